//! Integration tests: the real server over HTTP, on SQLite and on PostgreSQL.

mod harness;

mod cli;
mod foundation;
mod process;
