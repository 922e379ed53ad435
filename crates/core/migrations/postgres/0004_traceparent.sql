ALTER TABLE sandboxes ADD COLUMN traceparent TEXT;
