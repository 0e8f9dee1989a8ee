-- Endpoints and rules carry a version, bumped by every change to them, so that a change can be
-- made conditional on the version it was based on (If-Match), as for actions.
ALTER TABLE endpoints ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
ALTER TABLE rules ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
