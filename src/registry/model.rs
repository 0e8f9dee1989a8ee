//! What an action is: its declaration as admins write it, parsed into types that cannot hold an
//! invalid name or an uncompilable schema.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crypto;
use crate::http::ErrorDetail;

/// A validated action name: `^[A-Za-z0-9_-]{1,64}$`, accepted by OpenAI, Anthropic and MCP alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ActionName(String);

impl ActionName {
    /// Parses a name, saying what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(text.to_string()))
        } else {
            Err("must be 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`".into())
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Hints for clients about what an action does (MCP tool annotations).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Annotations {
    /// Only reads; needs no idempotency key.
    #[serde(default)]
    pub read_only: bool,
    /// May destroy or irreversibly change data.
    #[serde(default)]
    pub destructive: bool,
    /// Repeating it with the same arguments has no further effect.
    #[serde(default)]
    pub idempotent: bool,
    /// Talks to the world outside the customer's system.
    #[serde(default)]
    pub open_world: bool,
}

/// Whether an invocation waits for the endpoint's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Wait up to `timeout_ms` and return the endpoint's answer.
    #[default]
    Sync,
    /// Answer 202 at once.
    Async,
}

/// Whether a person must approve each invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// Run without approval.
    #[default]
    Never,
    /// Hold every invocation for an approver.
    Always,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_true() -> bool {
    true
}

/// An action as declared over the API or in `schemas/actions/*.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionDeclaration {
    /// Unique per tenant; see [`ActionName`].
    pub name: String,
    /// Short human title.
    #[serde(default)]
    pub title: Option<String>,
    /// What the action does, written for the model that will choose it.
    #[serde(default)]
    pub description: String,
    /// JSON Schema 2020-12 for the arguments; must be an object schema.
    pub input_schema: Value,
    /// JSON Schema 2020-12 for the endpoint's result.
    #[serde(default)]
    pub output_schema: Option<Value>,
    /// Behaviour hints.
    #[serde(default)]
    pub annotations: Annotations,
    /// The endpoint that receives invocations.
    #[serde(default)]
    pub endpoint_id: Option<String>,
    /// `sync` or `async`.
    #[serde(default)]
    pub mode: Mode,
    /// How long a `sync` invocation waits for the endpoint.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// `never` or `always`.
    #[serde(default)]
    pub approval: Approval,
    /// Disabled actions are not listed or invocable.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Conditional allow/deny/approval rules evaluated on each invocation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<Value>,
}

impl ActionDeclaration {
    /// Checks everything that can be checked without the database; every problem is reported.
    pub fn validate(&self) -> Result<ActionName, Vec<ErrorDetail>> {
        let mut problems = Vec::new();
        let name = ActionName::parse(&self.name).map_err(|message| ErrorDetail {
            path: "/name".into(),
            message,
        });
        if let Err(detail) = &name {
            problems.push(detail.clone());
        }
        if self.description.chars().count() > 4096 {
            problems.push(detail("/description", "must be at most 4096 characters"));
        }
        if let Some(title) = &self.title
            && title.chars().count() > 200
        {
            problems.push(detail("/title", "must be at most 200 characters"));
        }
        match self.input_schema.get("type").and_then(Value::as_str) {
            Some("object") => {}
            _ => problems.push(detail(
                "/input_schema/type",
                "the input schema must describe an object: set \"type\": \"object\"",
            )),
        }
        if let Err((at, message)) = compile_new_schema(&self.input_schema) {
            problems.push(detail(&format!("/input_schema{at}"), &message));
        }
        if let Some(output) = &self.output_schema {
            // A result is an object (MCP's `structuredContent` is one): a schema that says the
            // result is something else can never be met. One that says nothing is left alone,
            // as declarations saved before this check may.
            if !schema_takes_objects(output) {
                problems.push(detail(
                    "/output_schema/type",
                    "the output schema must describe an object: set \"type\": \"object\"",
                ));
            }
            if let Err((at, message)) = compile_new_schema(output) {
                problems.push(detail(&format!("/output_schema{at}"), &message));
            }
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            problems.push(detail("/timeout_ms", "must be between 100 and 120000"));
        }
        if self.guards.len() > 32 {
            problems.push(detail("/guards", "at most 32 guards"));
        } else if let Err(p) = super::guards::check(&self.guards) {
            problems.extend(p);
        }
        match name {
            Ok(name) if problems.is_empty() => Ok(name),
            _ => Err(problems),
        }
    }

