//! The delivery worker: takes jobs handed over in memory by the request that created them, or
//! claimed from the database by the poller (retries, replays, leases of dead workers), signs and
//! sends each attempt, and records outcomes in batches.
//!
//! Tasks: the dispatcher (bounded channel → one task per job), the poller, the outcome writer
//! (group commit of attempts and status changes) and the retention purge.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::endpoints::{self, EndpointRow};
use super::outbound::{AttemptResult, Outbound};
use super::outbox::{self, Job, Lease};
use super::retry::{self, Next};
use super::signing::{self, Carries, Scheme, SignedAttempt};
use super::slots::{EndpointSlots, SharedSlots};
use crate::changes::Change;
use crate::config::Config;
use crate::crypto::MasterKey;
use crate::db::{Database, Tx, now_ms};
use crate::events::{self, NewEvent};
use crate::gateway::invocations;
use crate::rate::{Bucket, Limit, SharedBuckets};
use crate::registry::validators::Validators;
use crate::{args, ids};

/// The error class of a delivery given up because its endpoint was deleted.
const ENDPOINT_DELETED_CLASS: &str = "endpoint_deleted";

/// An endpoint failing without a single success for this long is disabled.
const FAILING_DISABLE_AFTER_MS: i64 = 5 * 24 * 3600 * 1000;

/// A tenant's enabled endpoints and when they were read.
type CachedSubscribers = (Instant, Arc<Vec<EndpointRow>>);

/// The final state of a delivery, told to whoever waits for it (sync invocations).
#[derive(Debug, Clone)]
pub struct Settled {
    /// `succeeded` or `failed`.
    pub status: &'static str,
    /// The last attempt's result.
    pub result: AttemptResult,
}

/// An endpoint as the sender needs it: decrypted secrets and limits.
#[derive(Debug)]
struct LiveEndpoint {
    /// Whose it is: a job of another tenant naming this id does not get it.
    tenant_id: String,
    url: String,
    /// `url` parsed once (not per attempt), or why it does not parse.
    parsed: Result<reqwest::Url, String>,
    enabled: bool,
    scheme: Scheme,
    secrets: Vec<String>,
    limits: Arc<Limits>,
    fetched: Instant,
    /// Set when the endpoint changed: read it again, but keep its limits (and their in-flight
    /// count) unless they changed too.
    stale: AtomicBool,
    /// The engine's count of endpoint changes when this was read: a job holding this copy can
    /// tell that some endpoint changed since, even once the cache holds another copy.
    changes_at_read: u64,
}

#[derive(Debug)]
struct Limits {
    rate_per_s: Option<i64>,
    in_flight_cap: Option<i64>,
    rate: Option<Bucket>,
    in_flight: Arc<Semaphore>,
    /// The endpoint's cap held across replicas (PostgreSQL), beside this process's semaphore.
    shared_in_flight: Option<Arc<EndpointSlots>>,
    /// For a rate-limited endpoint: how many of its jobs are sent a second at most.
    per_second_by_rate: Option<usize>,
    /// For a capped endpoint: the most of its jobs held in memory however fast it answers.
    most_held: usize,
    /// For a capped endpoint: how long its answers have been taking, in µs (a moving average;
    /// 0 before the first), from which how many of its jobs its cap lets through a second.
    answer_us: AtomicU64,
    /// This endpoint's jobs held in memory (waiting for their turn or being sent).
    held: Arc<std::sync::atomic::AtomicUsize>,
    /// When the next deferred job is due (unix µs): deferred jobs are spaced out from here.
    next_deferred_at: AtomicI64,
    /// The guessed pace (jobs a second, before any answer was in) that deferred jobs were
    /// spaced at; 0 when none were, or once they were made due (see [`Limits::record_answer`]).
    deferred_at_pace: AtomicU64,
    /// How many times deferred jobs were made due because the pace outgrew the guess: a job
    /// deferred across one is made due itself, since the update may have missed it.
    made_due: AtomicU64,
    /// Wakes the jobs waiting for their turn under these limits when the endpoint changes.
    endpoint_changed: tokio::sync::Notify,
    /// Taken by a woken job while it reads the endpoint again, so that the first read fills the
    /// cache and the others find it there (not one database read per waiting job).
    rereading: tokio::sync::Mutex<()>,
}

/// Seconds of an endpoint's limited capacity that may wait in memory; the rest waits in the
/// outbox, so a slow or rate-limited endpoint's backlog takes no place in the shared queue.
/// Counted at the whole rate (or cap): replicas sharing an endpoint's bucket or slots each
/// hold that many and drain them more slowly; a job whose lease ran out while it waited is left
/// to whoever claimed it since (the lease is checked again before sending).
const HELD_SECONDS: usize = 5;

/// An endpoint's rate limit: `rate` a second, evenly spaced, with a burst of at most a
/// twentieth of a second's worth. A receiver counting requests in one-second windows then sees
/// at most 5 % more than the limit in any of them (a full second's burst would double it), and
/// a high limit is not held back by the timer's millisecond resolution.
fn endpoint_limit(rate: NonZeroU32) -> Limit {
    let burst = NonZeroU32::new(rate.get().div_ceil(20)).unwrap_or(NonZeroU32::MIN);
    Limit { per_s: rate, burst }
}

impl Limits {
    /// The limits `(rate_per_s, in_flight_cap)` of the endpoint `endpoint_id`, whose rate's
    /// bucket and in-flight cap are shared through `shared` when given.
    fn new(
        (rate_per_s, in_flight_cap): (Option<i64>, Option<i64>),
        endpoint_id: &str,
        shared: &SharedLimits,
    ) -> Self {
        let rate_per_s_u32 = rate_per_s
            .and_then(|r| u32::try_from(r).ok())
            .and_then(NonZeroU32::new);
        // The bucket's key names the rate: a changed limit starts a bucket of its own.
        let rate = rate_per_s_u32.map(|r| {
            Bucket::new(
                endpoint_limit(r),
                format!("endpoint/{endpoint_id}/{r}"),
                shared.rates.clone(),
            )
        });
        let cap = in_flight_cap
            .map(clamped_cap)
            .unwrap_or(Semaphore::MAX_PERMITS >> 4);
        let shared_in_flight = in_flight_cap
            .zip(shared.slots.clone())
            .map(|(_, slots)| Arc::new(EndpointSlots::new(endpoint_id, cap as i64, slots)));
        Self {
            rate_per_s,
            in_flight_cap,
            rate,
            in_flight: Arc::new(Semaphore::new(cap)),
            shared_in_flight,
            per_second_by_rate: rate_per_s_u32.map(|r| r.get() as usize),
            most_held: shared.most_held,
            answer_us: AtomicU64::new(0),
            held: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            next_deferred_at: AtomicI64::new(0),
            deferred_at_pace: AtomicU64::new(0),
            made_due: AtomicU64::new(0),
            endpoint_changed: tokio::sync::Notify::new(),
            rereading: tokio::sync::Mutex::new(()),
        }
    }

