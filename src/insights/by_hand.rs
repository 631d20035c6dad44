//! Runs started by hand through the admin API: `POST /api/insights/runs`.
//! (Dry runs keep nothing, so they are the command line's: `insights sync
//! --dry-run` prints what a run would write.) Behind the operator's credential and kept
//! in the audit trail; the run itself goes on in the background and its
//! summary joins `GET /api/insights/runs` when it ends.

use super::{run_lock, sync, sync_and_store};
use crate::web::answers::ErrorBody;
use crate::web::{Actor, AdminState, ApiError, AppState};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;

/// Routes that need the operator's credential (the admin API's check).
pub fn operator_routes() -> Router<AppState> {
    Router::new().route("/api/insights/runs", post(start))
}

/// A run started.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Started {
    pub started: bool,
}

/// No parameters: any is refused by name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartQuery {}

/// `POST /api/insights/runs`: a sync starts now, in the background.
#[utoipa::path(post, path = "/api/insights/runs", tag = "insights",
    responses((status = 202, body = Started), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn start(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    q: Result<Query<StartQuery>, QueryRejection>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    q.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    crate::config::insights::ready_to_sync(&state.runtime.config).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            "insights_not_configured",
            e.to_string(),
        )
    })?;
    let guard = run_lock(&state.runtime).try_lock_owned().map_err(|_| {
        ApiError::new(
            StatusCode::CONFLICT,
            "sync_running",
            "an insights sync is already running; its summary joins /api/insights/runs when it ends",
        )
    })?;
    actor
        .record(&*state.storage, "insights_run", json!({}), None)
        .await;
    let runtime = state.runtime.clone();
    tokio::spawn(async move {
        let _guard = guard;
        match sync_and_store(&runtime, false, &sync::NoProgress).await {
            Ok(o) => tracing::info!(
                status = ?o.summary.status,
                accounts_read = o.summary.accounts_read,
                records_updated = o.summary.records_updated,
                "insights sync started by hand finished"
            ),
            Err(e) => {
                tracing::error!(error = %e, "insights sync started by hand could not be stored")
            }
        }
    });
    Ok((StatusCode::ACCEPTED, Json(Started { started: true })))
}
