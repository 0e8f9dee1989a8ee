//! HTTP routes of the delivery capability: endpoints and their secrets, the delivery log with
//! replay and recover, previews of signed requests, and signature verification.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::endpoints::{self, EndpointInput};
use super::outbox;
use super::signing::{self, Carries, SignedAttempt};
use super::verify;
use crate::changes::Change;
use crate::db::{Arg, Versioned, now_ms, parse_rfc3339, rfc3339};
use crate::events::{self, NewEvent};
use crate::http::{
    AdminAuth, ApiError, ApiResult, IfMatch, Json, JsonBody, OptionalJsonBody, Page, PageQuery, Path,
    Permission, Query,
};
use crate::{AppState, args};

/// The delivery routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/endpoints", get(list_endpoints).post(create_endpoint))
        .route(
            "/v1/endpoints/{id}",
            get(get_endpoint).patch(update_endpoint).delete(delete_endpoint),
        )
        .route("/v1/endpoints/{id}/secret", get(get_secret))
        .route("/v1/endpoints/{id}/rotate-secret", post(rotate_secret))
        .route("/v1/endpoints/{id}/test", post(test_endpoint))
        .route("/v1/endpoints/{id}/recover", post(recover_endpoint))
        .route("/v1/deliveries", get(list_deliveries))
        .route("/v1/deliveries/{id}", get(get_delivery))
        .route("/v1/deliveries/{id}/replay", post(replay_delivery))
        .route("/v1/preview", post(preview))
        .route("/v1/signatures/verify", post(verify_signature))
}

async fn load_endpoint(state: &AppState, auth: &AdminAuth, id: &str) -> ApiResult<endpoints::EndpointRow> {
    endpoints::get(&state.db, &auth.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))
}

async fn create_endpoint(
    State(state): State<AppState>,
    auth: AdminAuth,
    input: JsonBody,
) -> ApiResult<impl IntoResponse> {
    auth.require(Permission::Manage)?;
    let mut input: EndpointInput = input.parse()?;
    endpoints::check_input(&mut input, true, state.config.dev)?;
    let (row, secret) = endpoints::create(&state.db, &state.keys, &auth.tenant_id, input).await?;
    state
        .changed(Change::Endpoint(auth.tenant_id.clone(), row.id.clone()))
        .await;
    let mut body = row.to_json();
    body["secret"] = secret.into();
    Ok((StatusCode::CREATED, IfMatch::etag(row.version), axum::Json(body)))
}

async fn list_endpoints(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = page.limit();
    let rows: Vec<endpoints::EndpointRow> = state
        .db
        .fetch_all(
            "SELECT * FROM endpoints WHERE tenant_id = $1 AND deleted_at IS NULL AND id < $2 ORDER BY id DESC LIMIT $3",
            args![&auth.tenant_id, crate::http::page::newest_first_cursor(page.cursor.as_deref(), "ep")?, limit + 1],
        )
        .await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

async fn get_endpoint(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let row = load_endpoint(&state, &auth, &id).await?;
    Ok((IfMatch::etag(row.version), axum::Json(row.to_json())))
}

async fn update_endpoint(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    if_match: IfMatch,
    input: JsonBody,
) -> ApiResult<impl IntoResponse> {
    auth.require(Permission::Manage)?;
    let mut input: EndpointInput = input.parse()?;
    if input.secret.is_some() {
        return Err(ApiError::invalid_field(
            "/secret",
            "use POST /v1/endpoints/{id}/rotate-secret to change the secret",
        ));
    }
    endpoints::check_input(&mut input, false, state.config.dev)?;
    // Marked changed before the change commits as well as after: a delivery being deferred by
    // the old limits meanwhile then knows to make itself due again (see `worker::attempt`).
    state.engine.forget_endpoint(&id);
    let row = match endpoints::update(&state.db, &auth.tenant_id, &id, input, if_match.version()).await? {
        Versioned::Done(row) => row,
        Versioned::Missing => return Err(ApiError::not_found("endpoint")),
        Versioned::Changed(current) => return Err(ApiError::version_mismatch("endpoint", current)),
    };
    state
        .changed(Change::Endpoint(auth.tenant_id.clone(), id.clone()))
        .await;
    // New limits may have made waiting deliveries due now.
    state.engine.poke();
    Ok((IfMatch::etag(row.version), axum::Json(row.to_json())))
}

async fn delete_endpoint(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    if_match: IfMatch,
) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    match endpoints::delete(&state.db, &auth.tenant_id, &id, if_match.version()).await? {
        Versioned::Done(()) => {}
        Versioned::Missing => return Err(ApiError::not_found("endpoint")),
        Versioned::Changed(current) => return Err(ApiError::version_mismatch("endpoint", current)),
    }
    state
        .changed(Change::Endpoint(auth.tenant_id.clone(), id.clone()))
        .await;
    // The calls it owed are due now, to be failed.
    state.engine.poke();
    Ok(StatusCode::NO_CONTENT)
}

