//! Compiled rules and their evaluation. A tenant's rules are indexed by trigger (exact type,
//! prefix pattern, or `*`), so an event only looks at the rules that can fire for its type;
//! conditions and regexes were compiled when the rule was stored.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::condition::{Condition, Step, lookup};
use super::template;
use crate::http::ErrorDetail;

/// What a matched rule does.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Deliver the event to this endpoint.
    Deliver {
        /// Target endpoint.
        endpoint_id: String,
    },
    /// Invoke an action with (templated) arguments, as principal `rule:<id>`.
    Invoke {
        /// Action name.
        action: String,
        /// Arguments (templates rendered at evaluation).
        arguments: Value,
    },
    /// Emit a new event.
    Emit {
        /// Its type.
        event_type: String,
        /// Its data (templates rendered at evaluation).
        data: Value,
    },
}

impl Output {
    fn compile(v: &Value) -> Option<Output> {
        if let Some(d) = v.get("deliver") {
            return Some(Output::Deliver {
                endpoint_id: d.get("endpoint_id")?.as_str()?.to_string(),
            });
        }
        if let Some(i) = v.get("invoke") {
            return Some(Output::Invoke {
                action: i.get("action")?.as_str()?.to_string(),
                arguments: i.get("arguments").cloned().unwrap_or_else(|| json!({})),
            });
        }
        let e = v.get("emit")?;
        Some(Output::Emit {
            event_type: e.get("type")?.as_str()?.to_string(),
            data: e.get("data").cloned().unwrap_or_else(|| json!({})),
        })
    }

    /// Renders the templates against `doc` within `budget` (of `max_bytes` for all of a rule's
    /// outputs); a rendering past it is refused with the trace entry saying so (without the
    /// oversized part).
    fn render(&self, doc: &Value, budget: &mut usize, max_bytes: usize) -> Result<Output, Value> {
        let too_large = |what: &str| {
            format!(
                "the rendered {what} would take the rule's outputs past {max_bytes} bytes, the most a request body may be"
            )
        };
        match self {
            Output::Deliver { .. } => Ok(self.clone()),
            Output::Invoke { action, arguments } => match template::render(arguments, doc, budget) {
                Ok(arguments) => Ok(Output::Invoke {
                    action: action.clone(),
                    arguments,
                }),
                Err(_) => Err(json!({"invoke": {"action": action}, "error": too_large("arguments")})),
            },
            Output::Emit { event_type, data } => match template::render(data, doc, budget) {
                Ok(data) => Ok(Output::Emit {
                    event_type: event_type.clone(),
                    data,
                }),
                Err(_) => Err(json!({"emit": {"type": event_type}, "error": too_large("data")})),
            },
        }
    }

    /// A JSON description for traces.
    pub fn describe(&self) -> Value {
        match self {
            Output::Deliver { endpoint_id } => json!({"deliver": {"endpoint_id": endpoint_id}}),
            Output::Invoke { action, arguments } => {
                json!({"invoke": {"action": action, "arguments": arguments}})
            }
            Output::Emit { event_type, data } => json!({"emit": {"type": event_type, "data": data}}),
        }
    }
}

/// A rule ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// `rul_…`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Disabled rules are stored but never fire.
    pub enabled: bool,
    /// The trigger pattern.
    pub pattern: String,
    /// A fingerprint of the conditions (16 hex characters of SHA-256 of `if`), kept with each
    /// trace so that reading it can tell whether today's conditions are the ones it flagged.
    pub if_hash: String,
    condition: Option<Condition>,
    /// How many comparisons the condition has (to size the trace once).
    comparisons: usize,
    outputs: Vec<Output>,
}

