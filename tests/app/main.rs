//! The app from the outside: over HTTP, in this process ([`support::TestApp`])
//! or as the real binary ([`support::binary`]), against a fake Totango.
//! `TEST_BACKEND=postgres` runs `server`, `delivery`, `hostile`,
//! `transport` and `privacy` on PostgreSQL (see .ci/run).

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod browser;
mod cli;
mod delivery;
mod entity;
mod history;
mod hostile;
mod insights;
mod limits;
mod openapi;
mod privacy;
mod privacy_rules;
mod replicas;
mod segment_clients;
mod server;
mod transport;
