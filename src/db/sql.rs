//! Reading our own SQL text: where its `$n` placeholders are. Both dialects' write paths
//! rewrite statements (SQLite to anonymous `?`, PostgreSQL to renumber statements sent as one).

/// Each `$n` placeholder outside quoted text and comments: (start byte, end byte, n).
pub(crate) fn placeholders(sql: &str) -> Vec<(usize, usize, usize)> {
    let bytes = sql.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'\'' | b'"') => {
                // A quoted literal or identifier ('' escapes just close and reopen it).
                i = bytes[i + 1..]
                    .iter()
                    .position(|&c| c == quote)
                    .map_or(bytes.len(), |p| i + 1 + p + 1);
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                // A line comment: a `$1` or quote in it is not SQL.
                i = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = sql[i + 2..].find("*/").map_or(bytes.len(), |p| i + 2 + p + 2);
            }
            b'$' if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let end = bytes[i + 1..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .map_or(bytes.len(), |p| i + 1 + p);
                found.push((i, end, sql[i + 1..end].parse().unwrap_or(0)));
                i = end;
            }
            _ => i += 1,
        }
    }
    found
}

/// `sql` with every placeholder `$n` written as `$(n + offset)`.
pub(crate) fn renumber(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut copied = 0;
    for (start, end, n) in placeholders(sql) {
        out.push_str(&sql[copied..start]);
        out.push('$');
        out.push_str(&(n + offset).to_string());
        copied = end;
    }
    out.push_str(&sql[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::renumber;

    #[test]
    fn renumbering_skips_quotes_and_comments() {
        assert_eq!(
            renumber(
                "INSERT INTO t VALUES ($1, '$2', $2) -- $3\n/* $4 */ RETURNING $10",
                5
            ),
            "INSERT INTO t VALUES ($6, '$2', $7) -- $3\n/* $4 */ RETURNING $15"
        );
    }
}
