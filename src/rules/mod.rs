//! Rules: "when X happens, if …, do Y". A rule names a trigger (event type pattern), an optional
//! condition tree and outputs (`deliver`, `invoke`, `emit`). Rules run inside the transaction
//! that records the event, so their deliveries, invocations and emitted events are exactly as
//! durable as the event itself; every evaluation is recorded on the event.
//!
//! - [`condition`]: condition trees (shared with action guards).
//! - [`template`]: `{{path}}` templates that keep JSON types.
//! - [`engine`]: compiled rules, the per-tenant index, evaluation.
//! - [`apply`]: carrying out matched outputs in the event's transaction.

pub mod apply;
pub mod condition;
pub mod engine;
mod routes;
pub mod template;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::args;
use crate::cache::TtlCache;
use crate::db::{Database, DbError};
use crate::http::{ApiError, ErrorDetail};
use engine::{CompiledRule, RuleSet};

pub use routes::routes;

/// The JSON Schema every rule must satisfy.
pub const RULE_SCHEMA: &str = include_str!("../../schemas/rule.schema.json");

/// Rule validation and the per-tenant compiled rule sets.
pub struct Rules {
    schema: jsonschema::Validator,
    sets: TtlCache<String, RuleSet>,
}

impl Rules {
    /// Compiles the rule schema; compiled rule sets are kept at most `cache_ttl`.
    pub fn new(cache_ttl: Duration) -> Self {
        let schema: Value = serde_json::from_str(RULE_SCHEMA).expect("the rule schema is valid JSON");
        Self {
            schema: jsonschema::draft202012::new(&schema).expect("the rule schema compiles"),
            sets: TtlCache::new(cache_ttl),
        }
    }

    /// Checks a rule against `schemas/rule.schema.json` and compiles it (regexes included).
    pub fn check(&self, id: &str, definition: &Value) -> Result<CompiledRule, ApiError> {
        let problems: Vec<ErrorDetail> = self
            .schema
            .iter_errors(definition)
            .map(|e| {
                let path = e.instance_path().to_string();
                ErrorDetail {
                    path: if path.is_empty() { "/".into() } else { path },
                    message: e.to_string(),
                }
            })
            .collect();
        if !problems.is_empty() {
            return Err(ApiError::validation(
                "the rule does not match schemas/rule.schema.json",
                problems,
            ));
        }
        CompiledRule::compile(id, definition).map_err(|p| ApiError::validation("the rule is invalid", p))
    }

    /// The enabled rules of a tenant, compiled and indexed.
    pub async fn for_tenant(&self, db: &Database, tenant_id: &str) -> Result<Arc<RuleSet>, DbError> {
        self.sets
            .get_or_load(&tenant_id.to_string(), || async {
                let rows: Vec<(String, String)> = db
                    .fetch_all(
                        "SELECT id, definition FROM rules WHERE tenant_id = $1 AND enabled = $2 ORDER BY id",
                        args![tenant_id, true],
                    )
                    .await?;
                let compiled = rows
                    .iter()
                    .filter_map(|(id, def)| {
                        let def: Value = serde_json::from_str(def).ok()?;
                        CompiledRule::compile(id, &def).ok()
                    })
                    .collect();
                Ok::<_, DbError>(RuleSet::new(compiled))
            })
            .await
    }

    /// What recording an event of this tenant needs to run its rules; `None` when it has none.
    pub async fn context(
        &self,
        db: &Database,
        tenant_id: &str,
        validators: &Arc<crate::registry::validators::Validators>,
    ) -> Result<Option<Arc<apply::RuleContext>>, DbError> {
        let rules = self.for_tenant(db, tenant_id).await?;
        Ok((!rules.is_empty()).then(|| {
            Arc::new(apply::RuleContext {
                rules,
                validators: validators.clone(),
            })
        }))
    }

    /// Forgets a tenant's compiled rules after a change.
    pub fn changed(&self, tenant_id: &str) {
        self.sets.invalidate(&tenant_id.to_string());
    }

    /// Forgets every tenant's compiled rules.
    pub fn forget_all(&self) {
        self.sets.clear();
    }
}
