-- What a node offers, for placement: CPUs, memory, templates; a draining node takes
-- no new sandboxes.
ALTER TABLE nodes ADD COLUMN cpus INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN memory_mb INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN templates TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
