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
/// keywords in [`REFUSED_AT_TOP`] are taken off the top. What they say is kept where it can be
/// without refusing a call the whole schema takes: the fields of `allOf` branches join the top
/// (a field both name must meet both), those of `oneOf`/`anyOf` branches join it as optional (a
/// field they name differently may be any of their forms); which fields `oneOf`/`anyOf` ask for
/// is said in plain words, anything else as JSON. A branch a `$ref` points into is kept under
/// `$defs`, and the `$ref` pointed there. The gateway still checks every call against the whole
/// schema; a call the description did not steer right gets a 422 naming what is wrong.
pub fn exported_schema(schema: &Value) -> (Value, Option<String>) {
    let Some(map) = schema.as_object() else {
        return (schema.clone(), None);
    };
    if !REFUSED_AT_TOP.iter().any(|k| map.contains_key(*k)) {
        return (schema.clone(), None);
    }
    let mut kept = map.clone();
    let mut removed = Vec::new();
    let mut sentences = Vec::new();
    for &keyword in REFUSED_AT_TOP {
        let Some(value) = kept.remove(keyword) else {
            continue;
        };
        let branches: Vec<Value> = match value.as_array() {
            Some(branches) if keyword != "enum" => branches
                .iter()
                .map(|b| resolve_local_refs(schema, b).clone())
                .collect(),
            _ => Vec::new(),
        };
        let fields_only = !branches.is_empty() && branches.iter().all(only_fields);
        if fields_only {
            merge_fields(&mut kept, keyword, &branches);
        }
        if !(fields_only && keyword == "allOf") {
            sentences.push(describe(
                keyword,
                &value,
                fields_only.then_some(branches.as_slice()),
            ));
        }
        removed.push((keyword, value));
    }
    keep_referenced(&mut kept, &removed);
    let said = (!sentences.is_empty()).then(|| sentences.join(" "));
    (Value::Object(kept), said)
}

/// What `branch` stands for when it is only `{"$ref": "#/…"}` (followed a few times), inside
/// `root`; else the branch itself.
fn resolve_local_refs<'a>(root: &'a Value, mut branch: &'a Value) -> &'a Value {
    for _ in 0..8 {
        let target = branch
            .as_object()
            .filter(|m| m.len() == 1)
            .and_then(|m| m.get("$ref")?.as_str()?.strip_prefix('#'))
            .and_then(|pointer| root.pointer(pointer));
        match target {
            Some(next) => branch = next,
            None => break,
        }
    }
    branch
}

/// Whether a branch only names fields: `properties`, `required` and the like, nothing that
/// constrains values across fields.
fn only_fields(branch: &Value) -> bool {
    const FIELD_KEYWORDS: &[&str] = &["type", "properties", "required", "title", "description"];
    branch.as_object().is_some_and(|b| {
        b.keys().all(|k| FIELD_KEYWORDS.contains(&k.as_str())) && b.get("type").is_none_or(|t| t == "object")
    })
}

/// Joins the fields the `keyword` branches name to the top's `properties` (and, for `allOf`,
/// `required`): for `allOf` a field named at the top and in a branch must meet both; for
/// `oneOf`/`anyOf` a field the top does not name may take any form a branch gives it.
fn merge_fields(top: &mut serde_json::Map<String, Value>, keyword: &str, branches: &[Value]) {
    let mut forms: Vec<(String, Vec<Value>)> = Vec::new();
    for branch in branches {
        for (name, form) in branch
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            match forms.iter_mut().find(|(n, _)| n == name) {
                Some((_, seen)) if !seen.contains(form) => seen.push(form.clone()),
                Some(_) => {}
                None => forms.push((name.clone(), vec![form.clone()])),
            }
        }
    }
    let properties = top.entry("properties").or_insert_with(|| json!({}));
    let Some(properties) = properties.as_object_mut() else {
        return;
    };
    for (name, mut seen) in forms {
        let combined = match (keyword, seen.len()) {
            (_, 1) => seen.remove(0),
            ("allOf", _) => json!({"allOf": seen}),
            _ => json!({"anyOf": seen}),
        };
        match properties.get_mut(&name) {
            Some(existing) if keyword == "allOf" && *existing != combined => {
                *existing = json!({"allOf": [existing.take(), combined]});
            }
            Some(_) => {}
            None => {
                properties.insert(name, combined);
            }
        }
    }
    if keyword == "allOf" {
        let required = top.entry("required").or_insert_with(|| json!([]));
        if let Some(required) = required.as_array_mut() {
            for name in branches
                .iter()
                .filter_map(|b| b.get("required")?.as_array())
                .flatten()
            {
                if !required.contains(name) {
                    required.push(name.clone());
                }
            }
        }
    }
}

