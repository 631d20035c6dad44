//! The router's state and the parts handlers take of it (axum `FromRef`):
//! a handler names what it reads, not the whole server.

use super::ClientRates;
use super::auth::AdminAuth;
use crate::backpressure::Backpressure;
use crate::config::Runtime;
use crate::delivery::Delivery;
use crate::storage::Storage;
use axum::extract::FromRef;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Everything the routes share; handlers take one of the parts below.
///
/// One `Arc`: a request clones the state for several layers and extractors,
/// and each clone of a shared reference count is a cache line moved between
/// cores, so a clone is one atomic increment, not one per field. The
/// handlers' parts are built once, here, for the same reason.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    parts: AppParts,
    ingest: IngestState,
    admin: AdminState,
    widget: WidgetState,
}

/// What [`AppState`] holds.
pub struct AppParts {
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

impl AppState {
    pub fn new(p: AppParts) -> Self {
        let ingest = IngestState(Arc::new(IngestParts {
            storage: p.storage.clone(),
            runtime: p.runtime.clone(),
            backpressure: p.backpressure.clone(),
            client_rates: p.client_rates.clone(),
            shutting_down: p.shutting_down.clone(),
        }));
        let admin = AdminState(Arc::new(AdminParts {
            storage: p.storage.clone(),
            runtime: p.runtime.clone(),
            delivery: p.delivery.clone(),
        }));
        let widget = WidgetState(Arc::new(WidgetParts {
            admin: p.admin.clone(),
            runtime: p.runtime.clone(),
        }));
        AppState(Arc::new(Shared {
            parts: p,
            ingest,
            admin,
            widget,
        }))
    }
}

impl Deref for AppState {
    type Target = AppParts;
    fn deref(&self) -> &AppParts {
        &self.0.parts
    }
}

/// A part of the state, shared behind one `Arc` and read through `Deref`.
macro_rules! part {
    ($(#[$doc:meta])* $name:ident($parts:ident) { $($(#[$fdoc:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(Arc<$parts>);

        /// The fields of the part of the same name.
        pub struct $parts {
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl Deref for $name {
            type Target = $parts;
            fn deref(&self) -> &$parts {
                &self.0
            }
        }
    };
}

part! {
    /// What ingest reads and writes: write keys and limits (runtime), the
    /// per-client rates, the backlog bounds, storage, and whether shutdown began.
    /// `/readyz` reads the same.
    IngestState(IngestParts) {
        storage: Arc<dyn Storage>,
        runtime: Arc<Runtime>,
        backpressure: Arc<Backpressure>,
        client_rates: Arc<ClientRates>,
        shutting_down: Arc<AtomicBool>,
    }
}

part! {
    /// What the admin API reads: stored messages, the settings that give their
    /// Totango URLs, and delivery's counters. Its credential check takes
    /// `Arc<AdminAuth>` alone.
    AdminState(AdminParts) {
        storage: Arc<dyn Storage>,
        runtime: Arc<Runtime>,
        delivery: Arc<Delivery>,
    }
}

part! {
    /// What the insights widget reads: the operator's credential, and the
    /// runtime (widget secret, frame ancestors, the insights store).
    WidgetState(WidgetParts) {
        admin: Arc<AdminAuth>,
        runtime: Arc<Runtime>,
    }
}

impl FromRef<AppState> for IngestState {
    fn from_ref(s: &AppState) -> Self {
        s.0.ingest.clone()
    }
}

impl FromRef<AppState> for AdminState {
    fn from_ref(s: &AppState) -> Self {
        s.0.admin.clone()
    }
}

impl FromRef<AppState> for WidgetState {
    fn from_ref(s: &AppState) -> Self {
        s.0.widget.clone()
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