async fn get_secret(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    auth.require(Permission::Manage)?;
    let row = load_endpoint(&state, &auth, &id).await?;
    let now = now_ms();
    let mut body = json!({"secret": state.keys.open(&row.secret_enc)?});
    let retired = row
        .retired_secrets(now)
        .iter()
        .map(|r| Ok(json!({"secret": state.keys.open(&r.secret_enc)?, "expires_at": rfc3339(r.expires_at)})))
        .collect::<Result<Vec<Value>, crate::crypto::CryptoError>>()?;
    // The newest on its own too, as before there could be more than one.
    if let Some(newest) = retired.first() {
        body["previous_secret"] = newest["secret"].clone();
        body["previous_expires_at"] = newest["expires_at"].clone();
        body["previous_secrets"] = retired.into();
    }
    Ok(axum::Json(body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    secret: Option<String>,
    /// Every earlier secret stops signing at once instead of after the overlap.
    #[serde(default)]
    retire_previous: bool,
}

async fn rotate_secret(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: OptionalJsonBody,
) -> ApiResult<axum::Json<Value>> {
    auth.require(Permission::Manage)?;
    let body: Option<RotateBody> = body.parse()?;
    let (new_secret, retire_previous) = body.map(|b| (b.secret, b.retire_previous)).unwrap_or_default();
    if new_secret.is_some() {
        let mut input = EndpointInput {
            secret: new_secret.clone(),
            ..EndpointInput::default()
        };
        endpoints::check_input(&mut input, false, state.config.dev)?;
    }
    let retire = match retire_previous {
        true => endpoints::Retire::Now,
        false => endpoints::Retire::After(state.config.secret_overlap.as_millis() as i64),
    };
    let rotated =
        endpoints::rotate_secret(&state.db, &state.keys, &auth.tenant_id, &id, new_secret, retire).await?;
    let (secret, until) = match rotated {
        endpoints::Rotation::Done {
            secret,
            previous_expires_at,
        } => (secret, previous_expires_at),
        endpoints::Rotation::Missing => return Err(ApiError::not_found("endpoint")),
        endpoints::Rotation::SecretInUse => {
            return Err(ApiError::invalid_field(
                "/secret",
                "is already one of the endpoint's signing secrets; choose a new one",
            ));
        }
    };
    state
        .changed(Change::Endpoint(auth.tenant_id.clone(), id.clone()))
        .await;
    Ok(axum::Json(
        json!({"secret": secret, "previous_expires_at": until.map(rfc3339)}),
    ))
}

/// The body of a request that takes no options: absent, or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

/// 409 for sending to an endpoint that is disabled.
fn endpoint_disabled() -> ApiError {
    ApiError::conflict("endpoint_disabled", "the endpoint is disabled; enable it first")
}

async fn test_endpoint(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: OptionalJsonBody,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    auth.require(Permission::Manage)?;
    body.parse::<NoOptions>()?;
    let row = load_endpoint(&state, &auth, &id).await?;
    if !row.enabled {
        return Err(endpoint_disabled());
    }
    let event = NewEvent {
        tenant_id: auth.tenant_id.clone(),
        event_type: "opsiq.test".into(),
        data: json!({"message": "This is a test delivery from OpsIQ.", "endpoint_id": id}),
        idempotency_key: None,
        source: "test".into(),
        depth: 0,
        emitted: Default::default(),
        fanout: crate::events::Fanout::Only(id),
        rules: None,
    };
    let now = now_ms();
    let mut tx = state.db.begin().await?;
    let recorded = events::record(&mut tx, event, &state.engine.lease(), now).await?;
    tx.commit().await?;
    let delivery_id = recorded.deliveries.first().map(|d| d.id.clone());
    state.engine.dispatch(recorded.deliveries).await;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"event_id": recorded.id, "delivery_id": delivery_id})),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverBody {
    since: String,
}