    /// For a limited endpoint, takes a place among the jobs this process holds for it, or, when
    /// its limit already has enough of them waiting, answers when the job should be due again
    /// instead, with the count of [`Limits::made_due`] as it was before the pace was read.
    /// An unlimited endpoint's jobs are not counted.
    fn hold_or_defer(&self, now: i64) -> Result<Option<HeldPlace>, (i64, u64)> {
        // Read before the pace: a job deferred at a guessed pace then sees the count change.
        let made_due = self.made_due.load(Ordering::Acquire);
        let guessed = self.in_flight_cap.is_some() && self.answer_us.load(Ordering::Acquire) == 0;
        let Some(per_second) = self.per_second() else {
            return Ok(None);
        };
        let (mut most, spacing_us) = (HELD_SECONDS * per_second, (1_000_000 / per_second as i64).max(1));
        // A cap's jobs wait for its permits: however fast its answers have been, at most the
        // process's own cap of attempts (or five seconds at one a second per permit) waits in
        // the queue every endpoint shares, should the endpoint start to hang.
        if let Some(cap) = self.in_flight_cap {
            most = most.min((HELD_SECONDS * clamped_cap(cap)).max(self.most_held));
        }
        let held = self.held.fetch_add(1, Ordering::AcqRel);
        let place = Some(HeldPlace(self.held.clone()));
        if held < most {
            return Ok(place);
        }
        drop(place);
        // After what is held has drained, one spacing apart from the last deferred job.
        let earliest = now.saturating_mul(1000).saturating_add(held as i64 * spacing_us);
        let mut at = earliest;
        let _ = self
            .next_deferred_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
                at = next.max(earliest);
                Some(at.saturating_add(spacing_us))
            });
        if guessed {
            self.deferred_at_pace.store(per_second as u64, Ordering::Release);
        }
        Err((at / 1000, made_due))
    }
}

impl Limits {
    /// How many of the endpoint's jobs its limits let through a second, for a limited one: a
    /// rate of r/s lets r through; a cap of c lets c through per answer time, which until the
    /// first answer is taken to be a second (and is never taken below a millisecond). The
    /// stricter limit counts.
    fn per_second(&self) -> Option<usize> {
        let by_cap = self.in_flight_cap.map(|cap| {
            let answer_us = match self.answer_us.load(Ordering::Relaxed) {
                0 => 1_000_000,
                us => us.max(1_000),
            };
            let cap = clamped_cap(cap) as u64;
            usize::try_from(cap * 1_000_000 / answer_us)
                .unwrap_or(usize::MAX)
                .max(1)
        });
        match (self.per_second_by_rate, by_cap) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }

    /// Counts how long one of a capped endpoint's answers took. Answers whether the pace its
    /// cap allows has grown fourfold past the guessed one that jobs deferred before any answer
    /// was in were spaced at (a second an answer): those are then to be made due now, and later
    /// ones are spaced from now. Once at most, since only guessed paces are kept.
    fn record_answer(&self, took: Duration) -> bool {
        if self.in_flight_cap.is_none() {
            return false;
        }
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .answer_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                // Slower answers count at once (a hanging endpoint must not keep being given
                // a fast one's backlog); faster ones bring the average down an eighth at a time.
                Some(match average {
                    0 => sample,
                    _ => sample.max(average - average / 8 + sample / 8),
                })
            });
        let paced = self.deferred_at_pace.load(Ordering::Acquire);
        let now = self.per_second().unwrap_or(0) as u64;
        if paced == 0 || now < paced.saturating_mul(4) {
            return false;
        }
        let first = self
            .deferred_at_pace
            .compare_exchange(paced, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.next_deferred_at.store(0, Ordering::Release);
            self.made_due.fetch_add(1, Ordering::AcqRel);
        }
        first
    }
}

/// An endpoint's `max_in_flight` as the engine applies it (the API accepts 1 to 10,000).
fn clamped_cap(cap: i64) -> usize {
    cap.clamp(1, 10_000) as usize
}

/// A job's place among those held in memory for its endpoint; given back when dropped.
struct HeldPlace(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for HeldPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Interest in a delivery's final state, from [`Engine::watch`]: resolves when this process
/// records it. Dropped unanswered (the caller stopped waiting, or another replica settled the
/// delivery), it takes its registration with it.
pub struct SettledWatch {
    rx: tokio::sync::oneshot::Receiver<Settled>,
    engine: Engine,
    delivery_id: String,
}

impl std::future::Future for SettledWatch {
    type Output = Result<Settled, tokio::sync::oneshot::error::RecvError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx).poll(cx)
    }
}

impl Drop for SettledWatch {
    fn drop(&mut self) {
        self.rx.close();
        let mut waiters = self
            .engine
            .inner
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(list) = waiters.get_mut(&self.delivery_id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(&self.delivery_id);
            }
        }
    }
}

/// One attempt's outcome, on its way to the outcome writer.
struct Outcome {
    job: Job,
    url: String,
    request_headers: Vec<(&'static str, String)>,
    started_at: i64,
    result: AttemptResult,
    next: Next,
}

/// The delivery engine shared by handlers and workers.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    keys: MasterKey,
    config: Arc<Config>,
    outbound: Outbound,
    node: String,
    jobs: mpsc::Sender<Job>,
    outcomes: mpsc::Sender<Outcome>,
    poke: Notify,
    /// When the last delivery this process deferred for its endpoint's limits falls due (ms):
    /// until then the poller wakes when the next pending delivery falls due rather than at its
    /// interval.
    deferred_until: AtomicI64,
    endpoints: Mutex<HashMap<String, Arc<LiveEndpoint>>>,
    subscribers: Mutex<HashMap<String, CachedSubscribers>>,
    /// Bumped by every endpoint change: what was read across one is used once, not kept fresh.
    endpoint_changes: AtomicU64,
    waiters: Mutex<HashMap<String, Vec<tokio::sync::oneshot::Sender<Settled>>>>,
    in_flight: Arc<Semaphore>,
    /// Set on shutdown: no new attempts, no new leases.
    stop: watch::Sender<bool>,
    /// Set on shutdown once no attempt is running: outcome writers record what is left and end.
    drain: watch::Sender<bool>,
    /// The dispatcher, poller and retention purge.
    workers: Mutex<JoinSet<()>>,
    /// The outcome writers, stopped after the workers so every attempt's outcome is recorded.
    writers: Mutex<JoinSet<()>>,
    validators: Arc<Validators>,
    /// The tenants' rules, run on the events the engine raises.
    rules: Arc<crate::rules::Rules>,
    /// Endpoints' limits as replicas share them (else each process keeps its own).
    shared_limits: SharedLimits,
}

/// What endpoints' limits share: on PostgreSQL, replicas' rate buckets and in-flight slots; in
/// every process, the ceiling on a capped endpoint's jobs held in memory.
struct SharedLimits {
    rates: Option<Arc<SharedBuckets>>,
    slots: Option<Arc<SharedSlots>>,
    /// The most of a capped endpoint's jobs held in memory: the process's `max_in_flight`.
    most_held: usize,
}

/// The receiving halves created with the engine, consumed by [`Engine::start`].
pub struct EngineReceivers {
    jobs: mpsc::Receiver<Job>,
    outcomes: mpsc::Receiver<Outcome>,
}

impl Engine {
    /// Creates the engine; call [`start`](Self::start) to run its workers.
    pub fn new(
        db: Database,
        keys: MasterKey,
        config: Arc<Config>,
        (validators, rules): (Arc<Validators>, Arc<crate::rules::Rules>),
        shared_rates: Option<Arc<SharedBuckets>>,
    ) -> (Self, EngineReceivers) {
        let (jobs_tx, jobs_rx) = mpsc::channel(config.max_in_flight * 8);
        let (outcomes_tx, outcomes_rx) = mpsc::channel(config.max_in_flight * 8);
        let outbound = Outbound::new(config.connect_timeout, config.request_timeout, config.dev);
        let node = ids::new_id("node");
        let shared_limits = SharedLimits {
            most_held: config.max_in_flight,
            rates: shared_rates,
            slots: (db.dialect() == crate::db::Dialect::Postgres).then(|| {
                let times = (config.lease, config.request_timeout);
                Arc::new(SharedSlots::new(db.clone(), node.clone(), times))
            }),
        };
        let inner = Inner {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            db,
            keys,
            outbound,
            node,
            jobs: jobs_tx,
            outcomes: outcomes_tx,
            poke: Notify::new(),
            deferred_until: AtomicI64::new(0),
            endpoints: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            endpoint_changes: AtomicU64::new(0),
            waiters: Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
            drain: watch::channel(false).0,
            workers: Mutex::new(JoinSet::new()),
            writers: Mutex::new(JoinSet::new()),
            validators,
            rules,
            shared_limits,
            config,
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            EngineReceivers {
                jobs: jobs_rx,
                outcomes: outcomes_rx,
            },
        )
    }

