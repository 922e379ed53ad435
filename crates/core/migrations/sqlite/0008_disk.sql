-- Disk limit of each sandbox's own writes (MiB).
ALTER TABLE sandboxes ADD COLUMN disk_mb INTEGER NOT NULL DEFAULT 8192;
