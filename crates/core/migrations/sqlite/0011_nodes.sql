-- The node (server) that runs each sandbox; existing rows are claimed by the first
-- server that starts (they were its own).
ALTER TABLE sandboxes ADD COLUMN node TEXT;
CREATE INDEX sandboxes_node ON sandboxes(node);
CREATE TABLE nodes (
    name          TEXT PRIMARY KEY NOT NULL,
    url           TEXT NOT NULL,
    runtimes      TEXT NOT NULL DEFAULT '[]',
    started_at    TEXT NOT NULL,
    heartbeat_at  TEXT NOT NULL,
    sandboxes     INTEGER NOT NULL DEFAULT 0
);
