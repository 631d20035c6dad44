//! The admin API's privacy controls: erase a user, suppressions, and the
//! audit trail of operator actions (docs/privacy.md). Every change made
//! here or elsewhere in the admin API is kept in the audit trail, which
//! this API can list but never change.

use super::{query, storage_error};
use crate::storage::Erase;
use crate::web::{Actor, AdminState, ApiError};
use axum::extract::{Path, Query, State as Extract};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EraseQuery {
    suppress: Option<bool>,
}

/// `DELETE /api/users/{userId}`: erases what is stored about the user
/// (as a Segment `delete` does); `?suppress=true` also suppresses it.
pub async fn erase_user(
    Extract(state): Extract<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(user_id): Path<String>,
    q: Result<Query<EraseQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({"erased": erased, "suppressed": suppress})))
}

/// `GET /api/suppressions`.
pub async fn list_suppressions(
    Extract(state): Extract<AdminState>,
) -> Result<Json<Value>, ApiError> {
    let list = state.storage.suppressions().await.map_err(storage_error)?;
    Ok(Json(json!({"suppressions": list})))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuppressBody {
    user_id: String,
    reason: Option<String>,
}

/// `POST /api/suppressions` with `{"userId": …}`: `201` when new, `200`
/// when the user already was suppressed.
pub async fn suppress(
    Extract(state): Extract<AdminState>,
    Extension(actor): Extension<Actor>,
    body: Result<Json<SuppressBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    Ok((status, Json(json!({"userId": user_id, "suppressed": true}))))
}

/// `DELETE /api/suppressions/{userId}`: `404` when there was none.
pub async fn lift(
    Extract(state): Extract<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({"userId": user_id, "suppressed": false})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    before: Option<i64>,
    limit: Option<usize>,
}

/// `GET /api/audit`: newest first; `next` pages on (`?before=`).
pub async fn audit(
    Extract(state): Extract<AdminState>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({"entries": entries, "next": next})))
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
