//! Telling every replica what changed. Each process caches the configuration its hot paths read
//! (actions, endpoints, rules, custom event types, API keys, external issuers' JWKS documents). A change made through one replica
//! is published on PostgreSQL with `NOTIFY`, and every replica listening forgets what it had
//! cached, so the others see the change within milliseconds instead of at the end of the cache
//! time (`cache_ttl`, which stays as the backstop). The same connection hears replicas wanting
//! or giving back endpoints' slots (see [`crate::delivery::slots`]). SQLite has one server process: nothing to tell.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::AppState;
use crate::args;
use crate::db::{Database, Dialect};

/// The PostgreSQL channel the replicas talk on.
pub const CHANNEL: &str = "opsiq_changes";

/// A change to configuration some process may have cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A tenant's actions (declared, changed, deleted).
    Actions(String),
    /// One endpoint of a tenant (created, changed, disabled, deleted, secret rotated).
    Endpoint(String, String),
    /// A tenant's rules.
    Rules(String),
    /// A tenant's custom event types.
    EventTypes(String),
    /// API keys (a key was revoked).
    ApiKeys,
    /// A tenant's external token issuer (saved or removed): fetched JWKS documents go.
    TokenIssuer(String),
}

impl Change {
    /// The `NOTIFY` payload: `kind:tenant[:id]`.
    pub fn payload(&self) -> String {
        match self {
            Change::Actions(tenant) => format!("actions:{tenant}"),
            Change::Endpoint(tenant, id) => format!("endpoint:{tenant}:{id}"),
            Change::Rules(tenant) => format!("rules:{tenant}"),
            Change::EventTypes(tenant) => format!("event_types:{tenant}"),
            Change::ApiKeys => "api_keys".into(),
            Change::TokenIssuer(tenant) => format!("token_issuer:{tenant}"),
        }
    }

    /// Reads a payload back; `None` for one this version does not know.
    pub fn parse(payload: &str) -> Option<Change> {
        let mut parts = payload.splitn(3, ':');
        let kind = parts.next()?;
        let tenant = parts.next().map(str::to_string);
        let id = parts.next().map(str::to_string);
        match (kind, tenant, id) {
            ("actions", Some(t), None) => Some(Change::Actions(t)),
            ("endpoint", Some(t), Some(id)) => Some(Change::Endpoint(t, id)),
            ("rules", Some(t), None) => Some(Change::Rules(t)),
            ("event_types", Some(t), None) => Some(Change::EventTypes(t)),
            ("api_keys", None, None) => Some(Change::ApiKeys),
            ("token_issuer", Some(t), None) => Some(Change::TokenIssuer(t)),
            _ => None,
        }
    }
}

/// Tells the other replicas about a committed change. A failure is logged, not returned: the
/// change itself stands, and the others see it when their cache entries expire.
pub async fn publish(db: &Database, change: &Change) {
    if db.dialect() != Dialect::Postgres {
        return;
    }
    if let Err(e) = db
        .execute("SELECT pg_notify($1, $2)", args![CHANNEL, change.payload()])
        .await
    {
        metrics::counter!("opsiq_change_notify_failures_total").increment(1);
        tracing::warn!(error = %e, "could not tell other replicas about a change; they see it within the cache time");
    }
}

/// Like [`publish`], inside a transaction: PostgreSQL sends the notification when (and only if)
/// the transaction commits.
pub async fn publish_in(tx: &mut crate::db::Tx, change: &Change) -> Result<(), sqlx::Error> {
    if tx.dialect() == Dialect::Postgres {
        tx.execute("SELECT pg_notify($1, $2)", args![CHANNEL, change.payload()])
            .await?;
    }
    Ok(())
}

/// On PostgreSQL, listens for other replicas' changes until the task is aborted, forgetting
/// what they name. After the listening connection is lost (notifications may have been missed
/// meanwhile) every cache is dropped.
pub fn spawn_listener(state: AppState) -> Option<tokio::task::JoinHandle<()>> {
    if state.db.dialect() != Dialect::Postgres {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut pause = Duration::from_millis(100);
        loop {
            match listen(&state).await {
                Ok(()) => pause = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "listening for other replicas' changes failed; retrying");
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
            state.forget_everything();
            tokio::time::sleep(pause).await;
        }
    }))
}

/// One listening connection, until it fails.
async fn listen(state: &AppState) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect(&state.config.database_url).await?;
    listener
        .listen_all([CHANNEL, crate::delivery::slots::CHANNEL])
        .await?;
    // Anything changed before this connection listened may be cached already.
    state.forget_everything();
    loop {
        match listener.try_recv().await? {
            Some(slots) if slots.channel() == crate::delivery::slots::CHANNEL => {
                state.engine.heard_about_slots(slots.payload())
            }
            Some(notification) => match Change::parse(notification.payload()) {
                Some(change) => state.forget(&change),
                None => state.forget_everything(),
            },
            // The connection was lost; what was sent meanwhile is gone.
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Change;

    #[test]
    fn payloads_read_back() {
        for change in [
            Change::Actions("ten_1".into()),
            Change::Endpoint("ten_1".into(), "ep_2".into()),
            Change::Rules("ten_1".into()),
            Change::EventTypes("ten_1".into()),
            Change::ApiKeys,
            Change::TokenIssuer("ten_1".into()),
        ] {
            assert_eq!(Change::parse(&change.payload()), Some(change));
        }
        assert_eq!(Change::parse("actions"), None);
        assert_eq!(Change::parse("invented:ten_1"), None);
        assert_eq!(Change::parse("api_keys:extra"), None);
    }
}
