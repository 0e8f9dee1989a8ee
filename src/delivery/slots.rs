//! Endpoints' `max_in_flight` held across replicas. Each process caps its own attempts to an
//! endpoint with a semaphore; on PostgreSQL, where several replicas send to one endpoint, an
//! attempt also holds one of the endpoint's slots in `endpoint_slots` (taken by the database
//! function `opsiq_take_slot`), so the cap holds for all of them together.
//!
//! Asking the database for every attempt would make a capped endpoint's every delivery wait for
//! two round trips, one at a time per endpoint. So a process keeps the slots it took while it
//! is busy: an attempt that ends puts its slot back in the process's pool, and the next attempt
//! takes it from there. A replica refused a slot says so on [`CHANNEL`] (`wanted:`);
//! for a second after hearing it, the others give back their idle slots and every slot an
//! attempt ends with, each announced (`freed:<endpoint>`) so that every replica's waiters ask
//! again alike. A slot also lapses on its own a lease after it was taken, so one held by a
//! replica that died is free again then; a stopping replica gives back all it holds. SQLite has
//! one server process: its semaphore is the whole cap.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::args;
use crate::db::{Database, DbError};

/// The PostgreSQL channel on which replicas say they want (`wanted:<holder>:<endpoint>`) or
/// gave back (`freed:<endpoint>`) an endpoint's slots.
pub const CHANNEL: &str = "opsiq_endpoint_slots";

/// The first pause before asking again for a full endpoint's slot, should no announcement
/// come; it doubles up to [`LONGEST_PAUSE`] while the endpoint stays full.
const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// The longest pause between two asks for a full endpoint's slot.
const LONGEST_PAUSE: Duration = Duration::from_millis(200);

/// How long to wait after the database could not be asked.
const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// How long, after another replica said it wants an endpoint's slots, this one gives back every
/// slot of it an attempt ends with instead of keeping it. A waiting replica says so again at
/// least every [`LONGEST_PAUSE`].
const GIVING_BACK_FOR: Duration = Duration::from_secs(1);

/// The slots of every capped endpoint, kept in the database (PostgreSQL's `endpoint_slots`).
pub struct SharedSlots {
    db: Database,
    /// This process, as the holder of the slots it takes.
    holder: String,
    /// How long a slot is taken for.
    lifetime: Duration,
    /// How long a slot must still have to be used for an attempt.
    least_left: Duration,
    /// By endpoint id: this process's slots of it and its waiters.
    pools: std::sync::Mutex<HashMap<String, Weak<SlotPool>>>,
    /// Set when the process stops delivering: slots are no longer kept for later attempts.
    stopping: std::sync::atomic::AtomicBool,
}

impl SharedSlots {
    /// Slots kept in `db`, which must be PostgreSQL, taken as `holder` (this process's id) for
    /// `lease`; an attempt (at most `request_timeout`) starts only with a slot that outlasts it.
    pub fn new(db: Database, holder: String, (lease, request_timeout): (Duration, Duration)) -> Self {
        let margin = (lease.saturating_sub(request_timeout) / 2).min(Duration::from_secs(5));
        Self {
            db,
            holder,
            lifetime: lease,
            least_left: request_timeout + margin,
            pools: std::sync::Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// This process's pools of slots still in use.
    fn live_pools(&self) -> Vec<Arc<SlotPool>> {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.values().filter_map(Weak::upgrade).collect()
    }

    /// The process stops delivering: gives back the idle slots at once, and from now on every
    /// slot an attempt ends with, each announced (other replicas may be waiting for them).
    pub fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
        for pool in self.live_pools() {
            pool.give_back_idle(Duration::ZERO, true);
        }
    }

    /// This process's pool of `endpoint_id`'s slots, shared by every [`EndpointSlots`] of it
    /// (its limits may be read again while slots taken under the old ones are out).
    fn pool(self: &Arc<Self>, endpoint_id: &str) -> Arc<SlotPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(endpoint_id).and_then(Weak::upgrade) {
            return pool;
        }
        pools.retain(|_, pool| pool.strong_count() > 0);
        let pool = Arc::new(SlotPool {
            endpoint_id: endpoint_id.to_string(),
            shared: Arc::downgrade(self),
            state: std::sync::Mutex::new(PoolState::default()),
            given_back: Notify::new(),
        });
        pools.insert(endpoint_id.to_string(), Arc::downgrade(&pool));
        pool
    }

