//! The event catalog: built-in types (JSON Schemas in `schemas/events/`, compiled in, the same
//! for every tenant) and each tenant's custom types, declared with or without a schema. Events of a type
//! with a schema are validated on ingestion; undeclared types are accepted free-form.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::check_event_type;
use crate::cache::{CompiledByTenant, TtlCache};
use crate::changes::Change;
use crate::db::{Database, DbError, now_ms, rfc3339};
use crate::http::{
    AdminAuth, ApiError, ApiResult, ErrorDetail, JsonBody, Page, PageQuery, Path as UrlPath, Permission,
    Query,
};
use crate::registry::model::{compile_new_schema, compile_schema, schema_errors};
use crate::{AppState, args};

/// One event type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventType {
    /// `invoice.paid`, …
    pub name: String,
    /// What it means.
    #[serde(default)]
    pub description: String,
    /// JSON Schema 2020-12 for `data`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
}

struct Known {
    declared: EventType,
    validator: Option<Arc<jsonschema::Validator>>,
    /// When a tenant declared it (ms); `None` for a built-in type.
    created_at: Option<i64>,
}

/// Built-in types plus a cache of each tenant's custom ones.
pub struct Catalog {
    builtin: BTreeMap<String, Known>,
    custom: TtlCache<String, BTreeMap<String, Arc<Known>>>,
    /// Each tenant's custom types as last compiled, with the schema text compiled: a reload
    /// after the time to live compiles only the schemas that changed.
    compiled: CompiledByTenant<(String, Arc<Known>)>,
}

/// Tenants whose compiled custom types are kept between reloads.
const MAX_TENANTS_COMPILED: usize = 10_000;

/// A problem with the catalog files; start-up stops with it.
#[derive(Debug, thiserror::Error)]
#[error("event type file {path}: {message}")]
pub struct CatalogError {
    path: String,
    message: String,
}

/// The built-in types, compiled in so that a binary started from any directory has them; the
/// files of the events directory add types or replace these by name.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "action.failed.json",
        include_str!("../../schemas/events/action.failed.json"),
    ),
    (
        "action.invoked.json",
        include_str!("../../schemas/events/action.invoked.json"),
    ),
    (
        "action.succeeded.json",
        include_str!("../../schemas/events/action.succeeded.json"),
    ),
    (
        "approval.requested.json",
        include_str!("../../schemas/events/approval.requested.json"),
    ),
    (
        "chat.human_requested.json",
        include_str!("../../schemas/events/chat.human_requested.json"),
    ),
    (
        "customer.signed_up.json",
        include_str!("../../schemas/events/customer.signed_up.json"),
    ),
    (
        "delivery.failed.json",
        include_str!("../../schemas/events/delivery.failed.json"),
    ),
    (
        "endpoint.disabled.json",
        include_str!("../../schemas/events/endpoint.disabled.json"),
    ),
    (
        "invoice.paid.json",
        include_str!("../../schemas/events/invoice.paid.json"),
    ),
    (
        "license.expired.json",
        include_str!("../../schemas/events/license.expired.json"),
    ),
    (
        "ticket.created.json",
        include_str!("../../schemas/events/ticket.created.json"),
    ),
];

impl Known {
    fn parse(origin: &str, text: &str) -> Result<Self, CatalogError> {
        let fail = |message: String| CatalogError {
            path: origin.to_string(),
            message,
        };
        let declared: EventType = serde_json::from_str(text).map_err(|e| fail(e.to_string()))?;
        check_event_type(&declared.name).map_err(fail)?;
        let validator = match &declared.schema {
            Some(s) => Some(Arc::new(
                compile_new_schema(s).map_err(|(at, m)| fail(format!("schema{at}: {m}")))?,
            )),
            None => None,
        };
        Ok(Known {
            declared,
            validator,
            created_at: None,
        })
    }
}

impl Catalog {
    /// Forgets a tenant's cached custom types after a change.
    pub fn forget(&self, tenant_id: &str) {
        self.custom.invalidate(&tenant_id.to_string());
    }

