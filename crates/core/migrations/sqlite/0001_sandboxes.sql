-- Every sandbox ever created; rows are never deleted, only marked ended.
CREATE TABLE sandboxes (
    id          TEXT PRIMARY KEY NOT NULL,
    runtime     TEXT NOT NULL,
    template    TEXT NOT NULL,
    status      TEXT NOT NULL,
    cpu         REAL NOT NULL,
    memory_mb   INTEGER NOT NULL,
    timeout_s   INTEGER NOT NULL,
    metadata    TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    ended_at    TEXT,
    end_reason  TEXT,
    boot_ms     REAL NOT NULL DEFAULT 0,
    host_pid    INTEGER
);
CREATE INDEX sandboxes_status ON sandboxes(status);
