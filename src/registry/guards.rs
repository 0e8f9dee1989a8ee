//! Action guards: `[{"if": <condition>, "then": "allow" | "deny" | "require_approval", "reason"}]`
//! evaluated on every invocation over `{arguments, agent: {id, roles}, action: {name, version}}`;
//! the first guard whose condition holds decides. Conditions are the rules' condition trees.

use std::sync::LazyLock;

use serde_json::{Value, json};

use crate::http::ErrorDetail;
use crate::rules::condition::Condition;

/// What a matching guard decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Run without approval.
    Allow,
    /// Refuse (403 `guard_denied`).
    Deny,
    /// Hold for a person, like `"approval": "always"`.
    RequireApproval,
}

/// A compiled guard.
#[derive(Debug, Clone)]
pub struct Guard {
    condition: Option<Condition>,
    verdict: Verdict,
    /// Why, shown to the caller.
    pub reason: String,
}

/// `$defs/guard` of `schemas/rule.schema.json`: the same condition trees as rules, so an
/// empty group or a comparison without its value is refused here as it is in a rule.
static GUARD_SCHEMA: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let rules: Value =
        serde_json::from_str(crate::rules::RULE_SCHEMA).expect("the rule schema is valid JSON");
    let guard = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": rules["$defs"],
        "$ref": "#/$defs/guard",
    });
    jsonschema::draft202012::new(&guard).expect("the guard schema compiles")
});

/// Checks an action's declared guards against their schema, then compiles them; problems carry
/// JSON pointers under `/guards`.
pub fn check(guards: &[Value]) -> Result<Vec<Guard>, Vec<ErrorDetail>> {
    let problems: Vec<ErrorDetail> = guards
        .iter()
        .enumerate()
        .flat_map(|(i, g)| {
            GUARD_SCHEMA.iter_errors(g).map(move |e| ErrorDetail {
                path: format!("/guards/{i}{}", e.instance_path()),
                message: e.to_string(),
            })
        })
        .collect();
    let problems: Vec<ErrorDetail> = problems
        .into_iter()
        .chain(guards.iter().enumerate().flat_map(|(i, g)| {
            g.get("if")
                .and_then(|c| Condition::check_regex_budget(c, &format!("/guards/{i}/if")).err())
                .unwrap_or_default()
        }))
        .collect();
    if problems.is_empty() {
        compile(guards)
    } else {
        Err(problems)
    }
}

/// Compiles guards that passed [`check`] when they were declared; calls get them compiled once
/// per action version from `Validators::guards`.
pub fn compile(guards: &[Value]) -> Result<Vec<Guard>, Vec<ErrorDetail>> {
    let mut out = Vec::with_capacity(guards.len());
    let mut problems = Vec::new();
    for (i, g) in guards.iter().enumerate() {
        let at = format!("/guards/{i}");
        let verdict = match g.get("then").and_then(Value::as_str) {
            Some("allow") => Verdict::Allow,
            Some("deny") => Verdict::Deny,
            Some("require_approval") => Verdict::RequireApproval,
            _ => {
                problems.push(ErrorDetail {
                    path: format!("{at}/then"),
                    message: "must be allow, deny or require_approval".into(),
                });
                continue;
            }
        };
        let condition = match g.get("if") {
            None => None,
            Some(c) => match Condition::compile(c, &format!("{at}/if")) {
                Ok(c) => Some(c),
                Err(p) => {
                    problems.extend(p);
                    continue;
                }
            },
        };
        let reason = g
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("a guard on this action")
            .to_string();
        out.push(Guard {
            condition,
            verdict,
            reason,
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The first matching guard's verdict and reason, if any guard matches.
pub fn decide<'g>(
    guards: &'g [Guard],
    arguments: &Value,
    agent_id: &str,
    roles: &[String],
    action: &str,
    version: i64,
) -> Option<(Verdict, &'g str)> {
    if guards.is_empty() {
        return None;
    }
    let doc = json!({
        "arguments": arguments,
        "agent": {"id": agent_id, "roles": roles},
        "action": {"name": action, "version": version},
    });
    guards
        .iter()
        .find(|g| {
            g.condition
                .as_ref()
                .is_none_or(|c| c.holds(&doc, &mut Vec::new()))
        })
        .map(|g| (g.verdict, g.reason.as_str()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The cap on regexes applies when guards are declared; guards stored under an earlier
    /// limit still compile for calls.
    #[test]
    fn the_regex_cap_applies_to_declarations() {
        let regex = json!({"field": "arguments.reason", "op": "matches", "value": "x"});
        let guard = json!({"if": {"any": vec![regex; crate::rules::condition::MAX_REGEXES + 1]},
            "then": "deny", "reason": "too many"});
        let refused = check(std::slice::from_ref(&guard)).unwrap_err();
        assert_eq!(refused[0].path, "/guards/0/if");
        assert_eq!(compile(&[guard]).map(|g| g.len()), Ok(1));
    }
}