    /// Starts the dispatcher, poller, outcome writer and retention purge (if this process runs
    /// the worker).
    pub fn start(&self, receivers: EngineReceivers) {
        let mut workers = self.inner.workers.lock().unwrap_or_else(|e| e.into_inner());
        let mut writers = self.inner.writers.lock().unwrap_or_else(|e| e.into_inner());
        // On PostgreSQL several writers, so one batch is built and written while another
        // commits; SQLite writes one at a time and one writer makes the largest batches.
        let writer_count = match self.inner.db.dialect() {
            crate::db::Dialect::Sqlite => 1,
            crate::db::Dialect::Postgres => 4,
        };
        let outcomes = Arc::new(tokio::sync::Mutex::new(receivers.outcomes));
        for _ in 0..writer_count {
            writers.spawn(outcome_writer(self.clone(), outcomes.clone()));
        }
        if self.inner.config.worker {
            workers.spawn(dispatcher(self.clone(), receivers.jobs));
            workers.spawn(poller(self.clone()));
            if let Some(slots) = self.inner.shared_limits.slots.clone() {
                let mut stop = self.inner.stop.subscribe();
                workers.spawn(async move {
                    tokio::select! {
                        _ = stop.wait_for(|stopping| *stopping) => {}
                        () = slots.give_back_idle_slots() => {}
                    }
                });
            }
            workers.spawn(super::retention::purge_loop(
                self.inner.db.clone(),
                self.inner.config.retention,
                self.inner.config.purge_interval,
                self.inner.stop.subscribe(),
            ));
        }
    }

    /// Stops taking new work, lets attempts in flight finish (bounded by the request timeout),
    /// hands queued but unstarted deliveries back to the outbox, records every outcome, and
    /// returns. Nothing is lost without it (leases expire), but a restart then waits a lease.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        if let Some(slots) = &self.inner.shared_limits.slots {
            slots.stop();
        }
        self.inner.poke.notify_waiters();
        let deadline = self.inner.config.request_timeout + Duration::from_secs(5);
        let workers = std::mem::take(&mut *self.inner.workers.lock().unwrap_or_else(|e| e.into_inner()));
        join_within(workers, deadline).await;
        let _ = self.inner.drain.send(true);
        let writers = std::mem::take(&mut *self.inner.writers.lock().unwrap_or_else(|e| e.into_inner()));
        join_within(writers, deadline).await;
        // Attempts cut short at the deadline may not have given their slots back yet.
        if let Some(slots) = &self.inner.shared_limits.slots {
            slots.give_back_all().await;
        }
    }

    /// Acts on what a replica said about endpoints' slots (see [`super::slots::CHANNEL`]).
    pub fn heard_about_slots(&self, payload: &str) {
        if let Some(slots) = &self.inner.shared_limits.slots {
            slots.heard(payload);
        }
    }

    /// How new deliveries are leased: to this process's worker, or left for any worker.
    pub fn lease(&self) -> Lease {
        if self.inner.config.worker && !*self.inner.stop.borrow() {
            Lease::To {
                node: self.inner.node.clone(),
                until: now_ms() + self.inner.config.lease.as_millis() as i64,
            }
        } else {
            Lease::Pending
        }
    }

    /// Hands freshly committed, leased jobs to the worker. Waits when the queue is full, which
    /// slows producers down instead of dropping work. Once the worker has stopped, the jobs go
    /// back to the outbox, due at once, for whichever worker runs next.
    pub async fn dispatch(&self, jobs: Vec<Job>) {
        let mut jobs = jobs.into_iter().filter(|job| job.lease_until.is_some());
        let mut unsent = Vec::new();
        for job in jobs.by_ref() {
            if let Err(refused) = self.inner.jobs.send(job).await {
                unsent.push(refused.0);
                break;
            }
        }
        unsent.extend(jobs);
        if !unsent.is_empty() {
            release_unsent(&self.inner, &unsent).await;
        }
    }

    /// Like [`dispatch`](Self::dispatch) but never waits: what does not fit in the queue now goes
    /// back to the outbox, due at once, for the poller. For the outcome writer, which must not
    /// wait for the dispatcher: the dispatcher can be waiting for attempts that wait for it.
    async fn dispatch_without_waiting(&self, jobs: Vec<Job>) {
        let mut unsent = Vec::new();
        for job in jobs.into_iter().filter(|job| job.lease_until.is_some()) {
            if let Err(refused) = self.inner.jobs.try_send(job) {
                unsent.push(refused.into_inner());
            }
        }
        if !unsent.is_empty() {
            release_unsent(&self.inner, &unsent).await;
            self.poke();
        }
    }

    /// Wakes the poller (after a replay or recover put deliveries back in the queue).
    pub fn poke(&self) {
        self.inner.poke.notify_one();
    }

    /// Whether a caller waits for one of these outcomes (a sync call, say).
    fn awaited(&self, batch: &[Outcome]) -> bool {
        let waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        !waiters.is_empty() && batch.iter().any(|o| waiters.contains_key(&o.job.id))
    }

    /// Registers interest in a delivery's final state; register before dispatching.
    pub fn watch(&self, delivery_id: &str) -> SettledWatch {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(delivery_id.to_string())
            .or_default()
            .push(tx);
        SettledWatch {
            rx,
            engine: self.clone(),
            delivery_id: delivery_id.to_string(),
        }
    }

    /// Forgets every cached endpoint and subscriber list.
    pub fn forget_endpoints(&self) {
        self.forget_endpoints_where(|_| true);
    }

    /// Forgets a cached endpoint (and the cached subscriber lists) after it changed.
    pub fn forget_endpoint(&self, endpoint_id: &str) {
        self.forget_endpoints_where(|id| id == endpoint_id);
    }

    fn forget_endpoints_where(&self, changed: impl Fn(&str) -> bool) {
        let endpoints = self.inner.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let mut subscribers = self.inner.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.endpoint_changes.fetch_add(1, Ordering::AcqRel);
        for (id, live) in endpoints.iter() {
            if changed(id) {
                live.stale.store(true, Ordering::Release);
                live.limits.endpoint_changed.notify_waiters();
            }
        }
        subscribers.clear();
    }

    /// The enabled endpoints of a tenant, for event fan-out; cached as long as endpoints (until a
    /// change here or, on PostgreSQL, on another replica; at most `cache_ttl`).
    pub async fn subscribers(&self, tenant_id: &str) -> Result<Arc<Vec<EndpointRow>>, crate::db::DbError> {
        if let Some((at, list)) = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant_id)
            && at.elapsed() < self.inner.config.cache_ttl
        {
            return Ok(list.clone());
        }
        let changes = self.inner.endpoint_changes.load(Ordering::Acquire);
        let list = Arc::new(super::endpoints::enabled_for_tenant(&self.inner.db, tenant_id).await?);
        let mut subscribers = self.inner.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if self.inner.endpoint_changes.load(Ordering::Acquire) == changes {
            subscribers.insert(tenant_id.to_string(), (Instant::now(), list.clone()));
        }
        Ok(list)
    }

    /// The outbound client (for `POST /v1/preview` URL checks and tests).
    pub fn outbound(&self) -> &Outbound {
        &self.inner.outbound
    }

    async fn live_endpoint(
        &self,
        tenant_id: &str,
        endpoint_id: &str,
    ) -> Result<Option<Arc<LiveEndpoint>>, String> {
        if let Some(ep) = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(endpoint_id)
            && ep.tenant_id == tenant_id
            && !ep.stale.load(Ordering::Acquire)
            && ep.fetched.elapsed() < self.inner.config.cache_ttl
        {
            return Ok(Some(ep.clone()));
        }
        let changes = self.inner.endpoint_changes.load(Ordering::Acquire);
        let row = super::endpoints::get(&self.inner.db, tenant_id, endpoint_id)
            .await
            .map_err(|e| e.to_string())?;
        let Some(row) = row else {
            self.inner
                .endpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(endpoint_id);
            return Ok(None);
        };
        let secrets = row
            .signing_secrets(&self.inner.keys, now_ms())
            .map_err(|e| e.to_string())?;
        let mut cache = self.inner.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the limiter (and its in-flight count) unless the limits themselves changed.
        let limits = match cache.get(endpoint_id) {
            Some(old)
                if old.limits.rate_per_s == row.rate_limit_per_s
                    && old.limits.in_flight_cap == row.max_in_flight =>
            {
                old.limits.clone()
            }
            _ => Arc::new(Limits::new(
                (row.rate_limit_per_s, row.max_in_flight),
                &row.id,
                &self.inner.shared_limits,
            )),
        };
        let live = Arc::new(LiveEndpoint {
            tenant_id: row.tenant_id.clone(),
            url: row.url.clone(),
            parsed: reqwest::Url::parse(&row.url).map_err(|e| e.to_string()),
            enabled: row.enabled,
            scheme: row.scheme(),
            secrets,
            limits,
            fetched: Instant::now(),
            stale: AtomicBool::new(self.inner.endpoint_changes.load(Ordering::Acquire) != changes),
            changes_at_read: changes,
        });
        cache.insert(endpoint_id.to_string(), live.clone());
        Ok(Some(live))
    }
}