    /// The canonical JSON text (sorted keys, defaults filled in) that the content hash covers.
    pub fn canonical_json(&self) -> String {
        // serde_json's map is ordered by key, so serialising through `Value` sorts every object.
        serde_json::to_value(self)
            .map(|v| v.to_string())
            .unwrap_or_default()
    }

    /// SHA-256 of the canonical declaration: what an invocation records as "exactly what ran".
    pub fn content_hash(&self) -> String {
        format!("sha256:{}", crypto::sha256_hex(self.canonical_json().as_bytes()))
    }
}

fn detail(path: &str, message: &str) -> ErrorDetail {
    ErrorDetail {
        path: path.into(),
        message: message.into(),
    }
}

/// Compiles a JSON Schema 2020-12 with no remote or file references (none can be fetched); on
/// failure returns the JSON pointer of the fault inside the schema and what is wrong.
pub fn compile_schema(schema: &Value) -> Result<jsonschema::Validator, (String, String)> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err((String::new(), "must be a JSON Schema (an object)".into()));
    }
    jsonschema::draft202012::options().build(schema).map_err(|e| {
        (
            e.instance_path().to_string(),
            format!("is not a valid JSON Schema 2020-12: {e}"),
        )
    })
}

/// Whether some object can meet `schema` as far as its `type` says: `true`, or an object schema
/// whose `type` is absent or names `object`.
pub fn schema_takes_objects(schema: &Value) -> bool {
    match schema {
        Value::Bool(takes) => *takes,
        Value::Object(s) => match s.get("type") {
            None => true,
            Some(Value::String(t)) => t == "object",
            Some(Value::Array(types)) => types.iter().any(|t| t == "object"),
            Some(_) => false,
        },
        _ => false,
    }
}

/// Most subschemas a registered schema may stand for once its `$ref`s are followed, counting
/// each every time it is reached. Checking a value can apply every one of them, and collects
/// all their errors before any can be listed, so a schema whose `allOf`s of `$ref`s double at
/// each level (a kilobyte can stand for a million) would make each bad call cost seconds.
pub const MAX_SCHEMA_EXPANSION: usize = 100_000;

/// Longest chain of `$ref`s followed one inside another.
const MAX_REF_CHAIN: usize = 256;

/// Keywords whose value is data, never a schema.
const DATA_KEYWORDS: &[&str] = &[
    "enum",
    "const",
    "examples",
    "default",
    "required",
    "dependentRequired",
];

/// Keywords whose value maps names to subschemas.
const SCHEMA_MAPS: &[&str] = &[
    "properties",
    "patternProperties",
    "dependentSchemas",
    "$defs",
    "definitions",
];

/// [`compile_schema`] for a schema being registered, which must also be one whose cost is known
/// before any value is checked: its `$ref`s point into itself (`#/…`, at schemas, with
/// canonical pointers) and never back to a schema they are inside (no recursion), and it stands
/// for at most [`MAX_SCHEMA_EXPANSION`] subschemas once they are followed. (Schemas already
/// stored are compiled as they are.)
pub fn compile_new_schema(schema: &Value) -> Result<jsonschema::Validator, (String, String)> {
    check_references(schema, schema, "", true)?;
    let mut count = Expansion {
        root: schema,
        memo: std::collections::HashMap::new(),
        open: Vec::new(),
    };
    let total = count.of(schema, "")?;
    if total > MAX_SCHEMA_EXPANSION {
        return Err((
            String::new(),
            format!(
                "stands for more than {MAX_SCHEMA_EXPANSION} subschemas once its $refs are followed \
                 (its references multiply); simplify it"
            ),
        ));
    }
    compile_schema(schema)
}

