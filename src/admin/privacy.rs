//! The admin API's privacy controls: erase a user, suppressions, and the
//! audit trail of operator actions (docs/privacy.md). Every change made
//! here or elsewhere in the admin API is kept in the audit trail, which
//! this API can list but never change.

use super::views::{AuditPage, ErasedUser, SuppressionList, SuppressionState};
use super::{query, storage_error};
use crate::storage::Erase;
use crate::web::answers::ErrorBody;
use crate::web::{Actor, AdminState, ApiError};
use axum::extract::{Path, Query, State as Extract};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EraseQuery {
    /// Also suppress the user: later messages are recorded, never sent.
    suppress: Option<bool>,
}

#[utoipa::path(delete, path = "/api/users/{userId}", tag = "privacy",
    params(("userId" = String, Path, description = "The Segment userId"), EraseQuery),
    responses((status = 200, body = ErasedUser), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
/// `DELETE /api/users/{userId}`: erases what is stored about the user
/// (as a Segment `delete` does); `?suppress=true` also suppresses it.
pub async fn erase_user(
    Extract(state): Extract<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(user_id): Path<String>,
    q: Result<Query<EraseQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ErasedUser>, ApiError> {
    let suppress = query(q)?.suppress.unwrap_or(false);
    let user_id = non_empty(user_id)?;
    let erased = state
        .storage
        .erase_user(Erase {
            user_id: user_id.clone(),
            suppress,
            reason: format!("admin API, {}", actor.who),
        })
        .await
        .map_err(storage_error)?;
    metrics::counter!(crate::telemetry::ERASURES).increment(1);
    // The audit trail names no user it erased: a digest only.
    let user_key = hex::encode(crate::secret::digest(user_id.as_bytes()));
    actor
        .record(
            &*state.storage,
            "erase",
            json!({"userKey": user_key, "suppress": suppress}),
            Some(erased.messages),
        )
        .await;
    Ok(Json(ErasedUser {
        erased,
        suppressed: suppress,
    }))
}

/// `GET /api/suppressions`.
#[utoipa::path(get, path = "/api/suppressions", tag = "privacy",
    responses((status = 200, body = SuppressionList), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn list_suppressions(
    Extract(state): Extract<AdminState>,
) -> Result<Json<SuppressionList>, ApiError> {
    let suppressions = state.storage.suppressions().await.map_err(storage_error)?;
    Ok(Json(SuppressionList { suppressions }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuppressBody {
    user_id: String,
    reason: Option<String>,
}

#[utoipa::path(post, path = "/api/suppressions", tag = "privacy", request_body = SuppressBody,
    responses((status = 201, description = "suppressed now", body = SuppressionState),
        (status = 200, description = "already suppressed", body = SuppressionState),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
/// `POST /api/suppressions` with `{"userId": …}`: `201` when new, `200`
/// when the user already was suppressed.
pub async fn suppress(
    Extract(state): Extract<AdminState>,
    Extension(actor): Extension<Actor>,
    body: Result<Json<SuppressBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<SuppressionState>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request("body", e.body_text()))?;
    let user_id = non_empty(body.user_id)?;
    let reason = body
        .reason
        .unwrap_or_else(|| format!("admin API, {}", actor.who));
    let added = state
        .storage
        .suppress(&user_id, &reason)
        .await
        .map_err(storage_error)?;
    actor
        .record(
            &*state.storage,
            "suppress",
            json!({"userId": user_id}),
            None,
        )
        .await;
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(SuppressionState {
            user_id,
            suppressed: true,
        }),
    ))
}

/// `DELETE /api/suppressions/{userId}`: `404` when there was none.
#[utoipa::path(delete, path = "/api/suppressions/{userId}", tag = "privacy",
    params(("userId" = String, Path, description = "The Segment userId")),
    responses((status = 200, body = SuppressionState), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn lift(
    Extract(state): Extract<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(user_id): Path<String>,
) -> Result<Json<SuppressionState>, ApiError> {
    let lifted = state
        .storage
        .lift_suppression(&user_id)
        .await
        .map_err(storage_error)?;
    if !lifted {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("userId {user_id:?} is not suppressed"),
        ));
    }
    actor
        .record(
            &*state.storage,
            "unsuppress",
            json!({"userId": user_id}),
            None,
        )
        .await;
    Ok(Json(SuppressionState {
        user_id,
        suppressed: false,
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The `next` of the previous page.
    before: Option<i64>,
    /// Entries per page (1 to 500; 50 by default).
    limit: Option<usize>,
}

/// `GET /api/audit`: newest first; `next` pages on (`?before=`).
#[utoipa::path(get, path = "/api/audit", tag = "privacy", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn audit(
    Extract(state): Extract<AdminState>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let entries = state
        .storage
        .audit_log(q.before, limit)
        .await
        .map_err(storage_error)?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage { entries, next }))
}

fn non_empty(user_id: String) -> Result<String, ApiError> {
    if user_id.is_empty() || user_id.len() > crate::segment::MAX_ID_BYTES {
        return Err(ApiError::bad_request(
            "userId",
            format!(
                "expected a user id of 1 to {} bytes",
                crate::segment::MAX_ID_BYTES
            ),
        ));
    }
    Ok(user_id)
}
