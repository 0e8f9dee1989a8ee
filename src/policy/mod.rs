//! Role policy: casbin RBAC with domains (domain = tenant), allow and deny rows, deny wins, globs
//! on action names. Rows come from `policies/policy.csv` (domain `*`, every tenant) and from each
//! tenant's API-managed rows (`GET|PUT /v1/policies`).
//!
//! Each tenant has an enforcer of its own over the file rows and its rows, built on first use and
//! rebuilt when the tenant's change counter (`policy:<tenant>`) moves. The counter is read on
//! every decision, so an edit made through any replica takes effect on the next request
//! everywhere, and one tenant's edit (or ten thousand rows) never slows another's decisions.
//! Decisions are cached per (subjects, action) until the next rebuild, since casbin evaluates
//! rows linearly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use casbin::function_map::OperatorFunction;
use casbin::rhai::Dynamic;
use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::args;
use crate::db::{self, Database, DbError};

mod routes;
pub use routes::routes;

/// The built-in model, used when `policies/model.conf` is absent.
pub const DEFAULT_MODEL: &str = include_str!("../../policies/model.conf");

/// One policy row as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRow {
    /// `role:<name>` or `agent:<id>`.
    pub subject: String,
    /// Action name or glob (`refund_*`, `*`).
    pub object: String,
    /// Always `invoke` today.
    #[serde(default = "default_act")]
    pub act: String,
    /// `allow` or `deny`.
    pub effect: String,
}

fn default_act() -> String {
    "invoke".into()
}

impl PolicyRow {
    /// Validates a row: every problem, each naming its field.
    pub fn check(&self) -> Result<(), Vec<(&'static str, String)>> {
        let word = |s: &str| {
            (1..=64).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        let mut problems = Vec::new();
        if !matches!(self.subject.split_once(':'), Some(("role" | "agent", rest)) if word(rest)) {
            problems.push(("subject", "must be role:<name> or agent:<id>".into()));
        }
        let glob_ok = (1..=128).contains(&self.object.len())
            && self
                .object
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'*' | b'?'));
        if !glob_ok {
            problems.push((
                "object",
                "must be an action name or a glob like refund_* or *".into(),
            ));
        }
        if self.act != "invoke" {
            problems.push(("act", "must be invoke".into()));
        }
        if self.effect != "allow" && self.effect != "deny" {
            problems.push(("effect", "must be allow or deny".into()));
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems),
        }
    }
}

/// The outcome of a policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Some row allows and none denies.
    Allow,
    /// Denied; the sentence names what was missing or what denied it.
    Deny(String),
}

