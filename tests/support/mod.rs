//! The one test harness, shared by every test binary:
//!
//! - [`TestApp`]: the app started in this process, on port 0;
//! - [`binary`]: the real binary, one-shot or serving ([`binary::Served`]);
//! - [`totango::FakeTotango`]: a fake Totango that records every request;
//! - [`wait::until`]: the one wait-until helper;
//! - [`place`]: storage for a test on SQLite or (`TEST_BACKEND=postgres`)
//!   PostgreSQL, [`pg`] for databases of its own, [`backends`] for the
//!   storage suites that run on both.
#![allow(dead_code)]

pub mod app;
pub mod backends;
pub mod binary;
pub mod pg;
pub mod place;
pub mod totango;
pub mod wait;

// Not every binary uses every part.
#[allow(unused_imports)]
pub use app::TestApp;
#[allow(unused_imports)]
pub use place::{TestPlace, config, place};

use totango_destination::storage::{MessageFilter, State, Storage};

/// The states of the stored messages whose `messageId` is `id`.
pub async fn state_of(s: &dyn Storage, id: &str) -> Vec<State> {
    s.list(
        MessageFilter {
            message_id: Some(id.to_owned()),
            ..Default::default()
        },
        10,
    )
    .await
    .unwrap()
    .into_iter()
    .map(|m| m.state)
    .collect()
}
