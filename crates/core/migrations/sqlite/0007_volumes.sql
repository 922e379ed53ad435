-- Persistent volumes, and the volumes each sandbox mounts (JSON [{id, mount}]).
CREATE TABLE volumes (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    size_mb     INTEGER NOT NULL,
    workspace   TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
ALTER TABLE sandboxes ADD COLUMN volumes TEXT NOT NULL DEFAULT '[]';
