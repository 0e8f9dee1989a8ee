//! Storage of actions: the current declaration per (tenant, name) in `actions`, every version
//! ever stored in `action_versions`. Deletes are soft so that versions stay readable for the
//! invocations that ran them.

use serde::Serialize;
use serde_json::{Value, json};

use super::model::ActionDeclaration;
use crate::db::{self, Database, DbError, now_ms, rfc3339};
use crate::{args, ids};

/// Where a declaration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The HTTP API.
    Api,
    /// A file in `schemas/actions/`.
    File,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct ActionRow {
    id: String,
    version: i64,
    declaration: String,
    content_hash: String,
    source: String,
    file_hash: Option<String>,
    created_at: i64,
    updated_at: i64,
    deleted_at: Option<i64>,
}

/// A stored action at its current version.
#[derive(Debug, Clone)]
pub struct Action {
    /// `act_…`, stable across versions.
    pub id: String,
    /// Bumped on every change.
    pub version: i64,
    /// `sha256:<hex>` of the canonical declaration.
    pub content_hash: String,
    /// The declaration.
    pub declaration: ActionDeclaration,
    /// `api` or `file`.
    pub source: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

impl Action {
    fn from_row(row: ActionRow) -> Result<Self, DbError> {
        Ok(Self {
            declaration: serde_json::from_str(&row.declaration)?,
            id: row.id,
            version: row.version,
            content_hash: row.content_hash,
            source: row.source,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }

    /// The API representation: the declaration plus id, version, hash and times.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.declaration).unwrap_or_else(|_| json!({}));
        if let Value::Object(map) = &mut v {
            map.insert("id".into(), self.id.clone().into());
            map.insert("version".into(), self.version.into());
            map.insert("content_hash".into(), self.content_hash.clone().into());
            map.insert("source".into(), self.source.clone().into());
            map.insert("created_at".into(), rfc3339(self.created_at).into());
            map.insert("updated_at".into(), rfc3339(self.updated_at).into());
        }
        v
    }
}

/// One stored version of an action.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ActionVersion {
    /// The version number.
    pub version: i64,
    /// `sha256:<hex>` of the canonical declaration.
    pub content_hash: String,
    #[serde(skip)]
    declaration: String,
    #[serde(skip)]
    created_at: i64,
}

impl ActionVersion {
    /// The API representation.
    pub fn to_json(&self) -> Value {
        json!({
            "version": self.version,
            "content_hash": self.content_hash,
            "created_at": rfc3339(self.created_at),
            "declaration": serde_json::from_str::<Value>(&self.declaration).unwrap_or(Value::Null),
        })
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// A new action (or a deleted one brought back).
    Created,
    /// A new version of an existing action.
    Updated,
    /// The stored declaration was already identical.
    Unchanged,
    /// A file declaration was skipped because the file has not changed since it was applied.
    Skipped,
}

/// How an upsert treats an existing action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertMode {
    /// Fail with `Conflict` if it exists (POST).
    CreateOnly,
    /// Fail with `NotFound` unless it exists (PUT); given a version (`If-Match`), also fail
    /// with `VersionMismatch` unless the action is at that version.
    UpdateOnly(Option<i64>),
    /// Apply a declarative file: only when the file changed since it was last applied.
    ApplyFile,
}

/// Failures of registry writes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// POST of a name that exists.
    #[error("an action with this name already exists")]
    Conflict,
    /// PUT of a name that does not exist.
    #[error("no such action")]
    NotFound,
    /// A conditional change (`If-Match`) of an action that has changed since that version.
    #[error("the action is at version {current}")]
    VersionMismatch {
        /// The version it is at.
        current: i64,
    },
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e.into())
    }
}

/// The current version of an action, unless deleted.
pub async fn get(db: &Database, tenant_id: &str, name: &str) -> Result<Option<Action>, DbError> {
    let row: Option<ActionRow> = db
        .fetch_optional(
            "SELECT * FROM actions WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL",
            args![tenant_id, name],
        )
        .await?;
    row.map(Action::from_row).transpose()
}

