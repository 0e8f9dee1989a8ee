//! `/v1/events`: ingestion with idempotency, listing and inspection.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::NewEvent;
use crate::db::{Arg, DbError, now_ms, parse_rfc3339, rfc3339};
use crate::http::{AdminAuth, ApiError, ApiResult, JsonBody, Page, Path, Permission, Query};
use crate::{AppState, args};

/// The event routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/events", get(list_events).post(ingest_event))
        .route("/v1/events/{id}", get(get_event))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestBody {
    #[serde(rename = "type")]
    event_type: String,
    data: Value,
    id: Option<String>,
}

/// The `Idempotency-Key` header, checked; sent twice it is refused (which one counts would be a
/// guess, and a wrong guess sends a call twice).
pub fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "send one Idempotency-Key header, not several",
        ));
    }
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| is_idempotency_key(k))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_string()))
}

/// Whether `key` is 1 to 255 visible ASCII characters, as an idempotency key must be.
pub fn is_idempotency_key(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(Debug, sqlx::FromRow)]
struct EventRow {
    id: String,
    #[sqlx(rename = "type")]
    event_type: String,
    body: String,
    source: String,
    rule_trace: Option<String>,
    created_at: i64,
}

impl EventRow {
    fn data(&self) -> Value {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|mut v| v.get_mut("data").map(Value::take))
            .unwrap_or(Value::Null)
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": self.event_type,
            "created_at": rfc3339(self.created_at),
            "data": self.data(),
            "source": self.source,
        })
    }
}

