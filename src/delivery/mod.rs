//! Signed delivery: every event and action request reaches the customer's endpoint signed,
//! replay-protected and idempotency-keyed, retried for up to 24 hours, logged for inspection and
//! replay — and nothing the API accepted is ever lost.
//!
//! - [`endpoints`]: endpoints, subscriptions, secrets at rest, rotation.
//! - [`signing`] / [`verify`]: the two signature schemes, both directions.
//! - [`outbox`]: delivery rows, leases and claims.
//! - [`worker`]: the engine that sends attempts and records outcomes.
//! - [`outbound`]: the only HTTP client that talks to customers, with the SSRF guard.
//! - [`retry`]: what follows an attempt.
//! - [`slots`]: endpoints' `max_in_flight` held across replicas.
//! - [`retention`]: purging old records.

pub mod endpoints;
pub mod listen;
pub mod outbound;
pub mod outbox;
pub mod retention;
pub mod retry;
pub mod routes;
pub mod signing;
pub mod slots;
pub mod verify;
pub mod worker;

pub use routes::routes;
pub use worker::Engine;