/// Failures loading or evaluating policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The model or a row is invalid.
    #[error("policy: {0}")]
    Casbin(String),
    /// A file could not be read.
    #[error("policy file {path}: {message}")]
    File {
        /// Which file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A conditional replace (`If-Match`) of rows that changed since they were read.
    #[error("the policy rows changed since they were read")]
    Changed,
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<casbin::Error> for PolicyError {
    fn from(e: casbin::Error) -> Self {
        PolicyError::Casbin(e.to_string())
    }
}

impl From<sqlx::Error> for PolicyError {
    fn from(e: sqlx::Error) -> Self {
        PolicyError::Db(e.into())
    }
}

/// `hasSubject(r.subs, p.sub)`: whether the space-separated subject list contains the row's subject.
fn has_subject(subs: Dynamic, sub: Dynamic) -> Dynamic {
    let subs = subs.into_string().unwrap_or_default();
    let sub = sub.into_string().unwrap_or_default();
    subs.split(' ').any(|s| s == sub).into()
}

/// A built enforcer over a fixed set of rows; decides without caching.
pub struct Compiled {
    enforcer: Enforcer,
    /// Rows per tenant (and `*`), to explain denials.
    rows: HashMap<String, Vec<PolicyRow>>,
}

impl Compiled {
    /// Builds the enforcer from the model and rows: `(domain, row)` with domain a tenant id or `*`.
    pub async fn new(model_text: &str, rows: Vec<(String, PolicyRow)>) -> Result<Self, PolicyError> {
        let model = DefaultModel::from_str(model_text).await?;
        let mut enforcer = Enforcer::new(model, MemoryAdapter::default()).await?;
        enforcer.add_function("hasSubject", OperatorFunction::Arg2(has_subject));
        enforcer.add_function("globMatch", OperatorFunction::Arg2(glob_match_fn));
        let casbin_rows: Vec<Vec<String>> = rows
            .iter()
            .map(|(dom, r)| {
                vec![
                    r.subject.clone(),
                    dom.clone(),
                    r.object.clone(),
                    r.act.clone(),
                    r.effect.clone(),
                ]
            })
            .collect();
        if !casbin_rows.is_empty() {
            enforcer.add_policies(casbin_rows).await?;
        }
        let mut by_domain: HashMap<String, Vec<PolicyRow>> = HashMap::new();
        for (dom, row) in rows {
            by_domain.entry(dom).or_default().push(row);
        }
        Ok(Self {
            enforcer,
            rows: by_domain,
        })
    }

    /// Whether `subjects` may invoke `action` in `tenant_id` (casbin, deny wins).
    pub fn decide(
        &self,
        tenant_id: &str,
        subjects: &[String],
        action: &str,
    ) -> Result<Decision, PolicyError> {
        let subs = subjects.join(" ");
        if self
            .enforcer
            .enforce((subs.as_str(), tenant_id, action, "invoke"))?
        {
            Ok(Decision::Allow)
        } else {
            Ok(explain_denial(&self.rows, tenant_id, subjects, action))
        }
    }
}

/// One tenant's enforcer at one version of its rows, and the decisions it has made.
struct TenantPolicy {
    version: i64,
    compiled: Compiled,
    /// By (space-separated subjects, action).
    decisions: std::sync::Mutex<HashMap<(String, String), Decision>>,
    /// When it was last used, on the engine's use counter: the least recently used goes first.
    last_used: AtomicU64,
}

/// Tenants whose enforcers are kept; past it the least recently used is dropped (and rebuilt
/// at its next use). With the per-tenant cap on decisions this bounds the cache's memory.
const MAX_CACHED_TENANTS: usize = 256;

/// Decisions kept per tenant; past it that tenant's start over.
const MAX_CACHED_DECISIONS: usize = 1_000;

/// The change counter that moves when a tenant's policy rows change.
pub fn counter_name(tenant_id: &str) -> String {
    format!("policy:{tenant_id}")
}

/// The policy engine shared by every request.
pub struct Policy {
    model_text: String,
    file_rows: Vec<PolicyRow>,
    tenants: std::sync::Mutex<HashMap<String, Arc<TenantPolicy>>>,
    /// Counts uses of the enforcers, to tell which was used least recently.
    uses: AtomicU64,
    /// One lock per tenant being built, so that a burst of calls after an edit builds its
    /// enforcer once, while other tenants' builds go on.
    building: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Parses `policy.csv`: `p, subject, domain, object, act, effect` lines; `#` comments.
pub fn parse_policy_csv(text: &str) -> Result<Vec<PolicyRow>, String> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        match cols.as_slice() {
            ["p", subject, "*", object, act, effect] => {
                let row = PolicyRow {
                    subject: subject.to_string(),
                    object: object.to_string(),
                    act: act.to_string(),
                    effect: effect.to_string(),
                };
                row.check().map_err(|problems| {
                    let each: Vec<String> = problems.iter().map(|(f, m)| format!("{f} {m}")).collect();
                    format!("line {}: {}", n + 1, each.join("; "))
                })?;
                rows.push(row);
            }
            _ => {
                return Err(format!(
                    "line {}: expected `p, subject, *, object, act, effect`",
                    n + 1
                ));
            }
        }
    }
    Ok(rows)
}

/// `globMatch(r.obj, p.obj)`, replacing casbin's own (which compiles a glob per row and panics
/// on a malformed one) with our linear matcher.
fn glob_match_fn(name: Dynamic, pattern: Dynamic) -> Dynamic {
    let name = name.into_string().unwrap_or_default();
    let pattern = pattern.into_string().unwrap_or_default();
    crate::glob::matches(&pattern, &name).into()
}

