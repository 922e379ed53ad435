-- Fork lineage and the runtime resources a record points at (a merge swaps them).
ALTER TABLE sandboxes ADD COLUMN parent TEXT;
ALTER TABLE sandboxes ADD COLUMN resource_id TEXT;
CREATE INDEX sandboxes_parent ON sandboxes(parent);
