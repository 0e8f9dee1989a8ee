//! Prefixed, time-sortable identifiers (`evt_0192…`): a UUIDv7 in lowercase hex, so string order
//! is creation order and cursor pagination can compare ids directly.

/// Makes a new identifier with the given prefix, such as `"evt"`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Answers whether `id` looks like one of ours with this prefix (cheap guard before a query).
pub fn has_prefix(id: &str, prefix: &str) -> bool {
    id.len() <= 128 && id.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('_'))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_sort_by_creation() {
        let a = super::new_id("evt");
        let b = super::new_id("evt");
        assert!(a < b, "{a} !< {b}");
        assert!(super::has_prefix(&a, "evt"));
        assert!(!super::has_prefix(&a, "ev"));
    }
}
