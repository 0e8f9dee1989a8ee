//! Token buckets for the gateway's per-agent and per-action limits and for endpoints' delivery
//! rates.
//!
//! A process that alone serves its database (a locked SQLite file) keeps its buckets in memory.
//! Replicas on PostgreSQL share each bucket through the database instead, so that N replicas
//! together allow what one would: a replica takes a few tokens at a time (a lease, about a
//! twentieth of a second's worth) in one round trip, and spends them locally. A replica can
//! hold at most one lease's unused tokens per bucket, and an unused lease lapses after a second.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::args;
use crate::db::{Database, DbError};

/// A bucket's size: `per_s` tokens a second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Tokens added a second.
    pub per_s: NonZeroU32,
    /// Most tokens held at once.
    pub burst: NonZeroU32,
}

impl Limit {
    /// A bucket of `per_s` a second whose burst is a whole second's worth.
    pub fn per_second(per_s: NonZeroU32) -> Self {
        Self { per_s, burst: per_s }
    }

    /// The same size as a governor quota.
    pub fn quota(self) -> Quota {
        Quota::per_second(self.per_s).allow_burst(self.burst)
    }

    /// Tokens a replica takes at once: a twentieth of a second's worth, within the burst.
    fn lease_size(self) -> u32 {
        self.per_s.get().div_ceil(20).min(self.burst.get())
    }
}

/// Why a token could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum RateError {
    /// The bucket is empty; a token is there again after this long.
    #[error("rate limited for {0:?}")]
    Limited(Duration),
    /// The shared bucket could not be read just now; callers are refused for this long.
    #[error("the rate limit cannot be read for {0:?}")]
    Unavailable(Duration),
    /// The shared bucket could not be read just now for a reason a retry will not mend (the
    /// caller that asked heard it as [`RateError::Db`]).
    #[error("the rate limit cannot be read")]
    Broken,
    /// The shared bucket could not be read.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Token buckets by key, all of one size (the gateway's), in memory or shared.
pub struct KeyedBuckets {
    limit: Limit,
    inner: Store,
}

enum Store {
    Local(LocalBuckets),
    Shared(Arc<SharedBuckets>),
}

impl KeyedBuckets {
    /// Buckets of `limit`: shared through `shared` when given (replicas), else in memory.
    pub fn new(limit: Limit, shared: Option<Arc<SharedBuckets>>) -> Self {
        let inner = match shared {
            Some(shared) => Store::Shared(shared),
            None => Store::Local(LocalBuckets::new(limit.quota())),
        };
        Self { limit, inner }
    }

    /// Takes one token from `key`'s bucket.
    pub async fn take(&self, key: &str) -> Result<(), RateError> {
        match &self.inner {
            Store::Local(local) => local.take(key),
            Store::Shared(shared) => shared.take(key, self.limit).await,
        }
    }
}

/// Buckets kept before the idle ones are dropped.
const MOST_BUCKETS: usize = 10_000;

/// In-memory buckets, whose idle ones (full again, so no different from new ones) are dropped
/// once there are many, at most every ten seconds.
struct LocalBuckets {
    limiter: DefaultKeyedRateLimiter<String>,
    /// When idle buckets were last dropped (seconds after `started`).
    pruned_at: std::sync::atomic::AtomicU64,
    started: Instant,
}

