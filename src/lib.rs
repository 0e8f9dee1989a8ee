//! # OpsIQ
//!
//! A gateway between AI agents and a customer's systems: agents may run only the actions an admin
//! declared, with valid arguments, within their token's scopes and roles; every allowed call
//! becomes a signed, retried, logged webhook.
//!
//! # Layout
//! - [`config`]: layered configuration, validated once.
//! - [`db`]: the SQLite | PostgreSQL database, migrations, transactions and dialect-neutral query arguments.
//! - [`http`]: the error body, our extractors, admin-key authentication, pagination.
//! - [`tenants`]: tenants and admin API keys.
//! - [`registry`]: actions, versions, content hashes, declarative files.
//! - [`delivery`]: endpoints, signing, the outbox, the worker, outbound HTTP, retention.
//! - [`events`]: event ingestion and fan-out to subscribed endpoints.
//! - [`agents`]: agents, their tokens (JWT) and external issuers.
//! - [`policy`]: casbin role policy, deny wins, reloaded across replicas.
//! - [`gateway`]: invocation (scope → role → schema → idempotency → outbox), records, tool export.
//! - [`mcp`]: the MCP server (both protocol eras) on top of the gateway.
//! - [`rules`]: "when X happens, if …, do Y": conditions, templates, evaluation in the event's transaction.
//! - [`audit`]: the hash-chained log of admin changes and its verification.
//! - [`ops`]: health, readiness, metrics, the OpenAPI document.
//! - [`rate`]: token buckets, in memory or shared by replicas through PostgreSQL.
//! - [`crypto`], [`ids`], [`json`], [`telemetry`]: small shared plumbing.
//!
//! [`run`] starts everything on a given listener; the binary and the tests both call it.

// Denied rather than forbidden: `db::direct` owns SQLite's writer connection and calls SQLite's
// C API, and is the one module allowed to.
#![deny(unsafe_code)]

pub mod agents;
pub mod audit;
pub mod cache;
pub mod changes;
pub mod config;
pub mod console;
pub mod crypto;
pub mod db;
pub mod delivery;
pub mod events;
pub mod gateway;
pub mod glob;
pub mod http;
pub mod ids;
pub mod json;
pub mod mcp;
pub mod ops;
pub mod policy;
pub mod rate;
pub mod registry;
pub mod rules;
pub mod telemetry;
pub mod tenants;

pub mod app;

pub use app::{AppState, init, run};
pub use config::Config;