    /// Gives back, twice a second, the slots no attempt has used for [`KEPT_IDLE`], until the
    /// process ends: a replica that stopped sending to an endpoint does not keep its slots.
    pub async fn give_back_idle_slots(self: Arc<Self>) {
        let mut every = tokio::time::interval(KEPT_IDLE / 2);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            for pool in self.live_pools() {
                pool.give_back_idle(KEPT_IDLE, false);
            }
        }
    }

    /// Acts on what a replica said on [`CHANNEL`]: `wanted:<holder>:<endpoint>` (a refusal;
    /// this process's own are ignored) or `freed:<endpoint>`.
    pub fn heard(&self, payload: &str) {
        let (wanted, endpoint_id) = match payload.split_once(':') {
            Some(("wanted", said)) => match said.split_once(':') {
                Some((holder, _)) if holder == self.holder => return,
                Some((_, id)) => (true, id),
                None => return,
            },
            Some(("freed", id)) => (false, id),
            _ => return,
        };
        let pool = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.get(endpoint_id).and_then(Weak::upgrade)
        };
        let Some(pool) = pool else { return };
        if wanted {
            pool.wanted_elsewhere();
        } else {
            pool.given_back.notify_one();
        }
    }

    /// One round trip: takes slot `slot` of `endpoint` if fewer than `cap` others are held;
    /// answers whether it did. A refusal is announced (`wanted:`).
    async fn take(&self, endpoint: &str, cap: i64, slot: &str) -> Result<bool, DbError> {
        let lifetime_ms = i64::try_from(self.lifetime.as_millis()).unwrap_or(i64::MAX / 1000);
        let taken: Option<(bool,)> = self
            .db
            .fetch_optional(
                "SELECT opsiq_take_slot($1, $2, $3, $4, $5, $6)",
                args![endpoint, cap, slot, &self.holder, lifetime_ms, CHANNEL],
            )
            .await?;
        Ok(taken.is_some_and(|(taken,)| taken))
    }

    /// Gives the slots `slots` back, announcing it (`freed:`) when `announce`.
    async fn give_back(&self, endpoint: &str, slots: Vec<String>, announce: bool) {
        // Slot ids are `slot_` and hex: a comma cannot be part of one.
        let gone = self
            .db
            .execute(
                "WITH gone AS (DELETE FROM endpoint_slots WHERE slot_id = ANY(string_to_array($1, ',')) \
                 RETURNING 1) SELECT pg_notify($2, 'freed:' || $3) WHERE $4 AND EXISTS (SELECT 1 FROM gone)",
                args![slots.join(","), CHANNEL, endpoint, announce],
            )
            .await;
        if let Err(e) = gone {
            tracing::warn!(endpoint_id = %endpoint, error = %e, "could not give back slots of an endpoint's max_in_flight; they lapse with their lease");
        }
    }

    /// Gives back every slot this process still holds (at shutdown, once its attempts ended).
    pub async fn give_back_all(&self) {
        let gone = self
            .db
            .execute(
                "WITH gone AS (DELETE FROM endpoint_slots WHERE holder = $1 RETURNING endpoint_id) \
                 SELECT pg_notify($2, 'freed:' || endpoint_id) FROM (SELECT DISTINCT endpoint_id FROM gone) e",
                args![&self.holder, CHANNEL],
            )
            .await;
        if let Err(e) = gone {
            tracing::warn!(error = %e, "could not give back this process's endpoint slots; they lapse with their lease");
        }
    }
}

/// This process's slots of one endpoint.
struct SlotPool {
    endpoint_id: String,
    shared: Weak<SharedSlots>,
    state: std::sync::Mutex<PoolState>,
    /// Woken when a slot of the endpoint is given back (here or by another replica).
    given_back: Notify,
}

/// A slot this process holds: its id and until when it is its own.
type OwnSlot = (String, Instant);

/// How long a slot no attempt uses is kept for the next one before it is given back.
const KEPT_IDLE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct PoolState {
    /// Slots held and not in use, taken under `cap`, with when each was put back.
    idle: Vec<(OwnSlot, Instant)>,
    /// The cap the idle slots were taken under.
    cap: i64,
    /// Until when another replica wants the endpoint's slots.
    wanted_until: Option<Instant>,
}

impl SlotPool {
    /// Another replica wants slots: give back the idle ones, and for a while every one that
    /// comes back from an attempt.
    fn wanted_elsewhere(self: &Arc<Self>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.wanted_until = Some(Instant::now() + GIVING_BACK_FOR);
        drop(state);
        self.give_back_idle(Duration::ZERO, true);
    }