/// Waits for `tasks` to end, aborting those still running after `deadline`.
async fn join_within(mut tasks: JoinSet<()>, deadline: Duration) {
    let _ = tokio::time::timeout(deadline, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

/// Receives jobs and runs each in its own task, at most `8 × max_in_flight` at once.
async fn dispatcher(engine: Engine, mut jobs: mpsc::Receiver<Job>) {
    let slots = Arc::new(Semaphore::new(engine.inner.config.max_in_flight * 8));
    let mut stop = engine.inner.stop.subscribe();
    let mut running = JoinSet::new();
    // Jobs leased to this worker that it will not send, because shutdown came first.
    let mut queued = Vec::new();
    loop {
        let job = tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => None,
            job = jobs.recv() => job,
        };
        let Some(job) = job else { break };
        // Shutdown can begin while every slot is taken; the job then goes back unsent.
        let slot = tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => None,
            slot = slots.clone().acquire_owned() => slot.ok(),
        };
        let Some(slot) = slot else {
            queued.push(job);
            break;
        };
        running.spawn(attempt(engine.clone(), job, slot));
        while let Some(done) = running.try_join_next() {
            if let Ok(Some(unsent)) = done {
                queued.push(unsent);
            }
        }
    }
    // From here on `dispatch` is refused (and releases its jobs itself) instead of queueing
    // behind a receiver nobody reads. Jobs still queued were never sent: give them back to the
    // outbox now, so another worker can send them while attempts under way finish here.
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        queued.push(job);
    }
    if !queued.is_empty() {
        release_unsent(&engine.inner, &std::mem::take(&mut queued)).await;
    }
    // Let attempts already under way finish so their outcomes are recorded; those that were
    // still waiting for their turn come back unsent at once and are released as they come, not
    // after the slowest attempt (the shutdown deadline could cut that wait short).
    while let Some(done) = running.join_next().await {
        let finished = std::iter::once(done).chain(std::iter::from_fn(|| running.try_join_next()));
        queued.extend(finished.filter_map(|done| done.ok().flatten()));
        if !queued.is_empty() {
            release_unsent(&engine.inner, &std::mem::take(&mut queued)).await;
        }
    }
}

/// Gives leased jobs that were never sent back to the outbox, due now.
async fn release_unsent(inner: &Inner, jobs: &[Job]) {
    match outbox::release(&inner.db, &inner.node, jobs, now_ms()).await {
        Ok(n) => tracing::info!(released = n, "returned unsent deliveries to the outbox"),
        Err(e) => tracing::warn!(error = %e, "cannot return unsent deliveries; their leases will expire"),
    }
}