/// Keeps under `$defs` each part taken off the top (a branch, or `not`) that a `$ref` left in
/// `kept`, or in another such part, points into; and points those references there.
fn keep_referenced(kept: &mut serde_json::Map<String, Value>, removed: &[(&str, Value)]) {
    let mut targets = Vec::new();
    for value in kept.values().chain(removed.iter().map(|(_, v)| v)) {
        collect_refs(value, &mut targets);
    }
    let points_into = |from: &str| {
        targets
            .iter()
            .any(|t| t == from || t.strip_prefix(from).is_some_and(|rest| rest.starts_with('/')))
    };
    // (where it was, where it is kept, the part)
    let mut moved: Vec<(String, String, Value)> = Vec::new();
    let mut taken: Vec<String> = kept
        .get("$defs")
        .and_then(Value::as_object)
        .map(|defs| defs.keys().cloned().collect())
        .unwrap_or_default();
    let mut free_name = |wanted: String| {
        let mut name = wanted;
        while taken.contains(&name) {
            name.push('_');
        }
        taken.push(name.clone());
        name
    };
    for (keyword, value) in removed {
        let parts: Vec<(String, &Value)> = match value.as_array() {
            Some(branches) if *keyword != "enum" => branches
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("#/{keyword}/{i}"), b))
                .collect(),
            _ if *keyword == "not" => vec![(format!("#/{keyword}"), value)],
            _ => Vec::new(),
        };
        for (from, part) in parts {
            if points_into(&from) {
                let name = free_name(format!("opsiq_{}", from[2..].replace('/', "_")));
                moved.push((from, format!("#/$defs/{name}"), part.clone()));
            }
        }
    }
    if moved.is_empty() {
        return;
    }
    let defs = kept.entry("$defs").or_insert_with(|| json!({}));
    if let Some(defs) = defs.as_object_mut() {
        for (_, to, part) in &moved {
            defs.insert(to["#/$defs/".len()..].to_string(), part.clone());
        }
    }
    for value in kept.values_mut() {
        repoint(value, &moved);
    }
}

/// Every `$ref` target under `node`.
fn collect_refs(node: &Value, into: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("$ref", Value::String(target)) => into.push(target.clone()),
                    _ => collect_refs(child, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, into)),
        _ => {}
    }
}

/// Points every `$ref` under `node` that leads into a moved part at where it is kept.
fn repoint(node: &mut Value, moved: &[(String, String, Value)]) {
    match node {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                match child {
                    Value::String(target) if key == "$ref" => {
                        let new = moved.iter().find_map(|(from, to, _)| {
                            let rest = target.strip_prefix(from.as_str())?;
                            (rest.is_empty() || rest.starts_with('/')).then(|| format!("{to}{rest}"))
                        });
                        if let Some(new) = new {
                            *target = new;
                        }
                    }
                    _ => repoint(child, moved),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| repoint(item, moved)),
        _ => {}
    }
}

/// Longest JSON quoted in a description.
const MOST_QUOTED_CHARS: usize = 600;

/// A sentence for a keyword taken off the top of a schema: in plain words for branches that
/// only require fields, each a different set (`branches`, resolved), as JSON otherwise.
fn describe(keyword: &str, value: &Value, branches: Option<&[Value]>) -> String {
    let field_sets: Option<Vec<String>> = branches
        .filter(|bs| {
            bs.iter()
                .all(|b| b.as_object().is_some_and(|m| m.keys().all(|k| k == "required")))
        })
        .and_then(|branches| {
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
        })
        .filter(|sets: &Vec<String>| sets.iter().enumerate().all(|(i, set)| !sets[..i].contains(set)));
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
        // allOf branches that only name fields join the top, through $refs too (a field both
        // name meets both); oneOf/anyOf fields join as optional, in any of their forms; a $ref
        // into a part taken off points at a copy of that branch, under a name of its own.
        let composed = json!({
            "type": "object",
            "$defs": {"Base": {"$ref": "#/$defs/Core"}, "Core": {"properties": {"id": {"type": "string"}}, "required": ["id"]},
                      "opsiq_anyOf_0": {"type": "string"}},
            "properties": {"note": {"$ref": "#/anyOf/0/properties/n"}, "qty": {"type": "integer"}},
            "allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"qty": {"minimum": 3}}, "required": ["qty"]}],
            "anyOf": [{"properties": {"n": {"type": "string"}}, "required": ["n"]},
                      {"properties": {"n": {"type": "integer"}}, "required": ["m"]}],
        });
        let (schema, said) = exported_schema(&composed);
        assert_eq!(
            schema["properties"],
            json!({"note": {"$ref": "#/$defs/opsiq_anyOf_0_/properties/n"}, "id": {"type": "string"},
                   "qty": {"allOf": [{"type": "integer"}, {"minimum": 3}]},
                   "n": {"anyOf": [{"type": "string"}, {"type": "integer"}]}})
        );
        assert_eq!(schema["required"], json!(["id", "qty"]));
        assert!(
            crate::registry::model::compile_new_schema(&schema).is_ok(),
            "{schema}"
        );
        assert_eq!(schema["$defs"]["opsiq_anyOf_0_"], composed["anyOf"][0]);
        assert_eq!(
            schema["$defs"]["opsiq_anyOf_0"],
            json!({"type": "string"}),
            "a name of the author's kept"
        );
        assert!(schema["$defs"].get("opsiq_anyOf_1").is_none());
        assert!(
            said.unwrap()
                .starts_with("The arguments must also satisfy the JSON Schema {\"anyOf\"")
        );
        // Branches that only require fields, each another set, are said in words; the same set
        // twice is not.
        let twice = json!({"type": "object", "oneOf": [{"required": ["b"]}, {"required": ["b"]}]});
        assert!(
            exported_schema(&twice)
                .1
                .unwrap()
                .starts_with("The arguments must also satisfy")
        );
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