async fn find_by_key(
    state: &AppState,
    tenant_id: &str,
    key: &str,
) -> Result<Option<(EventRow, i64)>, DbError> {
    let row: Option<EventRow> = state
        .db
        .fetch_optional(
            "SELECT id, type, body, source, rule_trace, created_at FROM events WHERE tenant_id = $1 AND idempotency_key = $2",
            args![tenant_id, key],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let (n,): (i64,) = state
        .db
        .fetch_optional(
            "SELECT COUNT(*) FROM deliveries WHERE event_id = $1",
            args![&row.id],
        )
        .await?
        .unwrap_or((0,));
    Ok(Some((row, n)))
}

fn replayed(row: &EventRow, deliveries: i64, event_type: &str, data: &Value) -> ApiResult<Response> {
    // The same data is the same event however its numbers are spelled (`7`, `7.0`).
    if row.event_type != event_type || !crate::json::equal_by_value(&row.data(), data) {
        return Err(ApiError::conflict(
            "idempotency_conflict",
            "this Idempotency-Key was already used with a different event",
        ));
    }
    let mut resp = (
        StatusCode::ACCEPTED,
        axum::Json(json!({"event_id": row.id, "deliveries": deliveries})),
    )
        .into_response();
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(resp)
}

async fn ingest_event(
    State(state): State<AppState>,
    auth: AdminAuth,
    headers: HeaderMap,
    body: JsonBody,
) -> ApiResult<Response> {
    auth.require(Permission::IngestEvents)?;
    let body: IngestBody = body.parse()?;
    super::check_own_event_type(&body.event_type).map_err(|m| ApiError::invalid_field("/type", m))?;
    if !body.data.is_object() {
        return Err(ApiError::invalid_field("/data", "must be a JSON object"));
    }
    // The id stands in for an Idempotency-Key: it is the same key, held to the same rules.
    if body.id.as_deref().is_some_and(|id| !is_idempotency_key(id)) {
        return Err(ApiError::invalid_field(
            "/id",
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    state
        .catalog
        .validate(&state.db, &auth.tenant_id, &body.event_type, &body.data)
        .await?;
    let rules = state
        .rules
        .context(&state.db, &auth.tenant_id, &state.gateway.validators)
        .await?;
    let key = match idempotency_key(&headers)? {
        Some(k) => Some(k),
        None => body.id.clone(),
    };
    // Before body ids and headers shared one key, a body id was stored as `id:<id>`: an event
    // stored so is still that id's event, for as long as events are kept.
    if let (None, Some(id)) = (headers.get("idempotency-key"), &body.id)
        && let Some((row, n)) = find_by_key(&state, &auth.tenant_id, &format!("id:{id}")).await?
    {
        return replayed(&row, n, &body.event_type, &body.data);
    }
    // No read before the write: a repeated key is caught by the unique index and answered below.
    let event = NewEvent {
        tenant_id: auth.tenant_id.clone(),
        event_type: body.event_type.clone(),
        data: body.data.clone(),
        idempotency_key: key.clone(),
        source: "api".into(),
        depth: 0,
        emitted: Default::default(),
        fanout: super::Fanout::Among(state.engine.subscribers(&auth.tenant_id).await?),
        rules,
    };
    let job = super::RecordJob {
        event,
        lease: state.engine.lease(),
        now: now_ms(),
    };
    let recorded = match state.event_writes.submit(job).await {
        Ok(r) => r,
        Err(e) if e.is_unique_violation() => {
            // A concurrent request with the same key won the race: answer with its event.
            let key = key.unwrap_or_default();
            let (row, n) = find_by_key(&state, &auth.tenant_id, &key)
                .await?
                .ok_or_else(|| ApiError::internal("idempotent event vanished"))?;
            return replayed(&row, n, &body.event_type, &body.data);
        }
        Err(e) => return Err(e.into()),
    };
    // The event's own deliveries, as a replay of its key counts them.
    let count = recorded
        .deliveries
        .iter()
        .filter(|d| d.event_id.as_deref() == Some(recorded.id.as_str()))
        .count();
    state.engine.dispatch(recorded.deliveries).await;
    metrics::counter!("opsiq_events_ingested_total").increment(1);
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"event_id": recorded.id, "deliveries": count})),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventFilter {
    #[serde(rename = "type")]
    event_type: Option<String>,
    since: Option<String>,
    #[serde(default, deserialize_with = "crate::http::page::limit")]
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_events(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(filter): Query<EventFilter>,
) -> ApiResult<axum::Json<Page<Value>>> {
    auth.require(Permission::Read)?;
    let limit = crate::http::page::page_size(filter.limit);
    let mut sql = String::from(
        "SELECT id, type, body, source, rule_trace, created_at FROM events WHERE tenant_id = $1 AND id < $2",
    );
    let mut values: Vec<Arg> = args![
        &auth.tenant_id,
        crate::http::page::newest_first_cursor(filter.cursor.as_deref(), "evt")?
    ];
    // A type, or a pattern as subscriptions take them (`invoice.*`, `*`).
    if let Some(t) = &filter.event_type {
        crate::delivery::endpoints::check_pattern(t)
            .map_err(|m| ApiError::bad_request("invalid_query", m))?;
        match t.strip_suffix('*') {
            Some("") => {}
            Some(prefix) => {
                // The length is ours, written in: a bound integer would be int8 on PostgreSQL,
                // for which `substr` has no form.
                values.push(prefix.into());
                sql.push_str(&format!(
                    " AND substr(type, 1, {}) = ${}",
                    prefix.len(),
                    values.len()
                ));
            }
            None => {
                values.push(t.into());
                sql.push_str(&format!(" AND type = ${}", values.len()));
            }
        }
    }
    if let Some(since) = &filter.since {
        let ms = parse_rfc3339(since)
            .ok_or_else(|| ApiError::bad_request("invalid_query", "since must be an RFC 3339 time"))?;
        values.push(crate::ids::time_floor("evt", ms).into());
        sql.push_str(&format!(" AND id >= ${}", values.len()));
    }
    values.push((limit + 1).into());
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", values.len()));
    let rows: Vec<EventRow> = state.db.fetch_all(sqlx::AssertSqlSafe(sql), values).await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

#[derive(Debug, sqlx::FromRow)]
struct EventDelivery {
    id: String,
    endpoint_id: String,
    status: String,
    attempts: i64,
}

async fn get_event(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let row: EventRow = state
        .db
        .fetch_optional(
            "SELECT id, type, body, source, rule_trace, created_at FROM events WHERE tenant_id = $1 AND id = $2",
            args![&auth.tenant_id, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("event"))?;
    let deliveries: Vec<EventDelivery> = state
        .db
        .fetch_all(
            "SELECT id, endpoint_id, status, attempts FROM deliveries WHERE event_id = $1 AND tenant_id = $2 ORDER BY id",
            args![&id, &auth.tenant_id],
        )
        .await?;
    let mut body = row.to_json();
    body["deliveries"] = deliveries
        .iter()
        .map(
            |d| json!({"id": d.id, "endpoint_id": d.endpoint_id, "status": d.status, "attempts": d.attempts}),
        )
        .collect();
    let mut trace = stored_trace(&state, &auth.tenant_id, row.rule_trace.as_deref()).await?;
    // Stored traces hold flags only; the rules (as they are now) name their conditions.
    let ids: Vec<String> = trace
        .iter()
        .filter_map(|entry| entry["rule_id"].as_str().map(str::to_string))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rules = state.rules.rules_now(&state.db, &auth.tenant_id, &ids).await?;
    for entry in &mut trace {
        if let Some(rule) = entry["rule_id"].as_str().and_then(|id| rules.get(id)) {
            rule.expand(entry);
        }
    }
    body["rules"] = Value::Array(trace);
    Ok(axum::Json(body))
}

/// The trace entries stored with an event: a list of entries (when some rule matched), or a
/// compact trace naming its candidate set (see [`crate::rules::engine::compact_trace`]).
async fn stored_trace(state: &AppState, tenant_id: &str, text: Option<&str>) -> ApiResult<Vec<Value>> {
    let Some(stored) = text.and_then(|t| serde_json::from_str::<Value>(t).ok()) else {
        return Ok(Vec::new());
    };
    if let Value::Array(entries) = stored {
        return Ok(entries);
    }
    let (Some(set_id), Some(flags)) = (stored["set"].as_str(), stored["flags"].as_str()) else {
        return Ok(Vec::new());
    };
    let rule_ids: Option<(String,)> = state
        .db
        .fetch_optional(
            "SELECT rule_ids FROM rule_sets WHERE tenant_id = $1 AND id = $2",
            args![tenant_id, set_id],
        )
        .await?;
    let rule_ids: Vec<String> = rule_ids
        .and_then(|(ids,)| serde_json::from_str(&ids).ok())
        .unwrap_or_default();
    Ok(crate::rules::engine::expand_compact(&rule_ids, flags).unwrap_or_default())
}