/// Claims due deliveries every poll interval (or when poked).
async fn poller(engine: Engine) {
    let inner = &engine.inner;
    let mut stop = inner.stop.subscribe();
    // Checked before every claim: a stopping worker must not lease what it will not send.
    while !*stop.borrow() {
        let free = inner.in_flight.available_permits().max(1) as i64;
        let lease_ms = inner.config.lease.as_millis() as i64;
        // One clock for the claim and the look below: a deferred delivery falling due between
        // two readings would be neither claimed nor looked for.
        let now = now_ms();
        match outbox::claim_due(&inner.db, &inner.node, now, lease_ms, free.min(500)).await {
            Ok(jobs) => {
                let full = jobs.len() as i64 >= free.min(500);
                engine.dispatch(jobs).await;
                if full {
                    continue;
                }
            }
            Err(e) => tracing::warn!(error = %e, "claiming due deliveries failed"),
        }
        let deferred_until = inner.deferred_until.load(Ordering::Acquire);
        let wait = if now <= deferred_until {
            until_next_due(inner, deferred_until).await
        } else {
            inner.config.poll_interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = inner.poke.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// While deliveries deferred for their endpoints' limits are still to fall due: how long until
/// the next pending delivery does (at least [`SOONEST_POLL`], at most the poll interval), so that
/// they go out when due rather than at the next poll, without looking more often than that.
async fn until_next_due(inner: &Inner, deferred_until: i64) -> Duration {
    let interval = inner.config.poll_interval;
    match outbox::next_due(&inner.db).await {
        Ok(Some(at)) => {
            let ms = u64::try_from(at - now_ms()).unwrap_or(0);
            Duration::from_millis(ms).clamp(SOONEST_POLL.min(interval), interval)
        }
        Ok(None) => {
            // Nothing waits (made due early and sent): back to the interval, unless another
            // deferral came meanwhile.
            let _ =
                inner
                    .deferred_until
                    .compare_exchange(deferred_until, 0, Ordering::AcqRel, Ordering::Acquire);
            interval
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading when the next delivery is due failed");
            Duration::from_millis(100).min(interval)
        }
    }
}

/// The shortest wait between the poller's looks while deferred deliveries fall due.
const SOONEST_POLL: Duration = Duration::from_millis(5);

/// One attempt of one job: limits, lease check, sign, send, decide, hand the outcome on.
/// Answers the job back, unsent, if shutdown came while it waited for its turn.
async fn attempt(engine: Engine, job: Job, _slot: OwnedSemaphorePermit) -> Option<Job> {
    let inner = &engine.inner;
    let started_at = now_ms();
    // (`None` here ends the attempt with nothing to hand back: the job failed or waits for its
    // lease.)
    let endpoint = sendable_endpoint(&engine, &job, started_at).await?;

    // Too many of this endpoint's jobs wait here already: this one waits in the outbox instead,
    // due when its turn should come, and frees its place in the shared queue.
    let _place = match endpoint.limits.hold_or_defer(now_ms()) {
        Ok(place) => place,
        Err((due_at, made_due)) => {
            metrics::counter!("opsiq_deliveries_deferred_total").increment(1);
            if let Err(e) = outbox::defer(&inner.db, &inner.node, &job, due_at).await {
                tracing::warn!(delivery_id = %job.id, error = %e, "cannot defer a delivery; its lease will expire");
                return None;
            }
            // The first of a run of deferrals wakes the poller, which may be asleep for its
            // whole interval, to look more often until they are due.
            if inner.deferred_until.fetch_max(due_at, Ordering::AcqRel) <= now_ms() {
                engine.poke();
            }
            // An endpoint changed since this one was read, perhaps this one's limits, and perhaps
            // after the change made the deferred deliveries due: this one is due now too, for
            // the limits it has now to place. The same when the deferred ones were made due
            // for the endpoint's pace, perhaps before this one's deferral was written.
            if inner.endpoint_changes.load(Ordering::Acquire) != endpoint.changes_at_read
                || endpoint.limits.made_due.load(Ordering::Acquire) != made_due
            {
                match outbox::due_now(&inner.db, &job.id, now_ms()).await {
                    Ok(()) => engine.poke(),
                    Err(e) => {
                        tracing::warn!(delivery_id = %job.id, error = %e, "cannot make a deferred delivery due")
                    }
                }
            }
            return None;
        }
    };
    let mut stop = inner.stop.subscribe();
    let mut limits = endpoint.limits.clone();
    let _permits = loop {
        let turn = async {
            if let Some(rate) = &limits.rate {
                rate.until_ready().await;
            }
            let endpoint_permit = limits.in_flight.clone().acquire_owned().await.ok()?;
            let (slot, global_permit) = loop {
                // Before this process's permit: an attempt waiting for a slot another replica
                // holds must not hold one of the permits every endpoint shares.
                let slot = match &limits.shared_in_flight {
                    Some(slots) => Some(slots.acquire().await),
                    None => None,
                };
                let global_permit = inner.in_flight.clone().acquire_owned().await.ok()?;
                // The wait for that permit must not have eaten into the slot's time; a slot
                // lost meanwhile is waited for again without the permit.
                match (slot, &limits.shared_in_flight) {
                    (Some(slot), Some(slots)) => match slots.outlasting(slot).await {
                        Some(slot) => break (Some(slot), global_permit),
                        None => continue,
                    },
                    _ => break (None, global_permit),
                }
            };
            // The slot first: dropped first, it is back in the pool before the endpoint's
            // permit lets the next attempt look for one.
            Some((slot, endpoint_permit, global_permit))
        };
        // A closed semaphore (the engine is going away) ends the attempt; the lease covers it.
        tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => return Some(job),
            _ = limits.endpoint_changed.notified() => {}
            permits = turn => break permits?,
        }
        // The endpoint changed while this waited: wait for its turn under the limits it has now
        // (a raised limit is not waited out at the old rate).
        let now = {
            let _one_at_a_time = limits.rereading.lock().await;
            sendable_endpoint(&engine, &job, started_at).await
        };
        limits = now?.limits.clone();
    };

    // Waiting for limits may have eaten into the lease; make sure it outlasts this attempt and
    // the recording of its outcome (batched, retried when the database stumbles): a lease that
    // ran out before then would let the delivery be claimed and sent again after a 2xx. Keep
    // half of what the lease adds beyond the request timeout, and at least 5 s.
    let now = now_ms();
    let (lease_ms, timeout_ms) = (
        inner.config.lease.as_millis() as i64,
        inner.config.request_timeout.as_millis() as i64,
    );
    let needed = now + timeout_ms + ((lease_ms - timeout_ms) / 2).max(5_000);
    if job.lease_until.unwrap_or(0) < needed {
        let until = now + lease_ms;
        match outbox::extend_lease(&inner.db, &job, &inner.node, until).await {
            Ok(true) => {}
            Ok(false) => return None, // another worker took it over
            Err(e) => {
                tracing::warn!(delivery_id = %job.id, error = %e, "cannot extend the lease");
                return None;
            }
        }
    }

    // The endpoint may have changed while this waited for its turn (a new URL, a retired
    // secret, disabled, deleted): send as it stands now, not as it stood.
    let endpoint = sendable_endpoint(&engine, &job, started_at).await?;
    let url = endpoint.url.clone();
    let target = endpoint
        .parsed
        .as_ref()
        .map(signing::request_target)
        .unwrap_or_default();
    let nonce = signing::generate_nonce();
    let secrets: Vec<&str> = endpoint.secrets.iter().map(String::as_str).collect();
    let carries = if job.is_action() {
        Carries::Action(&job.label)
    } else {
        Carries::Event(&job.label)
    };
    let headers = signing::signed_headers(
        endpoint.scheme,
        &secrets,
        &SignedAttempt {
            delivery_id: &job.id,
            idempotency_key: &job.idempotency_key,
            carries,
            attempt: job.attempts,
            timestamp: now_ms() / 1000,
            nonce: &nonce,
            request_target: &target,
            body: job.body.as_bytes(),
        },
    );
    let body = bytes::Bytes::from(job.body.clone());
    let result = inner.outbound.post(&endpoint.parsed, &headers, body).await;
    let mut headers = headers;
    if let Ok(parsed) = &endpoint.parsed {
        headers.extend(super::outbound::transport_headers(parsed, job.body.len()));
    }
    metrics::histogram!("opsiq_delivery_attempt_duration_seconds").record(result.duration.as_secs_f64());
    if endpoint.limits.record_answer(result.duration) {
        let (db, engine) = (inner.db.clone(), engine.clone());
        let (tenant_id, endpoint_id) = (job.tenant_id.clone(), job.endpoint_id.clone());
        tokio::spawn(async move {
            match db
                .execute(outbox::WAITING_DUE_NOW, args![now_ms(), tenant_id, endpoint_id])
                .await
            {
                Ok(_) => engine.poke(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make an endpoint's waiting deliveries due; they keep their times")
                }
            }
        });
    }

    let jitter = f64::from(u32::from_le_bytes(crate::crypto::random_bytes::<4>())) / f64::from(u32::MAX);
    let next = retry::decide(
        &result,
        job.is_action(),
        &inner.config.retry_schedule,
        job.schedule_index,
        job.cycle_started_at.unwrap_or(started_at),
        now_ms(),
        jitter,
    );
    let outcome = Outcome {
        job,
        url,
        request_headers: headers,
        started_at,
        result,
        next,
    };
    send_outcome(inner, outcome).await;
    None
}

/// A job's endpoint as it stands now (usually from the cache), or `None` when the job ends here:
/// failed when the endpoint was deleted or disabled, left to its lease when it cannot be read.
async fn sendable_endpoint(engine: &Engine, job: &Job, started_at: i64) -> Option<Arc<LiveEndpoint>> {
    match engine.live_endpoint(&job.tenant_id, &job.endpoint_id).await {
        Ok(Some(endpoint)) if endpoint.enabled => Some(endpoint),
        Ok(other) => {
            fail_unsendable(&engine.inner, job.clone(), started_at, other.is_none()).await;
            None
        }
        Err(e) => {
            tracing::warn!(delivery_id = %job.id, error = %e, "cannot load the endpoint");
            None
        }
    }
}

/// Fails a job whose endpoint was deleted or disabled before it could be sent. Deleted: nothing
/// to alert about, its deleter gave up what it owed. Disabled: the delivery is lost to its
/// subscribers, which `delivery.failed` tells.
async fn fail_unsendable(inner: &Inner, job: Job, started_at: i64, deleted: bool) {
    let (class, reason) = match deleted {
        true => (ENDPOINT_DELETED_CLASS, endpoints::ENDPOINT_DELETED),
        false => ("endpoint_disabled", "the endpoint is disabled"),
    };
    let result = AttemptResult {
        error_class: Some(class),
        error_message: Some(reason.into()),
        ..AttemptResult::default()
    };
    let next = Next::Failed {
        disable_endpoint: false,
        reason: reason.into(),
    };
    let outcome = Outcome {
        job,
        url: String::new(),
        request_headers: Vec::new(),
        started_at,
        result,
        next,
    };
    send_outcome(inner, outcome).await;
}

async fn send_outcome(inner: &Inner, outcome: Outcome) {
    if inner.outcomes.send(outcome).await.is_err() {
        tracing::warn!("the outcome writer stopped; the lease will expire and the delivery be retried");
    }
}

/// Writes outcomes in batches: one transaction for everything that finished meanwhile.
async fn outcome_writer(engine: Engine, outcomes: Arc<tokio::sync::Mutex<mpsc::Receiver<Outcome>>>) {
    let mut drain = engine.inner.drain.subscribe();
    let mut batch = Vec::with_capacity(OUTCOME_BATCH);
    loop {
        {
            // Writers take turns collecting a batch; each then records its own.
            let mut outcomes = outcomes.lock().await;
            // Draining, no attempt is running any more: record what is queued, then end.
            let first = if *drain.borrow() {
                outcomes.try_recv().ok()
            } else {
                tokio::select! {
                    o = outcomes.recv() => o,
                    _ = drain.changed() => outcomes.try_recv().ok(),
                }
            };
            let Some(first) = first else { return };
            batch.push(first);
            while batch.len() < OUTCOME_BATCH {
                match outcomes.try_recv() {
                    Ok(o) => batch.push(o),
                    Err(_) => break,
                }
            }
            if !*drain.borrow() && !engine.awaited(&batch) {
                gather_outcomes(&engine, &mut outcomes, &mut batch, &mut drain).await;
            }
        }
        let mut attempts = 0;
        metrics::histogram!("opsiq_outcome_batch_size").record(batch.len() as f64);
        let started = Instant::now();
        loop {
            match record_outcomes(&engine, &batch).await {
                Ok(new_jobs) => {
                    metrics::histogram!("opsiq_outcome_batch_seconds")
                        .record(started.elapsed().as_secs_f64());
                    settle_waiters(&engine, &batch);
                    engine.dispatch_without_waiting(new_jobs).await;
                    break;
                }
                Err(e) if attempts < 5 => {
                    attempts += 1;
                    tracing::warn!(error = %e, "recording delivery outcomes failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempts)).await;
                }
                // A database that is down is not helped by trying each alone: only a batch that
                // fails for what it holds is split.
                Err(e) if batch.len() > 1 && !e.is_transient() => {
                    // One outcome that cannot be written must not take its neighbours along:
                    // each is tried alone.
                    tracing::warn!(error = %e, count = batch.len(), "recording delivery outcomes failed; recording them one by one");
                    for outcome in &batch {
                        let one = std::slice::from_ref(outcome);
                        match record_outcomes(&engine, one).await {
                            Ok(new_jobs) => {
                                settle_waiters(&engine, one);
                                engine.dispatch_without_waiting(new_jobs).await;
                            }
                            Err(e) => {
                                // Its lease expires and it is attempted again: at-least-once holds.
                                tracing::error!(error = %e, delivery_id = %outcome.job.id, "dropping a delivery outcome");
                                if e.is_transient() {
                                    // The rest would wait on the database in turn; their
                                    // leases bring them back too.
                                    break;
                                }
                            }
                        }
                    }
                    break;
                }
                Err(e) => {
                    // The lease expires and the delivery is attempted again: at-least-once holds.
                    tracing::error!(error = %e, delivery_id = %batch[0].job.id, "dropping a delivery outcome");
                    break;
                }
            }
        }
        batch.clear();
    }
}

/// Most outcomes recorded in one transaction.
const OUTCOME_BATCH: usize = 256;

/// How long outcomes nobody waits for gather before they are recorded together. Under steady
/// load one outcome per transaction cost a commit (and on SQLite a fresh copy of the pages the
/// newest deliveries share) each; a few milliseconds' worth per transaction cut the server's CPU
/// per gateway call by about a tenth, and the writer is free sooner for the calls that wait on
/// it. Longer windows saved no more and held the writer longer per batch. A late record costs
/// only that wait (the delivery's lease covers it); outcomes a caller waits for are not held.
const OUTCOME_GATHER: Duration = Duration::from_millis(2);

/// Adds to `batch` what arrives within [`OUTCOME_GATHER`], until it is full, an outcome that a
/// caller waits for arrives, or the engine drains.
async fn gather_outcomes(
    engine: &Engine,
    outcomes: &mut mpsc::Receiver<Outcome>,
    batch: &mut Vec<Outcome>,
    drain: &mut watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + OUTCOME_GATHER;
    while batch.len() < OUTCOME_BATCH {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, outcomes.recv()) => next,
            _ = drain.changed() => return,
        };
        let Ok(Some(outcome)) = next else { return };
        let awaited = engine.awaited(std::slice::from_ref(&outcome));
        batch.push(outcome);
        if awaited {
            return;
        }
    }
}

fn settle_waiters(engine: &Engine, batch: &[Outcome]) {
    let mut waiters = engine.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
    for o in batch {
        let status = match o.next {
            Next::Succeeded => "succeeded",
            Next::Failed { .. } => "failed",
            Next::RetryAt { .. } => continue,
        };
        for tx in waiters.remove(&o.job.id).unwrap_or_default() {
            let _ = tx.send(Settled {
                status,
                result: o.result.clone(),
            });
        }
    }
}

/// Records a batch of outcomes in one transaction; returns jobs for events raised meanwhile
/// (`delivery.failed`, `endpoint.disabled`).
fn last_error(result: &AttemptResult) -> Option<String> {
    if result.is_success() {
        return None;
    }
    result
        .error_message
        .clone()
        .or_else(|| result.status.map(|s| format!("HTTP {s}")))
}

/// Moves every delivery of the batch to its next state in one statement per fifty, guarded by
/// the attempt number so that only the lease holder's outcome counts; returns the ids moved.
async fn move_deliveries(
    tx: &mut Tx,
    batch: &[Outcome],
    now: i64,
) -> Result<std::collections::HashSet<String>, crate::db::DbError> {
    const COLUMNS: usize = 7;
    let mut moved = std::collections::HashSet::with_capacity(batch.len());
    for chunk in crate::db::chunks(tx.dialect(), batch) {
        let mut rows = Vec::with_capacity(chunk.len());
        let mut values = args![now];
        for (i, o) in chunk.iter().enumerate() {
            let job = &o.job;
            let (status, next_at, schedule_index) = match &o.next {
                Next::Succeeded => ("succeeded", now, job.schedule_index),
                Next::RetryAt { at, schedule_index } => ("pending", *at, *schedule_index),
                Next::Failed { .. } => ("failed", now, job.schedule_index),
            };
            let p = |k: usize| format!("${}", 2 + i * COLUMNS + k);
            rows.push(format!(
                "(CAST({} AS TEXT), CAST({} AS BIGINT), CAST({} AS TEXT), CAST({} AS BIGINT), CAST({} AS BIGINT), \
                 CAST({} AS BIGINT), CAST({} AS TEXT), 'delivering')",
                p(0), p(1), p(2), p(3), p(4), p(5), p(6)
            ));
            values.extend(args![
                &job.id,
                job.attempts,
                status,
                next_at,
                schedule_index,
                o.result.status.map(i64::from),
                last_error(&o.result)
            ]);
        }
        // The status a row must still have is compared through `v`, not as a literal: given
        // `status = 'delivering'`, PostgreSQL's planner may scan the partial lease index (every
        // delivery in flight, and their dead versions: thousands under a backlog) and hash-join
        // it, instead of looking each row up by its primary key.
        let sql = format!(
            "WITH v(did, att, st, nxt, sched, code, err, was) AS (VALUES {}) \
             UPDATE deliveries SET status = v.st, next_attempt_at = v.nxt, schedule_index = v.sched, \
             lease_until = NULL, leased_by = NULL, last_status_code = v.code, last_error = v.err, updated_at = $1 \
             FROM v WHERE deliveries.id = v.did AND deliveries.attempts = v.att AND deliveries.status = v.was \
             RETURNING id",
            rows.join(", ")
        );
        moved.extend(tx.fetch_texts(sqlx::AssertSqlSafe(sql), values).await?);
    }
    Ok(moved)
}

/// Inserts the attempt log rows of a batch, fifty per statement.
async fn insert_attempts(tx: &mut Tx, batch: &[Outcome]) -> Result<(), crate::db::DbError> {
    const COLUMNS: usize = 13;
    for chunk in crate::db::chunks(tx.dialect(), batch) {
        let mut sql = String::from(
            "INSERT INTO delivery_attempts (id, tenant_id, delivery_id, attempt, url, request_headers, \
             response_status, response_headers, response_body, error_class, error_message, started_at, duration_ms) VALUES ",
        );
        let mut values = Vec::with_capacity(chunk.len() * COLUMNS);
        for (i, o) in chunk.iter().enumerate() {
            let headers: serde_json::Map<String, serde_json::Value> = o
                .request_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().into()))
                .collect();
            let response_headers: serde_json::Map<String, serde_json::Value> = o
                .result
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            if i > 0 {
                sql.push_str(", ");
            }
            let placeholders: Vec<String> = (1..=COLUMNS).map(|k| format!("${}", i * COLUMNS + k)).collect();
            sql.push_str(&format!("({})", placeholders.join(", ")));
            values.extend(args![
                ids::new_id("att"),
                &o.job.tenant_id,
                &o.job.id,
                o.job.attempts,
                &o.url,
                serde_json::Value::Object(headers).to_string(),
                o.result.status.map(i64::from),
                o.result
                    .status
                    .map(|_| serde_json::Value::Object(response_headers).to_string()),
                o.result.status.map(|_| o.result.body.clone()),
                o.result.error_class,
                o.result.error_message.clone(),
                o.started_at,
                o.result.duration.as_millis() as i64
            ]);
        }
        tx.defer(sqlx::AssertSqlSafe(sql), values).await?;
    }
    Ok(())
}

