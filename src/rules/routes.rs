//! `/v1/rules`: create, read, list, replace, delete, and dry runs (`/test`) that show which
//! conditions held and the exact signed requests a rule would send — sending and writing nothing.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::engine::{CompiledRule, Output};
use crate::changes::Change;
use crate::db::{Versioned, now_ms, rfc3339, version_holds};
use crate::delivery::endpoints;
use crate::delivery::signing::Carries;
use crate::gateway::invoke::RuleCallVerdict;
use crate::http::{
    AdminAuth, ApiError, ApiResult, ErrorDetail, IfMatch, JsonBody, Page, PageQuery, Path, Permission, Query,
};
use crate::registry::store;
use crate::{AppState, args, ids};

/// The rule routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/rules", get(list_rules).post(create_rule))
        .route("/v1/rules/test", post(test_unsaved))
        .route(
            "/v1/rules/{id}",
            get(get_rule).put(replace_rule).delete(delete_rule),
        )
        .route("/v1/rules/{id}/test", post(test_saved))
}

#[derive(Debug, sqlx::FromRow)]
struct RuleRow {
    id: String,
    definition: String,
    created_at: i64,
    updated_at: i64,
    /// Bumped by every change; the `ETag` that `If-Match` names.
    version: i64,
}

impl RuleRow {
    fn to_json(&self) -> Value {
        let mut v: Value = serde_json::from_str(&self.definition).unwrap_or_else(|_| json!({}));
        // A rule sent without `enabled` runs: say so, rather than leave the reader to know it.
        if let Some(map) = v.as_object_mut() {
            map.entry("enabled").or_insert(Value::Bool(true));
        }
        v["id"] = self.id.clone().into();
        v["created_at"] = rfc3339(self.created_at).into();
        v["updated_at"] = rfc3339(self.updated_at).into();
        v["version"] = self.version.into();
        v
    }

    /// The answer to a read or a change: the rule and its `ETag`.
    fn answer(&self) -> impl IntoResponse + use<> {
        (IfMatch::etag(self.version), axum::Json(self.to_json()))
    }
}

/// Strips server-managed fields so a GET body can be PUT back.
fn definition_of(mut body: Value) -> Value {
    if let Some(map) = body.as_object_mut() {
        for f in ["id", "created_at", "updated_at", "version"] {
            map.remove(f);
        }
    }
    body
}

