//! Wiring: the shared [`AppState`], the router with its middleware, and [`run`], which starts
//! the API and the background workers and stops them on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request, StatusCode};
use axum::response::IntoResponse;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::changes::Change;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::db::batch::Batcher;
use crate::db::{Database, Dialect};
use crate::delivery::Engine;
use crate::events::RecordJob;
use crate::events::catalog::Catalog;
use crate::gateway::Gateway;
use crate::gateway::invoke::PersistInvocation;
use crate::http::ApiError;
use crate::http::error::{method_not_allowed_fallback, not_found_fallback};
use crate::policy::Policy;
use crate::rate::SharedBuckets;
use crate::registry::validators::Validators;
use crate::rules::Rules;
use crate::{
    agents, audit, console, delivery, events, gateway, mcp, ops, policy, registry, rules, telemetry, tenants,
};

/// Everything a handler or worker needs, shared: a clone (every request makes a few) is one
/// reference count, not one per part.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The database.
    pub db: Database,
    /// Encrypts and decrypts secrets at rest.
    pub keys: MasterKey,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The delivery engine.
    pub engine: Engine,
    /// Group-commit writer for ingested events.
    pub event_writes: Batcher<RecordJob>,
    /// Group-commit writer for accepted invocations.
    pub invocation_writes: Batcher<PersistInvocation>,
    /// Role policy.
    pub policy: Arc<Policy>,
    /// Agent gateway state.
    pub gateway: Arc<Gateway>,
    /// Rule validation and compiled rule sets.
    pub rules: Arc<Rules>,
    /// The event catalog.
    pub catalog: Arc<Catalog>,
    /// Admin key lookups by hash (revocations through this process clear it at once; through
    /// another replica within a second).
    pub api_keys: Arc<ApiKeyCache>,
    /// Slots for API requests in progress (see `max_requests_in_flight`).
    pub request_slots: Arc<tokio::sync::Semaphore>,
    /// Whether this process is its database's only server (held for as long as it runs).
    pub server_lock: crate::db::ServerLock,
    /// Held shared by every admin change while it runs in its own task (its client may be gone);
    /// shutdown takes it exclusively to let them finish.
    pub unfinished_changes: Arc<tokio::sync::RwLock<()>>,
    /// Set when shutdown begins: long-lived answers (MCP's event streams) end, so that the
    /// server's wait for its connections to close does not last as long as their clients.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Cached admin key lookups: hash → (key id, tenant id, role), or `None` for no such live key.
pub type ApiKeyCache = crate::cache::TtlCache<String, Option<(String, String, String)>>;

