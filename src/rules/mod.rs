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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::args;
use crate::cache::{CompiledByTenant, TtlCache};
use crate::db::{Database, DbError};
use crate::events::catalog::Catalog;
use crate::http::ApiError;
use engine::{CompiledRule, RuleSet};

pub use routes::routes;

/// The JSON Schema every rule must satisfy.
pub const RULE_SCHEMA: &str = include_str!("../../schemas/rule.schema.json");

/// Rule validation and the per-tenant compiled rule sets.
pub struct Rules {
    schema: jsonschema::Validator,
    sets: TtlCache<String, RuleSet>,
    /// Each tenant's enabled rules as last compiled, with the version compiled: a set reloaded
    /// after its time to live recompiles only the rules changed since (a condition's regexes can
    /// take milliseconds each to compile).
    compiled: CompiledByTenant<(i64, CompiledRule)>,
    /// Event types, for the data of emitted events.
    catalog: Arc<Catalog>,
    /// The limits of an event sent in, which emitted events keep to as well.
    limits: apply::EmitLimits,
}

/// Tenants whose compiled rules are kept between reloads.
const MAX_TENANTS_COMPILED: usize = 10_000;

impl Rules {
    /// Compiles the rule schema; compiled rule sets are kept at most `cache_ttl`; events that
    /// rules emit are held to `catalog` and `limits`.
    pub fn new(cache_ttl: Duration, catalog: Arc<Catalog>, limits: apply::EmitLimits) -> Self {
        let schema: Value = serde_json::from_str(RULE_SCHEMA).expect("the rule schema is valid JSON");
        Self {
            schema: jsonschema::draft202012::new(&schema).expect("the rule schema compiles"),
            sets: TtlCache::new(cache_ttl),
            compiled: CompiledByTenant::new(MAX_TENANTS_COMPILED),
            catalog,
            limits,
        }
    }

    /// Checks a rule against `schemas/rule.schema.json` and compiles it (regexes included).
    pub fn check(&self, id: &str, definition: &Value) -> Result<CompiledRule, ApiError> {
        let problems = crate::registry::model::schema_errors(&self.schema, definition);
        if !problems.is_empty() {
            return Err(ApiError::validation(
                "the rule does not match schemas/rule.schema.json",
                problems,
            ));
        }
        if let Some(condition) = definition.get("if") {
            condition::Condition::check_regex_budget(condition, "/if")
                .map_err(|p| ApiError::validation("the rule is invalid", p))?;
        }
        CompiledRule::compile(id, definition).map_err(|p| ApiError::validation("the rule is invalid", p))
    }

    /// The enabled rules of a tenant, compiled and indexed.
    pub async fn for_tenant(&self, db: &Database, tenant_id: &str) -> Result<Arc<RuleSet>, DbError> {
        self.sets
            .get_or_load(&tenant_id.to_string(), || async {
                let rows: Vec<(String, i64, String)> = db
                    .fetch_all(
                        "SELECT id, version, definition FROM rules WHERE tenant_id = $1 AND enabled = $2 ORDER BY id",
                        args![tenant_id, true],
                    )
                    .await?;
                Ok::<_, DbError>(RuleSet::new(self.compile_changed(tenant_id, &rows)))
            })
            .await
    }

    /// The rules of `rows` (id, version, definition) compiled, reusing those compiled before at
    /// the same version; remembers exactly these for the tenant's next reload.
    fn compile_changed(&self, tenant_id: &str, rows: &[(String, i64, String)]) -> Vec<CompiledRule> {
        let before = self.compiled.of(tenant_id);
        let now: BTreeMap<String, (i64, CompiledRule)> = rows
            .iter()
            .filter_map(|(id, version, definition)| {
                let rule = match before.get(id) {
                    Some((compiled_at, rule)) if compiled_at == version => rule.clone(),
                    _ => {
                        let definition: Value = serde_json::from_str(definition).ok()?;
                        CompiledRule::compile(id, &definition).ok()?
                    }
                };
                Some((id.clone(), (*version, rule)))
            })
            .collect();
        let rules = now.values().map(|(_, rule)| rule.clone()).collect();
        self.compiled.keep(tenant_id, now);
        rules
    }

