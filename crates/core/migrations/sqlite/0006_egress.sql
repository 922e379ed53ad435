-- The egress allowlist of a sandbox with a network link (JSON array), else NULL.
ALTER TABLE sandboxes ADD COLUMN egress TEXT;
