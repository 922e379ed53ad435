-- How long a node's sandboxes outlive it (its --orphan-grace, seconds; 0: forever):
-- after that the other nodes record them lost.
ALTER TABLE nodes ADD COLUMN orphan_grace_s BIGINT NOT NULL DEFAULT 0;
