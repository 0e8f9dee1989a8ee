//! Our own extractors. axum's built-in rejections are plain text; these answer every bad input in
//! the contract's error shape: wrong content type → 415, too large → 413, invalid UTF-8,
//! malformed or too deeply nested JSON or a key named twice in one object → 400, well-formed JSON
//! of the wrong shape → 422.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorDetail};
use crate::AppState;

/// A JSON body, checked for content type, size, UTF-8, its text (see [`check_json_text`]) and
/// shape.
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = json_body_bytes(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// A JSON body checked like [`Json`] (content type, size, UTF-8, text, shape), but whose
/// problems are answered only by [`JsonBody::parse`]: for handlers that must answer 403 to a
/// caller without the permission whatever it sent.
#[derive(Debug)]
pub struct JsonBody {
    /// The bytes, or why they cannot be a JSON body.
    bytes: Result<Bytes, ApiError>,
}

impl JsonBody {
    /// The body as a `T`, or the error [`Json`] would have answered.
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        parse_json(&self.bytes?)
    }
}

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(JsonBody {
            bytes: json_body_bytes(req, state).await,
        })
    }
}

/// The raw bytes of a JSON body after the content-type, size, UTF-8 and text checks (see
/// [`check_json_text`]); for handlers that must keep the exact bytes.
pub async fn json_body_bytes(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    require_json_content_type(req.headers())?;
    let deadline = state.config.read_timeout;
    let read = tokio::time::timeout(deadline, Bytes::from_request(req, state)).await;
    let bytes = read.map_err(|_| body_too_slow(deadline))?.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large(state.config.body_limit)
        } else {
            ApiError::bad_request("unreadable_body", "the request body could not be read")
        }
    })?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(ApiError::bad_request(
            "invalid_utf8",
            "the request body is not valid UTF-8",
        ));
    }
    let max_depth = state.config.max_json_depth;
    if let Err(problem) = scan_json_text(&bytes, max_depth) {
        // A problem of content in text that is not even JSON: say what is wrong first.
        if problem != JsonTextProblem::TooDeep
            && let Err(syntax) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        {
            return Err(malformed(&syntax));
        }
        return Err(problem.into_api_error(max_depth));
    }
    Ok(bytes)
}

/// Checks JSON text before it is parsed, in one cheap byte scan: nested no deeper than
/// `max_depth`, with no escaped NUL (`\u0000`) anywhere, no integer that 64 bits cannot hold and
/// no object naming a key twice. PostgreSQL's text cannot hold a NUL, so a name with one would
/// fail there as a 500 while SQLite kept it: it is refused alike on both. A larger integer would
/// be read as the nearest float, so stored, delivered, compared and matched against an
/// idempotency key as another number than the one sent. Of a key named twice, parsers keep
/// either one or the other: what was checked could differ from what another reader sees.
pub fn check_json_text(bytes: &[u8], max_depth: usize) -> Result<(), ApiError> {
    scan_json_text(bytes, max_depth).map_err(|problem| problem.into_api_error(max_depth))
}

/// What [`scan_json_text`] found wrong with JSON text (the first problem, in text order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonTextProblem {
    /// Nested deeper than allowed.
    TooDeep,
    /// An escaped NUL (`\u0000`) in a string.
    Nul,
    /// An integer literal outside `i64::MIN..=u64::MAX`, as written.
    IntegerTooLarge(String),
    /// An object that names one key twice: the JSON pointer of the second.
    DuplicateKey(String),
}

impl JsonTextProblem {
    /// The API's answer to it.
    pub fn into_api_error(self, max_depth: usize) -> ApiError {
        match self {
            JsonTextProblem::TooDeep => too_deep(max_depth),
            JsonTextProblem::Nul => ApiError::validation(
                "the request body holds a NUL character",
                vec![ErrorDetail {
                    path: "/".into(),
                    message: "text may not contain the NUL character (\\u0000)".into(),
                }],
            ),
            JsonTextProblem::IntegerTooLarge(number) => integer_too_large(&number),
            // Parsers disagree on which of the two counts (the last here, the first elsewhere),
            // so a body whose meaning depends on the reader is refused.
            JsonTextProblem::DuplicateKey(pointer) => ApiError::bad_request(
                "duplicate_key",
                "the request body names a key twice in one object; send each key once",
            )
            .with_details(vec![serde_json::json!({
                // A key may be as long as the body: the path shows its start, marked as cut.
                "path": match pointer.char_indices().nth(200) {
                    Some((at, _)) => format!("{}…", &pointer[..at]),
                    None => pointer,
                },
                "message": "this key appears earlier in the same object",
            })]),
        }
    }
}