impl Policy {
    /// Reads `model.conf` and `policy.csv` from `dir` (either may be absent).
    pub fn from_dir(dir: &Path) -> Result<Self, PolicyError> {
        let read = |name: &str| -> Result<Option<String>, PolicyError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(PolicyError::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }),
            }
        };
        let model_text = read("model.conf")?.unwrap_or_else(|| DEFAULT_MODEL.to_string());
        let file_rows = match read("policy.csv")? {
            Some(text) => parse_policy_csv(&text).map_err(|message| PolicyError::File {
                path: dir.join("policy.csv").display().to_string(),
                message,
            })?,
            None => Vec::new(),
        };
        Ok(Self {
            model_text,
            file_rows,
            tenants: std::sync::Mutex::new(HashMap::new()),
            uses: AtomicU64::new(0),
            building: std::sync::Mutex::default(),
        })
    }

    /// The rows from `policy.csv`.
    pub fn file_rows(&self) -> &[PolicyRow] {
        &self.file_rows
    }

    async fn build(&self, db: &Database, tenant_id: &str, version: i64) -> Result<TenantPolicy, PolicyError> {
        let rows = self
            .file_rows
            .iter()
            .map(|r| ("*".to_string(), r.clone()))
            .chain(
                tenant_rows(db, tenant_id)
                    .await?
                    .into_iter()
                    .map(|r| (tenant_id.to_string(), r)),
            )
            .collect();
        Ok(TenantPolicy {
            version,
            compiled: Compiled::new(&self.model_text, rows).await?,
            decisions: std::sync::Mutex::default(),
            last_used: AtomicU64::new(self.uses.fetch_add(1, Ordering::Relaxed)),
        })
    }

    fn cached(&self, tenant_id: &str, version: i64) -> Option<Arc<TenantPolicy>> {
        self.tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant_id)
            .filter(|t| t.version == version)
            .inspect(|t| {
                t.last_used
                    .store(self.uses.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed)
            })
            .cloned()
    }

    /// The tenant's enforcer at `version`, built if this process has none at it.
    async fn tenant(
        &self,
        db: &Database,
        tenant_id: &str,
        version: i64,
    ) -> Result<Arc<TenantPolicy>, PolicyError> {
        if let Some(t) = self.cached(tenant_id, version) {
            return Ok(t);
        }
        let lock = self
            .building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant_id.to_string())
            .or_default()
            .clone();
        let built = {
            let _building = lock.lock().await;
            match self.cached(tenant_id, version) {
                Some(t) => Ok(t),
                None => self.build(db, tenant_id, version).await.map(Arc::new),
            }
        };
        {
            let mut building = self.building.lock().unwrap_or_else(|e| e.into_inner());
            // The last one out removes the tenant's lock (only the map's copy and this one are
            // left; others take theirs from the map, under this same guard).
            if Arc::strong_count(&lock) <= 2 && building.get(tenant_id).is_some_and(|l| Arc::ptr_eq(l, &lock))
            {
                building.remove(tenant_id);
            }
        }
        let built = built?;
        if self
            .cached(tenant_id, version)
            .is_some_and(|t| Arc::ptr_eq(&t, &built))
        {
            return Ok(built);
        }
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if tenants.len() >= MAX_CACHED_TENANTS
            && !tenants.contains_key(tenant_id)
            && let Some(oldest) = tenants
                .iter()
                .min_by_key(|(_, t)| t.last_used.load(Ordering::Relaxed))
                .map(|(id, _)| id.clone())
        {
            tenants.remove(&oldest);
        }
        // A call that read the version before an edit must not replace the newer enforcer.
        if tenants.get(tenant_id).is_none_or(|t| t.version < version) {
            tenants.insert(tenant_id.to_string(), built.clone());
        }
        Ok(built)
    }

    /// Decides whether `subjects` (e.g. `agent:a1`, `role:support`) may invoke `action` in `tenant`
    /// under the tenant's current policy (`version`, when the caller already read it, else read
    /// here).
    pub async fn check(
        self: &Arc<Self>,
        db: &Database,
        version: Option<i64>,
        (tenant_id, subjects, action): (&str, &[String], &str),
    ) -> Result<Decision, PolicyError> {
        let version = match version {
            Some(v) => v,
            None => db::counter(db, &counter_name(tenant_id)).await?,
        };
        let tenant = self.tenant(db, tenant_id, version).await?;
        let key = (subjects.join(" "), action.to_string());
        if let Some(d) = tenant
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(d.clone());
        }
        let decision = tenant.compiled.decide(tenant_id, subjects, action)?;
        let mut decisions = tenant.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if decisions.len() >= MAX_CACHED_DECISIONS {
            decisions.clear();
        }
        decisions.insert(key, decision.clone());
        Ok(decision)
    }
}

