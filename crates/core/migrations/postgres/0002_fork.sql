ALTER TABLE sandboxes ADD COLUMN parent TEXT;
ALTER TABLE sandboxes ADD COLUMN resource_id TEXT;
CREATE INDEX sandboxes_parent ON sandboxes(parent);