async fn record_outcomes(engine: &Engine, batch: &[Outcome]) -> Result<Vec<Job>, crate::db::DbError> {
    let inner = &engine.inner;
    let now = now_ms();
    let lease = engine.lease();
    // Settled actions raise `action.succeeded`/`action.failed`, failures may raise
    // `delivery.failed`/`endpoint.disabled`: subscribers and rules are looked up (from caches)
    // before the writer is taken.
    let mut subscribers = std::collections::HashMap::new();
    let mut rules = std::collections::HashMap::new();
    for o in batch
        .iter()
        .filter(|o| (o.job.is_action() && !matches!(o.next, Next::RetryAt { .. })) || !o.result.is_success())
    {
        let tenant_id = o.job.tenant_id.as_str();
        if !subscribers.contains_key(tenant_id) {
            subscribers.insert(tenant_id, engine.subscribers(tenant_id).await?);
            rules.insert(
                tenant_id,
                inner
                    .rules
                    .context(&inner.db, tenant_id, &inner.validators)
                    .await?,
            );
        }
    }
    let rules_of = |tenant_id: &str| rules.get(tenant_id).cloned().flatten();
    let mut tx = inner.db.begin().await?;
    tx.in_background();
    insert_attempts(&mut tx, batch).await?;
    let moved = move_deliveries(&mut tx, batch, now).await?;
    let ends_healthy = clear_failing_runs(&mut tx, batch).await?;
    let mut raised = Vec::new();
    let mut tally = OutcomeTally::default();
    for o in batch {
        let job = &o.job;
        // Only the holder of this attempt's lease moved the delivery on; a stale outcome stops here.
        if !moved.contains(&job.id) {
            continue;
        }
        let last_error = last_error(&o.result);
        if job.is_action() {
            invocations::settle(&mut tx, &inner.validators, job, &o.result, &o.next, now).await?;
            let settled = match &o.next {
                Next::Succeeded => Some("action.succeeded"),
                Next::Failed { .. } => Some("action.failed"),
                Next::RetryAt { .. } => None,
            };
            if let (Some(event_type), Some(invocation_id)) = (settled, &job.invocation_id) {
                let mut data = json!({"invocation_id": invocation_id, "action": job.label});
                if event_type == "action.failed" {
                    data["error"] = json!({"status": o.result.status, "message": last_error.clone()});
                }
                let fanout = match subscribers.get(job.tenant_id.as_str()) {
                    Some(list) => events::Fanout::Among(list.clone()),
                    None => events::Fanout::Lookup,
                };
                // Rules run on an agent's action events, not on those of a rule's own invocation
                // (a rule invoking an action on `action.invoked` would otherwise never stop).
                let rules = if requested_by_rule(job) {
                    None
                } else {
                    rules_of(&job.tenant_id)
                };
                raised.extend(
                    raise(
                        &mut tx,
                        &job.tenant_id,
                        event_type,
                        data,
                        fanout,
                        rules,
                        (&lease, now),
                    )
                    .await?,
                );
            }
        }
        tally.count(&o.next);
        if !o.url.is_empty() {
            let rules = rules_of(&job.tenant_id);
            let healthy = ends_healthy.contains(job.endpoint_id.as_str());
            let (disabled, jobs) =
                update_endpoint_health(engine, &mut tx, o, healthy, rules, (&lease, now)).await?;
            tally.endpoints_disabled += u64::from(disabled);
            raised.extend(jobs);
        }
        if let Next::Failed { reason, .. } = &o.next {
            tracing::warn!(delivery_id = %job.id, endpoint_id = %job.endpoint_id, %reason, "delivery failed");
            // A failed `delivery.failed` delivery raises nothing, or failures would feed themselves;
            // nor does one whose endpoint was deleted.
            if job.label != "delivery.failed" && o.result.error_class != Some(ENDPOINT_DELETED_CLASS) {
                // A failure a rule caused runs no rules: a rule on `delivery.failed` whose own
                // call fails at once (a 4xx is final) would otherwise feed itself without end.
                let rules = if caused_by_rule(&mut tx, job).await? {
                    None
                } else {
                    rules_of(&job.tenant_id)
                };
                let data = json!({
                    "delivery_id": job.id,
                    "endpoint_id": job.endpoint_id,
                    "kind": job.kind,
                    "label": job.label,
                    "event_id": job.event_id,
                    "invocation_id": job.invocation_id,
                    "attempts": job.attempts,
                    "last_status": o.result.status,
                    "last_error": last_error,
                    "reason": reason,
                });
                raised.extend(
                    raise(
                        &mut tx,
                        &job.tenant_id,
                        "delivery.failed",
                        data,
                        events::Fanout::Lookup,
                        rules,
                        (&lease, now),
                    )
                    .await?,
                );
            }
        }
    }
    tx.commit().await?;
    // Counted once committed: a batch rolled back and written again counts once.
    tally.record();
    Ok(raised)
}