impl CompiledRule {
    /// Compiles a rule that passed `schemas/rule.schema.json`; problems carry JSON pointers.
    pub fn compile(id: &str, definition: &Value) -> Result<Self, Vec<ErrorDetail>> {
        let condition = match definition.get("if") {
            Some(c) => Some(Condition::compile(c, "/if")?),
            None => None,
        };
        let outputs = definition
            .get("then")
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(Output::compile).collect())
            .unwrap_or_default();
        let comparisons = condition.as_ref().map_or(0, |c| c.comparisons().len());
        Ok(Self {
            comparisons,
            id: id.to_string(),
            name: definition
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            enabled: definition.get("enabled").and_then(Value::as_bool).unwrap_or(true),
            pattern: definition
                .get("when")
                .and_then(|w| w.get("event_type"))
                .and_then(Value::as_str)
                .unwrap_or("*")
                .to_string(),
            if_hash: {
                let mut hash = crate::crypto::sha256_hex(
                    definition
                        .get("if")
                        .map(Value::to_string)
                        .unwrap_or_default()
                        .as_bytes(),
                );
                hash.truncate(16);
                hash
            },
            condition,
            outputs,
        })
    }

    /// The outputs as declared (before templating).
    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    /// Checks the conditions against an event document (cheap: no trace, no templating).
    pub fn check(self: &Arc<Self>, doc: &Value) -> Evaluation {
        let mut held = Vec::with_capacity(self.comparisons);
        let matched = self.condition.as_ref().is_none_or(|c| c.holds(doc, &mut held));
        Evaluation {
            rule: self.clone(),
            matched,
            held,
        }
    }

    /// Like [`check`](Self::check), with the rule set's fields already looked up.
    fn check_resolved(self: &Arc<Self>, fields: &[Option<&Value>]) -> Evaluation {
        let mut held = Vec::with_capacity(self.comparisons);
        let matched = self
            .condition
            .as_ref()
            .is_none_or(|c| c.holds_resolved(fields, &mut held));
        Evaluation {
            rule: self.clone(),
            matched,
            held,
        }
    }

    /// Evaluates with a full trace (what each field held), for dry runs.
    pub fn explain(&self, doc: &Value) -> (bool, Vec<Step>) {
        let mut steps = Vec::new();
        let matched = self
            .condition
            .as_ref()
            .is_none_or(|c| c.eval(doc, "/if", &mut steps));
        (matched, steps)
    }

    /// The outputs with templates rendered against `doc`.
    pub fn render_outputs(&self, doc: &Value, max_bytes: usize) -> Vec<Result<Output, Value>> {
        // One budget for all of them: twenty outputs may not take twenty times the limit.
        let mut budget = max_bytes;
        self.outputs
            .iter()
            .map(|o| o.render(doc, &mut budget, max_bytes))
            .collect()
    }
}

/// The result of checking one rule against one event.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The rule.
    pub rule: Arc<CompiledRule>,
    /// Whether its conditions held.
    pub matched: bool,
    /// One flag per comparison, in document order.
    pub held: Vec<bool>,
}

impl Evaluation {
    /// The trace stored on the event: which rule, whether it matched, which conditions held.
    pub fn trace(&self) -> Value {
        // Compact on purpose: an event may be checked by hundreds of rules, and this is stored
        // with it. Reading the event expands the flags with the rule's conditions (see `expand`).
        json!({"rule_id": self.rule.id, "if_hash": self.rule.if_hash, "matched": self.matched, "held": self.held})
    }

    /// [`trace`](Self::trace) written straight to text (this runs for every rule an event
    /// triggers, so it skips building a JSON tree).
    pub fn write_trace(&self, out: &mut String) {
        use std::fmt::Write;
        let id = serde_json::to_string(&self.rule.id).unwrap_or_else(|_| "\"\"".into());
        let _ = write!(
            out,
            "{{\"rule_id\":{id},\"if_hash\":\"{}\",\"matched\":{},\"held\":[",
            self.rule.if_hash, self.matched
        );
        for (i, h) in self.held.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(if *h { "true" } else { "false" });
        }
        out.push_str("]}");
    }
}