/// The one byte scan behind [`check_json_text`], for request bodies. Nesting too deep wins over
/// any other problem, wherever it is; of the others the first in text order is told. It
/// allocates only to remember each open object's keys.
pub fn scan_json_text(bytes: &[u8], max_depth: usize) -> Result<(), JsonTextProblem> {
    scan(bytes, max_depth, Checks::RequestBody)
}

/// [`scan_json_text`] for JSON from elsewhere (an endpoint's answer), which is kept as it came:
/// only its integers are checked, at any depth, whatever its keys and strings hold.
pub fn scan_json_integers(bytes: &[u8]) -> Result<(), JsonTextProblem> {
    scan(bytes, usize::MAX, Checks::IntegersOnly)
}

/// What a scan looks for besides nesting depth.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checks {
    /// Integer range, escaped NULs and keys named twice.
    RequestBody,
    /// Integer range alone.
    IntegersOnly,
}

/// An array or object the scan is inside.
enum Open<'a> {
    /// An array, at its `index`th element.
    Array { index: usize },
    /// An object, with the keys it has named so far (when they are checked).
    Object {
        keys: KeySet<'a>,
        /// Whether the next string is a key (after `{` or `,`) rather than a value.
        expecting_key: bool,
        /// The last key named: where a duplicate further down lies.
        current: Cow<'a, [u8]>,
    },
}

/// The keys of one object, as decoded bytes; searched in a list while there are few.
#[derive(Default)]
struct KeySet<'a> {
    few: Vec<Cow<'a, [u8]>>,
    many: Option<std::collections::HashSet<Cow<'a, [u8]>>>,
}

impl<'a> KeySet<'a> {
    /// Adds `key`; false if it was there already.
    fn insert(&mut self, key: Cow<'a, [u8]>) -> bool {
        if let Some(many) = &mut self.many {
            return many.insert(key);
        }
        if self.few.contains(&key) {
            return false;
        }
        self.few.push(key);
        if self.few.len() > 16 {
            self.many = Some(std::mem::take(&mut self.few).into_iter().collect());
        }
        true
    }
}

fn scan(bytes: &[u8], max_depth: usize, checks: Checks) -> Result<(), JsonTextProblem> {
    let mut open: Vec<Open> = Vec::new();
    // The first problem other than depth; once found, only depth is followed.
    let mut found: Option<JsonTextProblem> = None;
    let (mut in_string, mut escaped) = (false, false);
    // Where the key being read began (its opening quote), when keys are checked.
    let mut key_from: Option<usize> = None;
    // Where the number being read began, outside strings.
    let mut number_from: Option<usize> = None;
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(from) = number_from {
            if matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                continue;
            }
            number_from = None;
            if let Err(problem) = check_integer_range(&bytes[from..i]) {
                found.get_or_insert(problem);
            }
        }
        if in_string {
            match (escaped, b) {
                (true, b'u')
                    if checks == Checks::RequestBody
                        && found.is_none()
                        && bytes.get(i + 1..i + 5) == Some(b"0000".as_slice()) =>
                {
                    found = Some(JsonTextProblem::Nul);
                    escaped = false;
                }
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    if let Some(from) = key_from.take()
                        && let Err(problem) = name_key(&mut open, &bytes[from..=i])
                    {
                        found.get_or_insert(problem);
                    }
                }
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                let checks_keys = checks == Checks::RequestBody && found.is_none();
                if checks_keys
                    && matches!(
                        open.last(),
                        Some(Open::Object {
                            expecting_key: true,
                            ..
                        })
                    )
                {
                    key_from = Some(i);
                }
            }
            b'{' | b'[' => {
                if open.len() >= max_depth {
                    return Err(JsonTextProblem::TooDeep);
                }
                open.push(match b {
                    b'{' => Open::Object {
                        keys: KeySet::default(),
                        expecting_key: true,
                        current: Cow::Borrowed(&[]),
                    },
                    _ => Open::Array { index: 0 },
                });
            }
            b'}' | b']' => {
                open.pop();
            }
            b',' => match open.last_mut() {
                Some(Open::Array { index }) => *index += 1,
                Some(Open::Object { expecting_key, .. }) => *expecting_key = true,
                None => {}
            },
            b':' => {
                if let Some(Open::Object { expecting_key, .. }) = open.last_mut() {
                    *expecting_key = false;
                }
            }
            b'-' | b'0'..=b'9' if found.is_none() => number_from = Some(i),
            _ => {}
        }
    }
    if let Some(from) = number_from
        && let Err(problem) = check_integer_range(&bytes[from..])
    {
        found.get_or_insert(problem);
    }
    found.map_or(Ok(()), Err)
}

