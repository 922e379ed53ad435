-- Seconds without calls after which a sandbox ends as on timeout (NULL: never).
ALTER TABLE sandboxes ADD COLUMN idle_timeout INTEGER;