fn explain_denial(
    rows: &HashMap<String, Vec<PolicyRow>>,
    tenant_id: &str,
    subjects: &[String],
    action: &str,
) -> Decision {
    let applicable = rows
        .get("*")
        .into_iter()
        .chain(rows.get(tenant_id))
        .flatten()
        .filter(|r| subjects.contains(&r.subject) && crate::glob::matches(&r.object, action));
    let deny = applicable.clone().find(|r| r.effect == "deny");
    let roles: Vec<&str> = subjects.iter().filter_map(|s| s.strip_prefix("role:")).collect();
    Decision::Deny(match deny {
        Some(r) => format!(
            "policy denies {} the action {action} (row {} {} {})",
            r.subject, r.subject, r.object, r.effect
        ),
        None if roles.is_empty() => {
            format!("this agent has no roles, and no policy row allows it to invoke {action}")
        }
        None => format!(
            "no policy row allows roles [{}] to invoke {action}",
            roles.join(", ")
        ),
    })
}

/// The `ETag` of a tenant's API-managed rows: a hash of them in order.
pub fn rows_tag(rows: &[PolicyRow]) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_string(rows).unwrap_or_default();
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}

/// Replaces a tenant's API-managed rows and bumps the policy version, in one transaction; given
/// a tag (`If-Match`), only if the rows are still those it was taken of. Answers the new tag.
pub async fn replace_rows(
    db: &Database,
    tenant_id: &str,
    rows: &[PolicyRow],
    expected_tag: Option<&str>,
) -> Result<String, PolicyError> {
    let mut tx = db.begin().await?;
    // One replace at a time per tenant: on PostgreSQL two interleaved ones would otherwise each
    // delete only the rows they saw and leave both sets behind.
    tx.execute(
        db::locking(&tx, "SELECT 1 FROM tenants WHERE id = $1"),
        args![tenant_id],
    )
    .await?;
    if let Some(expected) = expected_tag {
        let current: Vec<(String, String, String, String)> = tx
            .fetch_all(
                "SELECT subject, object, act, effect FROM policy_rows WHERE tenant_id = $1 ORDER BY position",
                args![tenant_id],
            )
            .await?;
        if rows_tag(&current.into_iter().map(PolicyRow::from).collect::<Vec<_>>()) != expected {
            return Err(PolicyError::Changed);
        }
    }
    tx.execute("DELETE FROM policy_rows WHERE tenant_id = $1", args![tenant_id])
        .await?;
    // Multi-row inserts: the tenant's lock is held for a few statements, not one per row.
    let values = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            args![
                crate::ids::new_id("pol"),
                tenant_id,
                &r.subject,
                &r.object,
                &r.act,
                &r.effect,
                i as i64
            ]
        })
        .collect();
    db::insert_rows(
        &mut tx,
        "INSERT INTO policy_rows (id, tenant_id, subject, object, act, effect, position) VALUES",
        7,
        values,
    )
    .await?;
    db::bump_counter(&mut tx, &counter_name(tenant_id)).await?;
    // The counter every tenant shared before versions were per tenant: replicas of an earlier
    // version still read it, so an edit made here reaches them during a rolling upgrade.
    db::bump_counter(&mut tx, "policy").await?;
    tx.commit().await?;
    Ok(rows_tag(rows))
}

impl From<(String, String, String, String)> for PolicyRow {
    fn from((subject, object, act, effect): (String, String, String, String)) -> Self {
        PolicyRow {
            subject,
            object,
            act,
            effect,
        }
    }
}