/// Refuses references the count cannot follow exactly: `$dynamicRef`, `$recursiveRef`, an
/// `$id` below the root (the pointers under it would mean another document), and a `$ref`
/// that is not a canonical JSON pointer to a schema inside this one.
fn check_references(node: &Value, root: &Value, at: &str, is_root: bool) -> Result<(), (String, String)> {
    let Value::Object(map) = node else {
        return Ok(());
    };
    for (key, value) in map {
        let here = format!("{at}/{}", crate::json::pointer_token(key));
        match (key.as_str(), value) {
            ("$ref", Value::String(target)) if resolve(root, target).is_none() => {
                return Err((
                    here,
                    "must point at a part of this schema that is a schema, as `#/$defs/…` \
                     (nothing is fetched)"
                        .into(),
                ));
            }
            ("$dynamicRef" | "$recursiveRef", _) => {
                return Err((here, format!("{key} is not supported; use `$ref` to `#/$defs/…`")));
            }
            ("$id", _) if !is_root => return Err((here, "only the root may have an `$id`".into())),
            (data, _) if DATA_KEYWORDS.contains(&data) => {}
            // Their keys are names (a property may be called `$ref`); their values schemas.
            (name, Value::Object(children)) if SCHEMA_MAPS.contains(&name) => {
                for (child_name, child) in children {
                    check_references(
                        child,
                        root,
                        &format!("{here}/{}", crate::json::pointer_token(child_name)),
                        false,
                    )?;
                }
            }
            (_, Value::Array(items)) => {
                for (k, item) in items.iter().enumerate() {
                    check_references(item, root, &format!("{here}/{k}"), false)?;
                }
            }
            (_, Value::Object(_)) => check_references(value, root, &here, false)?,
            _ => {}
        }
    }
    Ok(())
}

/// The schema a `#…` reference points at, if it is a canonical JSON pointer that passes through
/// no data keyword (`enum`, `const`, …) and ends at an object or a boolean.
fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = percent_decode(reference.strip_prefix('#')?);
    if pointer.is_empty() {
        return Some(root);
    }
    let mut tokens = pointer.strip_prefix('/')?.split('/');
    // `Value::pointer` refuses indices like `01` or `+1`, which other resolvers take: refused
    // here, so that the count and the validator cannot disagree about where one points.
    let canonical = tokens.all(|t| {
        let odd_index = t.starts_with('+')
            || (t.len() > 1 && t.starts_with('0') && t.bytes().all(|b| b.is_ascii_digit()));
        !(DATA_KEYWORDS.contains(&t) || odd_index)
    });
    if !canonical {
        return None;
    }
    root.pointer(&pointer).filter(|v| v.is_object() || v.is_boolean())
}

/// Counts the subschemas a schema stands for once its `$ref`s are followed.
struct Expansion<'a> {
    root: &'a Value,
    /// Counted nodes by address (without recursion a node's count does not depend on the way
    /// it was reached).
    memo: std::collections::HashMap<*const Value, usize>,
    /// The `$ref` targets being counted, to find recursion.
    open: Vec<*const Value>,
}

impl<'a> Expansion<'a> {
    /// `node`'s count (itself, its subschemas and what its `$ref` stands for), saturating past
    /// [`MAX_SCHEMA_EXPANSION`]; an error for recursion or too long a chain of references.
    fn of(&mut self, node: &'a Value, at: &str) -> Result<usize, (String, String)> {
        let Value::Object(map) = node else {
            return Ok(1);
        };
        let key = node as *const Value;
        if let Some(known) = self.memo.get(&key) {
            return Ok(*known);
        }
        let mut total: usize = 1;
        for (keyword, value) in map {
            // Definitions count where they are used, not where they are written.
            if DATA_KEYWORDS.contains(&keyword.as_str())
                || matches!(keyword.as_str(), "$defs" | "definitions")
            {
                continue;
            }
            let here = format!("{at}/{}", crate::json::pointer_token(keyword));
            let children: Vec<(String, &'a Value)> = match value {
                Value::Object(children) if SCHEMA_MAPS.contains(&keyword.as_str()) => children
                    .iter()
                    .map(|(name, child)| (format!("{here}/{}", crate::json::pointer_token(name)), child))
                    .collect(),
                Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(k, child)| (format!("{here}/{k}"), child))
                    .collect(),
                Value::Object(_) => vec![(here.clone(), value)],
                _ => Vec::new(),
            };
            for (child_at, child) in children {
                total = total.saturating_add(self.of(child, &child_at)?);
                if total > MAX_SCHEMA_EXPANSION {
                    return Ok(total);
                }
            }
        }
        if let Some(target) = map
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| resolve(self.root, r))
        {
            let target_key = target as *const Value;
            if self.open.contains(&target_key) {
                return Err((
                    format!("{at}/$ref"),
                    "refers back to a schema it is part of; recursive schemas are not supported".into(),
                ));
            }
            if self.open.len() >= MAX_REF_CHAIN {
                return Err((
                    format!("{at}/$ref"),
                    format!("follows more than {MAX_REF_CHAIN} references one inside another"),
                ));
            }
            self.open.push(target_key);
            let counted = self.of(target, at);
            self.open.pop();
            total = total.saturating_add(counted?);
        }
        self.memo.insert(key, total);
        Ok(total)
    }
}

