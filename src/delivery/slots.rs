//! Endpoints' `max_in_flight` held across replicas. Each process caps its own attempts to an
//! endpoint with a semaphore; on PostgreSQL, where several replicas send to one endpoint, an
//! attempt also holds one of the endpoint's slots in `endpoint_slots` (taken by the database
//! function `opsiq_take_slot`) from just before it is sent until it ends, so the cap holds for
//! all of them together. A slot given back is announced on [`CHANNEL`], which wakes every
//! replica's waiters for that endpoint alike; a slot also lapses on its own after a lease, so one
//! held by a replica that died is free again then. SQLite has one server process: its semaphore
//! is the whole cap.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

use crate::args;
use crate::db::{Database, DbError};

/// The PostgreSQL channel on which a given-back slot's endpoint id is announced.
pub const CHANNEL: &str = "opsiq_endpoint_slots";

/// The first pause before asking again for a full endpoint's slot, should no announcement
/// come; it doubles up to [`LONGEST_PAUSE`] while the endpoint stays full.
const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// The longest pause between two asks for a full endpoint's slot.
const LONGEST_PAUSE: Duration = Duration::from_millis(200);

/// How long to wait after the database could not be asked.
const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The slots of every capped endpoint, kept in the database (PostgreSQL's `endpoint_slots`).
pub struct SharedSlots {
    db: Database,
    /// This process, as the holder of the slots it takes.
    holder: String,
    /// By endpoint id: what wakes this process's waiters when one of its slots is given back.
    given_back: std::sync::Mutex<HashMap<String, Weak<Notify>>>,
}

impl SharedSlots {
    /// Slots kept in `db`, which must be PostgreSQL, taken as `holder` (this process's id).
    pub fn new(db: Database, holder: String) -> Self {
        Self {
            db,
            holder,
            given_back: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The waiters' alarm for `endpoint_id`, shared by every [`EndpointSlots`] of it (its limits
    /// may be read again while slots taken under the old ones are out).
    fn alarm(&self, endpoint_id: &str) -> Arc<Notify> {
        let mut alarms = self.given_back.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(alarm) = alarms.get(endpoint_id).and_then(Weak::upgrade) {
            return alarm;
        }
        alarms.retain(|_, alarm| alarm.strong_count() > 0);
        let alarm = Arc::new(Notify::new());
        alarms.insert(endpoint_id.to_string(), Arc::downgrade(&alarm));
        alarm
    }

    /// Wakes this process's next waiter for `endpoint_id`: a replica gave one of its slots back.
    pub fn slot_given_back(&self, endpoint_id: &str) {
        let alarms = self.given_back.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(alarm) = alarms.get(endpoint_id).and_then(Weak::upgrade) {
            alarm.notify_one();
        }
    }

    /// One round trip: takes (or renews) slot `slot` of `endpoint` for `lifetime` if fewer than
    /// `cap` others are held; answers whether it did.
    async fn take(&self, endpoint: &str, cap: i64, slot: &str, lifetime: Duration) -> Result<bool, DbError> {
        let lifetime_ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 1000);
        let taken: Option<(bool,)> = self
            .db
            .fetch_optional(
                "SELECT opsiq_take_slot($1, $2, $3, $4, $5)",
                args![endpoint, cap, slot, &self.holder, lifetime_ms],
            )
            .await?;
        Ok(taken.is_some_and(|(taken,)| taken))
    }

    /// Gives slot `slot` back and announces it to every replica.
    async fn give_back(&self, slot: &str) -> Result<u64, sqlx::Error> {
        self.db
            .execute(
                "WITH gone AS (DELETE FROM endpoint_slots WHERE slot_id = $1 RETURNING endpoint_id) \
                 SELECT pg_notify($2, endpoint_id) FROM gone",
                args![slot, CHANNEL],
            )
            .await
    }

    /// Gives back every slot this process still holds (at shutdown, once its attempts ended).
    pub async fn give_back_all(&self) {
        let gone = self
            .db
            .execute(
                "WITH gone AS (DELETE FROM endpoint_slots WHERE holder = $1 RETURNING endpoint_id) \
                 SELECT pg_notify($2, endpoint_id) FROM gone",
                args![&self.holder, CHANNEL],
            )
            .await;
        if let Err(e) = gone {
            tracing::warn!(error = %e, "could not give back this process's endpoint slots; they lapse with their lease");
        }
    }
}

/// One endpoint's shared slots, as this process waits for them.
pub struct EndpointSlots {
    endpoint_id: String,
    cap: i64,
    shared: Arc<SharedSlots>,
    /// Held by the waiter asking the database again after a refusal; the others of this
    /// process queue behind it, so a full endpoint costs one ask per announcement or pause,
    /// not one per waiting attempt.
    asking: Mutex<()>,
    /// Woken when any replica gives one of the endpoint's slots back.
    given_back: Arc<Notify>,
}

impl std::fmt::Debug for EndpointSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSlots")
            .field("endpoint_id", &self.endpoint_id)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl EndpointSlots {
    /// The slots of `endpoint_id`, at most `cap` held by all replicas together.
    pub fn new(endpoint_id: &str, cap: i64, shared: Arc<SharedSlots>) -> Self {
        Self {
            endpoint_id: endpoint_id.to_string(),
            cap,
            given_back: shared.alarm(endpoint_id),
            shared,
            asking: Mutex::new(()),
        }
    }

    /// Waits until one of the endpoint's slots is free and takes it for at most `lifetime`.
    /// When the database cannot be asked, waits and asks again: a cap must not be exceeded
    /// because the database is slow. Dropped while it waits, it gives back what its last ask
    /// may have taken, once that ask's answer is in.
    pub async fn acquire(self: &Arc<Self>, lifetime: Duration) -> HeldSlot {
        let mut slot = HeldSlot {
            id: crate::ids::new_id("slot"),
            endpoint: self.clone(),
            state: SlotState::Free,
        };
        // A free endpoint is taken at once; the queue is only for a full one.
        if slot.ask(lifetime).await {
            return slot;
        }
        let _asking = self.asking.lock().await;
        let mut pause = FIRST_PAUSE;
        loop {
            if slot.ask(lifetime).await {
                return slot;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.given_back.notified() => {}
            }
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }
}

/// Whether the database holds a [`HeldSlot`].
enum SlotState {
    /// It does not.
    Free,
    /// An ask is under way; its answer says.
    Asking(JoinHandle<Result<bool, DbError>>),
    /// It does.
    Taken,
}

/// One of an endpoint's shared slots, given back when dropped.
pub struct HeldSlot {
    id: String,
    endpoint: Arc<EndpointSlots>,
    state: SlotState,
}

impl HeldSlot {
    /// Asks the database for this slot once; answers whether it is taken. The ask runs as a
    /// task of its own, so that a caller that stops waiting cannot leave the slot taken with
    /// nobody to give it back. After a failure, waits a while before answering.
    async fn ask(&mut self, lifetime: Duration) -> bool {
        let endpoint = self.endpoint.clone();
        let id = self.id.clone();
        let ask = tokio::spawn(async move {
            endpoint
                .shared
                .take(&endpoint.endpoint_id, endpoint.cap, &id, lifetime)
                .await
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
        // The ask may have taken the slot all the same: a drop gives it back.
        self.state = SlotState::Taken;
        tracing::warn!(endpoint_id = %self.endpoint.endpoint_id, error = %error, "could not take a slot of an endpoint's max_in_flight; trying again");
        tokio::time::sleep(AFTER_FAILURE).await;
        false
    }
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let ask = match std::mem::replace(&mut self.state, SlotState::Free) {
            SlotState::Free => return,
            SlotState::Asking(ask) => Some(ask),
            SlotState::Taken => None,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the process is ending: the slot lapses with its lease
        };
        let (id, endpoint) = (std::mem::take(&mut self.id), self.endpoint.clone());
        runtime.spawn(async move {
            // An ask still under way is waited for: a give-back sent before it would find
            // nothing, and the slot it then took would stay taken for a lease.
            if let Some(ask) = ask
                && let Ok(Ok(false)) = ask.await
            {
                return;
            }
            if let Err(e) = endpoint.shared.give_back(&id).await {
                tracing::warn!(endpoint_id = %endpoint.endpoint_id, error = %e, "could not give back a slot of an endpoint's max_in_flight; it lapses with its lease");
            }
        });
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
