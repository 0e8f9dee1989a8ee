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
/// keywords in [`REFUSED_AT_TOP`] are taken off the top and described instead. The gateway still
/// checks every call against the whole schema; a call the description did not steer right gets
/// a 422 naming what is wrong.
pub fn exported_schema(schema: &Value) -> (Value, Option<String>) {
    let Some(map) = schema.as_object() else {
        return (schema.clone(), None);
    };
    if !REFUSED_AT_TOP.iter().any(|k| map.contains_key(*k)) {
        return (schema.clone(), None);
    }
    let mut kept = map.clone();
    let sentences: Vec<String> = REFUSED_AT_TOP
        .iter()
        .filter_map(|&keyword| kept.remove(keyword).map(|value| describe(keyword, &value)))
        .collect();
    (Value::Object(kept), Some(sentences.join(" ")))
}

/// A sentence for a keyword taken off the top of a schema: in plain words for the common "one
/// of these fields" shapes, as JSON otherwise.
fn describe(keyword: &str, value: &Value) -> String {
    // Branches that only require fields: [{"required": ["a"]}, {"required": ["b", "c"]}].
    let field_sets: Option<Vec<String>> = value.as_array().and_then(|branches| {
        branches
            .iter()
            .map(|branch| {
                let required = branch.as_object().filter(|b| b.len() == 1)?.get("required")?;
                let names: Option<Vec<&str>> = required.as_array()?.iter().map(Value::as_str).collect();
                names.filter(|n| !n.is_empty()).map(|n| n.join(" and "))
            })
            .collect()
    });
    match (keyword, field_sets) {
        ("oneOf", Some(sets)) => format!("Give exactly one of: {}.", sets.join("; ")),
        ("anyOf", Some(sets)) => format!("Give at least one of: {}.", sets.join("; ")),
        _ => format!("The arguments must also satisfy the JSON Schema {{\"{keyword}\": {value}}}."),
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
        // Nested combinators are left alone: only the top is refused.
        let nested = json!({"type": "object", "properties": {"p": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}});
        assert_eq!(exported_schema(&nested).0, nested);
    }
}