impl AppState {
    /// Connects to the database, loads the master key and applies the declarative files.
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        let server_lock = crate::db::ServerLock::take(&config.database_url)
            .with_context(|| format!("cannot lock {}", config.database_url))?;
        Self::open_locked(config, server_lock).await
    }

    /// Like [`open`](Self::open), with the server lock already taken (`opsiq serve` takes it
    /// first, to refuse a contended database before starting anything).
    pub async fn open_locked(config: Config, server_lock: crate::db::ServerLock) -> anyhow::Result<Self> {
        crate::crypto::install_tls_provider();
        check_inline_master_key(&config)?;
        let db = Database::connect(&config.database_url)
            .await
            .with_context(|| "cannot open the database")?;
        db.prioritize_writer(config.sqlite_writer_nice);
        let (keys, created) =
            tenants::open_master_key(&db, config.master_key.as_deref(), &config.master_key_file, true)
                .await?;
        if created {
            tracing::warn!(
                path = %config.master_key_file.display(),
                "created a new master key file; keep it with the database, secrets cannot be read without it"
            );
        }
        let config = Arc::new(config);
        // A binary started outside the checkout finds no example actions or roles: say so, or
        // every call is refused without a word why.
        for (dir, what) in [
            (&config.actions_dir, "actions_dir"),
            (&config.policies_dir, "policies_dir"),
        ] {
            if !dir.is_dir() {
                tracing::warn!(path = %dir.display(), "{what} does not exist; starting without its files");
            }
        }
        let policy = Arc::new(Policy::from_dir(&config.policies_dir)?);
        let validators = Arc::new(Validators::default());
        let catalog = Arc::new(Catalog::load(&config.events_dir, config.cache_ttl)?);
        let limits = crate::rules::apply::EmitLimits {
            max_bytes: config.body_limit,
            max_depth: config.max_json_depth,
        };
        let rules = Arc::new(Rules::new(config.cache_ttl, catalog.clone(), limits));
        // Replicas share their rate limits' buckets through the database; a sole server keeps
        // them in memory.
        let shared_rates =
            (db.dialect() == Dialect::Postgres).then(|| Arc::new(SharedBuckets::new(db.clone())));
        let (engine, receivers) = Engine::new(
            db.clone(),
            keys.clone(),
            config.clone(),
            (validators.clone(), rules.clone()),
            shared_rates.clone(),
        );
        // SQLite has one writer connection, but a batch takes it only to send: with two writer
        // tasks one builds its batch while the other's is being written.
        let writers = match db.dialect() {
            Dialect::Sqlite => 2,
            Dialect::Postgres => 4,
        };
        let state = Self(Arc::new(Shared {
            event_writes: Batcher::start(db.clone(), writers),
            invocation_writes: Batcher::start(db.clone(), writers),
            gateway: Arc::new(Gateway::new(
                validators,
                (config.agent_rate_per_s, config.action_rate_per_s),
                shared_rates.clone(),
                server_lock.is_sole(),
                config.cache_ttl,
            )),
            server_lock,
            rules,
            api_keys: Arc::new(ApiKeyCache::new(config.cache_ttl)),
            request_slots: Arc::new(tokio::sync::Semaphore::new(config.max_requests_in_flight)),
            unfinished_changes: Arc::default(),
            stopping: Arc::default(),
            catalog,
            policy,
            config,
            db,
            keys,
            metrics: telemetry::metrics_handle(),
            engine,
        }));
        state.apply_declarative_files().await?;
        state.engine.start(receivers);
        Ok(state)
    }

    async fn apply_declarative_files(&self) -> anyhow::Result<()> {
        let actions = registry::files::read_action_files(&self.config.actions_dir)?;
        for tenant_id in tenants::all_tenant_ids(&self.db).await? {
            let changed =
                registry::files::apply_to_tenant(&self.db, self.keys.audit_chain_key(), &tenant_id, &actions)
                    .await?;
            if changed > 0 {
                tracing::info!(tenant_id, changed, "applied action files");
                // Replicas still running (a rolling start) hold the old declarations.
                crate::changes::publish(&self.db, &Change::Actions(tenant_id.clone())).await;
            }
        }
        Ok(())
    }

    /// On a database with no tenant at all, creates the "default" tenant so a first `serve`
    /// is usable at once; returns it (with its owner key, to be shown once).
    pub async fn bootstrap_first_tenant(&self) -> anyhow::Result<Option<tenants::NewTenant>> {
        if !tenants::all_tenant_ids(&self.db).await?.is_empty() {
            return Ok(None);
        }
        let created = match tenants::create_tenant(&self.db, &self.keys, "default", "opsiq serve").await {
            Ok(created) => created,
            // Another replica starting at the same moment made it.
            Err(tenants::TenantError::NameTaken) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let actions = registry::files::read_action_files(&self.config.actions_dir)?;
        registry::files::apply_to_tenant(
            &self.db,
            self.keys.audit_chain_key(),
            &created.tenant_id,
            &actions,
        )
        .await?;
        Ok(Some(created))
    }

    /// Forgets what this process cached about a committed change and tells the other replicas.
    pub async fn changed(&self, change: Change) {
        self.forget(&change);
        let db = self.db.clone();
        // In a task of its own: a client hanging up must not cancel telling the others.
        let _ = tokio::spawn(async move { crate::changes::publish(&db, &change).await }).await;
    }

    /// Forgets what this process cached about a change.
    pub fn forget(&self, change: &Change) {
        match change {
            Change::Actions(_) => self.gateway.actions.clear(),
            Change::Endpoint(_, endpoint_id) => self.engine.forget_endpoint(endpoint_id),
            Change::Rules(tenant_id) => self.rules.changed(tenant_id),
            Change::EventTypes(tenant_id) => self.catalog.forget(tenant_id),
            Change::ApiKeys => self.api_keys.clear(),
            Change::TokenIssuer(_) => self.gateway.jwks.clear(),
        }
    }

    /// Forgets every cached piece of configuration (after changes may have been missed).
    pub fn forget_everything(&self) {
        self.gateway.actions.clear();
        self.engine.forget_endpoints();
        self.rules.forget_all();
        self.catalog.forget_all();
        self.api_keys.clear();
        self.gateway.jwks.clear();
    }
}

/// The API's operations that take no query parameters, as the OpenAPI document says.
fn query_free_routes() -> crate::http::query_guard::QueryFreeRoutes {
    let document = serde_json::from_str(crate::ops::OPENAPI).unwrap_or_default();
    crate::http::query_guard::QueryFreeRoutes::from_openapi(&document)
}

