-- API keys may expire: after expires_at (RFC 3339) a key authenticates nothing.
ALTER TABLE tokens ADD COLUMN expires_at TEXT;
