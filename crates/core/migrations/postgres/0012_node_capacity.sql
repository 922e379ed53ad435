-- What a node offers, for placement: CPUs, memory, templates; a draining node takes
-- no new sandboxes.
ALTER TABLE nodes ADD COLUMN cpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN memory_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN templates TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN draining BOOLEAN NOT NULL DEFAULT FALSE;