    /// Forgets every tenant's cached custom types.
    pub fn forget_all(&self) {
        self.custom.clear();
        self.compiled.clear();
    }

    /// The compiled-in types, then `*.json` from the events directory (which may be missing).
    pub fn load(dir: &Path, cache_ttl: Duration) -> Result<Self, CatalogError> {
        let mut builtin = BTreeMap::new();
        for (file, text) in BUILT_IN {
            let known = Known::parse(&format!("built-in {file}"), text)?;
            builtin.insert(known.declared.name.clone(), known);
        }
        let files = crate::registry::files::json_files(dir).map_err(|e| CatalogError {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|e| CatalogError {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            // The repository's own events directory holds the compiled-in files themselves.
            let file_name = path.file_name().and_then(|n| n.to_str());
            if BUILT_IN
                .iter()
                .any(|(name, built_in)| Some(*name) == file_name && *built_in == text)
            {
                continue;
            }
            let known = Known::parse(&path.display().to_string(), &text)?;
            builtin.insert(known.declared.name.clone(), known);
        }
        Ok(Self {
            builtin,
            custom: TtlCache::new(cache_ttl),
            compiled: CompiledByTenant::new(MAX_TENANTS_COMPILED),
        })
    }

    async fn custom_types(
        &self,
        db: &Database,
        tenant_id: &str,
    ) -> Result<Arc<BTreeMap<String, Arc<Known>>>, DbError> {
        self.custom
            .get_or_load(&tenant_id.to_string(), || async {
                let rows: Vec<(String, String, Option<String>, i64)> = db
                    .fetch_all(
                        "SELECT name, description, schema, created_at FROM event_types WHERE tenant_id = $1 ORDER BY name",
                        args![tenant_id],
                    )
                    .await?;
                let before = self.compiled.of(tenant_id);
                let mut now = BTreeMap::new();
                for (name, description, schema_text, created_at) in rows {
                    let text = schema_text.unwrap_or_default();
                    let known = match before.get(&name) {
                        Some((compiled_from, known))
                            if *compiled_from == text
                                && known.declared.description == description
                                && known.created_at == Some(created_at) =>
                        {
                            known.clone()
                        }
                        _ => {
                            let schema: Option<Value> = serde_json::from_str(&text).ok();
                            let validator =
                                schema.as_ref().and_then(|s| compile_schema(s).ok()).map(Arc::new);
                            let declared = EventType { name: name.clone(), description, schema };
                            Arc::new(Known {
                                declared,
                                validator,
                                created_at: Some(created_at),
                            })
                        }
                    };
                    now.insert(name, (text, known));
                }
                let map = now.iter().map(|(name, (_, known))| (name.clone(), known.clone())).collect();
                self.compiled.keep(tenant_id, now);
                Ok::<_, DbError>(map)
            })
            .await
    }

    /// Validates an event's data against its type's schema, if the type has one.
    pub async fn validate(
        &self,
        db: &Database,
        tenant_id: &str,
        event_type: &str,
        data: &Value,
    ) -> Result<(), ApiError> {
        let validator = match self.builtin.get(event_type) {
            Some(k) => k.validator.clone(),
            None => self
                .custom_types(db, tenant_id)
                .await?
                .get(event_type)
                .and_then(|k| k.validator.clone()),
        };
        check_data(validator.as_deref(), event_type, data)
    }

    /// A tenant's event types as they stand, to check data against without reading again.
    pub async fn for_tenant(
        self: &Arc<Self>,
        db: &Database,
        tenant_id: &str,
    ) -> Result<TenantCatalog, DbError> {
        Ok(TenantCatalog {
            catalog: self.clone(),
            custom: self.custom_types(db, tenant_id).await?,
        })
    }
}

/// One tenant's event types, built-in and custom, as read when it was made.
#[derive(Clone)]
pub struct TenantCatalog {
    catalog: Arc<Catalog>,
    custom: Arc<BTreeMap<String, Arc<Known>>>,
}

impl TenantCatalog {
    /// Validates an event's data against its type's schema, if the type has one.
    pub fn check(&self, event_type: &str, data: &Value) -> Result<(), ApiError> {
        let validator = match self.catalog.builtin.get(event_type) {
            Some(k) => k.validator.as_deref(),
            None => self.custom.get(event_type).and_then(|k| k.validator.as_deref()),
        };
        check_data(validator, event_type, data)
    }
}

fn check_data(
    validator: Option<&jsonschema::Validator>,
    event_type: &str,
    data: &Value,
) -> Result<(), ApiError> {
    let Some(validator) = validator else { return Ok(()) };
    let problems: Vec<ErrorDetail> = schema_errors(validator, data)
        .into_iter()
        .map(|d| ErrorDetail {
            path: format!("/data{}", if d.path == "/" { "" } else { &d.path }),
            message: d.message,
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::validation(
            format!("the data does not match the schema of {event_type}"),
            problems,
        ))
    }
}

/// The catalog routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/event-types", get(list_types).post(create_type))
        .route(
            "/v1/event-types/{name}",
            get(get_type).patch(update_type).delete(delete_type),
        )
}

/// An event type as the API shows it; `created_at` for a tenant's own types.
fn describe(t: &EventType, created_at: Option<i64>) -> Value {
    let mut out = json!({"name": t.name, "description": t.description, "schema": t.schema,
        "builtin": created_at.is_none(), "reserved": super::is_reserved(&t.name)});
    if let Some(ms) = created_at {
        out["created_at"] = rfc3339(ms).into();
    }
    out
}

/// The catalog, built-in and custom types together in name order, paginated by name.
async fn list_types(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Value>>> {
    // A cursor is the name of the last type a page held; anything else this list never gave.
    if let Some(cursor) = page.cursor.as_deref().filter(|c| !c.is_empty())
        && check_event_type(cursor).is_err()
    {
        return Err(ApiError::bad_request(
            "invalid_cursor",
            "cursor must be a next_cursor this list answered",
        ));
    }
    let custom = state.catalog.custom_types(&state.db, &auth.tenant_id).await?;
    let mut types: Vec<&Known> = state
        .catalog
        .builtin
        .values()
        .chain(custom.values().map(Arc::as_ref))
        .filter(|k| {
            page.cursor
                .as_deref()
                .filter(|c| !c.is_empty())
                .is_none_or(|after| k.declared.name.as_str() > after)
        })
        .collect();
    types.sort_by(|a, b| a.declared.name.cmp(&b.declared.name));
    let limit = page.limit();
    types.truncate(limit as usize + 1);
    Ok(axum::Json(
        Page::from_rows(types, limit, |k| k.declared.name.clone())
            .map(|k| describe(&k.declared, k.created_at)),
    ))
}

async fn get_type(
    State(state): State<AppState>,
    auth: AdminAuth,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<axum::Json<Value>> {
    if let Some(k) = state.catalog.builtin.get(&name) {
        return Ok(axum::Json(describe(&k.declared, None)));
    }
    let custom = state.catalog.custom_types(&state.db, &auth.tenant_id).await?;
    custom
        .get(&name)
        .map(|k| axum::Json(describe(&k.declared, k.created_at)))
        .ok_or_else(|| ApiError::not_found("event type"))
}

async fn create_type(
    State(state): State<AppState>,
    auth: AdminAuth,
    body: JsonBody,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    auth.require(Permission::Manage)?;
    let body: EventType = body.parse()?;
    super::check_own_event_type(&body.name).map_err(|m| ApiError::invalid_field("/name", m))?;
    check_type_fields(&body.description, body.schema.as_ref())?;
    crate::audit::note("created", body.name.clone());
    if state.catalog.builtin.contains_key(&body.name) {
        return Err(ApiError::conflict(
            "already_exists",
            "this is a built-in event type",
        ));
    }
    let created_at = now_ms();
    let inserted = state
        .db
        .execute(
            "INSERT INTO event_types (tenant_id, name, description, schema, builtin, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, name) DO NOTHING",
            args![
                &auth.tenant_id,
                &body.name,
                &body.description,
                body.schema.as_ref().map(Value::to_string),
                false,
                created_at
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(ApiError::conflict(
            "already_exists",
            "an event type with this name already exists",
        ));
    }
    state.changed(Change::EventTypes(auth.tenant_id.clone())).await;
    Ok((StatusCode::CREATED, axum::Json(describe(&body, Some(created_at)))))
}

/// Checks what a tenant may say of its own event type: a description of at most 2000 characters
/// and a schema, if any, that compiles and takes objects.
fn check_type_fields(description: &str, schema: Option<&Value>) -> Result<(), ApiError> {
    if description.chars().count() > 2000 {
        return Err(ApiError::invalid_field(
            "/description",
            "must be at most 2000 characters",
        ));
    }
    let Some(schema) = schema else {
        return Ok(());
    };
    // An event's data is an object: a schema that takes none would refuse every event.
    if !crate::registry::model::schema_takes_objects(schema) {
        return Err(ApiError::invalid_field(
            "/schema",
            "must be a JSON Schema for an object (an event's data is always one)",
        ));
    }
    compile_new_schema(schema).map_err(|(at, m)| ApiError::invalid_field(&format!("/schema{at}"), m))?;
    Ok(())
}

/// What `PATCH /v1/event-types/{name}` may change; a `schema` of `null` removes the schema.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventTypeChange {
    #[serde(default, deserialize_with = "crate::http::extract::not_null")]
    description: Option<String>,
    #[serde(default, deserialize_with = "crate::http::extract::null_or_value")]
    schema: Option<Option<Value>>,
}

/// A tenant's own event type as stored, with when it was declared (locked until `tx` ends), or
/// why it cannot be changed.
async fn own_type(
    state: &AppState,
    tx: &mut crate::db::Tx,
    tenant_id: &str,
    name: &str,
) -> Result<(EventType, i64), ApiError> {
    if state.catalog.builtin.contains_key(name) {
        return Err(ApiError::conflict(
            "builtin_event_type",
            "built-in event types cannot be changed or deleted",
        ));
    }
    let select = crate::db::locking(
        tx,
        "SELECT description, schema, created_at FROM event_types WHERE tenant_id = $1 AND name = $2",
    );
    let row: Option<(String, Option<String>, i64)> =
        tx.fetch_optional(select, args![tenant_id, name]).await?;
    let (description, schema, created_at) = row.ok_or_else(|| ApiError::not_found("event type"))?;
    let schema = schema
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(DbError::from)?;
    let declared = EventType {
        name: name.to_string(),
        description,
        schema,
    };
    Ok((declared, created_at))
}

async fn update_type(
    State(state): State<AppState>,
    auth: AdminAuth,
    UrlPath(name): UrlPath<String>,
    body: JsonBody,
) -> ApiResult<axum::Json<Value>> {
    auth.require(Permission::Manage)?;
    let change: EventTypeChange = body.parse()?;
    // Read, change and write on a locked row: two changes of different fields both stand.
    let mut tx = state.db.begin().await?;
    let (mut declared, created_at) = own_type(&state, &mut tx, &auth.tenant_id, &name).await?;
    if let Some(description) = change.description {
        declared.description = description;
    }
    // Only a new schema is checked: one stored earlier stands until it is replaced.
    check_type_fields(
        &declared.description,
        change.schema.as_ref().and_then(Option::as_ref),
    )?;
    if let Some(schema) = change.schema {
        declared.schema = schema;
    }
    tx.execute(
        "UPDATE event_types SET description = $1, schema = $2 WHERE tenant_id = $3 AND name = $4",
        args![
            &declared.description,
            declared.schema.as_ref().map(Value::to_string),
            &auth.tenant_id,
            &name
        ],
    )
    .await?;
    tx.commit().await?;
    state.changed(Change::EventTypes(auth.tenant_id.clone())).await;
    Ok(axum::Json(describe(&declared, Some(created_at))))
}

async fn delete_type(
    State(state): State<AppState>,
    auth: AdminAuth,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    let mut tx = state.db.begin().await?;
    own_type(&state, &mut tx, &auth.tenant_id, &name).await?;
    tx.execute(
        "DELETE FROM event_types WHERE tenant_id = $1 AND name = $2",
        args![&auth.tenant_id, &name],
    )
    .await?;
    tx.commit().await?;
    state.changed(Change::EventTypes(auth.tenant_id.clone())).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Holds a sample event (a rule's dry run, a preview) to what the gateway would deliver: a
/// valid type name (the gateway's own included: their shapes can be tried too) and a JSON object
/// matching the type's schema, with details under `/event/…`.
pub async fn check_sample_event(
    state: &AppState,
    tenant_id: &str,
    event_type: &str,
    data: &Value,
) -> Result<(), ApiError> {
    check_event_type(event_type).map_err(|m| ApiError::invalid_field("/event/type", m))?;
    if !data.is_object() {
        return Err(ApiError::invalid_field("/event/data", "must be a JSON object"));
    }
    state
        .catalog
        .validate(&state.db, tenant_id, event_type, data)
        .await
        .map_err(|mut e| {
            for detail in &mut e.details {
                if let Some(path) = detail["path"].as_str() {
                    detail["path"] = format!("/event{path}").into();
                }
            }
            e
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to `schemas/events` is only built in once it is listed in `BUILT_IN`.
    #[test]
    fn built_in_list_is_the_events_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/events");
        let on_disk: BTreeMap<String, String> = crate::registry::files::json_files(&dir)
            .expect("schemas/events is readable")
            .into_iter()
            .map(|path| {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                let text = std::fs::read_to_string(&path).expect("an event type file is readable");
                (name, text)
            })
            .collect();
        let built_in: BTreeMap<String, String> = BUILT_IN
            .iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .collect();
        assert_eq!(
            on_disk.keys().collect::<Vec<_>>(),
            built_in.keys().collect::<Vec<_>>()
        );
        assert_eq!(on_disk, built_in);
        for (name, text) in BUILT_IN {
            let known = Known::parse(name, text).expect("a built-in type parses");
            assert_eq!(format!("{}.json", known.declared.name), *name);
        }
    }

    /// A file identical to a built-in one is skipped; a changed one replaces it, and a new one
    /// adds a type.
    #[test]
    fn files_replace_or_add_to_the_built_ins() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/events");
        let catalog = Catalog::load(&repo, Duration::from_secs(1)).expect("the catalog loads");
        assert_eq!(catalog.builtin.len(), BUILT_IN.len());

        let dir = tempfile::tempdir().expect("a temporary directory");
        let (name, text) = BUILT_IN[0];
        std::fs::write(dir.path().join(name), text).unwrap();
        let (changed_name, changed_text) = BUILT_IN[1];
        let mut changed: serde_json::Value = serde_json::from_str(changed_text).unwrap();
        changed["description"] = "changed here".into();
        std::fs::write(dir.path().join(changed_name), changed.to_string()).unwrap();
        std::fs::write(
            dir.path().join("order.placed.json"),
            r#"{"name": "order.placed", "description": "added here"}"#,
        )
        .unwrap();
        let catalog = Catalog::load(dir.path(), Duration::from_secs(1)).expect("the catalog loads");
        assert_eq!(catalog.builtin.len(), BUILT_IN.len() + 1);
        let replaced = &catalog.builtin[changed["name"].as_str().unwrap()];
        assert_eq!(replaced.declared.description, "changed here");
        assert_eq!(catalog.builtin["order.placed"].declared.description, "added here");
    }
}
