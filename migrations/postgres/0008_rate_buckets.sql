-- Token buckets shared by replicas (the gateway's per-agent and per-action limits, endpoints'
-- delivery rates). Tokens are counted in thousandths; times are the database's clock, in
-- microseconds, so that replicas' clocks need not agree. Unlogged: a take's commit waits for no
-- WAL flush, and buckets lost in a crash or a failover only start full again. Every take
-- updates its row: room on the page lets the update stay there (a HOT update, no index touched).
CREATE UNLOGGED TABLE rate_buckets (
    key TEXT PRIMARY KEY,
    tokens_milli BIGINT NOT NULL,
    refilled_at_us BIGINT NOT NULL
) WITH (fillfactor = 70);

-- Refills the bucket `bucket` (`rate` tokens a second, at most `burst`) for the time since it
-- was last touched and takes up to `wanted` whole tokens from it. Returns how many were taken
-- and the thousandths left. A bucket not seen before starts full. A row held by someone else for
-- over a second is an error (55P03), not a wait that keeps the caller's connection.
CREATE FUNCTION opsiq_take_tokens(bucket TEXT, burst BIGINT, rate BIGINT, wanted BIGINT,
                                  OUT granted BIGINT, OUT left_milli BIGINT) AS $$
DECLARE
    held BIGINT;
    since BIGINT;
    now_us BIGINT;
BEGIN
    LOOP
        SELECT tokens_milli, refilled_at_us INTO held, since
        FROM rate_buckets WHERE key = bucket FOR UPDATE;
        EXIT WHEN FOUND;
        -- Not there (new, or purged as idle a moment ago): make it, then lock it.
        INSERT INTO rate_buckets (key, tokens_milli, refilled_at_us)
        VALUES (bucket, burst * 1000, (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT)
        ON CONFLICT (key) DO NOTHING;
    END LOOP;
    -- Read the clock once the row is ours, so that refills never go back in time.
    now_us := (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT;
    -- A minute refills any bucket this server makes (its burst is at most a second's worth),
    -- and keeps the product below BIGINT's range.
    held := least(burst * 1000, held + least(greatest(now_us - since, 0), 60000000) * rate / 1000);
    granted := least(wanted, held / 1000);
    left_milli := held - granted * 1000;
    UPDATE rate_buckets SET tokens_milli = left_milli, refilled_at_us = greatest(now_us, since)
    WHERE key = bucket;
END;
$$ LANGUAGE plpgsql SET lock_timeout = '1s';
