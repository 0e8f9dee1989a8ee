//! Compiled JSON Schema validators and guards, cached by (tenant, action, version): compiling is
//! far more expensive than evaluating, and a version's declaration never changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::guards::{self, Guard};
use super::model::compile_schema;

/// Which schema of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Which {
    /// `input_schema`.
    Input,
    /// `output_schema`.
    Output,
}

type Key = (String, String, i64, Which);

/// (tenant, action, version).
type VersionKey = (String, String, i64);

/// An action version's compiled output schema, or `None` when it declares none.
type OutputSchema = Option<Arc<jsonschema::Validator>>;

/// The cache.
#[derive(Default)]
pub struct Validators {
    map: Mutex<HashMap<Key, Arc<jsonschema::Validator>>>,
    /// Output schemas by (tenant, action, version), including "this version has none".
    outputs: Mutex<HashMap<VersionKey, OutputSchema>>,
    /// Compiled guards by (tenant, action, version).
    guards: Mutex<HashMap<VersionKey, Arc<[Guard]>>>,
}

impl Validators {
    /// The output validator of an action version if it is known (`Some(None)`: no output schema).
    pub fn known_output(
        &self,
        tenant_id: &str,
        action: &str,
        version: i64,
    ) -> Option<Option<Arc<jsonschema::Validator>>> {
        let key = (tenant_id.to_string(), action.to_string(), version);
        self.outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }

    /// Compiles and remembers the output schema (or its absence) of an action version.
    pub fn learn_output(
        &self,
        tenant_id: &str,
        action: &str,
        version: i64,
        schema: Option<&Value>,
    ) -> Option<Arc<jsonschema::Validator>> {
        let compiled = schema.and_then(|s| compile_schema(s).ok()).map(Arc::new);
        remember(
            &self.outputs,
            (tenant_id.to_string(), action.to_string(), version),
            compiled.clone(),
        );
        compiled
    }

    /// The validator for a schema of an action version, compiling it on first use.
    pub fn get(
        &self,
        tenant_id: &str,
        action: &str,
        version: i64,
        which: Which,
        schema: &Value,
    ) -> Result<Arc<jsonschema::Validator>, String> {
        let key = (tenant_id.to_string(), action.to_string(), version, which);
        if let Some(v) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(v.clone());
        }
        let compiled = Arc::new(compile_schema(schema).map_err(|(_, m)| m)?);
        remember(&self.map, key, compiled.clone());
        Ok(compiled)
    }

    /// The compiled guards of an action version (`None` when it declares none), compiling them
    /// on first use. Guards were checked against their schema when declared; a stored set that
    /// no longer compiles is an error, so a call is refused rather than let past its guards.
    pub fn guards(
        &self,
        tenant_id: &str,
        action: &str,
        version: i64,
        declared: &[Value],
    ) -> Result<Option<Arc<[Guard]>>, String> {
        if declared.is_empty() {
            return Ok(None);
        }
        let key = (tenant_id.to_string(), action.to_string(), version);
        if let Some(g) = self.guards.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(Some(g.clone()));
        }
        let compiled: Arc<[Guard]> = Arc::from(guards::compile(declared).map_err(|problems| {
            let first = problems.first().map(|p| format!("{}: {}", p.path, p.message));
            format!(
                "the stored guards of {action} version {version} do not compile ({})",
                first.unwrap_or_default()
            )
        })?);
        remember(&self.guards, key, compiled.clone());
        Ok(Some(compiled))
    }
}

/// Keeps a compiled value; a map grown past any real registry's size starts over rather than
/// grow without bound.
fn remember<K: std::hash::Hash + Eq, V>(map: &Mutex<HashMap<K, V>>, key: K, value: V) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() > 50_000 {
        map.clear();
    }
    map.insert(key, value);
}
