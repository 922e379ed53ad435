ALTER TABLE tokens ADD COLUMN expires_at TEXT;