/// A tenant's API-managed rows.
pub async fn tenant_rows(db: &Database, tenant_id: &str) -> Result<Vec<PolicyRow>, PolicyError> {
    let rows: Vec<(String, String, String, String)> = db
        .fetch_all(
            "SELECT subject, object, act, effect FROM policy_rows WHERE tenant_id = $1 ORDER BY position",
            args![tenant_id],
        )
        .await?;
    Ok(rows.into_iter().map(PolicyRow::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_file_parses() {
        let rows = parse_policy_csv(include_str!("../../policies/policy.csv")).unwrap();
        assert!(
            rows.iter()
                .any(|r| r.subject == "role:intern" && r.effect == "deny")
        );
        assert!(
            parse_policy_csv("p, role:a, t1, x, invoke, allow").is_err(),
            "file rows apply to every tenant"
        );
        assert!(parse_policy_csv("p, root, *, x, invoke, allow").is_err());
    }

    fn row(subject: &str, object: &str, effect: &str) -> PolicyRow {
        PolicyRow {
            subject: subject.into(),
            object: object.into(),
            act: "invoke".into(),
            effect: effect.into(),
        }
    }

    /// A policy engine with `file_rows` over a fresh SQLite database (kept while `dir` lives).
    async fn engine(dir: &tempfile::TempDir, file_rows: Vec<PolicyRow>) -> (Database, Arc<Policy>) {
        let db = Database::connect(&format!("sqlite://{}", dir.path().join("p.db").display()))
            .await
            .unwrap();
        let policy = Arc::new(Policy {
            model_text: DEFAULT_MODEL.into(),
            file_rows,
            tenants: std::sync::Mutex::default(),
            uses: AtomicU64::new(0),
            building: std::sync::Mutex::default(),
        });
        (db, policy)
    }

    /// One tenant's edit moves its own counter only: the other tenant's enforcer (and its cached
    /// decisions) is kept, and neither sees the other's rows.
    #[tokio::test]
    async fn each_tenant_has_an_enforcer_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (db, policy) = engine(&dir, vec![row("role:everyone", "lookup_*", "allow")]).await;
        for tenant in ["ten_a", "ten_b"] {
            db.execute(
                "INSERT INTO tenants (id, name, jwt_key_enc, created_at) VALUES ($1, $1, '', 0)",
                args![tenant],
            )
            .await
            .unwrap();
        }
        let support = vec!["agent:x".to_string(), "role:support".to_string()];
        let decide = |tenant: &'static str, action: &'static str| {
            let (policy, db, subjects) = (policy.clone(), db.clone(), support.clone());
            async move {
                policy
                    .check(&db, None, (tenant, &subjects, action))
                    .await
                    .unwrap()
            }
        };
        replace_rows(&db, "ten_a", &[row("role:support", "refund_*", "allow")], None)
            .await
            .unwrap();
        assert_eq!(decide("ten_a", "refund_invoice").await, Decision::Allow);
        assert!(matches!(
            decide("ten_b", "refund_invoice").await,
            Decision::Deny(_)
        ));
        let cached_b = policy.cached("ten_b", 0).expect("ten_b's enforcer is kept");

        replace_rows(&db, "ten_a", &[row("role:support", "refund_*", "deny")], None)
            .await
            .unwrap();
        assert_eq!(db::counter(&db, &counter_name("ten_a")).await.unwrap(), 2);
        assert_eq!(
            db::counter(&db, "policy").await.unwrap(),
            2,
            "the shared counter moves too, for replicas of an earlier version"
        );
        assert!(matches!(
            decide("ten_a", "refund_invoice").await,
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide("ten_b", "refund_invoice").await,
            Decision::Deny(_)
        ));
        let still_b = policy.cached("ten_b", 0).expect("ten_b's enforcer is still kept");
        assert!(
            Arc::ptr_eq(&cached_b, &still_b),
            "ten_a's edit rebuilt ten_b's enforcer"
        );
        assert_eq!(
            still_b.decisions.lock().unwrap().len(),
            1,
            "and kept its decision"
        );
        assert!(
            !still_b.compiled.rows.contains_key("ten_a"),
            "ten_b's enforcer holds none of ten_a's rows"
        );
        assert!(
            policy.building.lock().unwrap().is_empty(),
            "build locks are dropped after use"
        );
        db.close().await;
    }

    /// Past the cap the least recently used tenant's enforcer is dropped, not every tenant's.
    #[tokio::test]
    async fn the_least_recently_used_enforcer_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let (db, policy) = engine(&dir, vec![row("role:support", "lookup_*", "allow")]).await;
        let subjects = vec!["role:support".to_string()];
        for n in 0..MAX_CACHED_TENANTS {
            let tenant = format!("ten_{n}");
            let decision = policy
                .check(&db, Some(0), (&tenant, &subjects, "lookup_customer"))
                .await;
            assert_eq!(decision.unwrap(), Decision::Allow);
        }
        // ten_0 is used again, so ten_1 is now the least recently used.
        policy
            .check(&db, Some(0), ("ten_0", &subjects, "lookup_customer"))
            .await
            .unwrap();
        policy
            .check(&db, Some(0), ("ten_new", &subjects, "lookup_customer"))
            .await
            .unwrap();
        let kept = |tenant: &str| policy.tenants.lock().unwrap().contains_key(tenant);
        assert_eq!(policy.tenants.lock().unwrap().len(), MAX_CACHED_TENANTS);
        assert!(kept("ten_0") && kept("ten_new") && kept("ten_2"));
        assert!(!kept("ten_1"), "the least recently used enforcer was kept");
        db.close().await;
    }
}
