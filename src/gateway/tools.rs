//! The tool list an agent may use, in each vendor's exact shape: OpenAI function tools,
//! Anthropic tools and MCP `Tool`s. Only actions the token may invoke (scope AND role) appear.

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

/// One action as a tool in `format`.
pub fn tool(action: &Action, format: Format) -> Value {
    let d = &action.declaration;
    let description = if d.description.is_empty() {
        d.title.clone().unwrap_or_default()
    } else {
        d.description.clone()
    };
    match format {
        Format::OpenAi => json!({
            "type": "function",
            "function": {"name": d.name, "description": description, "parameters": d.input_schema},
        }),
        Format::Anthropic => {
            json!({"name": d.name, "description": description, "input_schema": d.input_schema})
        }
        Format::Mcp => {
            let mut t = json!({
                "name": d.name,
                "description": description,
                "inputSchema": d.input_schema,
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
            // An MCP client requires structured content matching `outputSchema` on every
            // successful call, which an `async` action (answered before its endpoint runs)
            // cannot give; and MCP's `outputSchema` must say `"type": "object"` in so many words.
            if let Some(output) = d
                .output_schema
                .as_ref()
                .filter(|o| d.mode == Mode::Sync && o.get("type") == Some(&Value::from("object")))
            {
                t["outputSchema"] = output.clone();
            }
            t
        }
    }
}
