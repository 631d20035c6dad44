//! The HTTP layer every handler stands on: the state they share and the part
//! of it each takes, one error shape for every answer, and the guards
//! (operator credential and sessions, cross-site refusal, per-client rates).
//! Handlers live above it, in `ingest`, `admin` and `insights`.

pub mod answers;
mod audit;
pub mod auth;
mod error;
mod rates;
pub mod sessions;
mod state;
pub mod throttle;

pub use audit::Actor;
pub use error::ApiError;
pub use rates::ClientRates;
pub use state::{AdminState, AppParts, AppState, IngestState, WidgetState};
