//! The tool list an agent may use, in each vendor's exact shape: OpenAI function tools,
//! Anthropic tools and MCP `Tool`s. Only actions the token may invoke (scope AND role) appear,
//! with input schemas every vendor accepts (see [`exported_schema`]).

use serde_json::{Value, json};

use crate::AppState;
use crate::agents::AgentPrincipal;
use crate::http::ApiError;
use crate::policy::Decision;
use crate::registry::{Action, Mode, store};

/// A tool format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"type":"function","function":{"name","description","parameters"}}`.
    OpenAi,
    /// `{"name","description","input_schema"}`.
    Anthropic,
    /// MCP `Tool`: `name`, `title`, `description`, `inputSchema`, `outputSchema`, `annotations`.
    Mcp,
}

impl Format {
    /// Parses `openai`, `anthropic` or `mcp`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "openai" => Some(Format::OpenAi),
            "anthropic" => Some(Format::Anthropic),
            "mcp" => Some(Format::Mcp),
            _ => None,
        }
    }
}

/// The enabled actions this agent may invoke: allowed by its scopes and roles, and pointed at an
/// enabled endpoint (a call to any other is refused as `action_unavailable`).
pub async fn allowed_actions(state: &AppState, agent: &AgentPrincipal) -> Result<Vec<Action>, ApiError> {
    let subjects = agent.subjects();
    let live = state.engine.subscribers(&agent.tenant_id).await?;
    // One policy version for the whole listing.
    let version = match agent.policy_version {
        Some(v) => v,
        None => crate::db::counter(&state.db, &crate::policy::counter_name(&agent.tenant_id)).await?,
    };
    let mut out = Vec::new();
    for action in store::list_enabled(&state.db, &agent.tenant_id).await? {
        let name = &action.declaration.name;
        let deliverable = (action.declaration.endpoint_id.as_ref())
            .is_some_and(|id| live.iter().any(|endpoint| &endpoint.id == id));
        if !deliverable || !super::scope_allows(&agent.scopes, name) {
            continue;
        }
        if state
            .policy
            .check(&state.db, Some(version), (&agent.tenant_id, &subjects, name))
            .await?
            == Decision::Allow
        {
            out.push(action);
        }
    }
    Ok(out)
}

/// Keywords OpenAI and Anthropic refuse at the top of a tool's input schema (the whole request
/// that carries the tool is refused), though JSON Schema allows them.
const REFUSED_AT_TOP: &[&str] = &["oneOf", "anyOf", "allOf", "not", "enum"];

/// `schema` as every model vendor takes it, and what it had to leave out said in words: the
/// keywords in [`REFUSED_AT_TOP`] are taken off the top. What they say is kept where it can be:
/// the fields of `allOf` branches (and of `oneOf`/`anyOf` branches, as optional) join the top's
/// `properties` (and, for `allOf`, `required`); which fields `oneOf`/`anyOf` ask for is said in
/// plain words, anything else as JSON. A `$ref` into a part taken off is pointed at a copy kept
/// under `$defs`. The gateway still checks every call against the whole schema; a call the
/// description did not steer right gets a 422 naming what is wrong.
pub fn exported_schema(schema: &Value) -> (Value, Option<String>) {
    let Some(map) = schema.as_object() else {
        return (schema.clone(), None);
    };
    if !REFUSED_AT_TOP.iter().any(|k| map.contains_key(*k)) {
        return (schema.clone(), None);
    }
    let mut kept = map.clone();
    let mut sentences = Vec::new();
    for &keyword in REFUSED_AT_TOP {
        let Some(value) = kept.remove(keyword) else {
            continue;
        };
        let branches: Vec<Value> = match value.as_array() {
            Some(branches) if matches!(keyword, "allOf" | "oneOf" | "anyOf") => branches
                .iter()
                .map(|b| resolve_local_ref(schema, b).unwrap_or(b).clone())
                .collect(),
            _ => Vec::new(),
        };
        let fields_only = !branches.is_empty() && branches.iter().all(only_fields);
        if fields_only {
            for branch in &branches {
                merge_properties(&mut kept, branch);
                if keyword == "allOf" {
                    merge_required(&mut kept, branch);
                }
            }
        }
        if !(fields_only && keyword == "allOf") {
            sentences.push(describe(
                keyword,
                &value,
                fields_only.then_some(branches.as_slice()),
            ));
        }
        keep_referenced(&mut kept, keyword, value);
    }
    let said = (!sentences.is_empty()).then(|| sentences.join(" "));
    (Value::Object(kept), said)
}