/// Records `quoted` (a key with its quotes) in the innermost object; a key it already named is
/// [`JsonTextProblem::DuplicateKey`]. Escapes are decoded first, so `"\u0061"` repeats `"a"`.
fn name_key<'a>(open: &mut [Open<'a>], quoted: &'a [u8]) -> Result<(), JsonTextProblem> {
    let raw = &quoted[1..quoted.len() - 1];
    let key: Cow<'a, [u8]> = if raw.contains(&b'\\') {
        match serde_json::from_slice::<String>(quoted) {
            Ok(decoded) => Cow::Owned(decoded.into_bytes()),
            // Broken text: the parser will say so.
            Err(_) => return Ok(()),
        }
    } else {
        Cow::Borrowed(raw)
    };
    let Some(Open::Object { keys, current, .. }) = open.last_mut() else {
        return Ok(());
    };
    if keys.insert(key.clone()) {
        *current = key;
        return Ok(());
    }
    let mut pointer = String::new();
    let outer = open.len() - 1;
    for container in &open[..outer] {
        pointer.push('/');
        match container {
            Open::Array { index } => pointer.push_str(&index.to_string()),
            Open::Object { current, .. } => {
                pointer.push_str(&crate::json::pointer_token(&String::from_utf8_lossy(current)))
            }
        }
    }
    pointer.push('/');
    pointer.push_str(&crate::json::pointer_token(&String::from_utf8_lossy(&key)));
    Err(JsonTextProblem::DuplicateKey(pointer))
}

/// Refuses an integer literal (no fraction, no exponent) outside `i64::MIN..=u64::MAX`; anything
/// else, malformed numbers included, is left to the parser.
fn check_integer_range(number: &[u8]) -> Result<(), JsonTextProblem> {
    if number.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return Ok(());
    }
    let (negative, digits) = match number.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, number),
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return Ok(());
    }
    let significant = match digits.iter().position(|&d| d != b'0') {
        Some(first) => &digits[first..],
        None => return Ok(()),
    };
    let limit: &[u8] = if negative {
        b"9223372036854775808"
    } else {
        b"18446744073709551615"
    };
    // Same length: digit strings compare as numbers.
    let too_large =
        significant.len() > limit.len() || (significant.len() == limit.len() && significant > limit);
    if too_large {
        return Err(JsonTextProblem::IntegerTooLarge(
            String::from_utf8_lossy(number).into_owned(),
        ));
    }
    Ok(())
}

/// 422 for an integer 64 bits cannot hold, with what to send instead.
fn integer_too_large(number: &str) -> ApiError {
    let shown: String = number.chars().take(40).collect();
    let ellipsis = if number.len() > 40 { "…" } else { "" };
    ApiError::validation(
        "the request body holds an integer too large to keep exactly",
        vec![ErrorDetail {
            path: "/".into(),
            message: format!(
                "the integer {shown}{ellipsis} is outside the range of 64-bit integers \
                 (-9223372036854775808 to 18446744073709551615); send it as a string, or as a \
                 decimal number if an approximate value will do"
            ),
        }],
    )
}

fn too_deep(max_depth: usize) -> ApiError {
    ApiError::bad_request(
        "nesting_too_deep",
        format!("the JSON body is nested deeper than {max_depth} levels"),
    )
}