/// The current version of an action, unless deleted, read inside a transaction.
pub async fn get_in(tx: &mut crate::db::Tx, tenant_id: &str, name: &str) -> Result<Option<Action>, DbError> {
    let row: Option<ActionRow> = tx
        .fetch_optional(
            "SELECT * FROM actions WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL",
            args![tenant_id, name],
        )
        .await?;
    row.map(Action::from_row).transpose()
}

/// Actions ordered by name, after `after` (exclusive), at most `limit`.
pub async fn list(db: &Database, tenant_id: &str, after: &str, limit: i64) -> Result<Vec<Action>, DbError> {
    let rows: Vec<ActionRow> = db
        .fetch_all(
            "SELECT * FROM actions WHERE tenant_id = $1 AND name > $2 AND deleted_at IS NULL \
             ORDER BY name LIMIT $3",
            args![tenant_id, after, limit],
        )
        .await?;
    rows.into_iter().map(Action::from_row).collect()
}

/// Every enabled action of a tenant (tool export and MCP listing).
pub async fn list_enabled(db: &Database, tenant_id: &str) -> Result<Vec<Action>, DbError> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = list(db, tenant_id, &after, 500).await?;
        let done = page.len() < 500;
        if let Some(last) = page.last() {
            after = last.declaration.name.clone();
        }
        out.extend(page.into_iter().filter(|a| a.declaration.enabled));
        if done {
            return Ok(out);
        }
    }
}

/// Stored versions, newest first, with versions below `before`.
pub async fn versions(
    db: &Database,
    tenant_id: &str,
    name: &str,
    before: i64,
    limit: i64,
) -> Result<Vec<ActionVersion>, DbError> {
    Ok(db
        .fetch_all(
            "SELECT version, content_hash, declaration, created_at FROM action_versions \
             WHERE tenant_id = $1 AND name = $2 AND version < $3 ORDER BY version DESC LIMIT $4",
            args![tenant_id, name, before, limit],
        )
        .await?)
}

