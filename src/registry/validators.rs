//! Compiled JSON Schema validators, cached by (tenant, action, version): compiling is far more
//! expensive than validating, and a version's schema never changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

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

/// An action version's compiled output schema, or `None` when it declares none.
type OutputSchema = Option<Arc<jsonschema::Validator>>;

/// The cache.
#[derive(Default)]
pub struct Validators {
    map: Mutex<HashMap<Key, Arc<jsonschema::Validator>>>,
    /// Output schemas by (tenant, action, version), including "this version has none".
    outputs: Mutex<HashMap<(String, String, i64), OutputSchema>>,
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
        let mut outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        if outputs.len() > 50_000 {
            outputs.clear();
        }
        outputs.insert(
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
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 50_000 {
            map.clear();
        }
        map.insert(key, compiled.clone());
        Ok(compiled)
    }
}
