-- The runtime that took each snapshot: a vm snapshot is a whole guest (memory and
-- processes) only the vm runtime can start again. Existing ones are the jail's.
ALTER TABLE snapshots ADD COLUMN runtime TEXT NOT NULL DEFAULT 'jail';