/// Stores `decl` for the tenant according to `mode`; returns the stored action and what happened.
pub async fn upsert(
    db: &Database,
    tenant_id: &str,
    decl: &ActionDeclaration,
    source: Source,
    mode: UpsertMode,
) -> Result<(Action, Upserted), StoreError> {
    let canonical = decl.canonical_json();
    let hash = decl.content_hash();
    let now = now_ms();
    let name = decl.name.as_str();
    let file_hash = (mode == UpsertMode::ApplyFile).then(|| hash.clone());
    let mut tx = db.begin().await?;
    let existing: Option<ActionRow> = tx
        .fetch_optional(
            db::locking(&tx, "SELECT * FROM actions WHERE tenant_id = $1 AND name = $2"),
            args![tenant_id, name],
        )
        .await?;
    let live = existing.as_ref().filter(|r| r.deleted_at.is_none());
    let (row, kind) = match (mode, &existing, live) {
        (UpsertMode::CreateOnly, _, Some(_)) => return Err(StoreError::Conflict),
        (UpsertMode::UpdateOnly(_), _, None) => return Err(StoreError::NotFound),
        (UpsertMode::UpdateOnly(Some(expected)), _, Some(row)) if row.version != expected => {
            return Err(StoreError::VersionMismatch { current: row.version });
        }
        (UpsertMode::ApplyFile, Some(row), _) if row.file_hash.as_deref() == Some(hash.as_str()) => {
            return Ok((Action::from_row(row.clone())?, Upserted::Skipped));
        }
        (mode, _, Some(row)) if row.content_hash == hash => {
            // A file now saying what the action already says (an admin's edit put there, say) is
            // applied all the same: its hash is kept, so that the next API edit stands until the
            // file changes again rather than being undone at the next start.
            if mode == UpsertMode::ApplyFile && row.file_hash.as_deref() != Some(hash.as_str()) {
                tx.execute(
                    "UPDATE actions SET file_hash = $1 WHERE tenant_id = $2 AND name = $3",
                    args![&hash, tenant_id, name],
                )
                .await?;
                tx.commit().await?;
            }
            return Ok((Action::from_row(row.clone())?, Upserted::Unchanged));
        }
        (_, None, _) => {
            let row = ActionRow {
                id: ids::new_id("act"),
                version: 1,
                declaration: canonical,
                content_hash: hash,
                source: source.as_str().into(),
                file_hash,
                created_at: now,
                updated_at: now,
                deleted_at: None,
            };
            // ON CONFLICT: a concurrent create of the same name (PostgreSQL) found no row to lock.
            let inserted = tx
                .execute(
                    "INSERT INTO actions (tenant_id, name, id, version, declaration, content_hash, \
                     source, file_hash, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
                    args![
                        tenant_id,
                        name,
                        &row.id,
                        row.version,
                        &row.declaration,
                        &row.content_hash,
                        &row.source,
                        row.file_hash.clone(),
                        now,
                        now
                    ],
                )
                .await?;
            if inserted == 0 {
                return Err(StoreError::Conflict);
            }
            (row, Upserted::Created)
        }
        (_, Some(old), _) => {
            let revived = old.deleted_at.is_some();
            let row = ActionRow {
                version: old.version + 1,
                declaration: canonical,
                content_hash: hash,
                source: source.as_str().into(),
                file_hash: file_hash.or_else(|| old.file_hash.clone()),
                created_at: if revived { now } else { old.created_at },
                updated_at: now,
                deleted_at: None,
                ..old.clone()
            };
            tx.execute(
                "UPDATE actions SET version = $1, declaration = $2, content_hash = $3, source = $4, \
                 file_hash = $5, created_at = $6, updated_at = $7, deleted_at = NULL \
                 WHERE tenant_id = $8 AND name = $9",
                args![
                    row.version,
                    &row.declaration,
                    &row.content_hash,
                    &row.source,
                    row.file_hash.clone(),
                    row.created_at,
                    now,
                    tenant_id,
                    name
                ],
            )
            .await?;
            (
                row,
                if revived {
                    Upserted::Created
                } else {
                    Upserted::Updated
                },
            )
        }
    };
    tx.execute(
        "INSERT INTO action_versions (tenant_id, name, version, declaration, content_hash, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        args![
            tenant_id,
            name,
            row.version,
            &row.declaration,
            &row.content_hash,
            now
        ],
    )
    .await?;
    db::bump_counter(&mut tx, &format!("registry:{tenant_id}")).await?;
    tx.commit().await?;
    Ok((Action::from_row(row)?, kind))
}

/// Soft-deletes an action (given a version, only if it is at that version); answers whether
/// one was deleted.
pub async fn delete(
    db: &Database,
    tenant_id: &str,
    name: &str,
    expected_version: Option<i64>,
) -> Result<bool, StoreError> {
    let now = now_ms();
    let mut tx = db.begin().await?;
    if let Some(expected) = expected_version {
        let current: Option<(i64,)> = tx
            .fetch_optional(
                db::locking(
                    &tx,
                    "SELECT version FROM actions WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL",
                ),
                args![tenant_id, name],
            )
            .await?;
        match current {
            None => return Ok(false),
            Some((current,)) if current != expected => {
                return Err(StoreError::VersionMismatch { current });
            }
            Some(_) => {}
        }
    }
    let n = tx
        .execute(
            "UPDATE actions SET deleted_at = $1, updated_at = $1 \
             WHERE tenant_id = $2 AND name = $3 AND deleted_at IS NULL",
            args![now, tenant_id, name],
        )
        .await?;
    if n == 0 {
        // Nothing to delete: nothing to announce or record either.
        return Ok(false);
    }
    db::bump_counter(&mut tx, &format!("registry:{tenant_id}")).await?;
    tx.commit().await?;
    Ok(true)
}
