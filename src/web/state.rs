//! The router's state and the parts handlers take of it (axum `FromRef`):
//! a handler names what it reads, not the whole server.

use super::ClientRates;
use super::auth::AdminAuth;
use crate::backpressure::Backpressure;
use crate::config::Runtime;
use crate::delivery::Delivery;
use crate::storage::Storage;
use axum::extract::FromRef;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Everything the routes share; handlers take one of the parts below.
#[derive(Clone)]
pub struct AppState {
    pub storage: Arc<dyn Storage>,
    pub delivery: Arc<Delivery>,
    pub runtime: Arc<Runtime>,
    /// Set once shutdown begins: ingest and `/readyz` answer 503.
    pub shutting_down: Arc<AtomicBool>,
    /// The operator's credential (admin API and page, widget).
    pub admin: Arc<AdminAuth>,
    /// Set while the backlog or the disk is past its bound.
    pub backpressure: Arc<Backpressure>,
    /// Requests per minute per client address of the keys that have a limit.
    pub client_rates: Arc<ClientRates>,
}

/// What ingest reads and writes: write keys and limits (runtime), the
/// per-client rates, the backlog bounds, storage, and whether shutdown began.
/// `/readyz` reads the same.
#[derive(Clone)]
pub struct IngestState {
    pub storage: Arc<dyn Storage>,
    pub runtime: Arc<Runtime>,
    pub backpressure: Arc<Backpressure>,
    pub client_rates: Arc<ClientRates>,
    pub shutting_down: Arc<AtomicBool>,
}

/// What the admin API reads: stored messages, the settings that give their
/// Totango URLs, and delivery's counters. Its credential check takes
/// `Arc<AdminAuth>` alone.
#[derive(Clone)]
pub struct AdminState {
    pub storage: Arc<dyn Storage>,
    pub runtime: Arc<Runtime>,
    pub delivery: Arc<Delivery>,
}

/// What the insights widget reads: the operator's credential, and the
/// runtime (widget secret, frame ancestors, the insights store).
#[derive(Clone)]
pub struct WidgetState {
    pub admin: Arc<AdminAuth>,
    pub runtime: Arc<Runtime>,
}

impl FromRef<AppState> for IngestState {
    fn from_ref(s: &AppState) -> Self {
        IngestState {
            storage: s.storage.clone(),
            runtime: s.runtime.clone(),
            backpressure: s.backpressure.clone(),
            client_rates: s.client_rates.clone(),
            shutting_down: s.shutting_down.clone(),
        }
    }
}

impl FromRef<AppState> for AdminState {
    fn from_ref(s: &AppState) -> Self {
        AdminState {
            storage: s.storage.clone(),
            runtime: s.runtime.clone(),
            delivery: s.delivery.clone(),
        }
    }
}

impl FromRef<AppState> for WidgetState {
    fn from_ref(s: &AppState) -> Self {
        WidgetState {
            admin: s.admin.clone(),
            runtime: s.runtime.clone(),
        }
    }
}

impl FromRef<AppState> for Arc<AdminAuth> {
    fn from_ref(s: &AppState) -> Self {
        s.admin.clone()
    }
}

impl FromRef<AppState> for Arc<Runtime> {
    fn from_ref(s: &AppState) -> Self {
        s.runtime.clone()
    }
}

impl FromRef<AppState> for Arc<dyn Storage> {
    fn from_ref(s: &AppState) -> Self {
        s.storage.clone()
    }
}
