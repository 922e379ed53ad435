-- The W3C trace context a sandbox was created with; its work is logged under it.
ALTER TABLE sandboxes ADD COLUMN traceparent TEXT;