/// 408 for a body that did not arrive within `deadline` (`read_timeout`): a client that trickles
/// its body would otherwise hold its connection and a request slot for good.
pub fn body_too_slow(deadline: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body did not arrive within {}; send it at once",
            humantime::format_duration(deadline)
        ),
    )
}

/// 413 with the limit named.
pub fn payload_too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is larger than the limit of {limit} bytes"),
    )
}

fn require_json_content_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|essence| {
            let essence = essence.trim().to_ascii_lowercase();
            essence == "application/json" || essence.ends_with("+json")
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    // JSON is UTF-8 (RFC 8259); a body declared in another charset would be read as if it were.
    let other_charset = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .into_iter()
        .flat_map(|v| v.split(';').skip(1))
        .filter_map(|param| param.split_once('='))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("charset")
                && !matches!(
                    value.trim().trim_matches('"').to_ascii_lowercase().as_str(),
                    "utf-8" | "utf8"
                )
        });
    if other_charset {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as UTF-8: JSON in another charset is not supported",
        ));
    }
    // Bodies are read as sent; a compressed one would only fail later as bad UTF-8 or JSON.
    let encoded = headers.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        !v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
    });
    if encoded {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body uncompressed: Content-Encoding is not supported",
        ));
    }
    Ok(())
}

/// Parses JSON text that [`json_body_bytes`] let through into `T`, telling syntax errors (400)
/// from shape errors (422). (The text is not scanned again: every body was, once, as it came.)
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Syntax first, so that a truncated body is a 400 even when its start already has the
    // wrong shape; then the shape, with the path of the first problem.
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| malformed(&e))?;
    from_json_value(value)
}

/// 400 `malformed_json` with the parser's reason.
fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "malformed_json",
        format!("the request body is not valid JSON: {e}"),
    )
}

/// A parsed body (a JSON object) as `T`; a problem of shape is a 422 at its pointer.
pub fn from_json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::invalid_field(
            "/",
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(shape_or_syntax_error)
}

/// A field that may be left out but not sent as `null` (which would otherwise read as "leave
/// it", silently ignoring a request to clear it). For `#[serde(default, deserialize_with)]`.
pub fn not_null<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)?
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom("must not be null"))
}

/// A field that may be left out (`None`), sent as `null` (`Some(None)`, "clear it") or sent
/// with a value. For `#[serde(default, deserialize_with)]`.
pub fn null_or_value<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn shape_or_syntax_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    {
        let path = json_pointer(err.path());
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::validation(
                format!("the request body does not have the expected shape: {inner}"),
                vec![ErrorDetail {
                    path,
                    message: strip_position(&inner.to_string()),
                }],
            ),
            _ => ApiError::bad_request(
                "malformed_json",
                format!("the request body is not valid JSON: {inner}"),
            ),
        }
    }
}

fn json_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("/{index}")),
            Segment::Map { key } => {
                out.push('/');
                out.push_str(&crate::json::pointer_token(key));
            }
            Segment::Enum { variant } => out.push_str(&format!("/{variant}")),
            Segment::Unknown => out.push_str("/?"),
        }
    }
    if out.is_empty() { "/".into() } else { out }
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Query-string parameters; a bad one is a 400 in the contract's shape.
#[derive(Debug, Clone)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if parts.uri.query().is_some_and(holds_encoded_nul) {
            return Err(ApiError::bad_request(
                "invalid_query",
                "the query holds a NUL character (%00)",
            ));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| {
                // axum's text starts with its own words; the parameter and the problem follow.
                let text = e.body_text();
                let problem = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                ApiError::bad_request("invalid_query", format!("bad query parameter: {problem}"))
            })
    }
}

/// Path parameters; a bad one is a 400 in the contract's shape.
#[derive(Debug, Clone)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if holds_encoded_nul(parts.uri.path()) {
            return Err(ApiError::bad_request(
                "invalid_path",
                "the path holds a NUL character (%00)",
            ));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

/// Whether URI text decodes to a NUL somewhere: no id or name holds one, and PostgreSQL cannot
/// even compare text with one (it would answer a 500 where SQLite finds nothing).
fn holds_encoded_nul(text: &str) -> bool {
    text.contains("%00")
}