/// Schema, compilation, and references to endpoints and actions of this tenant.
async fn check_rule(
    state: &AppState,
    tenant_id: &str,
    id: &str,
    definition: &Value,
) -> ApiResult<CompiledRule> {
    let rule = state.rules.check(id, definition)?;
    let mut problems = Vec::new();
    for (i, output) in rule.outputs().iter().enumerate() {
        match output {
            Output::Deliver { endpoint_id } => {
                if endpoints::get(&state.db, tenant_id, endpoint_id).await?.is_none() {
                    problems.push(ErrorDetail {
                        path: format!("/then/{i}/deliver/endpoint_id"),
                        message: format!("no endpoint {endpoint_id} in this workspace"),
                    });
                }
            }
            Output::Invoke { action, arguments } => match store::get(&state.db, tenant_id, action).await? {
                None => problems.push(ErrorDetail {
                    path: format!("/then/{i}/invoke/action"),
                    message: format!("no action named {action} in this workspace"),
                }),
                Some(found) => {
                    let at = format!("/then/{i}/invoke/arguments");
                    let fixed = fixed_argument_problems(state, tenant_id, &found, arguments)?;
                    problems.extend(fixed.into_iter().map(|p| p.under(&at)));
                }
            },
            Output::Emit { event_type, .. } => {
                if let Err(message) = crate::events::check_own_event_type(event_type) {
                    problems.push(ErrorDetail {
                        path: format!("/then/{i}/emit/type"),
                        message,
                    });
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(rule)
    } else {
        Err(ApiError::validation(
            "the rule names endpoints, actions or event types it cannot use, or gives an action \
             arguments its input schema refuses",
            problems,
        ))
    }
}

/// What the action's input schema refuses in a rule's arguments whatever the event holds: its
/// complaints about the fixed values, without those a template (filled in from each event) could
/// cause or cure, that is, at or above or below a templated value.
fn fixed_argument_problems(
    state: &AppState,
    tenant_id: &str,
    action: &crate::registry::Action,
    arguments: &Value,
) -> ApiResult<Vec<ErrorDetail>> {
    let mut templated = Vec::new();
    templated_pointers(arguments, String::new(), &mut templated);
    let problems = crate::gateway::invoke::validate_arguments(state, tenant_id, action, arguments)?;
    // Pointers with the root as "" (errors write it "/"), so that it lies above every other.
    let below = |path: &str, above: &str| path.strip_prefix(above).is_some_and(|rest| rest.starts_with('/'));
    let related = |path: &str| {
        let path = if path == "/" { "" } else { path };
        templated
            .iter()
            .any(|t| path == t || below(path, t) || below(t, path))
    };
    Ok(problems.into_iter().filter(|p| !related(&p.path)).collect())
}

/// The JSON pointers of every string in `value` that holds a template.
fn templated_pointers(value: &Value, at: String, found: &mut Vec<String>) {
    match value {
        Value::String(s) if s.contains("{{") => found.push(at),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                templated_pointers(item, format!("{at}/{i}"), found);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let key = crate::json::pointer_token(key);
                templated_pointers(item, format!("{at}/{key}"), found);
            }
        }
        _ => {}
    }
}

async fn create_rule(
    State(state): State<AppState>,
    auth: AdminAuth,
    body: JsonBody,
) -> ApiResult<impl IntoResponse> {
    auth.require(Permission::Manage)?;
    let body: Value = body.parse()?;
    let definition = definition_of(body);
    let id = ids::new_id("rul");
    crate::audit::note("created", id.clone());
    let rule = check_rule(&state, &auth.tenant_id, &id, &definition).await?;
    let now = now_ms();
    state
        .db
        .execute(
            "INSERT INTO rules (id, tenant_id, name, enabled, event_pattern, definition, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            args![&id, &auth.tenant_id, &rule.name, rule.enabled, &rule.pattern, definition.to_string(), now],
        )
        .await?;
    state.changed(Change::Rules(auth.tenant_id.clone())).await;
    let row = RuleRow {
        id,
        definition: definition.to_string(),
        created_at: now,
        updated_at: now,
        version: 1,
    };
    Ok((StatusCode::CREATED, row.answer()))
}

async fn load(state: &AppState, tenant_id: &str, id: &str) -> ApiResult<RuleRow> {
    state
        .db
        .fetch_optional(
            "SELECT id, definition, created_at, updated_at, version FROM rules WHERE tenant_id = $1 AND id = $2",
            args![tenant_id, id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("rule"))
}

/// A rule read for a change, locked until the transaction ends.
async fn locked(tx: &mut crate::db::Tx, tenant_id: &str, id: &str) -> ApiResult<Option<RuleRow>> {
    let select = crate::db::locking(
        tx,
        "SELECT id, definition, created_at, updated_at, version FROM rules WHERE tenant_id = $1 AND id = $2",
    );
    Ok(tx.fetch_optional(select, args![tenant_id, id]).await?)
}

async fn get_rule(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(load(&state, &auth.tenant_id, &id).await?.answer())
}

async fn list_rules(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = page.limit();
    let rows: Vec<RuleRow> = state
        .db
        .fetch_all(
            "SELECT id, definition, created_at, updated_at, version FROM rules WHERE tenant_id = $1 AND id < $2 \
             ORDER BY id DESC LIMIT $3",
            args![
                &auth.tenant_id,
                crate::http::page::newest_first_cursor(page.cursor.as_deref(), "rul")?,
                limit + 1
            ],
        )
        .await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

async fn replace_rule(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    if_match: IfMatch,
    body: JsonBody,
) -> ApiResult<impl IntoResponse> {
    auth.require(Permission::Manage)?;
    let body: Value = body.parse()?;
    // Checked before the transaction: it reads the endpoints and actions the rule names.
    load(&state, &auth.tenant_id, &id).await?;
    let definition = definition_of(body);
    let rule = check_rule(&state, &auth.tenant_id, &id, &definition).await?;
    let mut tx = state.db.begin().await?;
    let Some(existing) = locked(&mut tx, &auth.tenant_id, &id).await? else {
        return Err(ApiError::not_found("rule"));
    };
    if !version_holds(if_match.version(), existing.version) {
        return Err(ApiError::version_mismatch("rule", existing.version));
    }
    // Nothing changed: no new version (which would fail others' If-Match for nothing).
    let as_read = |definition: Value| {
        let mut definition = definition;
        if let Some(map) = definition.as_object_mut() {
            map.entry("enabled").or_insert(Value::Bool(true));
        }
        definition
    };
    let stored: Value = serde_json::from_str(&existing.definition).map_err(ApiError::internal)?;
    if as_read(stored) == as_read(definition.clone()) {
        tx.rollback().await;
        return Ok(existing.answer());
    }
    let row = RuleRow {
        id,
        definition: definition.to_string(),
        created_at: existing.created_at,
        updated_at: now_ms(),
        version: existing.version + 1,
    };
    tx.execute(
        "UPDATE rules SET name = $1, enabled = $2, event_pattern = $3, definition = $4, updated_at = $5, \
         version = $6 WHERE tenant_id = $7 AND id = $8",
        args![
            &rule.name,
            rule.enabled,
            &rule.pattern,
            &row.definition,
            row.updated_at,
            row.version,
            &auth.tenant_id,
            &row.id
        ],
    )
    .await?;
    tx.commit().await?;
    state.changed(Change::Rules(auth.tenant_id.clone())).await;
    Ok(row.answer())
}

async fn delete_rule(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    if_match: IfMatch,
) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    let outcome = {
        let mut tx = state.db.begin().await?;
        match locked(&mut tx, &auth.tenant_id, &id).await? {
            None => Versioned::Missing,
            Some(existing) if !version_holds(if_match.version(), existing.version) => {
                Versioned::Changed(existing.version)
            }
            Some(_) => {
                tx.execute(
                    "DELETE FROM rules WHERE tenant_id = $1 AND id = $2",
                    args![&auth.tenant_id, &id],
                )
                .await?;
                tx.commit().await?;
                Versioned::Done(())
            }
        }
    };
    match outcome {
        Versioned::Done(()) => {}
        Versioned::Missing => return Err(ApiError::not_found("rule")),
        Versioned::Changed(current) => return Err(ApiError::version_mismatch("rule", current)),
    }
    state.changed(Change::Rules(auth.tenant_id.clone())).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleEvent {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default = "crate::events::empty_data")]
    data: Value,
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSaved {
    event: SampleEvent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestUnsaved {
    rule: Value,
    event: SampleEvent,
}

async fn test_saved(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: JsonBody,
) -> ApiResult<axum::Json<Value>> {
    // Dry runs return requests signed with real secrets: only those who may read them may ask.
    auth.require(Permission::Manage)?;
    let body: TestSaved = body.parse()?;
    let row = load(&state, &auth.tenant_id, &id).await?;
    let definition: Value = serde_json::from_str(&row.definition).map_err(ApiError::internal)?;
    let rule = state.rules.check(&id, &definition)?;
    dry_run(&state, &auth.tenant_id, &rule, body.event)
        .await
        .map(axum::Json)
}

async fn test_unsaved(
    State(state): State<AppState>,
    auth: AdminAuth,
    body: JsonBody,
) -> ApiResult<axum::Json<Value>> {
    auth.require(Permission::Manage)?;
    let body: TestUnsaved = body.parse()?;
    let rule = check_rule(&state, &auth.tenant_id, "rul_unsaved", &definition_of(body.rule)).await?;
    dry_run(&state, &auth.tenant_id, &rule, body.event)
        .await
        .map(axum::Json)
}

/// Evaluates `rule` on a sample event and previews every request it would cause.
async fn dry_run(
    state: &AppState,
    tenant_id: &str,
    rule: &CompiledRule,
    event: SampleEvent,
) -> ApiResult<Value> {
    crate::events::catalog::check_sample_event(state, tenant_id, &event.event_type, &event.data).await?;
    let now = now_ms();
    let event_id = event.id.clone().unwrap_or_else(|| ids::new_id("evt"));
    let doc = super::apply::document(&event_id, &event.event_type, now, &event.data);
    let triggered = crate::glob::matches(&rule.pattern, &event.event_type)
        || rule
            .pattern
            .strip_suffix('*')
            .is_some_and(|p| event.event_type.starts_with(p));
    let (held, conditions) = rule.explain(&doc);
    let matched = triggered && held;
    let mut outputs = Vec::new();
    if matched {
        for (n, output) in rule
            .render_outputs(&doc, state.config.body_limit)
            .into_iter()
            .enumerate()
        {
            let output = match output {
                Ok(output) => output,
                Err(refused) => {
                    outputs.push(refused);
                    continue;
                }
            };
            outputs.push(
                preview_output(
                    state,
                    (tenant_id, &rule.id),
                    &event_id,
                    &event.event_type,
                    &event.data,
                    now,
                    (n, &output),
                )
                .await?,
            );
        }
    }
    Ok(json!({
        "rule_id": rule.id,
        // A disabled rule is judged as if enabled; real events do not run it.
        "enabled": rule.enabled,
        "triggered": triggered,
        "matched": matched,
        "conditions": conditions,
        "outputs": outputs,
        "sent": false,
    }))
}

async fn preview_output(
    state: &AppState,
    (tenant_id, rule_id): (&str, &str),
    event_id: &str,
    event_type: &str,
    data: &Value,
    now: i64,
    (n, output): (usize, &Output),
) -> ApiResult<Value> {
    let mut out = output.describe();
    match output {
        Output::Deliver { endpoint_id } => {
            let Some(ep) = endpoints::get(&state.db, tenant_id, endpoint_id)
                .await?
                .filter(|ep| ep.enabled)
            else {
                out["error"] = format!("endpoint {endpoint_id} is deleted or disabled").into();
                return Ok(out);
            };
            let body = crate::events::event_body(event_id, event_type, now, data);
            if ep.subscribes_to(event_type) {
                // As the real run: the subscription's delivery is the one the endpoint gets.
                out["note"] = "the endpoint already receives this event".into();
            }
            out["request"] = crate::delivery::routes::sign_preview(
                state,
                &ep,
                (&ids::new_id("dlv"), None),
                Carries::Event(event_type),
                &body,
                now,
            )?;
        }
        Output::Invoke { action, arguments } => {
            // Judged as the rule's real call would be: a disabled action, a guard's denial or
            // approval show here, not a request that would never be sent as shown.
            // The rule's own id (`rul_unsaved` before it is saved), as guards see it.
            let caller = crate::gateway::invoke::Caller::Rule {
                tenant_id: tenant_id.to_string(),
                rule_id: rule_id.to_string(),
            };
            let stored = store::get(&state.db, tenant_id, action).await?;
            let verdict = crate::gateway::invoke::judge_rule_call(
                &state.gateway.validators,
                tenant_id,
                stored,
                action,
                arguments,
                &caller,
            );
            let (a, approval_reason) = match verdict {
                RuleCallVerdict::Refused { status, error, .. } => {
                    out["status"] = status.into();
                    out["code"] = error["code"].clone();
                    let details = error["details"].as_array().filter(|d| !d.is_empty());
                    match details {
                        Some(details) if error["code"] == "validation_failed" => {
                            out["valid"] = false.into();
                            out["details"] = details.clone().into();
                        }
                        _ => out["error"] = error["message"].clone(),
                    }
                    return Ok(out);
                }
                RuleCallVerdict::Allowed {
                    action,
                    approval_reason,
                } => (action, approval_reason),
            };
            out["valid"] = true.into();
            let ep = match &a.declaration.endpoint_id {
                Some(id) => endpoints::get(&state.db, tenant_id, id).await?,
                None => None,
            };
            let Some(ep) = ep.filter(|ep| ep.enabled) else {
                // As the real run records it.
                out["status"] = "failed".into();
                out["code"] = "action_unavailable".into();
                out["error"] = crate::gateway::invoke::endpoint_unavailable(action).into();
                return Ok(out);
            };
            out["status"] = if approval_reason.is_some() {
                "pending_approval"
            } else {
                "queued"
            }
            .into();
            if let Some(reason) = approval_reason {
                out["approval_reason"] = reason.into();
            }
            let invocation_id = ids::new_id("inv");
            let body =
                crate::gateway::invoke::action_request_body(&invocation_id, &a, arguments, &caller, now);
            // The key the rule's real call on this event would carry (see `apply_output`).
            let key = crate::gateway::invoke::derived_key(
                tenant_id,
                &caller.principal(),
                Some(&crate::rules::apply::rule_call_key(event_id, n)),
                &invocation_id,
            );
            out["request"] = crate::delivery::routes::sign_preview(
                state,
                &ep,
                (&ids::new_id("dlv"), Some(key)),
                Carries::Action(action),
                &body,
                now,
            )?;
        }
        Output::Emit {
            event_type: emitted,
            data: emitted_data,
        } => {
            let catalog = state.catalog.for_tenant(&state.db, tenant_id).await?;
            if let Err(m) = super::apply::check_emitted(&catalog, state.rules.limits(), emitted, emitted_data)
            {
                out["error"] = m.into();
                return Ok(out);
            }
            let emitted_id = ids::new_id("evt");
            let body = crate::events::event_body(&emitted_id, emitted, now, emitted_data);
            let mut requests = Vec::new();
            for ep in endpoints::enabled_for_tenant(&state.db, tenant_id).await? {
                if ep.subscribes_to(emitted) {
                    requests.push(crate::delivery::routes::sign_preview(
                        state,
                        &ep,
                        (&ids::new_id("dlv"), None),
                        Carries::Event(emitted),
                        &body,
                        now,
                    )?);
                }
            }
            out["event"] = serde_json::from_str::<Value>(&body).unwrap_or_default();
            out["requests"] = requests.into();
        }
    }
    Ok(out)
}
