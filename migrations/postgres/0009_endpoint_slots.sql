-- Endpoints' `max_in_flight`, held across replicas: an attempt to a capped endpoint holds one
-- of its slots while it is sent. A slot lapses at `expires_at_us` (the database's clock, in
-- microseconds), so one held by a replica that died is free again after a lease; `holder` names
-- the process, which gives back what it still holds when it stops. Unlogged: slots lost in a
-- crash or a failover only let their endpoint's cap be reached once more.
CREATE UNLOGGED TABLE endpoint_slots (
    slot_id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires_at_us BIGINT NOT NULL
);
CREATE INDEX endpoint_slots_by_endpoint ON endpoint_slots (endpoint_id);

-- Takes the slot `slot` of `endpoint` for `holder` and `lifetime_ms` if fewer than `cap` of its
-- slots are held (lapsed ones are dropped first), and answers whether it did; a refusal is
-- announced on `channel` (`wanted:<holder>:<endpoint>`), so that other replicas keeping idle
-- slots give them back. Takes of one endpoint run one at a time (a transaction-scoped advisory lock); one
-- waiting for over a second is an error (55P03), not a wait that keeps the caller's connection.
-- Taking a slot already held renews it; a refused one is not held.
CREATE FUNCTION opsiq_take_slot(endpoint TEXT, cap BIGINT, slot TEXT, holder TEXT, lifetime_ms BIGINT,
                                channel TEXT)
RETURNS BOOLEAN AS $$
DECLARE
    now_us BIGINT;
    held BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('opsiq_endpoint_slots/' || endpoint, 0));
    now_us := (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT;
    DELETE FROM endpoint_slots WHERE endpoint_id = endpoint AND expires_at_us <= now_us;
    SELECT count(*) INTO held FROM endpoint_slots WHERE endpoint_id = endpoint AND slot_id <> slot;
    IF held >= cap THEN
        DELETE FROM endpoint_slots WHERE slot_id = slot;
        PERFORM pg_notify(channel, 'wanted:' || holder || ':' || endpoint);
        RETURN FALSE;
    END IF;
    INSERT INTO endpoint_slots (slot_id, endpoint_id, holder, expires_at_us)
    VALUES (slot, endpoint, holder, now_us + lifetime_ms * 1000)
    ON CONFLICT (slot_id) DO UPDATE SET expires_at_us = EXCLUDED.expires_at_us;
    RETURN TRUE;
END;
$$ LANGUAGE plpgsql SET lock_timeout = '1s';
