//! Integration tests: the real server over HTTP, on SQLite and on PostgreSQL.

mod harness;
mod mcp;

mod audit;
mod cli;
mod console;
mod delivery;
mod durability;
mod external;
mod foundation;
mod gateway;
mod process;
mod receiver;
mod replicas;
mod rules;
mod samples;
