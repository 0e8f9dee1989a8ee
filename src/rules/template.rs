//! Templates in rule outputs: `{{data.license_id}}`. A string that is exactly one template keeps
//! the JSON type of what it points at (a number stays a number, an object an object; missing is
//! null); templates inside a longer string are replaced by their text (missing is empty).

use serde_json::Value;

use super::condition::lookup;

/// A rendering that would have grown past its budget; nothing of it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

/// Renders every string in `template` against `doc`, taking what the result weighs as JSON from
/// `budget` and giving up once it runs out: each `{{data}}` copies what it points at, so a rule
/// with many of them could otherwise turn one event into gigabytes.
pub fn render(template: &Value, doc: &Value, budget: &mut usize) -> Result<Value, TooLarge> {
    match template {
        Value::String(s) => render_string(s, doc, budget),
        Value::Array(items) => {
            spend(budget, 2 + items.len())?;
            items
                .iter()
                .map(|i| render(i, doc, budget))
                .collect::<Result<_, _>>()
                .map(Value::Array)
        }
        Value::Object(map) => {
            spend(budget, 2 + map.len())?;
            map.iter()
                .map(|(k, v)| {
                    spend(budget, escaped_len(k) + 1)?;
                    Ok((k.clone(), render(v, doc, budget)?))
                })
                .collect::<Result<_, _>>()
                .map(Value::Object)
        }
        other => {
            spend(budget, json_len(other))?;
            Ok(other.clone())
        }
    }
}

/// The length of `s` written as a JSON string, quotes included, without writing it.
fn escaped_len(s: &str) -> usize {
    2 + s
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

/// Takes `bytes` from what is left, or fails.
fn spend(budget: &mut usize, bytes: usize) -> Result<(), TooLarge> {
    *budget = budget.checked_sub(bytes).ok_or(TooLarge)?;
    Ok(())
}

/// The length of `value` as JSON text, without writing it.
pub fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; should it, the value counts as too large.
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

fn path_of(expr: &str) -> Vec<String> {
    expr.trim().split('.').map(str::to_string).collect()
}

fn render_string(s: &str, doc: &Value, budget: &mut usize) -> Result<Value, TooLarge> {
    let trimmed = s.trim();
    if let Some(inner) = trimmed.strip_prefix("{{").and_then(|r| r.strip_suffix("}}"))
        && !inner.contains("{{")
        && !inner.contains("}}")
    {
        let found = lookup(doc, &path_of(inner)).unwrap_or(&Value::Null);
        spend(budget, json_len(found))?;
        return Ok(found.clone());
    }
    if !s.contains("{{") {
        spend(budget, escaped_len(s))?;
        return Ok(Value::String(s.to_string()));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                match lookup(doc, &path_of(&after[..end])) {
                    Some(Value::String(v)) => {
                        spend(budget, escaped_len(v) - 2)?;
                        out.push_str(v)
                    }
                    Some(Value::Null) | None => {}
                    Some(other) => {
                        // Its JSON text is what goes in, escaped again inside the string.
                        spend(budget, json_len(other))?;
                        let text = other.to_string();
                        spend(budget, escaped_len(&text) - 2 - text.len())?;
                        out.push_str(&text)
                    }
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
    spend(budget, escaped_len(s))?;
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::{TooLarge, render};
    use serde_json::json;

    #[test]
    fn a_rendering_past_its_budget_is_refused_whole() {
        let doc = json!({"data": {"blob": "x".repeat(1000)}});
        let many: serde_json::Map<String, serde_json::Value> =
            (0..100).map(|k| (format!("a{k}"), json!("{{data}}"))).collect();
        assert_eq!(render(&json!(many), &doc, &mut (64 * 1024)), Err(TooLarge));
        let embedded = json!({"note": "{{data.blob}} {{data.blob}}"});
        assert_eq!(render(&embedded, &doc, &mut 1500), Err(TooLarge));
        let mut budget = 2100;
        let rendered = render(&embedded, &doc, &mut budget).unwrap();
        assert_eq!(rendered["note"].as_str().unwrap().len(), 2001);
        // One budget serves several renderings; text is weighed as JSON writes it.
        assert_eq!(render(&embedded, &doc, &mut budget), Err(TooLarge));
        let controls = json!({"c": "\u{1}".repeat(100)});
        assert_eq!(render(&json!("{{c}}"), &controls, &mut 500), Err(TooLarge));
        assert!(render(&json!("{{c}}"), &controls, &mut 700).is_ok());
        // An object pasted into text is weighed as the text it becomes: its quotes escaped.
        let quotes = json!({"q": "\"".repeat(100)});
        assert_eq!(
            render(&json!("pre {{q}}"), &json!({"q": quotes}), &mut 400),
            Err(TooLarge)
        );
    }

    #[test]
    fn whole_templates_keep_types_and_embedded_ones_interpolate() {
        let doc =
            json!({"data": {"license_id": "lic_1", "days": 7, "customer": {"tier": "pro"}, "tags": ["a"]}});
        let out = render(
            &json!({"id": "{{data.license_id}}", "days": "{{ data.days }}", "c": "{{data.customer}}",
                    "note": "Extend {{data.license_id}} by {{data.days}} days ({{data.missing}})", "n": 3,
                    "list": ["{{data.tags}}"], "gone": "{{data.nope}}"}),
            &doc,
            &mut (1 << 20),
        )
        .unwrap();
        assert_eq!(out["id"], "lic_1");
        assert_eq!(out["days"], 7);
        assert_eq!(out["c"], json!({"tier": "pro"}));
        assert_eq!(out["note"], "Extend lic_1 by 7 days ()");
        assert_eq!(out["n"], 3);
        assert_eq!(out["list"], json!([["a"]]));
        assert!(out["gone"].is_null());
    }
}
