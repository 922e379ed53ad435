-- Workspaces own sandboxes and snapshots; API keys (stored hashed) belong to one.
ALTER TABLE sandboxes ADD COLUMN workspace TEXT NOT NULL DEFAULT 'default';
ALTER TABLE snapshots ADD COLUMN workspace TEXT NOT NULL DEFAULT 'default';
CREATE INDEX sandboxes_workspace ON sandboxes(workspace);
CREATE TABLE workspaces (
    name            TEXT PRIMARY KEY NOT NULL,
    max_sandboxes   INTEGER,
    max_memory_mb   INTEGER,
    created_at      TEXT NOT NULL
);
INSERT INTO workspaces (name, created_at) VALUES ('default', strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    workspace   TEXT NOT NULL REFERENCES workspaces(name),
    name        TEXT NOT NULL,
    -- SHA-256 of the whole key, hex; the key itself is never stored.
    hash        TEXT NOT NULL UNIQUE,
    -- The key's first characters, to tell keys apart in listings.
    prefix      TEXT NOT NULL,
    admin       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
