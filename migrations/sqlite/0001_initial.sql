-- The whole OpsIQ schema. Timestamps are unix milliseconds (INTEGER) and JSON is stored as TEXT,
-- so that one set of queries reads the same on SQLite and PostgreSQL.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    -- per-tenant HMAC key for gateway-minted agent JWTs, encrypted with the master key
    jwt_key_enc TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    key_prefix   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, id);

CREATE TABLE actions (
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    name         TEXT NOT NULL,
    id           TEXT NOT NULL UNIQUE,
    version      INTEGER NOT NULL,
    declaration  TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    source       TEXT NOT NULL,
    file_hash    TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    deleted_at   INTEGER,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE action_versions (
    tenant_id    TEXT NOT NULL,
    name         TEXT NOT NULL,
    version      INTEGER NOT NULL,
    declaration  TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, name, version)
);

CREATE TABLE agents (
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    id         TEXT NOT NULL,
    name       TEXT NOT NULL,
    roles      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE agent_tokens (
    jti        TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    agent_id   TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX agent_tokens_agent ON agent_tokens (tenant_id, agent_id);

CREATE TABLE token_issuers (
    tenant_id   TEXT PRIMARY KEY REFERENCES tenants(id),
    issuer      TEXT NOT NULL,
    audience    TEXT NOT NULL,
    config      TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE policy_rows (
    id        TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    subject   TEXT NOT NULL,
    object    TEXT NOT NULL,
    act       TEXT NOT NULL,
    effect    TEXT NOT NULL,
    position  INTEGER NOT NULL
);
CREATE INDEX policy_rows_tenant ON policy_rows (tenant_id, position);

-- A counter bumped on every policy or registry change, so replicas notice and reload.
CREATE TABLE change_counters (
    name    TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);

CREATE TABLE endpoints (
    id                     TEXT PRIMARY KEY,
    tenant_id              TEXT NOT NULL REFERENCES tenants(id),
    url                    TEXT NOT NULL,
    description            TEXT NOT NULL,
    event_types            TEXT NOT NULL,
    enabled                BOOLEAN NOT NULL,
    rate_limit_per_s       INTEGER,
    max_in_flight          INTEGER,
    signature_scheme       TEXT NOT NULL,
    secret_enc             TEXT NOT NULL,
    previous_secret_enc    TEXT,
    previous_expires_at    INTEGER,
    disabled_reason        TEXT,
    failing_since          INTEGER,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    deleted_at             INTEGER
);
CREATE INDEX endpoints_tenant ON endpoints (tenant_id, id);

CREATE TABLE event_types (
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    schema      TEXT,
    builtin     BOOLEAN NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    type            TEXT NOT NULL,
    body            TEXT NOT NULL,
    idempotency_key TEXT,
    source          TEXT NOT NULL,
    depth           INTEGER NOT NULL,
    rule_trace      TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX events_tenant ON events (tenant_id, id);
CREATE INDEX events_type ON events (tenant_id, type, id);
CREATE UNIQUE INDEX events_idempotency ON events (tenant_id, idempotency_key);

CREATE TABLE invocations (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    principal       TEXT NOT NULL,
    agent_id        TEXT,
    roles           TEXT NOT NULL,
    action_name     TEXT NOT NULL,
    action_version  INTEGER,
    action_hash     TEXT,
    arguments       TEXT NOT NULL,
    status          TEXT NOT NULL,
    result          TEXT,
    error           TEXT,
    idempotency_key TEXT,
    delivery_id     TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    completed_at    INTEGER
);
CREATE INDEX invocations_tenant ON invocations (tenant_id, id);
CREATE INDEX invocations_agent ON invocations (tenant_id, agent_id, id);

CREATE TABLE idempotency_records (
    tenant_id      TEXT NOT NULL,
    scope          TEXT NOT NULL,
    key            TEXT NOT NULL,
    request_hash   TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, scope, key)
);
CREATE INDEX idempotency_expiry ON idempotency_records (expires_at);

CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL REFERENCES tenants(id),
    endpoint_id      TEXT NOT NULL,
    kind             TEXT NOT NULL,
    event_id         TEXT,
    invocation_id    TEXT,
    label            TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    body             TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    schedule_index   INTEGER NOT NULL,
    cycle_started_at INTEGER,
    next_attempt_at  INTEGER NOT NULL,
    lease_until      INTEGER,
    leased_by        TEXT,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
-- Partial indexes: settled deliveries, the vast majority, are in neither.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_tenant ON deliveries (tenant_id, id);
CREATE INDEX deliveries_endpoint ON deliveries (tenant_id, endpoint_id, id);
CREATE INDEX deliveries_event ON deliveries (event_id);

-- Ids are time-ordered, so retention and "since" filters range over primary keys instead of
-- needing their own created_at indexes.
CREATE TABLE delivery_attempts (
    id               TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    delivery_id      TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    url              TEXT NOT NULL,
    request_headers  TEXT NOT NULL,
    response_status  INTEGER,
    response_headers TEXT,
    response_body    TEXT,
    error_class      TEXT,
    error_message    TEXT,
    started_at       INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE rules (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    name          TEXT NOT NULL,
    enabled       BOOLEAN NOT NULL,
    event_pattern TEXT NOT NULL,
    definition    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX rules_tenant ON rules (tenant_id, id);

CREATE TABLE approvals (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    invocation_id TEXT NOT NULL,
    status        TEXT NOT NULL,
    reason        TEXT,
    decided_by    TEXT,
    comment       TEXT,
    created_at    INTEGER NOT NULL,
    decided_at    INTEGER
);
CREATE INDEX approvals_tenant ON approvals (tenant_id, status, id);

CREATE TABLE audit_log (
    seq        INTEGER NOT NULL,
    tenant_id  TEXT NOT NULL,
    id         TEXT NOT NULL UNIQUE,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    details    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);

CREATE UNIQUE INDEX token_issuers_issuer ON token_issuers (issuer, audience);
CREATE INDEX deliveries_lease ON deliveries (lease_until) WHERE status = 'delivering';

CREATE TABLE mcp_sessions (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL,
    agent_id         TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    ended_at         INTEGER
);