/// What a batch of outcomes adds to the delivery counters.
#[derive(Default)]
struct OutcomeTally {
    succeeded: u64,
    retried: u64,
    failed: u64,
    endpoints_disabled: u64,
}

impl OutcomeTally {
    fn count(&mut self, next: &Next) {
        match next {
            Next::Succeeded => self.succeeded += 1,
            Next::RetryAt { .. } => self.retried += 1,
            Next::Failed { .. } => self.failed += 1,
        }
    }

    fn record(&self) {
        let attempts = [
            ("succeeded", self.succeeded),
            ("retry", self.retried),
            ("failed", self.failed),
        ];
        for (outcome, n) in attempts.into_iter().filter(|(_, n)| *n > 0) {
            metrics::counter!("opsiq_delivery_attempts_total", "outcome" => outcome).increment(n);
        }
        if self.failed > 0 {
            metrics::counter!("opsiq_deliveries_failed_total").increment(self.failed);
        }
        if self.endpoints_disabled > 0 {
            metrics::counter!("opsiq_endpoints_disabled_total").increment(self.endpoints_disabled);
        }
    }
}

/// Ends the run of failures of every endpoint that answered 2xx in `batch` (a stale outcome's
/// answer counts too: the endpoint was healthy), whatever the sender's copy of the endpoint
/// said; one statement per batch, which writes nothing while no endpoint is failing. Runs
/// before the batch's failures start new runs. Answers the endpoints whose last outcome in the
/// batch (outcomes queue in the order attempts end) was a success: their earlier failures in
/// it start no run.
async fn clear_failing_runs<'b>(
    tx: &mut Tx,
    batch: &'b [Outcome],
) -> Result<std::collections::HashSet<&'b str>, crate::db::DbError> {
    let mut last_answer = std::collections::HashMap::new();
    let mut healthy = std::collections::BTreeSet::new();
    for o in batch.iter().filter(|o| !o.url.is_empty()) {
        let succeeded = o.result.is_success();
        last_answer.insert(o.job.endpoint_id.as_str(), succeeded);
        if succeeded {
            healthy.insert(o.job.endpoint_id.as_str());
        }
    }
    if !healthy.is_empty() {
        // Held and sent with the batch's next statement: no round trip of its own.
        tx.defer(
            sqlx::AssertSqlSafe(format!(
                "UPDATE endpoints SET failing_since = NULL WHERE failing_since IS NOT NULL AND id IN ({})",
                crate::db::in_list(healthy.len())
            )),
            healthy.into_iter().map(Into::into).collect(),
        )
        .await?;
    }
    Ok(last_answer
        .into_iter()
        .filter_map(|(endpoint, succeeded)| succeeded.then_some(endpoint))
        .collect())
}

