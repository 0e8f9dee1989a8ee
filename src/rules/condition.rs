//! Conditions: `all` / `any` / `not` trees of comparisons over dotted paths into a JSON document
//! (the event for rules, `{arguments, agent, action}` for action guards). Compiled once; regexes
//! are built with size limits (Rust's engine runs in linear time, so no pattern can hang a check).
//!
//! Semantics: a missing field, or a comparison between values of different JSON types, is simply
//! false — never an error. Numbers compare numerically (1 == 1.0); `gt`/`gte`/`lt`/`lte` compare
//! two numbers, or two strings in code-point order. `contains` is a case-insensitive substring test
//! on strings and membership on arrays; `exists` (value `true` by default) tests presence.

use regex::{Regex, RegexBuilder};
use serde::Serialize;
use serde_json::Value;

use crate::http::ErrorDetail;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Equal.
    Eq,
    /// Not equal (same type, other value).
    Neq,
    /// Greater than.
    Gt,
    /// Greater or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less or equal.
    Lte,
    /// One of an array.
    In,
    /// None of an array.
    NotIn,
    /// Substring (case-insensitive) or array membership.
    Contains,
    /// String prefix.
    StartsWith,
    /// Regular expression.
    Matches,
    /// Present (or absent with `false`).
    Exists,
}

impl Op {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "in" => Op::In,
            "not_in" => Op::NotIn,
            "contains" => Op::Contains,
            "starts_with" => Op::StartsWith,
            "matches" => Op::Matches,
            "exists" => Op::Exists,
            _ => return None,
        })
    }
}

/// One compiled comparison.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// JSON pointer of this comparison inside its rule, fixed at compile time.
    at: String,
    field: String,
    path: Vec<String>,
    /// Index of `path` in the rule set's table of resolved fields (see [`Condition::intern_paths`]).
    slot: usize,
    op: Op,
    value: Value,
    /// For `contains` with a string: the value lower-cased once, for substring matches (array
    /// membership compares the value as written).
    needle_lower: Option<String>,
    regex: Option<Regex>,
}

/// A compiled condition tree.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Every child holds.
    All(Vec<Condition>),
    /// At least one child holds.
    Any(Vec<Condition>),
    /// The child does not hold.
    Not(Box<Condition>),
    /// A comparison.
    Compare(Comparison),
}

/// One evaluated comparison, for traces and dry runs.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// JSON pointer of the comparison inside the rule (`/if/all/1`).
    pub at: String,
    /// The dotted field.
    pub field: String,
    /// The operator.
    pub op: Op,
    /// The value compared against.
    pub value: Value,
    /// What the field held (absent when missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<Value>,
    /// Whether the comparison held.
    pub held: bool,
}

/// The largest compiled regex (bytes); larger patterns are refused.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Most `matches` comparisons in one condition tree: each regex costs time to compile and memory
/// to keep, and nested groups could otherwise hold thousands.
pub const MAX_REGEXES: usize = 16;

/// How many `matches` comparisons a condition tree as written holds.
fn regex_count(v: &Value) -> usize {
    let list = |key: &str| v.get(key).and_then(Value::as_array).map(Vec::as_slice);
    if let Some(items) = list("all").or_else(|| list("any")) {
        return items.iter().map(regex_count).sum();
    }
    if let Some(inner) = v.get("not") {
        return regex_count(inner);
    }
    usize::from(v.get("op").and_then(Value::as_str) == Some("matches"))
}

impl Condition {
    /// Checks that a condition tree being saved (a rule's `if`, a guard's `if`) holds at most
    /// [`MAX_REGEXES`] regular expressions. Only saves are checked: what was stored under an
    /// earlier limit still loads.
    pub fn check_regex_budget(v: &Value, at: &str) -> Result<(), Vec<ErrorDetail>> {
        let regexes = regex_count(v);
        if regexes > MAX_REGEXES {
            return Err(vec![ErrorDetail {
                path: at.to_string(),
                message: format!(
                    "holds {regexes} `matches` comparisons; a condition may hold at most {MAX_REGEXES}"
                ),
            }]);
        }
        Ok(())
    }

