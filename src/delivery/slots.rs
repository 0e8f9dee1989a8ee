//! Endpoints' `max_in_flight` held across replicas. Each process caps its own attempts to an
//! endpoint with a semaphore; on PostgreSQL, where several replicas send to one endpoint, an
//! attempt also holds one of the endpoint's slots in `endpoint_slots` (taken by the database
//! function `opsiq_take_slot`), so the cap holds for all of them together. A slot is given back
//! when its attempt ends, and lapses on its own after a lease, so one held by a replica that died
//! is free again then. SQLite has one server process: its semaphore is the whole cap.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};

use crate::args;
use crate::db::{Database, DbError};

/// The first pause before asking again for a slot another replica holds; it doubles up to
/// [`LONGEST_PAUSE`] while the endpoint stays full. A slot this process gives back wakes its
/// own waiter at once.
const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// The longest pause between two asks for a full endpoint's slot.
const LONGEST_PAUSE: Duration = Duration::from_millis(200);

/// How long to wait after the database could not be asked.
const AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The slots of every capped endpoint, kept in the database (PostgreSQL's `endpoint_slots`).
pub struct SharedSlots {
    db: Database,
}

impl SharedSlots {
    /// Slots kept in `db`, which must be PostgreSQL.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// One round trip: takes (or renews) slot `slot` of `endpoint` for `lifetime` if fewer than
    /// `cap` others are held; answers whether it did.
    async fn take(&self, endpoint: &str, cap: i64, slot: &str, lifetime: Duration) -> Result<bool, DbError> {
        let lifetime_ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 1000);
        let taken: Option<(bool,)> = self
            .db
            .fetch_optional(
                "SELECT opsiq_take_slot($1, $2, $3, $4)",
                args![endpoint, cap, slot, lifetime_ms],
            )
            .await?;
        Ok(taken.is_some_and(|(taken,)| taken))
    }

    /// Gives slot `slot` back.
    async fn give_back(&self, slot: &str) -> Result<u64, sqlx::Error> {
        self.db
            .execute("DELETE FROM endpoint_slots WHERE slot_id = $1", args![slot])
            .await
    }
}

/// One endpoint's shared slots, as this process waits for them.
pub struct EndpointSlots {
    endpoint_id: String,
    cap: i64,
    shared: Arc<SharedSlots>,
    /// Held by the waiter asking the database; the others of this process queue behind it, so
    /// a full endpoint costs one ask per pause, not one per waiting attempt.
    asking: Mutex<()>,
    /// Told when this process gives one of the endpoint's slots back.
    given_back: Notify,
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
            shared,
            asking: Mutex::new(()),
            given_back: Notify::new(),
        }
    }

    /// Waits until one of the endpoint's slots is free and takes it for at most `lifetime`.
    /// When the database cannot be asked, waits and asks again: a cap must not be exceeded
    /// because the database is slow. Dropped while it waits, it gives back what it may have
    /// taken.
    pub async fn acquire(self: &Arc<Self>, lifetime: Duration) -> HeldSlot {
        let _asking = self.asking.lock().await;
        let mut slot = HeldSlot {
            id: crate::ids::new_id("slot"),
            endpoint: self.clone(),
            maybe_taken: false,
        };
        let mut pause = FIRST_PAUSE;
        loop {
            // Until the answer is read, the slot may be the database's: a drop gives it back.
            slot.maybe_taken = true;
            match self
                .shared
                .take(&self.endpoint_id, self.cap, &slot.id, lifetime)
                .await
            {
                Ok(true) => return slot,
                Ok(false) => {
                    slot.maybe_taken = false;
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.given_back.notified() => {}
                    }
                    pause = (pause * 2).min(LONGEST_PAUSE);
                }
                Err(e) => {
                    tracing::warn!(endpoint_id = %self.endpoint_id, error = %e, "could not take a slot of an endpoint's max_in_flight; trying again");
                    tokio::time::sleep(AFTER_FAILURE).await;
                }
            }
        }
    }
}

/// One of an endpoint's shared slots, given back when dropped.
pub struct HeldSlot {
    id: String,
    endpoint: Arc<EndpointSlots>,
    /// Whether the database may hold this slot (taken, or asked for with no answer read).
    maybe_taken: bool,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        if !self.maybe_taken {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the process is ending: the slot lapses with its lease
        };
        let (id, endpoint) = (std::mem::take(&mut self.id), self.endpoint.clone());
        runtime.spawn(async move {
            if let Err(e) = endpoint.shared.give_back(&id).await {
                tracing::warn!(endpoint_id = %endpoint.endpoint_id, error = %e, "could not give back a slot of an endpoint's max_in_flight; it lapses with its lease");
            }
            endpoint.given_back.notify_one();
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
