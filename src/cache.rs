//! A small time-bounded cache for per-tenant configuration that the hot path reads on every
//! request (actions, rules, custom event types, API keys). Changes made through this process
//! invalidate it at once, and so do other replicas' changes on PostgreSQL (`changes`); `ttl`
//! bounds what any missed invalidation can leave behind.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Values loaded on demand and kept for `ttl`.
pub struct TtlCache<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, Arc<V>)>>,
    /// Bumped by every invalidation: a value loaded across one may predate the change, so it
    /// is used once but not kept.
    generation: AtomicU64,
}

impl<K: Eq + Hash + Clone, V> TtlCache<K, V> {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// The cached value, or the one `load` produces (which is then cached).
    pub async fn get_or_load<E, F, Fut>(&self, key: &K, load: F) -> Result<Arc<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        if let Some((at, v)) = self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(key)
            && at.elapsed() < self.ttl
        {
            return Ok(v.clone());
        }
        let generation = self.generation.load(Ordering::Acquire);
        let value = Arc::new(load().await?);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return Ok(value);
        }
        if entries.len() > 10_000 {
            entries.clear();
        }
        entries.insert(key.clone(), (Instant::now(), value.clone()));
        Ok(value)
    }

    /// Drops one entry.
    pub fn invalidate(&self, key: &K) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.remove(key);
    }

    /// Drops every entry.
    pub fn clear(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }
}

/// What was last compiled from each tenant's stored definitions (rules, event schemas), each
/// entry with what it was compiled from, kept across reloads of a [`TtlCache`] so that a reload
/// compiles only what changed. Holds at most `most` tenants; past it, it starts over.
pub struct CompiledByTenant<T> {
    most: usize,
    tenants: Mutex<HashMap<String, Arc<std::collections::BTreeMap<String, T>>>>,
}

impl<T> CompiledByTenant<T> {
    /// Empty; keeps at most `most` tenants.
    pub fn new(most: usize) -> Self {
        Self {
            most,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// What was last kept for a tenant (empty if nothing).
    pub fn of(&self, tenant_id: &str) -> Arc<std::collections::BTreeMap<String, T>> {
        self.tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Keeps exactly `compiled` for a tenant (what it no longer has is dropped).
    pub fn keep(&self, tenant_id: &str, compiled: std::collections::BTreeMap<String, T>) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if compiled.is_empty() {
            tenants.remove(tenant_id);
            return;
        }
        if tenants.len() >= self.most && !tenants.contains_key(tenant_id) {
            tenants.clear();
        }
        tenants.insert(tenant_id.to_string(), Arc::new(compiled));
    }

    /// Forgets every tenant's.
    pub fn clear(&self) {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_value_loaded_across_an_invalidation_is_not_kept() {
        let cache: TtlCache<&str, &str> = TtlCache::new(Duration::from_secs(3600));
        // The change lands (and invalidates) while the old value is being read.
        let old = cache
            .get_or_load(&"k", || async {
                cache.invalidate(&"k");
                Ok::<_, ()>("old")
            })
            .await
            .unwrap();
        assert_eq!(*old, "old", "the caller still gets what it read");
        let next = cache
            .get_or_load(&"k", || async { Ok::<_, ()>("new") })
            .await
            .unwrap();
        assert_eq!(*next, "new");
        // A load with no invalidation meanwhile is kept.
        let kept = cache
            .get_or_load(&"k", || async { Ok::<_, ()>("newer") })
            .await
            .unwrap();
        assert_eq!(*kept, "new");
    }
}
