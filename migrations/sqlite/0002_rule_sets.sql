-- The candidate rules an event type had when events were checked: a stored trace names its set
-- and keeps only flags, instead of every rule id for every event.
CREATE TABLE rule_sets (
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    id          TEXT NOT NULL,
    rule_ids    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
