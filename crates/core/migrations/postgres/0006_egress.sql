ALTER TABLE sandboxes ADD COLUMN egress TEXT;
