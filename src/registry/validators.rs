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

/// The cache.
#[derive(Default)]
pub struct Validators {
    map: Mutex<HashMap<Key, Arc<jsonschema::Validator>>>,
}

impl Validators {
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
