//! Declarative actions: every `*.json` in the actions directory is applied to every tenant at
//! start (and to a new tenant by `opsiq init`).
//!
//! Semantics: a file is applied when it is new or its content changed since it was last applied
//! to that tenant; it then becomes a new version of the action. Edits made over the API to a
//! file-declared action stand until the file itself changes. Deleting the action over the API
//! is likewise kept until the file changes. Removing a file does not delete the action.

use std::path::Path;

use super::model::ActionDeclaration;
use super::store::{self, Source, UpsertMode, Upserted};
use crate::db::Database;

/// A problem with the declarative files; start-up stops with it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The directory or a file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file or directory.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Storing failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// One action file as read.
#[derive(Debug, Clone)]
pub struct ActionFile {
    /// The file's name (not its path), which the audit log names as the change's maker.
    pub name: String,
    /// What it declares.
    pub declaration: ActionDeclaration,
}

/// Reads and validates every action file; a missing directory is no files.
pub fn read_action_files(dir: &Path) -> Result<Vec<ActionFile>, FileError> {
    let mut out = Vec::new();
    for path in json_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|e| FileError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let decl: ActionDeclaration = serde_json::from_str(&text).map_err(|e| FileError::Read {
            path: path.display().to_string(),
            message: format!("not a valid action declaration: {e}"),
        })?;
        decl.validate().map_err(|problems| FileError::Read {
            path: path.display().to_string(),
            message: problems
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect::<Vec<_>>()
                .join("; "),
        })?;
        out.push(ActionFile {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            declaration: decl,
        });
    }
    Ok(out)
}

/// The `*.json` files of a directory in name order; none if the directory does not exist.
pub fn json_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, FileError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(FileError::Read {
                path: dir.display().to_string(),
                message: e.to_string(),
            });
        }
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Applies the files to one tenant, each change recorded in the audit log (hashed under
/// `audit_key`) as made by its file; returns how many actions were created or updated.
pub async fn apply_to_tenant(
    db: &Database,
    audit_key: &[u8; 32],
    tenant_id: &str,
    files: &[ActionFile],
) -> Result<usize, FileError> {
    let mut changed = 0;
    for file in files {
        let target = format!("/v1/actions/{}", file.declaration.name);
        let applied = apply_one(db, tenant_id, &file.declaration);
        let route = ("PUT /v1/actions/{name}", target.as_str());
        if crate::audit::by_file(audit_key, (tenant_id, &file.name), route, applied).await? {
            changed += 1;
        }
    }
    Ok(changed)
}

/// Applies one declaration to one tenant; whether it created or updated the action.
async fn apply_one(db: &Database, tenant_id: &str, decl: &ActionDeclaration) -> Result<bool, FileError> {
    // Files are applied to every tenant, an endpoint belongs to one: elsewhere the action
    // has no endpoint (its calls are refused) rather than another tenant's.
    let own;
    let decl = match &decl.endpoint_id {
        Some(endpoint_id)
            if crate::delivery::endpoints::get(db, tenant_id, endpoint_id)
                .await
                .map_err(store::StoreError::from)?
                .is_none() =>
        {
            tracing::warn!(
                tenant_id,
                action = %decl.name,
                endpoint_id,
                "the action file names an endpoint this tenant does not have; applied without it"
            );
            own = ActionDeclaration {
                endpoint_id: None,
                ..decl.clone()
            };
            &own
        }
        _ => decl,
    };
    let upsert = || store::upsert(db, tenant_id, decl, Source::File, UpsertMode::ApplyFile);
    let (_, what) = match upsert().await {
        // Another replica starting at the same moment created it first: apply over theirs.
        Err(store::StoreError::Conflict) => upsert().await?,
        done => done?,
    };
    Ok(matches!(what, Upserted::Created | Upserted::Updated))
}
