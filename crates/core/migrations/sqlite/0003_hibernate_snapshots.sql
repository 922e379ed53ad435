-- What a sandbox needs to be started again (wake), what its expiry does, and named
-- snapshots of root filesystems.
ALTER TABLE sandboxes ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'kill';
CREATE TABLE snapshots (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    sandbox_id  TEXT NOT NULL,
    template    TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
