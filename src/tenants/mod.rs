//! Tenants and their admin API keys. A tenant is created by `opsiq init`; its keys are managed
//! over `/v1/api-keys`. A key's secret is shown exactly once and stored only as its SHA-256.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use serde::{Deserialize, Serialize};

use crate::changes::Change;
use crate::crypto::{self, MasterKey};
use crate::db::{Database, DbError, Tx, now_ms, rfc3339};
use crate::http::auth::API_KEY_PREFIX;
use crate::http::{AdminAuth, ApiError, ApiResult, JsonBody, Page, PageQuery, Path, Permission, Query, Role};
use crate::{AppState, args, ids};

/// A tenant and the owner key made for it, as `opsiq init` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct NewTenant {
    /// The tenant's id (`ten_…`).
    pub tenant_id: String,
    /// The owner API key; shown once.
    pub admin_key: String,
}

/// Opens the master key for `db`. A key file is created only for a database without tenants (a
/// new key for a database that has secrets would seal new ones under it and open none of the
/// old), and a key that cannot open a tenant's sealed token key is refused, so a wrong
/// `OPSIQ_MASTER_KEY` or key file stops the process at once instead of failing each use.
/// Answers the key and whether its file was created.
pub async fn open_master_key(
    db: &Database,
    inline: Option<&str>,
    file: &std::path::Path,
    may_create: bool,
) -> anyhow::Result<(MasterKey, bool)> {
    let sealed: Option<(String,)> = db
        .fetch_optional(
            "SELECT jwt_key_enc FROM tenants WHERE jwt_key_enc <> '' ORDER BY id LIMIT 1",
            args![],
        )
        .await?;
    let (keys, created) = match MasterKey::load(inline, file, may_create && sealed.is_none()) {
        Ok(loaded) => loaded,
        // `opsiq init` would not help: the database has secrets, sealed under the key it had.
        Err(_) if sealed.is_some() && inline.is_none() => anyhow::bail!(
            "this database already holds secrets, so it needs the master key they were sealed with: \
             set OPSIQ_MASTER_KEY, or put its key file at {}",
            file.display()
        ),
        Err(e) => return Err(e.into()),
    };
    if let Some((sealed,)) = sealed
        && keys.open(&sealed).is_err()
    {
        anyhow::bail!(
            "the master key ({}) does not open this database's secrets: give the key it was created with",
            if inline.is_some() {
                "OPSIQ_MASTER_KEY".to_string()
            } else {
                file.display().to_string()
            }
        );
    }
    Ok((keys, created))
}

/// Creates a tenant with a fresh agent-token signing key and an owner API key; the first row of
/// its audit log says so, made by `cli:<command>` (`cli:opsiq init`).
pub async fn create_tenant(
    db: &Database,
    keys: &MasterKey,
    name: &str,
    command: &str,
) -> Result<NewTenant, TenantError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(TenantError::InvalidName);
    }
    let tenant_id = ids::new_id("ten");
    let jwt_key = keys.seal(&crypto::random_token::<32>());
    let (key_row, secret) = new_key_row(&tenant_id, "owner", Role::Owner);
    let now = now_ms();
    let mut tx = db.begin().await?;
    let exists: Option<(String,)> = tx
        .fetch_optional("SELECT id FROM tenants WHERE name = $1", args![name])
        .await?;
    if exists.is_some() {
        return Err(TenantError::NameTaken);
    }
    // Two at once (replicas starting together on an empty database) both find the name free;
    // the unique name decides, and the loser hears that it is taken.
    let taken = |e: sqlx::Error| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => TenantError::NameTaken,
        e => TenantError::from(e),
    };
    tx.execute(
        "INSERT INTO tenants (id, name, jwt_key_enc, created_at) VALUES ($1, $2, $3, $4)",
        args![&tenant_id, name, jwt_key, now],
    )
    .await
    .map_err(taken)?;
    insert_key(&mut tx, &key_row).await?;
    let details = serde_json::json!({"name": name, "owner_key_id": &key_row.id}).to_string();
    let entry = crate::audit::Entry {
        tenant_id: &tenant_id,
        actor: &format!("cli:{command}"),
        action: "create tenant",
        target: &tenant_id,
        details: &details,
    };
    crate::audit::append_in(&mut tx, keys.audit_chain_key(), entry).await?;
    tx.commit().await.map_err(taken)?;
    Ok(NewTenant {
        tenant_id,
        admin_key: secret,
    })
}

/// The ids of every tenant (declarative files are applied to each).
pub async fn all_tenant_ids(db: &Database) -> Result<Vec<String>, DbError> {
    let rows: Vec<(String,)> = db
        .fetch_all("SELECT id FROM tenants ORDER BY id", args![])
        .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Failures creating a tenant.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The name is empty or longer than 100 characters.
    #[error("a tenant name must be 1 to 100 characters")]
    InvalidName,
    /// Tenant names are unique per database.
    #[error("a tenant with that name already exists")]
    NameTaken,
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for TenantError {
    fn from(e: sqlx::Error) -> Self {
        TenantError::Db(e.into())
    }
}

/// A stored API key, as listed (never with its secret).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ApiKeyRow {
    /// `key_…`.
    pub id: String,
    #[serde(skip)]
    tenant_id: String,
    /// A label chosen by the admin.
    pub name: String,
    /// One of owner, admin, developer, approver, viewer.
    pub role: String,
    #[serde(skip)]
    key_hash: String,
    /// The first characters of the key, to recognise it.
    pub key_prefix: String,
    #[serde(skip)]
    created_at: i64,
    #[serde(skip)]
    revoked_at: Option<i64>,
}

