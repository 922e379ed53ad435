ALTER TABLE sandboxes ADD COLUMN idle_timeout BIGINT;
