//! Cursor pagination shared by every list route: `?limit=&cursor=` in, `{"data", "next_cursor"}`
//! out. Cursors are the sort key of the last item returned, so pages stay stable while rows are
//! added.

use serde::{Deserialize, Deserializer, Serialize};

/// Query parameters common to list routes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// How many items to return (1–200, default 50).
    #[serde(default, deserialize_with = "crate::http::page::limit")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// The effective page size.
    pub fn limit(&self) -> i64 {
        page_size(self.limit)
    }
}

/// Largest page a list answers.
const MAX_LIMIT: u32 = 200;

/// The effective page size for a requested `limit` (1–200, default 50).
pub fn page_size(limit: Option<u32>) -> i64 {
    i64::from(limit.unwrap_or(50).clamp(1, MAX_LIMIT))
}

/// Reads a list's `limit`, refusing (as a 400) one outside 1–200 rather than answering a page
/// of another size than asked.
pub fn limit<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    match Option::<u32>::deserialize(deserializer)? {
        Some(n) if !(1..=MAX_LIMIT).contains(&n) => Err(serde::de::Error::custom(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {n}"
        ))),
        limit => Ok(limit),
    }
}

/// Where a newest-first list of ids with `prefix` goes on from: the cursor a previous page gave,
/// or (none, or empty) the newest item. A cursor the list could not have given is a 400, not a
/// silently empty or restarted page.
pub fn newest_first_cursor(cursor: Option<&str>, prefix: &str) -> Result<String, crate::http::ApiError> {
    match cursor {
        None | Some("") => Ok(crate::ids::after_all(prefix)),
        Some(c) if crate::ids::is_well_formed(c, prefix) => Ok(c.to_string()),
        Some(_) => Err(crate::http::ApiError::bad_request(
            "invalid_cursor",
            "cursor must be a next_cursor this list answered",
        )),
    }
}

/// One page of a list.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// The items.
    pub data: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` fetched rows: the extra row only says that more exist.
    pub fn from_rows(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Self {
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_cursor = if more { rows.last().map(&cursor_of) } else { None };
        Page {
            data: rows,
            next_cursor,
        }
    }

    /// Maps every item.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            data: self.data.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}
