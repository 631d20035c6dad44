//! Tests of the library without a server: the module layering, the mapping
//! and the storage backends (SQLite; PostgreSQL when `TEST_DATABASE_URL` is
//! set), with the queue's model test.

#[path = "../support/mod.rs"]
mod support;

mod architecture;
mod mapping_never_panics;
mod privacy;
mod queue_model;
mod storage;
