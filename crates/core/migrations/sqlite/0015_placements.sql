-- The node each volume and snapshot lives on (existing ones: the first server that
-- starts, whose they were), and the capacity placements in flight reserve: a row per
-- create placed but not yet recorded, until it is or `expires_ms` passes.
ALTER TABLE volumes ADD COLUMN node TEXT;
ALTER TABLE snapshots ADD COLUMN node TEXT;
CREATE TABLE placements (
    token       TEXT PRIMARY KEY NOT NULL,
    node        TEXT NOT NULL,
    memory_mb   BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
-- Secrets the nodes share: `forward` marks calls one node passes to another.
CREATE TABLE cluster_secrets (
    name        TEXT PRIMARY KEY NOT NULL,
    value       TEXT NOT NULL
);
