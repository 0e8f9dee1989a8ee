//! JSON values compared as JSON Schema counts them: a number is its value, however it is spelled
//! (`7`, `7.0` and `7e0` are one number), at any depth.

use std::cmp::Ordering;

use serde_json::{Number, Value};

/// `name` as one token of a JSON pointer (RFC 6901): `~` and `/` escaped.
pub fn pointer_token(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// Numbers compared by value, exactly: 1 equals 1.0, and an integer past 2^53 is told from the
/// float next to it (converting either side would round them together).
pub fn number_order(x: &Number, y: &Number) -> Option<Ordering> {
    let exact = |n: &Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    match (exact(x), exact(y)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        (Some(x), None) => integer_float_order(x, y.as_f64()?),
        (None, Some(y)) => integer_float_order(y, x.as_f64()?).map(Ordering::reverse),
        (None, None) => x.as_f64()?.partial_cmp(&y.as_f64()?),
    }
}

/// How the integer `i` (within 64 bits) orders against the float `f`, without rounding either.
fn integer_float_order(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // Every 64-bit integer lies strictly inside (-2^64, 2^64); so does a float's whole part
    // there, which an i128 then holds exactly.
    const BOUND: f64 = 18_446_744_073_709_551_616.0;
    let whole = f.trunc();
    if whole >= BOUND {
        return Some(Ordering::Less);
    }
    if whole <= -BOUND {
        return Some(Ordering::Greater);
    }
    let below_fraction = 0.0f64.partial_cmp(&(f - whole)).unwrap_or(Ordering::Equal);
    Some(i.cmp(&(whole as i128)).then(below_fraction))
}

/// JSON equality with numbers compared by value at any depth (`{"a": 1}` equals `{"a": 1.0}`).
pub fn equal_by_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_order(x, y) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| equal_by_value(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| equal_by_value(v, w)))
        }
        _ => a == b,
    }
}

/// `value` as canonical text: keys sorted (serde_json's map is ordered) and every whole-valued
/// float written as the integer it is, so that values equal by [`equal_by_value`] read the same.
pub fn canonical_text(value: &Value) -> String {
    match floats_as_integers(value, whole_float_as_integer) {
        Some(rewritten) => rewritten.to_string(),
        None => value.to_string(),
    }
}

/// `value` as it is sent on: whole-valued floats written as the integers they are (`100.0` and
/// `1e2` as `100`), which a strictly typed reader of an integer field (Go's `int`, serde's
/// `u64`) takes where it refuses the float, and any reader of a number takes alike. `None` if
/// there is none to rewrite.
pub fn whole_numbers_as_integers(value: &Value) -> Option<Value> {
    floats_as_integers(value, exact_whole_float)
}

/// Past 2^53 a float is not the number its text said (`9007199254740993.0` reads as
/// `…992`): written as an integer it would look exact, so it is left a float.
const EXACT_FLOAT_END: f64 = 9_007_199_254_740_992.0;

/// A whole float below 2^53 in size, which is the number its text said, as that integer.
fn exact_whole_float(n: &Number) -> Option<Value> {
    let f = n.as_f64()?;
    (n.is_f64() && f.fract() == 0.0 && f.abs() < EXACT_FLOAT_END).then(|| Value::from(f as i64))
}

/// A float with a whole value that 64 bits hold exactly, as that integer.
fn whole_float_as_integer(n: &Number) -> Option<Value> {
    let f = n.as_f64().filter(|_| n.is_f64())?;
    // Every whole float in [-2^63, 2^63) is exactly an i64, and in [2^63, 2^64) a u64.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    if f.fract() != 0.0 {
        return None;
    }
    if (-I64_END..I64_END).contains(&f) {
        Some(Value::from(f as i64))
    } else if (I64_END..U64_END).contains(&f) {
        Some(Value::from(f as u64))
    } else {
        None
    }
}