async fn recover_endpoint(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: JsonBody,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    auth.require(Permission::Manage)?;
    let body: RecoverBody = body.parse()?;
    // Sent nowhere, recovered deliveries would only fail again, each with an alert.
    if !load_endpoint(&state, &auth, &id).await?.enabled {
        return Err(endpoint_disabled());
    }
    let since = parse_rfc3339(&body.since).ok_or_else(|| {
        ApiError::invalid_field("/since", "must be an RFC 3339 time like 2026-11-27T10:00:00Z")
    })?;
    let first_id = crate::ids::time_floor("dlv", since);
    let recovered = outbox::requeue_failed(&state.db, &auth.tenant_id, &id, &first_id, now_ms()).await?;
    state.engine.poke();
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"recovered": recovered}))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryFilter {
    status: Option<String>,
    endpoint_id: Option<String>,
    event_type: Option<String>,
    since: Option<String>,
    #[serde(default, deserialize_with = "crate::http::page::limit")]
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
struct DeliveryRow {
    id: String,
    endpoint_id: String,
    kind: String,
    event_id: Option<String>,
    invocation_id: Option<String>,
    label: String,
    idempotency_key: String,
    body: String,
    status: String,
    attempts: i64,
    next_attempt_at: i64,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl DeliveryRow {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "endpoint_id": self.endpoint_id,
            "kind": self.kind,
            "event_id": self.event_id,
            "invocation_id": self.invocation_id,
            "event_type": (self.kind == "event").then_some(&self.label),
            "action": (self.kind == "action").then_some(&self.label),
            "idempotency_key": self.idempotency_key,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": (self.status == "pending").then(|| rfc3339(self.next_attempt_at)),
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        })
    }
}

const DELIVERY_COLUMNS: &str = "id, endpoint_id, kind, event_id, invocation_id, label, idempotency_key, body, status, \
    attempts, next_attempt_at, last_status_code, last_error, created_at, updated_at";