/// `%XX` escapes of a URI fragment decoded (a JSON pointer in a `$ref` may carry them).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Validates `instance` and returns its errors, each with its JSON pointer and a sentence an LLM
/// can act on; at most [`MAX_SCHEMA_ERRORS`] of them, then one saying more follow.
pub fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<ErrorDetail> {
    use jsonschema::error::ValidationErrorKind as Kind;
    let at = |parent: &str, name: &str| format!("{parent}/{}", crate::json::pointer_token(name));
    let detail = |path: String, message: String| ErrorDetail {
        path: if path.is_empty() { "/".into() } else { path },
        message,
    };
    let mut details: Vec<ErrorDetail> = validator
        .iter_errors(instance)
        .flat_map(|e| {
            let parent = e.instance_path().to_string();
            match e.kind() {
                // Reported at the parent; point at the property itself, one detail each.
                Kind::Required { property } if property.is_string() => {
                    vec![detail(
                        at(&parent, property.as_str().unwrap_or_default()),
                        e.to_string(),
                    )]
                }
                Kind::AdditionalProperties { unexpected } | Kind::UnevaluatedProperties { unexpected } => {
                    unexpected
                        .iter()
                        .map(|name| {
                            let message = format!("`{name}` is not a property allowed here; remove it");
                            detail(at(&parent, name), message)
                        })
                        .collect()
                }
                _ => vec![detail(parent, concise_message(&e))],
            }
        })
        // One past the cap, to know whether any were left out.
        .take(MAX_SCHEMA_ERRORS + 1)
        .collect();
    if details.len() > MAX_SCHEMA_ERRORS {
        details.truncate(MAX_SCHEMA_ERRORS);
        details.push(detail(
            String::new(),
            format!("more problems follow; only the first {MAX_SCHEMA_ERRORS} are listed"),
        ));
    }
    details
}

/// A validation error's sentence, with a long echo of the value it is about (an array of a
/// thousand items that has too many) cut to what the value is.
fn concise_message(e: &jsonschema::ValidationError<'_>) -> String {
    let message = e.to_string();
    let instance = e.instance().to_string();
    if instance.len() <= 80 {
        return message;
    }
    let Some(rest) = message.strip_prefix(&instance) else {
        return message;
    };
    let count = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let what = match e.instance().as_ref() {
        Value::Array(items) => format!("the array of {}", count(items.len(), "item", "items")),
        Value::Object(map) => format!("the object with {}", count(map.len(), "property", "properties")),
        Value::String(text) => format!(
            "the text of {}",
            count(text.chars().count(), "character", "characters")
        ),
        _ => "the value".to_string(),
    };
    format!("{what}{rest}")
}