/// `value` with every number `as_integer` rewrites rewritten, at any depth; `None` if it
/// rewrites none (nothing is copied then).
fn floats_as_integers(value: &Value, as_integer: fn(&Number) -> Option<Value>) -> Option<Value> {
    fn holds(value: &Value, as_integer: fn(&Number) -> Option<Value>) -> bool {
        match value {
            Value::Number(n) => as_integer(n).is_some(),
            Value::Array(items) => items.iter().any(|v| holds(v, as_integer)),
            Value::Object(map) => map.values().any(|v| holds(v, as_integer)),
            _ => false,
        }
    }
    fn rewrite(value: Value, as_integer: fn(&Number) -> Option<Value>) -> Value {
        match value {
            Value::Number(n) => as_integer(&n).unwrap_or(Value::Number(n)),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| rewrite(v, as_integer)).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (k, rewrite(v, as_integer)))
                    .collect(),
            ),
            other => other,
        }
    }
    holds(value, as_integer).then(|| rewrite(value.clone(), as_integer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_floats_are_sent_on_as_integers_only_where_exact() {
        let sent: Value =
            serde_json::from_str(r#"{"a": [100.0, 1e2, -0.0, 0.5, 9007199254740991.0, 9007199254740993.0]}"#)
                .unwrap();
        assert_eq!(
            whole_numbers_as_integers(&sent).unwrap().to_string(),
            r#"{"a":[100,100,0,0.5,9007199254740991,9007199254740992.0]}"#
        );
        assert_eq!(whole_numbers_as_integers(&json!({"a": [1, 0.5]})), None);
    }

    fn order(a: Value, b: Value) -> Option<Ordering> {
        match (a, b) {
            (Value::Number(a), Value::Number(b)) => number_order(&a, &b),
            _ => unreachable!(),
        }
    }

    #[test]
    fn integers_and_floats_compare_exactly() {
        use Ordering::*;
        // 2^53 + 1 has no float of its own; the float 2^53 is below it, not equal.
        assert_eq!(
            order(json!(9007199254740993u64), json!(9007199254740992.0)),
            Some(Greater)
        );
        assert_eq!(
            order(json!(9007199254740992.0), json!(9007199254740993u64)),
            Some(Less)
        );
        assert_eq!(
            order(json!(9007199254740992u64), json!(9007199254740992.0)),
            Some(Equal)
        );
        assert_eq!(order(json!(u64::MAX), json!(18446744073709551616.0)), Some(Less));
        assert_eq!(order(json!(i64::MIN), json!(-9223372036854775808.0)), Some(Equal));
        assert_eq!(order(json!(i64::MIN), json!(-1e30)), Some(Greater));
        assert_eq!(order(json!(2), json!(2.5)), Some(Less));
        assert_eq!(order(json!(-2), json!(-2.5)), Some(Greater));
        assert_eq!(order(json!(-3), json!(-3.0)), Some(Equal));
        assert_eq!(order(json!(0), json!(-0.0)), Some(Equal));
        assert_eq!(order(json!(1.5), json!(2.5)), Some(Less));
    }

    #[test]
    fn equality_is_by_value_at_any_depth() {
        assert!(equal_by_value(
            &json!({"a": [1, {"b": 2}]}),
            &json!({"a": [1.0, {"b": 2.0}]})
        ));
        assert!(!equal_by_value(&json!({"a": [1, 2]}), &json!({"a": [1, 2, 3]})));
        assert!(!equal_by_value(&json!({"a": 1}), &json!({"a": 1, "b": 1})));
        assert!(!equal_by_value(&json!({"a": 1}), &json!({"b": 1})));
        assert!(!equal_by_value(&json!({"a": "1"}), &json!({"a": 1})));
    }

    #[test]
    fn canonical_text_reads_equal_values_alike() {
        let spelled: Value =
            serde_json::from_str(r#"{"b": [7.0, -0.0, 1e19, 9223372036854775808.0], "a": 1.5, "c": 1e30}"#)
                .unwrap();
        let plain: Value = serde_json::from_str(
            r#"{"a": 1.5, "b": [7, 0, 10000000000000000000, 9223372036854775808], "c": 1e30}"#,
        )
        .unwrap();
        assert_eq!(canonical_text(&spelled), canonical_text(&plain));
        assert_eq!(
            canonical_text(&plain),
            r#"{"a":1.5,"b":[7,0,10000000000000000000,9223372036854775808],"c":1e+30}"#
        );
        assert_ne!(
            canonical_text(&json!({"a": 7})),
            canonical_text(&json!({"a": 7.5}))
        );
    }
}