async fn list_deliveries(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(filter): Query<DeliveryFilter>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = crate::http::page::page_size(filter.limit);
    let mut sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE tenant_id = $1 AND id < $2");
    let mut values: Vec<Arg> = args![
        &auth.tenant_id,
        crate::http::page::newest_first_cursor(filter.cursor.as_deref(), "dlv")?
    ];
    if let Some(status) = &filter.status {
        if !matches!(status.as_str(), "pending" | "delivering" | "succeeded" | "failed") {
            return Err(ApiError::bad_request(
                "invalid_query",
                "status must be pending, delivering, succeeded or failed",
            ));
        }
        values.push(status.into());
        sql.push_str(&format!(" AND status = ${}", values.len()));
    }
    if let Some(endpoint_id) = &filter.endpoint_id {
        values.push(endpoint_id.into());
        sql.push_str(&format!(" AND endpoint_id = ${}", values.len()));
    }
    if let Some(event_type) = &filter.event_type {
        if crate::events::check_event_type(event_type).is_err() {
            return Err(ApiError::bad_request(
                "invalid_query",
                "event_type must be an event type's name, like invoice.paid",
            ));
        }
        values.push(event_type.into());
        sql.push_str(&format!(" AND kind = 'event' AND label = ${}", values.len()));
    }
    if let Some(since) = &filter.since {
        let ms = parse_rfc3339(since)
            .ok_or_else(|| ApiError::bad_request("invalid_query", "since must be an RFC 3339 time"))?;
        values.push(crate::ids::time_floor("dlv", ms).into());
        sql.push_str(&format!(" AND id >= ${}", values.len()));
    }
    values.push((limit + 1).into());
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", values.len()));
    let rows: Vec<DeliveryRow> = state.db.fetch_all(sqlx::AssertSqlSafe(sql), values).await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

#[derive(Debug, sqlx::FromRow)]
struct AttemptRow {
    id: String,
    attempt: i64,
    url: String,
    request_headers: String,
    response_status: Option<i64>,
    response_headers: Option<String>,
    response_body: Option<String>,
    error_class: Option<String>,
    error_message: Option<String>,
    started_at: i64,
    duration_ms: i64,
}

async fn get_delivery(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let row: DeliveryRow = state
        .db
        .fetch_optional(
            sqlx::AssertSqlSafe(format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE tenant_id = $1 AND id = $2"
            )),
            args![&auth.tenant_id, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("delivery"))?;
    let attempts: Vec<AttemptRow> = state
        .db
        .fetch_all(
            "SELECT id, attempt, url, request_headers, response_status, response_headers, response_body, \
             error_class, error_message, started_at, duration_ms FROM delivery_attempts \
             WHERE delivery_id = $1 AND tenant_id = $2 ORDER BY attempt, started_at",
            args![&id, &auth.tenant_id],
        )
        .await?;
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    let mut body = row.to_json();
    body["body"] = row.body.clone().into();
    body["attempts_log"] = attempts
        .iter()
        .map(|a| {
            json!({
                "id": a.id,
                "attempt": a.attempt,
                "request": {"method": "POST", "url": a.url, "headers": parse(&a.request_headers), "body": row.body},
                "response": a.response_status.map(|status| json!({
                    "status": status,
                    "headers": a.response_headers.as_deref().map(parse),
                    "body": a.response_body,
                })),
                "error_class": a.error_class,
                "error": a.error_message,
                "started_at": rfc3339(a.started_at),
                "duration_ms": a.duration_ms,
            })
        })
        .collect();
    Ok(axum::Json(body))
}

async fn replay_delivery(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: OptionalJsonBody,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    auth.require(Permission::Manage)?;
    body.parse::<NoOptions>()?;
    // Whether the delivery's endpoint is there and enabled (NULL: deleted).
    let found: Option<(Option<bool>,)> = state
        .db
        .fetch_optional(
            "SELECT e.enabled FROM deliveries d LEFT JOIN endpoints e \
             ON e.tenant_id = d.tenant_id AND e.id = d.endpoint_id AND e.deleted_at IS NULL \
             WHERE d.tenant_id = $1 AND d.id = $2",
            args![&auth.tenant_id, &id],
        )
        .await?;
    match found {
        None => return Err(ApiError::not_found("delivery")),
        Some((None,)) => {
            return Err(ApiError::conflict(
                "endpoint_deleted",
                "the delivery's endpoint was deleted; there is nowhere to send it",
            ));
        }
        Some((Some(false),)) => return Err(endpoint_disabled()),
        Some((Some(true),)) => {}
    }
    let mut tx = state.db.begin().await?;
    let requeued = outbox::requeue(&mut tx, &auth.tenant_id, &id, now_ms()).await?;
    tx.commit().await?;
    if !requeued {
        return Err(ApiError::conflict(
            "delivery_in_flight",
            "the delivery is being sent right now; try again shortly",
        ));
    }
    state.engine.poke();
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"delivery_id": id, "status": "pending"})),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewBody {
    endpoint_id: Option<String>,
    event: Option<PreviewEvent>,
    action: Option<PreviewAction>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with the action's `name` and its `arguments`"
)]
struct PreviewAction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object with the event's `type` and `data`"
)]
struct PreviewEvent {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default = "crate::events::empty_data")]
    data: Value,
}