/// Most problems listed for one value: an array of a million wrong items (or a schema whose
/// `$ref`s multiply its errors) must not make an answer of millions of details.
pub const MAX_SCHEMA_ERRORS: usize = 50;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decl(input_schema: Value) -> ActionDeclaration {
        serde_json::from_value(json!({"name": "refund_invoice", "input_schema": input_schema})).unwrap()
    }

    #[test]
    fn each_unexpected_or_missing_property_is_pointed_at() {
        let schema = json!({"type": "object", "required": ["amount"], "additionalProperties": false,
            "properties": {"amount": {"type": "integer"}, "nested": {"type": "object", "unevaluatedProperties": false}}});
        let validator = compile_schema(&schema).unwrap();
        let args = json!({"extra": 1, "a/b": 2, "nested": {"deep": true}});
        let mut paths: Vec<String> = schema_errors(&validator, &args)
            .into_iter()
            .map(|d| d.path)
            .collect();
        paths.sort();
        assert_eq!(paths, ["/amount", "/a~1b", "/extra", "/nested/deep"]);
        let details = schema_errors(&validator, &json!({"amount": 1, "extra": 1}));
        assert_eq!(
            details[0].message,
            "`extra` is not a property allowed here; remove it"
        );
    }

    #[test]
    fn long_values_are_not_echoed_in_messages() {
        let schema = json!({"type": "object", "properties": {
            "a": {"type": "array", "maxItems": 2},
            "s": {"type": "string", "maxLength": 3},
            "o": {"type": "string"}}});
        let validator = compile_schema(&schema).unwrap();
        let long = "x".repeat(500);
        let args = json!({"a": vec![long.clone(); 3], "s": long, "o": {"k": "y".repeat(100)}});
        let mut details = schema_errors(&validator, &args);
        details.sort_by(|x, y| x.path.cmp(&y.path));
        let messages: Vec<&str> = details.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "the array of 3 items has more than 2 items",
                "the object with 1 property is not of type \"string\"",
                "the text of 500 characters is longer than 3 characters",
            ]
        );
        let short = schema_errors(&validator, &json!({"s": "abcd"}));
        assert_eq!(short[0].message, "\"abcd\" is longer than 3 characters");
    }

    #[test]
    fn details_stop_at_the_cap() {
        let schema =
            json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}});
        let validator = compile_schema(&schema).unwrap();
        let details = schema_errors(&validator, &json!({"a": vec![0; 10_000]}));
        assert_eq!(details.len(), MAX_SCHEMA_ERRORS + 1);
        assert_eq!(details[0].path, "/a/0");
        assert!(details[MAX_SCHEMA_ERRORS].message.contains("only the first 50"));
        // Each level doubles the errors of the one below: 2^20 of them, unless cut early.
        let mut defs = serde_json::Map::new();
        for level in 0..20 {
            let next = format!("#/$defs/l{}", level + 1);
            defs.insert(
                format!("l{level}"),
                json!({"allOf": [{"$ref": next}, {"$ref": next}]}),
            );
        }
        defs.insert("l20".into(), json!({"required": ["x"]}));
        let doubling = json!({"$ref": "#/$defs/l0", "$defs": defs});
        let (_, why) = compile_new_schema(&doubling).unwrap_err();
        assert!(why.contains("subschemas"), "{why}");
        // The same through anchors, other documents or dynamic references is refused too.
        for reference in [
            json!({"$ref": "#a1"}),
            json!({"$ref": "other.json#/x"}),
            json!({"$dynamicRef": "#x"}),
        ] {
            let (at, _) =
                compile_new_schema(&json!({"type": "object", "properties": {"p": reference}})).unwrap_err();
            assert!(at.starts_with("/properties/p/"), "{at}");
        }
        let nested_id = json!({"$defs": {"a": {"$id": "https://x.example/a", "type": "object"}}});
        assert_eq!(compile_new_schema(&nested_id).unwrap_err().0, "/$defs/a/$id");
        // Shared definitions referenced many times, nesting that references the next level from
        // several properties, and recursion are all fine: they apply at other places.
        let shared = json!({"type": "object", "$defs": {"money": {"type": "object", "properties": {"cents": {"type": "integer"}}}},
            "properties": (0..200).map(|k| (format!("p{k}"), json!({"$ref": "#/$defs/money"}))).collect::<serde_json::Map<_, _>>()});
        assert!(compile_new_schema(&shared).is_ok());
        let mut levels = serde_json::Map::new();
        for level in 0..5 {
            let next = json!({"$ref": format!("#/$defs/l{}", level + 1)});
            levels.insert(
                format!("l{level}"),
                json!({"type": "object", "properties":
                {"a": next, "b": next, "c": next, "d": next, "name": {"type": "string"}}}),
            );
        }
        levels.insert("l5".into(), json!({"type": "string"}));
        assert!(compile_new_schema(&json!({"$ref": "#/$defs/l0", "$defs": levels})).is_ok());
        // Recursion is refused: through properties it doubles at each level of the value.
        let doubling_by_value =
            json!({"properties": {"x": {"$ref": "#"}}, "patternProperties": {"^x$": {"$ref": "#"}}});
        assert!(
            compile_new_schema(&doubling_by_value)
                .unwrap_err()
                .1
                .contains("recursive")
        );
        let tree = json!({"$defs": {"node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"});
        assert!(compile_new_schema(&tree).unwrap_err().1.contains("recursive"));
        // Pointers other resolvers read differently, and pointers into data, are refused.
        for target in [
            "#/$defs/a/allOf/00",
            "#/$defs/a/allOf/+0",
            "#/$defs/d/const",
            "#/$defs/missing",
        ] {
            let schema = json!({"$defs": {"a": {"allOf": [{"type": "object"}]}, "d": {"const": {"$ref": "#x"}}},
                "properties": {"p": {"$ref": target}}});
            assert_eq!(
                compile_new_schema(&schema).unwrap_err().0,
                "/properties/p/$ref",
                "{target}"
            );
        }
        // A property called `$ref` is a name, and `dependentRequired` holds names.
        let named = json!({"type": "object", "properties": {"$ref": {"type": "string"}},
            "dependentRequired": {"$ref": ["a"]}});
        assert!(compile_new_schema(&named).is_ok());
        // A long chain of references is refused before it can exhaust the stack.
        let chain: serde_json::Map<String, serde_json::Value> = (0..300)
            .map(|k| (format!("d{k}"), json!({"$ref": format!("#/$defs/d{}", k + 1)})))
            .chain([("d300".to_string(), json!({"type": "object"}))])
            .collect();
        let (_, why) = compile_new_schema(&json!({"$ref": "#/$defs/d0", "$defs": chain})).unwrap_err();
        assert!(why.contains("references one inside another"), "{why}");
    }

    #[test]
    fn names_follow_the_tool_name_rules() {
        assert!(ActionName::parse("refund_invoice-2").is_ok());
        assert!(ActionName::parse("").is_err());
        assert!(ActionName::parse("has space").is_err());
        assert!(ActionName::parse(&"a".repeat(65)).is_err());
        assert!(ActionName::parse("ünïcode").is_err());
    }

    #[test]
    fn bad_schemas_are_named() {
        let problems = decl(json!({"type": "object", "properties": {"a": {"type": 12}}}))
            .validate()
            .unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.path == "/input_schema/properties/a/type"),
            "{problems:?}"
        );
        let problems = decl(json!({"type": "string"})).validate().unwrap_err();
        assert_eq!(problems[0].path, "/input_schema/type");
        let mut with_output = decl(json!({"type": "object"}));
        with_output.output_schema = Some(json!({"type": "string"}));
        let problems = with_output.validate().unwrap_err();
        assert_eq!(problems[0].path, "/output_schema/type");
        with_output.output_schema =
            Some(json!({"type": "object", "properties": {"ok": {"type": "boolean"}}}));
        assert!(with_output.validate().is_ok());
        for also_fine in [
            json!({"properties": {"ok": {}}}),
            json!({"type": ["object", "null"]}),
        ] {
            with_output.output_schema = Some(also_fine);
            assert!(with_output.validate().is_ok());
        }
    }

    #[test]
    fn remote_refs_are_never_fetched() {
        let problems =
            decl(json!({"type": "object", "properties": {"a": {"$ref": "http://169.254.169.254/latest"}}}))
                .validate()
                .unwrap_err();
        assert!(
            problems.iter().any(|p| p.path.starts_with("/input_schema")),
            "{problems:?}"
        );
        let problems = decl(json!({"type": "object", "properties": {"a": {"$ref": "file:///etc/passwd"}}}))
            .validate()
            .unwrap_err();
        assert!(
            problems.iter().any(|p| p.path.starts_with("/input_schema")),
            "{problems:?}"
        );
    }

    #[test]
    fn hash_ignores_key_order_and_covers_content() {
        let a: ActionDeclaration = serde_json::from_str(
            r#"{"name":"x","input_schema":{"type":"object","properties":{"a":{"type":"string"}}},"description":"d"}"#,
        )
        .unwrap();
        let b: ActionDeclaration = serde_json::from_str(
            r#"{"description":"d","input_schema":{"properties":{"a":{"type":"string"}},"type":"object"},"name":"x"}"#,
        )
        .unwrap();
        assert_eq!(a.content_hash(), b.content_hash());
        let mut c = a.clone();
        c.description = "other".into();
        assert_ne!(a.content_hash(), c.content_hash());
    }
}
