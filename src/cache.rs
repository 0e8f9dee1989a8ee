//! A small time-bounded cache for per-tenant configuration that the hot path reads on every
//! request (subscribed endpoints, rules, custom event types). Changes made through this process
//! invalidate it at once; changes made through another replica are seen within the TTL.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Values loaded on demand and kept for `ttl`.
pub struct TtlCache<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, Arc<V>)>>,
}

impl<K: Eq + Hash + Clone, V> TtlCache<K, V> {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
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
        let value = Arc::new(load().await?);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() > 10_000 {
            entries.clear();
        }
        entries.insert(key.clone(), (Instant::now(), value.clone()));
        Ok(value)
    }

    /// Drops one entry.
    pub fn invalidate(&self, key: &K) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
