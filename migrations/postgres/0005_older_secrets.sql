-- Secrets rotated out before the previous one, still signing until their own overlap ends: a
-- JSON array of {"secret_enc", "expires_at"}, newest first. Rotating twice within the overlap
-- keeps every secret handed out in the window verifying, not just the last one.
ALTER TABLE endpoints ADD COLUMN older_secrets TEXT;