impl CompiledRule {
    /// Expands a stored compact trace entry with this rule's name and conditions. A rule whose
    /// conditions changed since the entry was made is named, but its conditions are not shown:
    /// today's would not be the ones the flags were set by.
    pub fn expand(&self, entry: &mut Value) {
        entry["name"] = self.name.clone().into();
        if entry["if_hash"].as_str().is_some_and(|then| then != self.if_hash) {
            entry["changed_since"] = true.into();
            entry["note"] =
                "the rule's conditions have changed since this event; those it was checked against are not kept"
                    .into();
            return;
        }
        let held: Vec<bool> = entry["held"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_bool().unwrap_or(false)).collect())
            .unwrap_or_default();
        let comparisons = self
            .condition
            .as_ref()
            .map(Condition::comparisons)
            .unwrap_or_default();
        if comparisons.len() == held.len() {
            entry["conditions"] = comparisons
                .iter()
                .zip(&held)
                .map(|(c, h)| c.describe(*h))
                .collect();
        }
    }
}

/// The candidate rules for one event type, in evaluation order, under a stable id: a stored
/// trace names this set and keeps one flag string per rule instead of every rule id.
#[derive(Debug)]
pub struct CandidateSet {
    /// SHA-256 (hex, 32 characters) of the rule ids in order.
    pub id: String,
    /// The rule ids, in the order the trace's flags follow.
    pub rule_ids: Vec<String>,
}

impl CandidateSet {
    fn new(rule_ids: Vec<String>) -> Self {
        let mut id = crate::crypto::sha256_hex(rule_ids.join(" ").as_bytes());
        id.truncate(32);
        Self { id, rule_ids }
    }
}

/// The compact trace stored with an event no rule matched: the candidate set's id and, per
/// rule, `m:hhh@f` (matched, then each condition held, `1`/`0`, then the conditions'
/// fingerprint),
/// comma-separated.
pub fn compact_trace(set: &CandidateSet, evaluations: &[Evaluation]) -> String {
    let mut flags = String::with_capacity(evaluations.len() * 8);
    for (i, e) in evaluations.iter().enumerate() {
        if i > 0 {
            flags.push(',');
        }
        flags.push(if e.matched { '1' } else { '0' });
        flags.push(':');
        flags.extend(e.held.iter().map(|h| if *h { '1' } else { '0' }));
        flags.push('@');
        flags.push_str(&e.rule.if_hash);
    }
    json!({"set": set.id, "flags": flags}).to_string()
}

/// Expands a compact trace's flags against its set's rule ids into the entries of
/// [`Evaluation::trace`]; `None` if they do not fit together.
pub fn expand_compact(rule_ids: &[String], flags: &str) -> Option<Vec<Value>> {
    let per_rule: Vec<&str> = if flags.is_empty() {
        Vec::new()
    } else {
        flags.split(',').collect()
    };
    if per_rule.len() != rule_ids.len() {
        return None;
    }
    rule_ids
        .iter()
        .zip(per_rule)
        .map(|(id, f)| {
            let (matched, rest) = f.split_once(':')?;
            // Traces from before fingerprints were kept have no `@`.
            let (held, if_hash) = match rest.split_once('@') {
                Some((held, if_hash)) => (held, Some(if_hash)),
                None => (rest, None),
            };
            let held: Vec<bool> = held.chars().map(|c| c == '1').collect();
            let mut entry = json!({"rule_id": id, "matched": matched == "1", "held": held});
            if let Some(if_hash) = if_hash {
                entry["if_hash"] = if_hash.into();
            }
            Some(entry)
        })
        .collect()
}

/// A tenant's enabled rules, indexed by trigger.
#[derive(Debug, Default)]
pub struct RuleSet {
    exact: HashMap<String, Vec<Arc<CompiledRule>>>,
    prefixed: Vec<(String, Arc<CompiledRule>)>,
    /// Every distinct field the rules compare, indexed by the comparisons' slots.
    fields: Vec<Vec<String>>,
    /// Candidate sets by event type, built on first use.
    sets: std::sync::Mutex<HashMap<String, Arc<CandidateSet>>>,
}

