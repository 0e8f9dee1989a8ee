//! Prefixed, time-sortable identifiers (`evt_0192…`): a UUIDv7 in lowercase hex, so string order
//! is creation order and cursor pagination can compare ids directly.

/// Makes a new identifier with the given prefix, such as `"evt"`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// The smallest id with this prefix created at or after `ms` (unix milliseconds): ids sort by
/// creation time, so `id < time_floor(p, t)` means "created before t".
pub fn time_floor(prefix: &str, ms: i64) -> String {
    format!("{prefix}_{:012x}", ms.clamp(0, (1 << 48) - 1))
}

/// A cursor after every id with this prefix, for lists read newest first (`id < cursor`).
/// Not a symbol such as `~`: byte order puts that after letters, but the collations of a
/// PostgreSQL database made with an English locale (ICU or glibc) put it before them.
pub fn after_all(prefix: &str) -> String {
    format!("{prefix}_g")
}

/// Answers whether `id` is shaped exactly like [`new_id`] makes them with this prefix.
pub fn is_well_formed(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_sort_by_creation() {
        let a = super::new_id("evt");
        let b = super::new_id("evt");
        assert!(a < b, "{a} !< {b}");
        assert!(super::is_well_formed(&a, "evt"));
        assert!(!super::is_well_formed(&a, "ev"));
        assert!(!super::is_well_formed("evt_", "evt") && !super::is_well_formed(&format!("{a}0"), "evt"));
        let now = crate::db::now_ms();
        assert!(super::time_floor("evt", now - 5) <= a && a < super::time_floor("evt", now + 5));
        assert!(b < super::after_all("evt"));
        assert!(super::time_floor("evt", i64::MAX) < super::after_all("evt"));
    }
}
