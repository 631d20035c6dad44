//! What every handler shares.

use crate::config::Runtime;
use crate::delivery::Delivery;
use crate::storage::Storage;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Shared by every handler.
pub struct AppState {
    pub storage: Arc<dyn Storage>,
    pub delivery: Arc<Delivery>,
    pub runtime: Arc<Runtime>,
    pub shutting_down: AtomicBool,
    /// The operator's credential (admin API and page).
    pub admin: super::auth::AdminAuth,
    /// Set while the backlog or the disk is past its bound.
    pub backpressure: Arc<crate::backpressure::Backpressure>,
    /// Requests per minute per client address of the keys that have a limit.
    pub client_rates: super::ClientRates,
}