impl RuleSet {
    /// Indexes the enabled rules.
    pub fn new(mut rules: Vec<CompiledRule>) -> Self {
        // Sorted once here, so every bucket is in id order and candidates merge without sorting.
        rules.sort_by(|a, b| a.id.cmp(&b.id));
        let mut set = RuleSet::default();
        let mut slots: HashMap<Vec<String>, usize> = HashMap::new();
        for mut rule in rules.into_iter().filter(|r| r.enabled) {
            if let Some(condition) = rule.condition.as_mut() {
                condition.intern_paths(&mut |path: &[String]| {
                    if let Some(slot) = slots.get(path) {
                        return *slot;
                    }
                    set.fields.push(path.to_vec());
                    slots.insert(path.to_vec(), set.fields.len() - 1);
                    set.fields.len() - 1
                });
            }
            let rule = Arc::new(rule);
            match rule.pattern.strip_suffix('*') {
                Some(prefix) => set.prefixed.push((prefix.to_string(), rule)),
                None => set.exact.entry(rule.pattern.clone()).or_default().push(rule),
            }
        }
        set
    }

    /// Whether there are no rules at all.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixed.is_empty()
    }

    /// The rules whose trigger matches `event_type`, in a stable order.
    pub fn candidates(&self, event_type: &str) -> Vec<&Arc<CompiledRule>> {
        let exact: &[Arc<CompiledRule>] = self.exact.get(event_type).map(Vec::as_slice).unwrap_or_default();
        let mut prefixed = self
            .prefixed
            .iter()
            .filter(|(p, _)| event_type.starts_with(p.as_str()))
            .map(|(_, r)| r)
            .peekable();
        let mut exact = exact.iter().peekable();
        let mut out = Vec::with_capacity(exact.len() + self.prefixed.len());
        loop {
            let next = match (exact.peek(), prefixed.peek()) {
                (Some(a), Some(b)) if a.id <= b.id => exact.next(),
                (Some(_), Some(_)) => prefixed.next(),
                (Some(_), None) => exact.next(),
                (None, Some(_)) => prefixed.next(),
                (None, None) => break,
            };
            out.extend(next);
        }
        out
    }

    /// The candidate set for `event_type` (the rules [`evaluate`](Self::evaluate) checks, in order).
    pub fn candidate_set(&self, event_type: &str) -> Arc<CandidateSet> {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = sets.get(event_type) {
            return set.clone();
        }
        let ids = self.candidates(event_type).iter().map(|r| r.id.clone()).collect();
        let set = Arc::new(CandidateSet::new(ids));
        // Event types are caller-chosen: bound the memory an unending variety of them can take.
        if sets.len() >= 10_000 {
            sets.clear();
        }
        sets.insert(event_type.to_string(), set.clone());
        set
    }

    /// Evaluates every candidate rule for an event.
    pub fn evaluate(&self, event_type: &str, doc: &Value) -> Vec<Evaluation> {
        let candidates = self.candidates(event_type);
        if candidates.is_empty() {
            return Vec::new();
        }
        let fields: Vec<Option<&Value>> = self.fields.iter().map(|path| lookup(doc, path)).collect();
        candidates
            .into_iter()
            .map(|r| r.check_resolved(&fields))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, definition: Value) -> CompiledRule {
        CompiledRule::compile(id, &definition).expect("a valid rule")
    }

    #[test]
    fn a_rule_set_agrees_with_rules_checked_one_by_one() {
        let definitions = [
            json!({"when": {"event_type": "ticket.*"}, "if": {"all": [
                {"field": "data.customer.tier", "op": "eq", "value": "enterprise"},
                {"not": {"field": "data.tags", "op": "contains", "value": "test"}}]}}),
            json!({"when": {"event_type": "ticket.created"}, "if": {"any": [
                {"field": "data.priority", "op": "in", "value": ["high", "urgent"]},
                {"field": "data.customer.tier", "op": "eq", "value": "free"},
                {"field": "data.missing.deep", "op": "exists"}]}}),
            json!({"when": {"event_type": "*"}}),
            json!({"when": {"event_type": "invoice.paid"}, "if": {"field": "data.amount", "op": "gt", "value": 1}}),
        ];
        let rules: Vec<CompiledRule> = definitions
            .iter()
            .enumerate()
            .map(|(i, d)| rule(&format!("rul_{i}"), d.clone()))
            .collect();
        let one_by_one: Vec<Arc<CompiledRule>> = rules.iter().cloned().map(Arc::new).collect();
        let set = RuleSet::new(rules);
        let doc = json!({"type": "ticket.created", "data": {"priority": "low", "tags": ["prod"],
            "customer": {"tier": "enterprise"}}});
        let evaluations = set.evaluate("ticket.created", &doc);
        let ids: Vec<&str> = evaluations.iter().map(|e| e.rule.id.as_str()).collect();
        assert_eq!(ids, ["rul_0", "rul_1", "rul_2"]);
        for evaluation in &evaluations {
            let alone = one_by_one
                .iter()
                .find(|r| r.id == evaluation.rule.id)
                .expect("the same rule")
                .check(&doc);
            assert_eq!(
                (evaluation.matched, &evaluation.held),
                (alone.matched, &alone.held)
            );
            let mut text = String::new();
            evaluation.write_trace(&mut text);
            assert_eq!(
                serde_json::from_str::<Value>(&text).expect("JSON"),
                evaluation.trace()
            );
        }
        assert_eq!(
            evaluations.iter().map(|e| e.matched).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(evaluations[1].held, [false, false, false]);

        // The compact trace reads back as the full one.
        let candidates = set.candidate_set("ticket.created");
        assert_eq!(candidates.rule_ids, ["rul_0", "rul_1", "rul_2"]);
        let compact: Value = serde_json::from_str(&compact_trace(&candidates, &evaluations)).expect("JSON");
        let hashes: Vec<&str> = evaluations.iter().map(|e| e.rule.if_hash.as_str()).collect();
        assert_eq!(
            compact["flags"],
            format!("1:10@{},0:000@{},1:@{}", hashes[0], hashes[1], hashes[2])
        );
        let expanded = expand_compact(&candidates.rule_ids, compact["flags"].as_str().expect("flags"));
        assert_eq!(
            expanded,
            Some(evaluations.iter().map(Evaluation::trace).collect())
        );
        assert_eq!(expand_compact(&candidates.rule_ids[..2], "1:10,0:000,1:"), None);
        // Traces stored before fingerprints were kept read back without one.
        let old = expand_compact(&candidates.rule_ids, "1:10,0:000,1:").expect("fits");
        assert_eq!(
            old[0],
            json!({"rule_id": "rul_0", "matched": true, "held": [true, false]})
        );

        // A trace names today's conditions only while they are the ones it flagged: renamed, the
        // rule still shows them; with other conditions, it does not.
        let mut renamed = definitions[0].clone();
        renamed["name"] = "renamed".into();
        let mut entry = evaluations[0].trace();
        rule("rul_0", renamed.clone()).expand(&mut entry);
        assert_eq!(entry["conditions"].as_array().map(Vec::len), Some(2), "{entry}");
        let mut changed = renamed;
        changed["if"]["all"][0]["value"] = "free".into();
        let mut entry = evaluations[0].trace();
        rule("rul_0", changed).expand(&mut entry);
        assert_eq!(
            (entry.get("conditions"), &entry["changed_since"]),
            (None, &json!(true)),
            "{entry}"
        );
    }
}