    /// Gives back the idle slots put back at least `kept` ago, announcing it when `announce`.
    fn give_back_idle(self: &Arc<Self>, kept: Duration, announce: bool) {
        let now = Instant::now();
        let unused = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (unused, still_kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.idle)
                .into_iter()
                .partition(|(_, since)| now.duration_since(*since) >= kept);
            state.idle = still_kept;
            unused
        };
        self.give_back(unused.into_iter().map(|((id, _), _)| id).collect(), announce);
    }

    /// Gives `slots` back in a task of its own.
    fn give_back(&self, slots: Vec<String>, announce: bool) {
        spawn_give_back(&self.shared, self.endpoint_id.clone(), slots, announce);
    }

    /// An idle slot taken under `cap` that outlasts an attempt, if there is one; idle slots
    /// that no longer do, or were taken under another cap, are given back.
    fn take_idle(self: &Arc<Self>, cap: i64, least_left: Duration) -> Option<OwnSlot> {
        let now = Instant::now();
        let (found, stale) = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let mut stale = Vec::new();
            if state.cap != cap {
                stale.extend(state.idle.drain(..).map(|((id, _), _)| id));
                state.cap = cap;
            }
            let mut found = None;
            while let Some(((id, until), _)) = state.idle.pop() {
                if until > now + least_left {
                    found = Some((id, until));
                    break;
                }
                stale.push(id);
            }
            (found, stale)
        };
        self.give_back(stale, false);
        found
    }

    /// A slot taken under `cap` whose attempt ended: kept for the next one, or given back when
    /// another replica wants the endpoint's slots, the cap changed or the process is stopping.
    fn put_back(self: &Arc<Self>, (id, until): OwnSlot, cap: i64) {
        let stopping = self
            .shared
            .upgrade()
            .is_none_or(|shared| shared.stopping.load(std::sync::atomic::Ordering::Acquire));
        let wanted = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let wanted = stopping || state.wanted_until.is_some_and(|t| t > Instant::now());
            if !wanted && state.cap == cap {
                state.idle.push(((id, until), Instant::now()));
                drop(state);
                self.given_back.notify_one();
                return;
            }
            wanted
        };
        self.give_back(vec![id], wanted);
    }
}

impl Drop for SlotPool {
    fn drop(&mut self) {
        // No limits use the endpoint's pool any more (its cap was removed): its idle slots
        // would otherwise count against a cap set again until they lapse.
        let idle = std::mem::take(&mut self.state.get_mut().unwrap_or_else(|e| e.into_inner()).idle);
        let slots = idle.into_iter().map(|((id, _), _)| id).collect();
        spawn_give_back(&self.shared, std::mem::take(&mut self.endpoint_id), slots, true);
    }
}

/// Gives `slots` of `endpoint_id` back in a task of its own, if there are any and the process
/// is still running (else they lapse with their lease).
fn spawn_give_back(shared: &Weak<SharedSlots>, endpoint_id: String, slots: Vec<String>, announce: bool) {
    if slots.is_empty() {
        return;
    }
    let (Some(shared), Ok(runtime)) = (shared.upgrade(), tokio::runtime::Handle::try_current()) else {
        return;
    };
    runtime.spawn(async move { shared.give_back(&endpoint_id, slots, announce).await });
}

/// One endpoint's shared slots under its current cap, as this process waits for them.
pub struct EndpointSlots {
    cap: i64,
    pool: Arc<SlotPool>,
    shared: Arc<SharedSlots>,
    /// Held by the waiter asking the database again after a refusal; the others of this
    /// process queue behind it, so a full endpoint costs one ask per announcement or pause,
    /// not one per waiting attempt.
    asking: Mutex<()>,
}