impl LocalBuckets {
    fn new(quota: Quota) -> Self {
        Self {
            limiter: RateLimiter::keyed(quota),
            pruned_at: std::sync::atomic::AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    fn take(&self, key: &str) -> Result<(), RateError> {
        use std::sync::atomic::Ordering;
        // The limiter's own clock: a new one costs a calibration on every call.
        let now = self.limiter.clock().now();
        // Counting the buckets takes a lock per shard: only once ten seconds have passed, and by
        // one caller.
        let seconds = self.started.elapsed().as_secs();
        let last = self.pruned_at.load(Ordering::Acquire);
        if seconds >= last + 10
            && self
                .pruned_at
                .compare_exchange(last, seconds, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            && self.limiter.len() > MOST_BUCKETS
        {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(&key.to_string())
            .map_err(|not_until| RateError::Limited(not_until.wait_time_from(now)))
    }
}

/// One bucket, alone in this process (an endpoint's): in memory or shared.
pub struct Bucket {
    limit: Limit,
    inner: BucketStore,
}

enum BucketStore {
    Local(governor::DefaultDirectRateLimiter),
    Shared {
        key: String,
        buckets: Arc<SharedBuckets>,
    },
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Bucket {
    /// A bucket of `limit` in memory.
    fn local(limit: Limit) -> Self {
        Self {
            limit,
            inner: BucketStore::Local(RateLimiter::direct(limit.quota())),
        }
    }

    /// The bucket `key` of `limit`: shared through `shared` when given (replicas), else in
    /// memory.
    pub fn new(limit: Limit, key: String, shared: Option<Arc<SharedBuckets>>) -> Self {
        match shared {
            Some(buckets) => Self {
                limit,
                inner: BucketStore::Shared { key, buckets },
            },
            None => Self::local(limit),
        }
    }

    /// Waits until a token can be taken, and takes it. When the shared bucket cannot be read,
    /// waits and tries again: a limit must not be exceeded because the database is slow.
    pub async fn until_ready(&self) {
        match &self.inner {
            BucketStore::Local(limiter) => limiter.until_ready().await,
            BucketStore::Shared { key, buckets } => loop {
                match buckets.take(key, self.limit).await {
                    Ok(()) => return,
                    Err(RateError::Limited(wait) | RateError::Unavailable(wait)) => {
                        tokio::time::sleep(wait).await
                    }
                    // Only the caller that asked the database hears its error; the others
                    // wait out the refusal.
                    Err(failed @ (RateError::Db(_) | RateError::Broken)) => {
                        if let RateError::Db(e) = failed {
                            tracing::warn!(error = %e, "could not read a shared rate limit; trying again");
                        }
                        tokio::time::sleep(AFTER_FAILURE).await;
                    }
                }
            },
        }
    }
}

/// How long a lease's unused tokens stay spendable.
const LEASE_LIFETIME: Duration = Duration::from_secs(1);

/// Longest a take waits for the database before the callers of its key are refused for a while.
const DATABASE_PATIENCE: Duration = Duration::from_secs(2);

/// How long callers of a key are refused after its bucket could not be read.
const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Buckets kept in the database (PostgreSQL's `rate_buckets`), with this process's leases.
pub struct SharedBuckets {
    db: Database,
    leases: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Lease>>>>,
    /// When lapsed leases were last dropped from `leases`.
    pruned_at: Mutex<Instant>,
}

/// The tokens this process holds of one shared bucket.
#[derive(Default)]
struct Lease {
    tokens: u32,
    valid_until: Option<Instant>,
    /// How many tokens the next lease asks for: one after a lease lapsed unspent, twice as many
    /// (up to the limit's lease size) after one was spent in time. Replicas that see a trickle
    /// then take no more than they spend, and busy ones one round trip per lease size.
    next_size: u32,
    /// Until when, and why, callers are refused without asking the database again: its bucket
    /// was found short (until the next lease's worth is back), or could not be read.
    refused_until: Option<(Instant, Refusal)>,
}

impl Lease {
    /// How many tokens to ask the database for, this lease having run out or lapsed.
    fn next_request(&self, limit: Limit) -> u32 {
        match (self.next_size, self.refused_until.is_some()) {
            (0, _) => 1,
            // The bucket was short (or unreadable): as much as last time, once it is back.
            (asked, true) => asked,
            // Lapsed unspent: what one call needs.
            (_, false) if self.tokens > 0 => 1,
            // Spent in time: twice as much.
            (asked, false) => asked.saturating_mul(2),
        }
        .clamp(1, limit.lease_size())
    }
}

/// Why callers of a key are being refused.
#[derive(Clone, Copy)]
enum Refusal {
    /// The bucket is short.
    Empty,
    /// The database did not answer; `transient` if it may well answer on a retry.
    Unreadable { transient: bool },
}

impl SharedBuckets {
    /// Buckets shared through `db`.
    pub fn new(db: Database) -> Self {
        Self {
            db,
            leases: Mutex::new(HashMap::new()),
            pruned_at: Mutex::new(Instant::now()),
        }
    }

    fn lease(&self, key: &str) -> Arc<tokio::sync::Mutex<Lease>> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = leases.get(key) {
            return lease.clone();
        }
        if leases.len() >= MOST_BUCKETS {
            self.prune(&mut leases);
        }
        leases.entry(key.to_string()).or_default().clone()
    }

    /// Drops leases nobody is using whose tokens and refusals have lapsed (no different from
    /// none), at most every ten seconds.
    fn prune(&self, leases: &mut HashMap<String, Arc<tokio::sync::Mutex<Lease>>>) {
        let now = Instant::now();
        let mut pruned_at = self.pruned_at.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(*pruned_at) < Duration::from_secs(10) {
            return;
        }
        *pruned_at = now;
        leases.retain(|_, lease| {
            Arc::strong_count(lease) > 1
                || lease.try_lock().map_or(true, |l| {
                    l.valid_until.is_some_and(|t| t > now) || l.refused_until.is_some_and(|(t, _)| t > now)
                })
        });
    }

    /// Takes one token of `key`'s bucket of `limit`: from this process's lease, or from a new
    /// lease taken from the database. Waits at most [`DATABASE_PATIENCE`] in all.
    pub async fn take(&self, key: &str, limit: Limit) -> Result<(), RateError> {
        let deadline = tokio::time::Instant::now() + DATABASE_PATIENCE;
        let lease = self.lease(key);
        // Callers of one key queue here, so that one of them renews the lease for all; a queue
        // that does not move (the database is slow) is as good as no answer.
        let Ok(mut lease) = tokio::time::timeout_at(deadline, lease.lock()).await else {
            return Err(RateError::Unavailable(AFTER_FAILURE));
        };
        let now = Instant::now();
        let lease_valid = lease.valid_until.is_some_and(|t| t > now);
        if lease.tokens > 0 && lease_valid {
            lease.tokens -= 1;
            return Ok(());
        }
        if let Some((until, refusal)) = lease.refused_until.filter(|(until, _)| *until > now) {
            return Err(match refusal {
                Refusal::Empty => RateError::Limited(until - now),
                Refusal::Unreadable { transient: true } => RateError::Unavailable(until - now),
                Refusal::Unreadable { transient: false } => RateError::Broken,
            });
        }
        let size = lease.next_request(limit);
        let taken = tokio::time::timeout_at(deadline, self.take_from_database(key, limit, size))
            .await
            .unwrap_or(Err(DbError::TimedOut("taking tokens of a shared rate limit")));
        let now = Instant::now();
        let (granted, left_milli) = match taken {
            Ok(row) => row,
            Err(e) => {
                let transient = e.is_transient();
                lease.refused_until = Some((now + AFTER_FAILURE, Refusal::Unreadable { transient }));
                return Err(e.into());
            }
        };
        lease.next_size = size;
        if granted <= 0 {
            lease.tokens = 0;
            // Ask again once the next lease's worth is back, not for every token. The one
            // caller that asked is told when the next token is.
            let per_s = u64::from(limit.per_s.get());
            let missing = |tokens: u32| {
                let short = (i64::from(tokens) * 1000 - left_milli).max(1);
                Duration::from_micros(u64::try_from(short).unwrap_or(1) * 1000 / per_s)
                    .max(Duration::from_millis(1))
            };
            lease.refused_until = Some((now + missing(size), Refusal::Empty));
            return Err(RateError::Limited(missing(1)));
        }
        lease.tokens = u32::try_from(granted - 1).unwrap_or(0);
        lease.valid_until = Some(now + LEASE_LIFETIME);
        lease.refused_until = None;
        Ok(())
    }

    /// One round trip: refills `key`'s bucket and takes up to `size` tokens from it; answers the
    /// tokens granted and the thousandths left.
    async fn take_from_database(&self, key: &str, limit: Limit, size: u32) -> Result<(i64, i64), DbError> {
        // A function that writes, called as a read: on PostgreSQL both go to the one pool.
        self.db
            .fetch_optional(
                "SELECT granted, left_milli FROM opsiq_take_tokens($1, $2, $3, $4)",
                args![
                    row_key(key),
                    i64::from(limit.burst.get()),
                    i64::from(limit.per_s.get()),
                    i64::from(size),
                ],
            )
            .await?
            .ok_or(DbError::Sqlx(sqlx::Error::RowNotFound))
    }
}

/// Drops shared buckets idle for an hour, which are full again, as a missing one would be
/// (by the database's clock, which their times are read from; a bucket in use is skipped).
/// Nothing to do on SQLite, whose buckets are in memory.
pub async fn purge_idle_buckets(db: &Database) -> Result<u64, sqlx::Error> {
    const BATCH: i64 = 500;
    let mut total = 0;
    if db.dialect() != crate::db::Dialect::Postgres {
        return Ok(total);
    }
    loop {
        let n = db
            .execute(
                "DELETE FROM rate_buckets WHERE key IN (SELECT key FROM rate_buckets \
                 WHERE refilled_at_us < (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT - 3600000000 \
                 LIMIT $1 FOR UPDATE SKIP LOCKED)",
                args![BATCH],
            )
            .await?;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Longest key kept as it is; a longer one (an external issuer's `sub` can be kilobytes) is
/// kept as its hash, which a B-tree index can hold.
const MOST_KEY_BYTES: usize = 200;

/// The `rate_buckets` key of bucket `key`.
fn row_key(key: &str) -> String {
    if key.len() <= MOST_KEY_BYTES {
        return key.to_string();
    }
    use sha2::Digest;
    format!("sha256/{}", hex::encode(sha2::Sha256::digest(key.as_bytes())))
}

/// `wait` in whole seconds for `Retry-After`, rounded up (at least one).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_a_twentieth_of_a_second_within_the_burst() {
        let limit = |per_s, burst| Limit {
            per_s: NonZeroU32::new(per_s).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        };
        assert_eq!(limit(1, 1).lease_size(), 1);
        assert_eq!(limit(100, 100).lease_size(), 5);
        assert_eq!(limit(1000, 50).lease_size(), 50);
        assert_eq!(limit(1000, 10).lease_size(), 10);
    }

    #[test]
    fn leases_grow_while_spent_in_time_and_shrink_when_they_lapse() {
        let limit = Limit::per_second(NonZeroU32::new(1000).unwrap());
        let mut lease = Lease::default();
        let mut asked = Vec::new();
        for _ in 0..8 {
            // Each lease spent before it lapsed.
            lease.next_size = lease.next_request(limit);
            asked.push(lease.next_size);
            lease.tokens = 0;
            lease.refused_until = None;
        }
        assert_eq!(asked, [1, 2, 4, 8, 16, 32, 50, 50]);
        // Found short: as much again, not one token at a time.
        lease.refused_until = Some((Instant::now(), Refusal::Empty));
        assert_eq!(lease.next_request(limit), 50);
        // Lapsed with tokens left: a trickle takes what one call needs.
        lease.refused_until = None;
        lease.tokens = 20;
        assert_eq!(lease.next_request(limit), 1);
    }

    #[test]
    fn long_keys_are_kept_as_hashes() {
        assert_eq!(row_key("agent/ten_1/agt_1"), "agent/ten_1/agt_1");
        let long = format!("agent/ten_1/{}", "x".repeat(4000));
        let kept = row_key(&long);
        assert!(kept.starts_with("sha256/") && kept.len() == 7 + 64, "{kept}");
        assert_ne!(kept, row_key(&format!("{long}y")));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn local_buckets_refuse_past_the_burst_and_say_how_long() {
        // One a second, so that only a stall of a second between takes could refill it.
        let limit = Limit {
            per_s: NonZeroU32::MIN,
            burst: NonZeroU32::new(2).unwrap(),
        };
        let buckets = LocalBuckets::new(limit.quota());
        assert!(buckets.take("a").is_ok());
        assert!(buckets.take("a").is_ok());
        match buckets.take("a") {
            Err(RateError::Limited(wait)) => assert!(wait <= Duration::from_secs(1), "{wait:?}"),
            other => panic!("expected a wait, got {other:?}"),
        }
        // Another key has its own bucket.
        assert!(buckets.take("b").is_ok());
    }
}
