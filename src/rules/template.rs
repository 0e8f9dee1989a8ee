//! Templates in rule outputs: `{{data.license_id}}`. A string that is exactly one template keeps
//! the JSON type of what it points at (a number stays a number, an object an object; missing is
//! null); templates inside a longer string are replaced by their text (missing is empty).

use serde_json::Value;

use super::condition::lookup;

/// Renders every string in `template` against `doc`.
pub fn render(template: &Value, doc: &Value) -> Value {
    match template {
        Value::String(s) => render_string(s, doc),
        Value::Array(items) => Value::Array(items.iter().map(|i| render(i, doc)).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), render(v, doc))).collect()),
        other => other.clone(),
    }
}

fn path_of(expr: &str) -> Vec<String> {
    expr.trim().split('.').map(str::to_string).collect()
}

fn render_string(s: &str, doc: &Value) -> Value {
    let trimmed = s.trim();
    if let Some(inner) = trimmed.strip_prefix("{{").and_then(|r| r.strip_suffix("}}"))
        && !inner.contains("{{")
        && !inner.contains("}}")
    {
        return lookup(doc, &path_of(inner)).cloned().unwrap_or(Value::Null);
    }
    if !s.contains("{{") {
        return Value::String(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                match lookup(doc, &path_of(&after[..end])) {
                    Some(Value::String(v)) => out.push_str(v),
                    Some(Value::Null) | None => {}
                    Some(other) => out.push_str(&other.to_string()),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    Value::String(out)
}

#[cfg(test)]
mod tests {
    use super::render;
    use serde_json::json;

    #[test]
    fn whole_templates_keep_types_and_embedded_ones_interpolate() {
        let doc =
            json!({"data": {"license_id": "lic_1", "days": 7, "customer": {"tier": "pro"}, "tags": ["a"]}});
        let out = render(
            &json!({"id": "{{data.license_id}}", "days": "{{ data.days }}", "c": "{{data.customer}}",
                    "note": "Extend {{data.license_id}} by {{data.days}} days ({{data.missing}})", "n": 3,
                    "list": ["{{data.tags}}"], "gone": "{{data.nope}}"}),
            &doc,
        );
        assert_eq!(out["id"], "lic_1");
        assert_eq!(out["days"], 7);
        assert_eq!(out["c"], json!({"tier": "pro"}));
        assert_eq!(out["note"], "Extend lic_1 by 7 days ()");
        assert_eq!(out["n"], 3);
        assert_eq!(out["list"], json!([["a"]]));
        assert!(out["gone"].is_null());
    }
}