    /// Rules of a tenant compiled as they are now (to name the conditions of a stored trace), by
    /// id; those that no longer exist are missing. A few queries for any number of rules.
    pub async fn rules_now(
        &self,
        db: &Database,
        tenant_id: &str,
        rule_ids: &[&str],
    ) -> Result<HashMap<String, CompiledRule>, DbError> {
        let compiled = self.compiled.of(tenant_id);
        let mut found = HashMap::with_capacity(rule_ids.len());
        let mut wanted: Vec<&str> = rule_ids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        for chunk in wanted.chunks(500) {
            let placeholders: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT id, version, definition FROM rules WHERE tenant_id = $1 AND id IN ({})",
                placeholders.join(", ")
            );
            let mut values = args![tenant_id];
            values.extend(chunk.iter().map(|id| (*id).into()));
            let rows: Vec<(String, i64, String)> = db.fetch_all(sqlx::AssertSqlSafe(sql), values).await?;
            for (id, version, definition) in rows {
                let known = compiled
                    .get(&id)
                    .filter(|(v, _)| *v == version)
                    .map(|(_, r)| r.clone());
                let rule = known.or_else(|| {
                    let definition: Value = serde_json::from_str(&definition).ok()?;
                    CompiledRule::compile(&id, &definition).ok()
                });
                if let Some(rule) = rule {
                    found.insert(id, rule);
                }
            }
        }
        Ok(found)
    }

    /// What recording an event of this tenant needs to run its rules; `None` when it has none.
    pub async fn context(
        &self,
        db: &Database,
        tenant_id: &str,
        validators: &Arc<crate::registry::validators::Validators>,
    ) -> Result<Option<Arc<apply::RuleContext>>, DbError> {
        let rules = self.for_tenant(db, tenant_id).await?;
        if rules.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(apply::RuleContext {
            rules,
            validators: validators.clone(),
            catalog: self.catalog.for_tenant(db, tenant_id).await?,
            limits: self.limits,
        })))
    }

    /// What an emitted event's data must keep to, besides its type's schema.
    pub fn limits(&self) -> apply::EmitLimits {
        self.limits
    }

    /// Forgets a tenant's compiled rules after a change.
    pub fn changed(&self, tenant_id: &str) {
        self.sets.invalidate(&tenant_id.to_string());
    }

    /// Forgets every tenant's compiled rules.
    pub fn forget_all(&self) {
        self.sets.clear();
        self.compiled.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule is compiled once per version: a reload reuses it while its version stands.
    #[test]
    fn rules_are_recompiled_only_when_their_version_moves() {
        let dir = std::path::Path::new("/nonexistent");
        let catalog = Arc::new(Catalog::load(dir, Duration::from_secs(1)).unwrap());
        let limits = apply::EmitLimits {
            max_bytes: 1 << 20,
            max_depth: 64,
        };
        let rules = Rules::new(Duration::from_secs(1), catalog, limits);
        let definition = serde_json::json!({"name": "r", "when": {"event_type": "a.b"},
            "then": [{"emit": {"type": "c.d"}}]})
        .to_string();
        let row =
            |version: i64, definition: &str| vec![("rul_1".to_string(), version, definition.to_string())];
        assert_eq!(rules.compile_changed("ten_1", &row(1, &definition)).len(), 1);
        // Same version: the compiled rule is reused (the text is not even read again).
        assert_eq!(rules.compile_changed("ten_1", &row(1, "not json")).len(), 1);
        // A new version is compiled from its text.
        assert_eq!(rules.compile_changed("ten_1", &row(2, "not json")).len(), 0);
        assert_eq!(rules.compile_changed("ten_1", &row(3, &definition)).len(), 1);
        // Another tenant's rule of the same id and version is its own.
        assert_eq!(rules.compile_changed("ten_2", &row(3, "not json")).len(), 0);
    }

    /// The cap on regexes applies when a rule is saved; one stored under an earlier limit
    /// still loads and runs.
    #[test]
    fn the_regex_cap_applies_to_saves_not_to_stored_rules() {
        let rules = Rules::new(
            Duration::from_secs(1),
            Arc::new(Catalog::load(std::path::Path::new("/nonexistent"), Duration::from_secs(1)).unwrap()),
            apply::EmitLimits {
                max_bytes: 1 << 20,
                max_depth: 64,
            },
        );
        let regex = serde_json::json!({"field": "data.s", "op": "matches", "value": "x"});
        let many = serde_json::json!({"name": "r", "when": {"event_type": "a.b"},
            "if": {"any": vec![regex; condition::MAX_REGEXES + 1]},
            "then": [{"emit": {"type": "c.d"}}]});
        let refused = rules.check("rul_1", &many).unwrap_err();
        assert_eq!(refused.details[0]["path"], "/if");
        let stored = vec![("rul_1".to_string(), 1, many.to_string())];
        assert_eq!(rules.compile_changed("ten_1", &stored).len(), 1);
    }
}