/// The schema a branch that is only `{"$ref": "#/…"}` points at, inside `root`.
fn resolve_local_ref<'a>(root: &'a Value, branch: &Value) -> Option<&'a Value> {
    let map = branch.as_object().filter(|m| m.len() == 1)?;
    let pointer = map.get("$ref")?.as_str()?.strip_prefix('#')?;
    root.pointer(pointer)
}

/// Whether a branch only names fields: `properties`, `required` and the like, nothing that
/// constrains values across fields.
fn only_fields(branch: &Value) -> bool {
    const FIELD_KEYWORDS: &[&str] = &["type", "properties", "required", "title", "description"];
    branch.as_object().is_some_and(|b| {
        b.keys().all(|k| FIELD_KEYWORDS.contains(&k.as_str())) && b.get("type").is_none_or(|t| t == "object")
    })
}

/// Adds `branch`'s properties the top does not have.
fn merge_properties(top: &mut serde_json::Map<String, Value>, branch: &Value) {
    let Some(properties) = branch.get("properties").and_then(Value::as_object) else {
        return;
    };
    let into = top.entry("properties").or_insert_with(|| json!({}));
    if let Some(into) = into.as_object_mut() {
        for (name, property) in properties {
            into.entry(name.clone()).or_insert_with(|| property.clone());
        }
    }
}

/// Adds `branch`'s required fields to the top's.
fn merge_required(top: &mut serde_json::Map<String, Value>, branch: &Value) {
    let Some(required) = branch.get("required").and_then(Value::as_array) else {
        return;
    };
    let into = top.entry("required").or_insert_with(|| json!([]));
    if let Some(into) = into.as_array_mut() {
        for name in required {
            if !into.contains(name) {
                into.push(name.clone());
            }
        }
    }
}

/// Keeps `value` (what `keyword` held at the top) under `$defs` if a `$ref` left in `kept`
/// points into it, and points those references there.
fn keep_referenced(kept: &mut serde_json::Map<String, Value>, keyword: &str, value: Value) {
    let from = format!("#/{keyword}");
    let to = format!("#/$defs/opsiq_{keyword}");
    let pointed = kept
        .values_mut()
        .fold(false, |pointed, child| repoint(child, &from, &to) | pointed);
    if pointed {
        let defs = kept.entry("$defs").or_insert_with(|| json!({}));
        if let Some(defs) = defs.as_object_mut() {
            defs.insert(format!("opsiq_{keyword}"), value);
        }
    }
}

/// Rewrites every `$ref` under `node` that points at `from` or below it to point under `to`;
/// whether there was one.
fn repoint(node: &mut Value, from: &str, to: &str) -> bool {
    match node {
        Value::Object(map) => {
            let mut found = false;
            for (key, child) in map.iter_mut() {
                match child {
                    Value::String(target)
                        if key == "$ref"
                            && (target.as_str() == from || target.starts_with(&format!("{from}/"))) =>
                    {
                        *target = format!("{to}{}", &target[from.len()..]);
                        found = true;
                    }
                    _ => found |= repoint(child, from, to),
                }
            }
            found
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |found, item| repoint(item, from, to) | found),
        _ => false,
    }
}

/// Longest JSON quoted in a description.
const MOST_QUOTED_CHARS: usize = 600;

/// A sentence for a keyword taken off the top of a schema: in plain words for branches that
/// only require fields (`branches`, resolved), as JSON otherwise.
fn describe(keyword: &str, value: &Value, branches: Option<&[Value]>) -> String {
    let field_sets: Option<Vec<String>> = branches.and_then(|branches| {
        branches
            .iter()
            .map(|branch| {
                let names: Option<Vec<&str>> = branch
                    .get("required")?
                    .as_array()?
                    .iter()
                    .map(Value::as_str)
                    .collect();
                names.filter(|n| !n.is_empty()).map(|n| n.join(" and "))
            })
            .collect()
    });
    match (keyword, field_sets) {
        ("oneOf", Some(sets)) => format!("Give exactly one of: {}.", sets.join("; ")),
        ("anyOf", Some(sets)) => format!("Give at least one of: {}.", sets.join("; ")),
        _ => {
            let quoted = value.to_string();
            let shown: String = quoted.chars().take(MOST_QUOTED_CHARS).collect();
            let cut = if shown.len() < quoted.len() { "…" } else { "" };
            format!("The arguments must also satisfy the JSON Schema {{\"{keyword}\": {shown}{cut}}}.")
        }
    }
}