    /// Compiles a condition already shaped by `schemas/rule.schema.json`; `at` is its pointer.
    pub fn compile(v: &Value, at: &str) -> Result<Condition, Vec<ErrorDetail>> {
        let detail = |path: String, message: String| vec![ErrorDetail { path, message }];
        let children = |key: &str, list: &Value| -> Result<Vec<Condition>, Vec<ErrorDetail>> {
            let items = list
                .as_array()
                .ok_or_else(|| detail(format!("{at}/{key}"), "must be an array".into()))?;
            let mut out = Vec::with_capacity(items.len());
            let mut problems = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match Condition::compile(item, &format!("{at}/{key}/{i}")) {
                    Ok(c) => out.push(c),
                    Err(p) => problems.extend(p),
                }
            }
            if problems.is_empty() {
                Ok(out)
            } else {
                Err(problems)
            }
        };
        if let Some(list) = v.get("all") {
            return children("all", list).map(Condition::All);
        }
        if let Some(list) = v.get("any") {
            return children("any", list).map(Condition::Any);
        }
        if let Some(inner) = v.get("not") {
            return Condition::compile(inner, &format!("{at}/not")).map(|c| Condition::Not(Box::new(c)));
        }
        let field = v
            .get("field")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if field.split('.').any(str::is_empty) {
            return Err(detail(
                format!("{at}/field"),
                format!("`{field}` is not a path: a comparison needs a field such as data.customer.tier"),
            ));
        }
        let op_text = v.get("op").and_then(Value::as_str).unwrap_or_default();
        let op = Op::parse(op_text)
            .ok_or_else(|| detail(format!("{at}/op"), format!("`{op_text}` is not an operator")))?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        let regex = if op == Op::Matches {
            let pattern = value.as_str().unwrap_or_default();
            let compiled = RegexBuilder::new(pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| {
                    detail(
                        format!("{at}/value"),
                        format!("not a usable regular expression: {e}"),
                    )
                })?;
            Some(compiled)
        } else {
            None
        };
        let needle_lower = match (op, &value) {
            (Op::Contains, Value::String(s)) => Some(s.to_lowercase()),
            _ => None,
        };
        Ok(Condition::Compare(Comparison {
            at: at.to_string(),
            path: field.split('.').map(str::to_string).collect(),
            slot: 0,
            field,
            op,
            value,
            needle_lower,
            regex,
        }))
    }

    /// Evaluates against `doc` without allocating beyond `held`, which receives one flag per
    /// comparison in document order (every comparison is evaluated, for complete traces).
    pub fn holds(&self, doc: &Value, held: &mut Vec<bool>) -> bool {
        match self {
            Condition::All(children) => children.iter().fold(true, |acc, c| c.holds(doc, held) & acc),
            Condition::Any(children) => children.iter().fold(false, |acc, c| c.holds(doc, held) | acc),
            Condition::Not(inner) => !inner.holds(doc, held),
            Condition::Compare(c) => {
                let h = c.holds(lookup(doc, &c.path));
                held.push(h);
                h
            }
        }
    }

    /// Gives each comparison the slot of its field in a shared table, so that a rule set looks
    /// every field up once per event however many rules compare it.
    pub fn intern_paths(&mut self, slot_of: &mut impl FnMut(&[String]) -> usize) {
        match self {
            Condition::All(children) | Condition::Any(children) => {
                children.iter_mut().for_each(|c| c.intern_paths(slot_of))
            }
            Condition::Not(inner) => inner.intern_paths(slot_of),
            Condition::Compare(c) => c.slot = slot_of(&c.path),
        }
    }

    /// Like [`holds`](Self::holds), with every field already looked up into `fields` by slot.
    pub fn holds_resolved(&self, fields: &[Option<&Value>], held: &mut Vec<bool>) -> bool {
        match self {
            Condition::All(children) => children
                .iter()
                .fold(true, |acc, c| c.holds_resolved(fields, held) & acc),
            Condition::Any(children) => children
                .iter()
                .fold(false, |acc, c| c.holds_resolved(fields, held) | acc),
            Condition::Not(inner) => !inner.holds_resolved(fields, held),
            Condition::Compare(c) => {
                let h = c.holds(fields.get(c.slot).copied().flatten());
                held.push(h);
                h
            }
        }
    }

    /// The comparisons in document order (matching the flags of [`holds`](Self::holds)).
    pub fn comparisons(&self) -> Vec<&Comparison> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'c>(&'c self, out: &mut Vec<&'c Comparison>) {
        match self {
            Condition::All(children) | Condition::Any(children) => {
                children.iter().for_each(|c| c.collect(out))
            }
            Condition::Not(inner) => inner.collect(out),
            Condition::Compare(c) => out.push(c),
        }
    }

    /// Evaluates against `doc`, appending a step per comparison evaluated to `trace`.
    pub fn eval(&self, doc: &Value, at: &str, trace: &mut Vec<Step>) -> bool {
        match self {
            Condition::All(children) => {
                // Every child is evaluated (no short cut) so the trace shows each condition.
                let mut held = true;
                for (i, c) in children.iter().enumerate() {
                    held &= c.eval(doc, &format!("{at}/all/{i}"), trace);
                }
                held
            }
            Condition::Any(children) => {
                let mut held = false;
                for (i, c) in children.iter().enumerate() {
                    held |= c.eval(doc, &format!("{at}/any/{i}"), trace);
                }
                held
            }
            Condition::Not(inner) => !inner.eval(doc, &format!("{at}/not"), trace),
            Condition::Compare(c) => {
                let actual = lookup(doc, &c.path);
                let held = c.holds(actual);
                trace.push(Step {
                    at: at.to_string(),
                    field: c.field.clone(),
                    op: c.op,
                    value: c.value.clone(),
                    actual: actual.cloned(),
                    held,
                });
                held
            }
        }
    }
}