async fn preview(
    State(state): State<AppState>,
    auth: AdminAuth,
    body: JsonBody,
) -> ApiResult<axum::Json<Value>> {
    // A preview is signed with the endpoint's real secret: only those who may read it may ask.
    auth.require(Permission::Manage)?;
    let body: PreviewBody = body.parse()?;
    let now = now_ms();
    let delivery_id = crate::ids::new_id("dlv");
    match (body.event, body.action) {
        (Some(event), None) => {
            let Some(endpoint_id) = &body.endpoint_id else {
                return Err(ApiError::invalid_field(
                    "/endpoint_id",
                    "name the endpoint the event would go to",
                ));
            };
            let endpoint = load_endpoint(&state, &auth, endpoint_id).await?;
            events::catalog::check_sample_event(&state, &auth.tenant_id, &event.event_type, &event.data)
                .await?;
            let request_body =
                events::event_body(&crate::ids::new_id("evt"), &event.event_type, now, &event.data);
            let signed = sign_preview(
                &state,
                &endpoint,
                (&delivery_id, None),
                Carries::Event(&event.event_type),
                &request_body,
                now,
            )?;
            Ok(axum::Json(signed))
        }
        (None, Some(call)) => {
            let action = crate::registry::store::get(&state.db, &auth.tenant_id, &call.name)
                .await?
                .ok_or_else(|| ApiError::not_found("action"))?;
            let endpoint_id = body
                .endpoint_id
                .or_else(|| action.declaration.endpoint_id.clone())
                .ok_or_else(|| {
                    ApiError::invalid_field("/endpoint_id", "the action has no endpoint; name one")
                })?;
            let endpoint = load_endpoint(&state, &auth, &endpoint_id).await?;
            let problems = crate::gateway::invoke::validate_arguments(
                &state,
                &auth.tenant_id,
                &action,
                &call.arguments,
            )?;
            if !problems.is_empty() {
                // Pointed at where they are in this body, as an event's problems are.
                let problems = problems
                    .into_iter()
                    .map(|p| p.under("/action/arguments"))
                    .collect();
                return Err(ApiError::validation(
                    "the arguments do not match the action's input schema",
                    problems,
                ));
            }
            let caller = crate::gateway::invoke::Caller::Rule {
                tenant_id: auth.tenant_id.clone(),
                rule_id: "preview".into(),
            };
            let request_body = crate::gateway::invoke::action_request_body(
                &crate::ids::new_id("inv"),
                &action,
                &call.arguments,
                &caller,
                now,
            );
            let signed = sign_preview(
                &state,
                &endpoint,
                (&delivery_id, None),
                Carries::Action(&call.name),
                &request_body,
                now,
            )?;
            Ok(axum::Json(signed))
        }
        _ => Err(ApiError::invalid_field(
            "/",
            "give either an event {\"type\", \"data\"} with an endpoint_id, or an action {\"name\", \"arguments\"}",
        )),
    }
}