impl std::fmt::Debug for EndpointSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSlots")
            .field("endpoint_id", &self.pool.endpoint_id)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl EndpointSlots {
    /// The slots of `endpoint_id`, at most `cap` held by all replicas together.
    pub fn new(endpoint_id: &str, cap: i64, shared: Arc<SharedSlots>) -> Self {
        Self {
            cap,
            pool: shared.pool(endpoint_id),
            shared,
            asking: Mutex::new(()),
        }
    }

    /// Waits until one of the endpoint's slots is free here or in the database, and takes it.
    /// When the database cannot be asked, waits and asks again: a cap must not be exceeded
    /// because the database is slow. Dropped while it waits, it gives back what its last ask
    /// may have taken, once that ask's answer is in.
    pub async fn acquire(self: &Arc<Self>) -> HeldSlot {
        let mut slot = HeldSlot {
            id: String::new(),
            until: Instant::now(),
            endpoint: self.clone(),
            state: SlotState::Free,
        };
        // A slot kept from an earlier attempt, or a free one, is taken at once; the queue is
        // only for a full endpoint.
        if slot.take_idle() || slot.ask().await {
            return slot;
        }
        let _asking = self.asking.lock().await;
        let mut pause = FIRST_PAUSE;
        loop {
            if slot.take_idle() || slot.ask().await {
                return slot;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.pool.given_back.notified() => {}
            }
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }
}

impl EndpointSlots {
    /// `slot`, if it still outlasts an attempt, else renewed for another lifetime; `None` when
    /// the endpoint filled up meanwhile and the slot is lost.
    pub async fn outlasting(self: &Arc<Self>, mut slot: HeldSlot) -> Option<HeldSlot> {
        if slot.until > Instant::now() + self.shared.least_left || slot.renew().await {
            return Some(slot);
        }
        None
    }
}

/// Whether the database holds a [`HeldSlot`] for this process.
enum SlotState {
    /// It does not.
    Free,
    /// An ask is under way; its answer says.
    Asking(JoinHandle<Result<bool, DbError>>),
    /// It does.
    Taken,
    /// It may: an ask failed. Given back, never kept for another attempt.
    Unsure,
}

/// One of an endpoint's shared slots, put back in this process's pool when dropped.
pub struct HeldSlot {
    id: String,
    /// Until when the slot is this process's (by this process's clock, counted from before it
    /// asked).
    until: Instant,
    endpoint: Arc<EndpointSlots>,
    state: SlotState,
}

impl HeldSlot {
    /// Takes a slot this process holds and no attempt uses; answers whether there was one.
    fn take_idle(&mut self) -> bool {
        let shared = &self.endpoint.shared;
        match self.endpoint.pool.take_idle(self.endpoint.cap, shared.least_left) {
            Some((id, until)) => {
                (self.id, self.until, self.state) = (id, until, SlotState::Taken);
                true
            }
            None => false,
        }
    }

    /// Asks the database for a new slot once; answers whether it is taken.
    async fn ask(&mut self) -> bool {
        self.id = crate::ids::new_id("slot");
        self.ask_for_id().await
    }

    /// Asks the database to renew this slot for another lifetime; answers whether it did (if
    /// not, the slot is no longer this process's).
    async fn renew(&mut self) -> bool {
        self.ask_for_id().await
    }

    /// Asks the database for the slot `self.id` once; answers whether it is taken. The ask runs
    /// as a task of its own, so that a caller that stops waiting cannot leave the slot taken
    /// with nobody to give it back. After a failure, waits a while before answering.
    async fn ask_for_id(&mut self) -> bool {
        let endpoint = self.endpoint.clone();
        self.until = Instant::now() + endpoint.shared.lifetime;
        let id = self.id.clone();
        let ask = tokio::spawn(async move {
            let endpoint_id = &endpoint.pool.endpoint_id;
            endpoint.shared.take(endpoint_id, endpoint.cap, &id).await
        });
        self.state = SlotState::Asking(ask);
        let SlotState::Asking(ask) = &mut self.state else {
            return false;
        };
        let error = match ask.await {
            Ok(Ok(taken)) => {
                self.state = if taken { SlotState::Taken } else { SlotState::Free };
                return taken;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        // The ask may have taken the slot all the same: it is given back, here or by a drop.
        self.state = SlotState::Unsure;
        let endpoint_id = &self.endpoint.pool.endpoint_id;
        tracing::warn!(endpoint_id = %endpoint_id, error = %error, "could not take a slot of an endpoint's max_in_flight; trying again");
        tokio::time::sleep(AFTER_FAILURE).await;
        self.state = SlotState::Free;
        let (id, pool) = (std::mem::take(&mut self.id), self.endpoint.pool.clone());
        pool.give_back(vec![id], false);
        false
    }
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let pool = self.endpoint.pool.clone();
        let id = std::mem::take(&mut self.id);
        match std::mem::replace(&mut self.state, SlotState::Free) {
            SlotState::Free => {}
            SlotState::Taken => pool.put_back((id, self.until), self.endpoint.cap),
            SlotState::Unsure => pool.give_back(vec![id], true),
            SlotState::Asking(ask) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return; // the process is ending: the slot lapses with its lease
                };
                // The ask is waited for: a give-back sent before it would find nothing, and
                // the slot it then took would stay taken for a lease.
                runtime.spawn(async move {
                    if let Ok(Ok(false)) = ask.await {
                        return;
                    }
                    pool.give_back(vec![id], true);
                });
            }
        }
    }
}

/// Drops slots that lapsed (their holders died or lost the database). Nothing to do on SQLite.
pub async fn purge_lapsed_slots(db: &Database) -> Result<u64, sqlx::Error> {
    if db.dialect() != crate::db::Dialect::Postgres {
        return Ok(0);
    }
    db.execute(
        "DELETE FROM endpoint_slots \
         WHERE expires_at_us <= (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT",
        args![],
    )
    .await
}