/// The output schema an MCP tool advertises for `d`, if any. An MCP client requires structured
/// content matching `outputSchema` on every result that is not an error, which an `async`
/// action (answered before its endpoint runs) cannot give; and MCP's `outputSchema` must say
/// `"type": "object"` in so many words.
pub fn advertised_output_schema(d: &crate::registry::ActionDeclaration) -> Option<&Value> {
    d.output_schema
        .as_ref()
        .filter(|o| d.mode == Mode::Sync && o.get("type") == Some(&Value::from("object")))
}

/// One action as a tool in `format`.
pub fn tool(action: &Action, format: Format) -> Value {
    let d = &action.declaration;
    let mut description = if d.description.is_empty() {
        d.title.clone().unwrap_or_default()
    } else {
        d.description.clone()
    };
    let (input_schema, left_out) = exported_schema(&d.input_schema);
    if let Some(sentence) = left_out {
        if !description.is_empty() {
            description.push(' ');
        }
        description.push_str(&sentence);
    }
    match format {
        Format::OpenAi => json!({
            "type": "function",
            "function": {"name": d.name, "description": description, "parameters": input_schema},
        }),
        Format::Anthropic => {
            json!({"name": d.name, "description": description, "input_schema": input_schema})
        }
        // MCP allows any schema, but clients hand the tools on to the same vendors.
        Format::Mcp => {
            let mut t = json!({
                "name": d.name,
                "description": description,
                "inputSchema": input_schema,
                "annotations": {
                    "readOnlyHint": d.annotations.read_only,
                    "destructiveHint": d.annotations.destructive,
                    "idempotentHint": d.annotations.idempotent,
                    "openWorldHint": d.annotations.open_world,
                },
            });
            if let Some(title) = &d.title {
                t["title"] = title.clone().into();
                t["annotations"]["title"] = title.clone().into();
            }
            if let Some(output) = advertised_output_schema(d) {
                t["outputSchema"] = output.clone();
            }
            t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_vendors_refuse_at_the_top_are_described_instead() {
        let plain = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        assert_eq!(exported_schema(&plain), (plain.clone(), None));

        let either = json!({
            "type": "object",
            "properties": {"id": {"type": "string"}, "email": {"type": "string"}},
            "oneOf": [{"required": ["id"]}, {"required": ["email"]}],
            "anyOf": [{"required": ["id", "email"]}, {"required": ["email"]}],
            "not": {"required": ["x"]},
        });
        let (schema, said) = exported_schema(&either);
        assert_eq!(
            schema,
            json!({"type": "object", "properties": {"id": {"type": "string"}, "email": {"type": "string"}}})
        );
        assert_eq!(
            said.as_deref(),
            Some(
                "Give exactly one of: id; email. Give at least one of: id and email; email. \
                 The arguments must also satisfy the JSON Schema {\"not\": {\"required\":[\"x\"]}}."
            )
        );
        // allOf branches that only name fields join the top, through a $ref too; a $ref into
        // a part taken off is pointed at a kept copy.
        let composed = json!({
            "type": "object",
            "$defs": {"Base": {"properties": {"id": {"type": "string"}}, "required": ["id"]}},
            "properties": {"note": {"$ref": "#/anyOf/0/properties/n"}},
            "allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"qty": {"type": "integer"}}, "required": ["qty"]}],
            "anyOf": [{"properties": {"n": {"type": "string"}}, "required": ["n"]}, {"required": ["m"]}],
        });
        let (schema, said) = exported_schema(&composed);
        assert_eq!(
            schema["properties"],
            json!({"note": {"$ref": "#/$defs/opsiq_anyOf/0/properties/n"}, "id": {"type": "string"},
                   "qty": {"type": "integer"}, "n": {"type": "string"}})
        );
        assert_eq!(schema["required"], json!(["id", "qty"]));
        assert_eq!(schema["$defs"]["opsiq_anyOf"], composed["anyOf"]);
        assert!(schema["$defs"].get("opsiq_allOf").is_none());
        assert_eq!(said.as_deref(), Some("Give at least one of: n; m."));
        // A long schema is quoted only in part.
        let long = json!({"type": "object", "not": {"enum": vec!["x"; 400]}});
        let said = exported_schema(&long).1.unwrap();
        assert!(
            said.chars().count() < MOST_QUOTED_CHARS + 100 && said.contains('…'),
            "{said}"
        );
        // Nested combinators are left alone: only the top is refused.
        let nested = json!({"type": "object", "properties": {"p": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}});
        assert_eq!(exported_schema(&nested).0, nested);
    }
}