/// The exact request an endpoint would receive for `body`, signed with its current secrets;
/// `idempotency_key` is the one a real delivery would carry, derived from the delivery id when
/// not given (as for events).
pub fn sign_preview(
    state: &AppState,
    endpoint: &endpoints::EndpointRow,
    (delivery_id, idempotency_key): (&str, Option<String>),
    carries: Carries<'_>,
    body: &str,
    now: i64,
) -> ApiResult<Value> {
    let secrets = endpoint.signing_secrets(&state.keys, now)?;
    let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let parsed = reqwest::Url::parse(&endpoint.url).ok();
    let target = parsed.as_ref().map(signing::request_target).unwrap_or_default();
    let nonce = signing::generate_nonce();
    let idempotency_key = idempotency_key.unwrap_or_else(|| format!("idem_{}", &delivery_id[4..]));
    let headers = signing::signed_headers(
        endpoint.scheme(),
        &secret_refs,
        &SignedAttempt {
            delivery_id,
            idempotency_key: &idempotency_key,
            carries,
            attempt: 1,
            timestamp: now / 1000,
            nonce: &nonce,
            request_target: &target,
            body: body.as_bytes(),
        },
    );
    let transport = parsed.map(|u| super::outbound::transport_headers(&u, body.len()));
    let headers: serde_json::Map<String, Value> = headers
        .into_iter()
        .chain(transport.into_iter().flatten())
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    Ok(json!({"method": "POST", "url": endpoint.url, "headers": headers, "body": body}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    secret: Option<String>,
    #[serde(default)]
    secrets: Vec<String>,
    endpoint_id: Option<String>,
    request_target: Option<String>,
    url: Option<String>,
    headers: serde_json::Map<String, Value>,
    body: String,
    now: Option<i64>,
}

async fn verify_signature(
    State(state): State<AppState>,
    auth: AdminAuth,
    Json(req): Json<VerifyBody>,
) -> ApiResult<axum::Json<Value>> {
    // An empty secret verifies nothing anyone should trust (an HMAC under an empty key is no
    // proof of anything): a mistake to point out, not a secret to try.
    let blank = |s: &String| s.trim().is_empty();
    if req.secret.as_ref().is_some_and(blank) {
        return Err(ApiError::invalid_field("/secret", "must not be empty"));
    }
    if let Some(i) = req.secrets.iter().position(blank) {
        return Err(ApiError::invalid_field(
            &format!("/secrets/{i}"),
            "must not be empty",
        ));
    }
    if let Some((name, _)) = req.headers.iter().find(|(_, v)| !v.is_string()) {
        let path = format!("/headers/{}", crate::json::pointer_token(name));
        return Err(ApiError::invalid_field(
            &path,
            "a header's value must be a string",
        ));
    }
    let mut secrets = req.secrets.clone();
    secrets.extend(req.secret.clone());
    if let Some(endpoint_id) = &req.endpoint_id {
        auth.require(Permission::Manage)?;
        let endpoint = load_endpoint(&state, &auth, endpoint_id).await?;
        secrets.extend(endpoint.signing_secrets(&state.keys, now_ms())?);
    }
    if secrets.is_empty() {
        return Err(ApiError::invalid_field(
            "/secret",
            "give a secret, secrets or an endpoint_id to verify against",
        ));
    }
    let target = match (&req.request_target, &req.url) {
        (Some(t), _) => t.clone(),
        (None, Some(url)) => reqwest::Url::parse(url)
            .map(|u| signing::request_target(&u))
            .map_err(|_| ApiError::invalid_field("/url", "is not a URL"))?,
        (None, None) => {
            if req
                .headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("webhook-signature"))
            {
                String::new()
            } else {
                return Err(ApiError::invalid_field(
                    "/request_target",
                    "give the request target (path and query) or the url",
                ));
            }
        }
    };
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let now = req.now.unwrap_or_else(|| now_ms() / 1000);
    Ok(axum::Json(
        match verify::verify_request(&refs, &req.headers, &target, req.body.as_bytes(), now) {
            Ok(v) => json!({"valid": true, "scheme": v.scheme.as_str()}),
            Err(e) => json!({"valid": false, "reason": e.reason(), "message": e.to_string()}),
        },
    ))
}