/// `If-Match: "<tag>"`: change the object only if it is still as it was when a read returned
/// that `ETag` (an action's version, a hash of a tenant's policy rows). Absent or `*` is `None`
/// (no condition).
#[derive(Debug, Clone)]
pub struct IfMatch(pub Option<String>);

/// What a tag that names no version asks for: versions start at 1.
const NO_VERSION: i64 = 0;

const INVALID_IF_MATCH: &str =
    "If-Match must be one ETag as a read answered it, such as \"3\" (not a weak W/ tag)";

impl IfMatch {
    /// The `ETag` header of an object whose tag is `tag`.
    pub fn etag(tag: impl std::fmt::Display) -> [(header::HeaderName, String); 1] {
        [(header::ETAG, format!("\"{tag}\""))]
    }

    /// The tag as a version number, for objects whose tags are versions. Tags compare as text:
    /// one that is not a version as this server writes it (`"02"`, `"x"`) matches none.
    pub fn version(&self) -> Option<i64> {
        self.0.as_deref().map(|tag| {
            tag.parse::<i64>()
                .ok()
                .filter(|v| v.to_string() == tag && *v > 0)
                .unwrap_or(NO_VERSION)
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(header::IF_MATCH).iter();
        let text = match (values.next(), values.next()) {
            (None, _) => return Ok(IfMatch(None)),
            (Some(value), None) => value.to_str().unwrap_or_default().trim(),
            (Some(_), Some(_)) => "",
        };
        if text == "*" {
            return Ok(IfMatch(None));
        }
        // A weak tag (W/"3") never matches under If-Match's strong comparison; it is refused
        // like any other ETag this server did not give.
        text.strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .filter(|t| {
                (1..=128).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            .map(|t| IfMatch(Some(t.to_string())))
            .ok_or_else(|| ApiError::bad_request("invalid_if_match", INVALID_IF_MATCH))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_nul_is_found_but_an_escaped_backslash_is_not_one() {
        let check = |text: &[u8]| check_json_text(text, 8);
        assert!(check(br#"{"a":"x\u0000"}"#).is_err());
        assert!(check(br#"{"a\u0000":1}"#).is_err());
        assert!(check(br#"{"a":"\\\u0000"}"#).is_err());
        assert!(check(br#"{"a":"\\u0000"}"#).is_ok());
        assert!(check(br#"{"a":"\u00001"}"#).is_err());
        assert!(check(br#"{"a":"\u0001 u0000"}"#).is_ok());
        assert!(check(br#"{"a":"\"\\u0000[[[[[[[[[["}"#).is_ok());
        assert_eq!(
            check(b"[[[[[[[[[1]]]]]]]]]").unwrap_err().code,
            "nesting_too_deep"
        );
    }

    #[test]
    fn integers_past_64_bits_are_refused_and_everything_else_left_to_the_parser() {
        let check = |text: &str| check_json_text(text.as_bytes(), 8).map_err(|e| e.details);
        for fits in [
            r#"{"n":18446744073709551615}"#,
            r#"{"n":-9223372036854775808}"#,
            r#"[0,-0,7,1e400,123456789012345678901234.5,-99999999999999999999e0]"#,
            r#"{"n":"99999999999999999999999"}"#,
            r#"{"n": 00000000000000000000001}"#,
            "18446744073709551615",
        ] {
            assert!(check(fits).is_ok(), "{fits}");
        }
        for too_large in [
            r#"{"n":18446744073709551616}"#,
            r#"{"n":-9223372036854775809}"#,
            r#"[1, 99999999999999999999999]"#,
            "{\"n\":\n123456789012345678901234567890}",
            "18446744073709551616",
        ] {
            let details = check(too_large).expect_err(too_large);
            assert!(
                details[0]["message"].as_str().unwrap().contains("64-bit"),
                "{too_large}"
            );
        }
    }

    #[test]
    fn a_key_named_twice_in_one_object_is_found_with_its_pointer() {
        let duplicate = |text: &str| match scan_json_text(text.as_bytes(), 16) {
            Err(JsonTextProblem::DuplicateKey(pointer)) => Some(pointer),
            Ok(()) => None,
            Err(other) => panic!("{text}: {other:?}"),
        };
        for unique in [
            r#"{"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]}"#,
            r#"{"a":"a","b":"a:,{","c":{"a":{"a":[]}}}"#,
            r#"[{"x":1},{"x":2},["x","x"]]"#,
            r#"{"a\"b":1,"a\\b":2,"ab":3}"#,
            r#"{"":1,"k":{"":2}}"#,
        ] {
            assert_eq!(duplicate(unique), None, "{unique}");
        }
        for (text, pointer) in [
            (r#"{"a":1,"a":2}"#, "/a"),
            (r#"{"a":1,"\u0061":2}"#, "/a"),
            (r#"{"x":[0,{"k":1,"m":{},"k":2}]}"#, "/x/1/k"),
            (r#"{"a/b":{"~":1,"~":2}}"#, "/a~1b/~0"),
            (r#"[1,[2,{"":1,"":2}]]"#, "/1/1/"),
        ] {
            assert_eq!(duplicate(text).as_deref(), Some(pointer), "{text}");
        }
        // Many keys are kept in a set, and still compared.
        let many: Vec<String> = (0..40).map(|k| format!("\"k{k}\":{k}")).collect();
        let text = format!("{{{}}}", many.join(","));
        assert_eq!(duplicate(&text), None);
        let text = format!("{{{},\"k7\":0}}", many.join(","));
        assert_eq!(duplicate(&text).as_deref(), Some("/k7"));
        // An endpoint's answer is kept as it came: only its integers matter.
        assert_eq!(scan_json_integers(br#"{"a":1,"a":"\u0000"}"#), Ok(()));
        for answer in [
            br#"{"a":1,"a":99999999999999999999999}"#.as_slice(),
            br#"{"note":"\u0000","n":99999999999999999999999}"#,
        ] {
            assert!(
                matches!(
                    scan_json_integers(answer),
                    Err(JsonTextProblem::IntegerTooLarge(_))
                ),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
        // Nesting too deep is told whatever came before it; otherwise the first problem is.
        let deep = format!(r#"{{"a":1,"a":{}{}}}"#, "[".repeat(20), "]".repeat(20));
        assert_eq!(scan_json_text(deep.as_bytes(), 16), Err(JsonTextProblem::TooDeep));
        assert_eq!(
            scan_json_text(br#"{"a":"\u0000","a":99999999999999999999999}"#, 16),
            Err(JsonTextProblem::Nul)
        );
    }

    #[test]
    fn depth_scan_ignores_brackets_inside_strings() {
        assert!(check_json_text(br#"{"a":"[[[[[[[[[["}"#, 3).is_ok());
        assert!(check_json_text(br#"{"a":"\"[[[[["}"#, 3).is_ok());
        assert!(check_json_text(b"[[[[1]]]]", 3).is_err());
        assert!(check_json_text(b"[[[1]]]", 3).is_ok());
    }

    #[test]
    fn syntax_errors_and_shape_errors_are_told_apart() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            amount: u32,
        }
        let e = parse_json::<Body>(b"{\"amount\": ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_json::<Body>(b"{\"amount\": \"x\"}").unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.details[0]["path"], "/amount");
        let e = parse_json::<Body>(b"{\"amount\": 1} trailing").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}

/// An optional JSON body: absent or blank is `None`; anything else is checked like [`JsonBody`]
/// and parsed only by [`OptionalJsonBody::parse`], once the caller's permission is checked.
#[derive(Debug)]
pub struct OptionalJsonBody(Option<JsonBody>);

impl OptionalJsonBody {
    /// The body as a `T`; `None` when there was none.
    pub fn parse<T: DeserializeOwned>(self) -> Result<Option<T>, ApiError> {
        self.0.map(JsonBody::parse).transpose()
    }
}

impl FromRequest<AppState> for OptionalJsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let empty = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "0")
            || (req.headers().get(header::CONTENT_LENGTH).is_none()
                && req.headers().get(header::TRANSFER_ENCODING).is_none());
        if empty {
            return Ok(OptionalJsonBody(None));
        }
        let body = JsonBody::from_request(req, state).await?;
        if body
            .bytes
            .as_ref()
            .is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace))
        {
            return Ok(OptionalJsonBody(None));
        }
        Ok(OptionalJsonBody(Some(body)))
    }
}
