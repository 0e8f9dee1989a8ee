-- The gateway's own deliveries have no event and its own events no idempotency key; leaving
-- those rows out of these two indexes saves index writes on every agent call. An event's
-- deliveries are listed in id order, which the index now gives without a sort (before, SQLite
-- preferred scanning the tenant's deliveries to avoid one).
DROP INDEX deliveries_event;
CREATE INDEX deliveries_event ON deliveries (event_id, id) WHERE event_id IS NOT NULL;
DROP INDEX events_idempotency;
CREATE UNIQUE INDEX events_idempotency ON events (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