/// Records a system event; `fanout` is the engine's cached subscriber list on the hot path, a
/// lookup inside the transaction where the batch itself may have just disabled an endpoint.
async fn raise(
    tx: &mut Tx,
    tenant_id: &str,
    event_type: &str,
    data: serde_json::Value,
    fanout: events::Fanout,
    rules: Option<Arc<crate::rules::apply::RuleContext>>,
    (lease, now): (&Lease, i64),
) -> Result<Vec<Job>, crate::db::DbError> {
    let event = NewEvent {
        tenant_id: tenant_id.to_string(),
        event_type: event_type.to_string(),
        data,
        idempotency_key: None,
        source: "system".into(),
        depth: 0,
        emitted: Default::default(),
        fanout,
        rules,
    };
    Ok(events::record(tx, event, lease, now).await?.deliveries)
}

/// Whether an action request was made by a rule (its body names the caller `rule:<id>`).
fn requested_by_rule(job: &Job) -> bool {
    serde_json::from_str::<serde_json::Value>(&job.body).is_ok_and(|body| {
        body["agent"]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("rule:"))
    })
}

/// Whether a rule caused this delivery: an action request a rule made, or an event a rule
/// emitted (depth above 0).
async fn caused_by_rule(tx: &mut Tx, job: &Job) -> Result<bool, crate::db::DbError> {
    if requested_by_rule(job) {
        return Ok(true);
    }
    let Some(event_id) = &job.event_id else {
        return Ok(false);
    };
    let depth: Option<(i64,)> = tx
        .fetch_optional("SELECT depth FROM events WHERE id = $1", args![event_id])
        .await?;
    Ok(depth.is_some_and(|(depth,)| depth > 0))
}

/// Tracks the endpoint's run of failures; disables it on 410 or after five days of failures, and
/// says whether it did.
async fn update_endpoint_health(
    engine: &Engine,
    tx: &mut Tx,
    o: &Outcome,
    ends_healthy: bool,
    rules: Option<Arc<crate::rules::apply::RuleContext>>,
    (lease, now): (&Lease, i64),
) -> Result<(bool, Vec<Job>), crate::db::DbError> {
    let job = &o.job;
    let gone = matches!(
        o.next,
        Next::Failed {
            disable_endpoint: true,
            ..
        }
    );
    // Successes were recorded for the whole batch in `clear_failing_runs`; a failure the
    // endpoint's later success in this batch made up for starts no run (410 still disables).
    if o.result.is_success() || (ends_healthy && !gone) {
        return Ok((false, Vec::new()));
    }
    // Sent with the read just below.
    tx.defer(
        "UPDATE endpoints SET failing_since = $1 WHERE id = $2 AND failing_since IS NULL",
        args![now, &job.endpoint_id],
    )
    .await?;
    let row: Option<EndpointRow> = tx
        .fetch_optional("SELECT * FROM endpoints WHERE id = $1", args![&job.endpoint_id])
        .await?;
    let Some(row) = row else {
        return Ok((false, Vec::new()));
    };
    let failing_too_long = row
        .failing_since
        .is_some_and(|since| now - since > FAILING_DISABLE_AFTER_MS);
    if !row.enabled || !(gone || failing_too_long) {
        return Ok((false, Vec::new()));
    }
    let reason = if gone {
        "the endpoint answered 410 Gone"
    } else {
        "the endpoint failed every delivery for 5 days"
    };
    tx.execute(
        "UPDATE endpoints SET enabled = $1, disabled_reason = $2, updated_at = $3, version = version + 1 WHERE id = $4",
        args![false, reason, now, &job.endpoint_id],
    )
    .await?;
    engine.forget_endpoint(&job.endpoint_id);
    crate::changes::publish_in(
        tx,
        &Change::Endpoint(job.tenant_id.clone(), job.endpoint_id.clone()),
    )
    .await?;
    tracing::warn!(endpoint_id = %job.endpoint_id, reason, "endpoint disabled");
    let data = json!({"endpoint_id": row.id, "url": row.url, "reason": reason});
    let raised = raise(
        tx,
        &job.tenant_id,
        "endpoint.disabled",
        data,
        events::Fanout::Lookup,
        rules,
        (lease, now),
    )
    .await?;
    Ok((true, raised))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::RateLimiter;
    use governor::clock::FakeRelativeClock;

    use super::*;

    /// The requests let through in each of `seconds` one-second windows, when as many are tried
    /// every millisecond as may go.
    fn per_second(rate: u32, seconds: usize) -> Vec<usize> {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::direct_with_clock(
            endpoint_limit(NonZeroU32::new(rate).unwrap()).quota(),
            clock.clone(),
        );
        let mut counts = vec![0; seconds];
        for count in counts.iter_mut() {
            for _ in 0..1000 {
                while limiter.check().is_ok() {
                    *count += 1;
                }
                clock.advance(Duration::from_millis(1));
            }
        }
        counts
    }

    #[test]
    fn an_endpoint_limit_holds_in_every_second() {
        // The first second, after a quiet time, too: at most 5 % over.
        assert_eq!(per_second(2, 3), [2, 2, 2]);
        assert_eq!(per_second(10, 3), [10, 10, 10]);
        assert_eq!(per_second(1000, 3), [1049, 1000, 1000]);
    }
}