impl ApiKeyRow {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "key_prefix": self.key_prefix,
            "created_at": rfc3339(self.created_at),
            "revoked": self.revoked_at.is_some(),
        })
    }
}

fn new_key_row(tenant_id: &str, name: &str, role: Role) -> (ApiKeyRow, String) {
    let secret = format!("{API_KEY_PREFIX}{}", crypto::random_token::<32>());
    let row = ApiKeyRow {
        id: ids::new_id("key"),
        tenant_id: tenant_id.to_string(),
        name: name.to_string(),
        role: role.as_str().to_string(),
        key_hash: crypto::sha256_hex(secret.as_bytes()),
        key_prefix: secret[..API_KEY_PREFIX.len() + 4].to_string(),
        created_at: now_ms(),
        revoked_at: None,
    };
    (row, secret)
}

async fn insert_key(tx: &mut Tx, row: &ApiKeyRow) -> Result<(), sqlx::Error> {
    tx.execute(
        "INSERT INTO api_keys (id, tenant_id, name, role, key_hash, key_prefix, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        args![
            &row.id,
            &row.tenant_id,
            &row.name,
            &row.role,
            &row.key_hash,
            &row.key_prefix,
            row.created_at
        ],
    )
    .await?;
    Ok(())
}

/// The admin-key routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/api-keys", get(list_keys).post(create_key))
        .route("/v1/api-keys/{id}", delete(revoke_key).get(get_key))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    role: Role,
}

async fn create_key(
    state: axum::extract::State<AppState>,
    auth: AdminAuth,
    body: JsonBody,
) -> ApiResult<(StatusCode, axum::Json<serde_json::Value>)> {
    auth.require(Permission::Manage)?;
    let body: CreateKey = body.parse()?;
    if body.role == Role::Owner && auth.role != Role::Owner {
        return Err(ApiError::forbidden(
            "forbidden",
            "only an owner key can create another owner key",
        ));
    }
    if body.name.trim().is_empty() || body.name.chars().count() > 100 {
        return Err(ApiError::invalid_field("/name", "must be 1 to 100 characters"));
    }
    let (row, secret) = new_key_row(&auth.tenant_id, body.name.trim(), body.role);
    crate::audit::note("created", row.id.clone());
    crate::audit::note("role", body.role.as_str());
    let mut tx = state.db.begin().await?;
    insert_key(&mut tx, &row).await?;
    tx.commit().await?;
    let mut json = row.to_json();
    json["key"] = secret.into();
    Ok((StatusCode::CREATED, axum::Json(json)))
}

async fn list_keys(
    state: axum::extract::State<AppState>,
    auth: AdminAuth,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<serde_json::Value>>> {
    auth.require(Permission::Manage)?;
    let limit = page.limit();
    let cursor = crate::http::page::newest_first_cursor(page.cursor.as_deref(), "key")?;
    let rows: Vec<ApiKeyRow> = state
        .db
        .fetch_all(
            "SELECT * FROM api_keys WHERE tenant_id = $1 AND id < $2 AND revoked_at IS NULL \
             ORDER BY id DESC LIMIT $3",
            args![&auth.tenant_id, cursor, limit + 1],
        )
        .await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

async fn get_key(
    state: axum::extract::State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    auth.require(Permission::Manage)?;
    let row: Option<ApiKeyRow> = state
        .db
        .fetch_optional(
            "SELECT * FROM api_keys WHERE tenant_id = $1 AND id = $2",
            args![&auth.tenant_id, &id],
        )
        .await?;
    row.map(|r| axum::Json(r.to_json()))
        .ok_or_else(|| ApiError::not_found("API key"))
}

async fn revoke_key(
    state: axum::extract::State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    let mut tx = state.db.begin().await?;
    // Revocations in one tenant queue on its row (PostgreSQL): two owners revoking each other
    // at once must not both see the other as the remaining owner.
    tx.execute(
        crate::db::locking(&tx, "SELECT 1 FROM tenants WHERE id = $1"),
        args![&auth.tenant_id],
    )
    .await?;
    let target: Option<(String,)> = tx
        .fetch_optional(
            "SELECT role FROM api_keys WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
            args![&auth.tenant_id, &id],
        )
        .await?;
    let (role,) = target.ok_or_else(|| ApiError::not_found("API key"))?;
    if role == Role::Owner.as_str() {
        if auth.role != Role::Owner {
            return Err(ApiError::forbidden(
                "forbidden",
                "only an owner key can revoke an owner key",
            ));
        }
        let (owners,): (i64,) = tx
            .fetch_optional(
                "SELECT COUNT(*) FROM api_keys WHERE tenant_id = $1 AND role = 'owner' AND revoked_at IS NULL",
                args![&auth.tenant_id],
            )
            .await?
            .unwrap_or((0,));
        if owners <= 1 {
            return Err(ApiError::conflict(
                "last_owner_key",
                "this is the workspace's last owner key; create another owner key first",
            ));
        }
    }
    tx.execute(
        "UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
        args![now_ms(), &auth.tenant_id, &id],
    )
    .await?;
    tx.commit().await?;
    state.changed(Change::ApiKeys).await;
    Ok(StatusCode::NO_CONTENT)
}