/// The value at a dotted path (`data.tags.0` indexes arrays).
pub fn lookup<'v>(doc: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(doc, |v, seg| match v {
        Value::Object(map) => map.get(seg),
        Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn json_eq(a: &Value, b: &Value) -> bool {
    crate::json::equal_by_value(a, b)
}

fn same_type(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => crate::json::number_order(x, y),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Whether `hay` contains `needle_lower` (already lower-case), ignoring case; allocation-free for
/// ASCII text.
fn contains_ignoring_case(hay: &str, needle_lower: &str) -> bool {
    if hay.is_ascii() && needle_lower.is_ascii() {
        let (h, n) = (hay.as_bytes(), needle_lower.as_bytes());
        return n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n));
    }
    hay.to_lowercase().contains(needle_lower)
}

impl Comparison {
    /// A JSON description for traces: where it is in the rule and what it compares.
    pub fn describe(&self, held: bool) -> Value {
        serde_json::json!({"at": self.at, "field": self.field, "op": self.op, "value": self.value, "held": held})
    }

    fn holds(&self, actual: Option<&Value>) -> bool {
        if self.op == Op::Exists {
            let wanted = self.value.as_bool().unwrap_or(true);
            return actual.is_some_and(|v| !v.is_null()) == wanted;
        }
        let Some(actual) = actual else { return false };
        let v = &self.value;
        match self.op {
            Op::Eq => json_eq(actual, v),
            Op::Neq => same_type(actual, v) && !json_eq(actual, v),
            Op::Gt => order(actual, v).is_some_and(|o| o.is_gt()),
            Op::Gte => order(actual, v).is_some_and(|o| o.is_ge()),
            Op::Lt => order(actual, v).is_some_and(|o| o.is_lt()),
            Op::Lte => order(actual, v).is_some_and(|o| o.is_le()),
            Op::In => v
                .as_array()
                .is_some_and(|items| items.iter().any(|i| json_eq(actual, i))),
            Op::NotIn => v.as_array().is_some_and(|items| {
                items.iter().any(|i| same_type(actual, i)) && !items.iter().any(|i| json_eq(actual, i))
            }),
            Op::Contains => match (actual, &self.needle_lower) {
                (Value::String(hay), Some(needle)) => contains_ignoring_case(hay, needle),
                (Value::Array(items), _) => items.iter().any(|i| json_eq(i, v)),
                _ => false,
            },
            Op::StartsWith => match (actual, v) {
                (Value::String(s), Value::String(prefix)) => s.starts_with(prefix.as_str()),
                _ => false,
            },
            Op::Matches => match (actual, &self.regex) {
                (Value::String(s), Some(re)) => re.is_match(s),
                _ => false,
            },
            Op::Exists => unreachable!("handled above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(cond: Value, doc: &Value) -> bool {
        Condition::compile(&cond, "/if")
            .unwrap()
            .eval(doc, "/if", &mut Vec::new())
    }

    #[test]
    fn operators_and_type_mismatches() {
        let doc = json!({"data": {"n": 5, "s": "Outage in EU", "tags": ["a", "b", "VIP"], "tier": "enterprise", "f": 1.0, "nul": null}});
        let t = |field: &str, op: &str, value: Value| {
            check(json!({"field": field, "op": op, "value": value}), &doc)
        };
        assert!(t("data.n", "eq", json!(5)) && t("data.f", "eq", json!(1)));
        assert!(!t("data.n", "eq", json!("5")), "no coercion");
        assert!(
            t("data.n", "neq", json!(6)) && !t("data.n", "neq", json!("6")),
            "mismatched types are false"
        );
        assert!(
            t("data.n", "gt", json!(4))
                && t("data.n", "gte", json!(5))
                && t("data.n", "lt", json!(6))
                && t("data.n", "lte", json!(5))
        );
        assert!(!t("data.n", "gt", json!("4")) && !t("data.s", "gt", json!(1)));
        assert!(t("data.tier", "in", json!(["pro", "enterprise"])) && !t("data.tier", "in", json!(["pro"])));
        assert!(t("data.tier", "not_in", json!(["pro"])) && !t("data.tier", "not_in", json!([1, 2])));
        assert!(t("data.s", "contains", json!("outage")) && t("data.tags", "contains", json!("b")));
        assert!(!t("data.n", "contains", json!("5")));
        // Membership compares the value as written; only substrings ignore case.
        assert!(t("data.tags", "contains", json!("VIP")) && !t("data.tags", "contains", json!("vip")));
        assert!(!t("data.tags", "contains", json!("B")) && t("data.s", "contains", json!("OUTAGE")));
        assert!(t("data.s", "starts_with", json!("Outage")) && !t("data.s", "starts_with", json!("outage")));
        assert!(
            t("data.s", "matches", json!("^Out\\w+ in [A-Z]{2}$")) && !t("data.n", "matches", json!("5"))
        );
        assert!(t("data.tags.1", "eq", json!("b")));
        assert!(!t("data.missing", "eq", json!(null)) && !t("data.missing", "neq", json!(1)));
        assert!(check(json!({"field": "data.n", "op": "exists"}), &doc));
        assert!(check(
            json!({"field": "data.missing", "op": "exists", "value": false}),
            &doc
        ));
        assert!(!check(json!({"field": "data.nul", "op": "exists"}), &doc));
    }

    #[test]
    fn trees_and_traces() {
        let doc = json!({"data": {"tier": "enterprise", "priority": "high", "subject": "DB outage", "tags": ["test"]}});
        let cond = json!({"all": [
            {"field": "data.tier", "op": "eq", "value": "enterprise"},
            {"field": "data.priority", "op": "in", "value": ["high", "urgent"]},
            {"any": [{"field": "data.subject", "op": "contains", "value": "outage"},
                     {"not": {"field": "data.tags", "op": "contains", "value": "test"}}]}]});
        let compiled = Condition::compile(&cond, "/if").unwrap();
        let mut trace = Vec::new();
        assert!(compiled.eval(&doc, "/if", &mut trace));
        assert_eq!(trace.len(), 4);
        assert_eq!(trace[3].at, "/if/all/2/any/1/not");
        assert!(
            trace[3].held,
            "the comparison under `not` held; `not` turned it false"
        );
    }

    #[test]
    fn bad_regexes_are_refused_not_run() {
        let err = Condition::compile(
            &json!({"field": "data.s", "op": "matches", "value": "(unclosed"}),
            "/if",
        )
        .unwrap_err();
        assert_eq!(err[0].path, "/if/value");
        let huge = "(a{1,1000}){1,1000}";
        assert!(
            Condition::compile(&json!({"field": "data.s", "op": "matches", "value": huge}), "/if").is_err()
        );
        // Classic catastrophic-backtracking shapes run in linear time.
        let c = Condition::compile(
            &json!({"field": "data.s", "op": "matches", "value": "^(a+)+$"}),
            "/if",
        )
        .unwrap();
        let doc = json!({"data": {"s": format!("{}b", "a".repeat(50_000))}});
        let started = std::time::Instant::now();
        assert!(!c.eval(&doc, "/if", &mut Vec::new()));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn large_integers_compare_exactly() {
        let doc = json!({"data": {"n": 9007199254740993_u64, "f": 1.0, "neg": -9007199254740993_i64}});
        let t = |field: &str, op: &str, value: Value| {
            let c = Condition::compile(&json!({"field": field, "op": op, "value": value}), "/if").unwrap();
            c.eval(&doc, "/if", &mut Vec::new())
        };
        assert!(!t("data.n", "eq", json!(9007199254740992_u64)));
        assert!(t("data.n", "eq", json!(9007199254740993_u64)));
        assert!(t("data.n", "gt", json!(9007199254740992_u64)));
        assert!(t("data.neg", "lt", json!(-9007199254740992_i64)));
        assert!(t("data.f", "eq", json!(1)) && t("data.n", "gt", json!(1.5)));
    }

    #[test]
    fn a_tree_holds_a_bounded_number_of_regexes() {
        let regex = json!({"field": "data.s", "op": "matches", "value": "\\w{5}"});
        let group = |n: usize| json!({"all": vec![regex.clone(); n]});
        assert!(Condition::check_regex_budget(&group(MAX_REGEXES), "/if").is_ok());
        // Spread over nested groups and under `not`, they still count.
        let nested = json!({"any": [group(MAX_REGEXES / 2), {"not": group(MAX_REGEXES / 2 + 1)}]});
        let err = Condition::check_regex_budget(&nested, "/if").unwrap_err();
        assert_eq!(err[0].path, "/if");
        assert!(
            err[0].message.contains(&format!("holds {}", MAX_REGEXES + 1)),
            "{}",
            err[0].message
        );
    }
}