/// The complete router with its middleware.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let api = Router::new()
        .merge(tenants::routes())
        .merge(registry::routes())
        .merge(delivery::routes())
        .merge(events::routes())
        .merge(events::catalog::routes())
        .merge(rules::routes())
        .merge(agents::routes())
        .merge(policy::routes())
        .merge(gateway::routes())
        .merge(mcp::routes(&state.config.mcp_allowed_origins))
        .merge(audit::routes())
        // Inside the audit layer, which runs a change in a task of its own: a change keeps its
        // request slot until it ends, even if its client has gone.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), shed_load))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record_changes,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            query_free_routes(),
            crate::http::query_guard::refuse_unread_query,
        ));
    let app = Router::new()
        .merge(ops::routes())
        .merge(mcp::resource_metadata::routes())
        .merge(console::routes())
        .merge(api)
        .fallback(not_found_fallback)
        .method_not_allowed_fallback(method_not_allowed_fallback)
        .layer(axum::middleware::from_fn(
            crate::http::keep_alive::close_if_body_unread,
        ))
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .layer(axum::middleware::from_fn(
            crate::http::head_limits::refuse_oversized_head,
        ))
        .layer(axum::middleware::from_fn(telemetry::http_metrics))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the server failed to handle this request",
            )
            .into_response()
        }))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri().path(), request_id = %id)
        }))
        .layer(SetSensitiveRequestHeadersLayer::new([
            axum::http::header::AUTHORIZATION,
        ]))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state);
    console::with_security_headers(app)
}

/// Refuses an API request with 503 when `max_requests_in_flight` are already in progress:
/// under overload an immediate, retryable refusal beats a queue that grows without bound.
async fn shed_load(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Ok(_slot) = state.request_slots.clone().try_acquire_owned() else {
        metrics::counter!("opsiq_requests_shed_total").increment(1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the server is at its limit of requests in progress; retry shortly",
        )
        .with_retry_after(1)
        .into_response();
    };
    next.run(request).await
}

/// Runs the gateway on `listener` until `shutdown` resolves, then drains and stops.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::open(config).await?;
    serve(state, listener, shutdown).await
}

/// Serves an opened state (the binary opens it first to report start-up errors early).
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let db = state.db.clone();
    let engine = state.engine.clone();
    let unfinished_changes = state.unfinished_changes.clone();
    let changes = crate::changes::spawn_listener(state.clone());
    let timeouts = (state.config.read_timeout, state.config.shutdown_timeout);
    let stopping = state.stopping.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let app = router(state);
    crate::http::server::serve(listener, app, timeouts, shutdown).await;
    // Changes whose clients left before the answer are not connections graceful shutdown
    // waits for; wait for them here, before the change feed and the database go.
    tokio::time::timeout(Duration::from_secs(10), unfinished_changes.write())
        .await
        .ok();
    if let Some(changes) = changes {
        changes.abort();
    }
    // Requests are answered: let attempts under way finish and record their outcomes.
    engine.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), db.close())
        .await
        .ok();
    Ok(())
}

/// Refuses a malformed `OPSIQ_MASTER_KEY` before a database file is made for it.
fn check_inline_master_key(config: &Config) -> anyhow::Result<()> {
    if let Some(inline) = &config.master_key {
        MasterKey::from_base64(inline)?;
    }
    Ok(())
}

/// `opsiq init`: creates the database (and master key file) if needed, then a tenant with an
/// owner key. Without `tenant`, creates "default" and refuses if it already exists.
pub async fn init(config: &Config, tenant: Option<&str>) -> anyhow::Result<tenants::NewTenant> {
    check_inline_master_key(config)?;
    let db = Database::connect(&config.database_url)
        .await
        .with_context(|| "cannot open the database")?;
    let (keys, _) =
        tenants::open_master_key(&db, config.master_key.as_deref(), &config.master_key_file, true).await?;
    let actions = registry::files::read_action_files(&config.actions_dir)?;
    let name = tenant.unwrap_or("default");
    let created = match tenants::create_tenant(&db, &keys, name, "opsiq init").await {
        Err(tenants::TenantError::NameTaken) if tenant.is_none() => {
            anyhow::bail!("this database is already initialised; use --tenant NAME to add another tenant")
        }
        other => other?,
    };
    registry::files::apply_to_tenant(&db, keys.audit_chain_key(), &created.tenant_id, &actions).await?;
    db.close().await;
    Ok(created)
}
