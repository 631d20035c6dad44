//! The operator's page per account (`/accounts/{id}`) and per user
//! (`/users/{id}`), and their JSON (`/api/accounts/{id}`, `/api/users/{id}`):
//! what the entity sent, the last value of each attribute sent to Totango,
//! activities per day and failures. Read only.

use super::storage_error;
use super::views::{ActivityView, DayCount, EntityView, FailuresView, MessageSummary};
use crate::storage::{
    EntityKind, MessageFilter, State, Storage, StoredMessage, day_of, now_millis,
};
use crate::web::answers::ErrorBody;
use crate::web::auth::AdminAuth;
use crate::web::{AdminState, ApiError};
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State as Extract};
use axum::response::Response;
use std::sync::Arc;

const PAGE: &str = include_str!("entity.html");
pub(super) const SCRIPT: &str = include_str!("entity.js");
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 200;
const DEFAULT_DAYS: i64 = 30;
/// At most the days storage keeps.
const MAX_DAYS: i64 = crate::storage::ACTIVITY_DAYS_KEPT;
/// Dead and failing messages shown, each.
const FAILURES: usize = 20;
/// Pending messages looked at for failed attempts.
const PENDING_SCAN: usize = 200;

/// `GET /accounts/{id}`, `GET /users/{id}`: the page (its data comes from
/// the JSON API), for a signed-in operator only; otherwise the sign-in form.
pub async fn page(Extract(admin): Extract<Arc<AdminAuth>>, req: Request) -> Response {
    super::signed_in_page(&admin, req.headers(), super::peer(&req), PAGE).await
}

/// One account (Segment `groupId`): what it sent, its attributes, activity
/// and failures.
#[utoipa::path(get, path = "/api/accounts/{id}", tag = "messages",
    params(("id" = String, Path, description = "The account id"), EntityQuery),
    responses((status = 200, body = EntityView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn account(
    Extract(state): Extract<AdminState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<EntityView>, ApiError> {
    entity(&state, EntityKind::Account, id, q).await
}

/// One user (Segment `userId`): what it sent, its attributes, activity and
/// failures.
#[utoipa::path(get, path = "/api/users/{userId}", tag = "messages",
    params(("userId" = String, Path, description = "The user id"), EntityQuery),
    responses((status = 200, body = EntityView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn user(
    Extract(state): Extract<AdminState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<EntityView>, ApiError> {
    entity(&state, EntityKind::User, id, q).await
}

/// The query of an entity's JSON, as the OpenAPI document describes it
/// (read by [`params`], which names a bad one).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EntityQuery {
    /// A message number: the `next` of the previous page.
    #[param(minimum = 1)]
    before: Option<i64>,
    /// Messages per page.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<usize>,
    /// Days of activity.
    #[param(minimum = 1, maximum = 90)]
    days: Option<i64>,
}

/// The query of an entity's JSON: `before` (a message number: the next page
/// of messages), `limit` (messages, 1–200), `days` (of activity, 1–90).
struct Params {
    before: Option<i64>,
    limit: usize,
    days: i64,
}

fn params(q: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Params, ApiError> {
    let Query(pairs) = q.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let mut p = Params {
        before: None,
        limit: DEFAULT_LIMIT,
        days: DEFAULT_DAYS,
    };
    for (name, value) in pairs {
        let number = |max: i64| {
            value
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        &name,
                        format!("{value:?} is not a number from 1 to {max}"),
                    )
                })
        };
        match name.as_str() {
            "before" => p.before = Some(number(i64::MAX)?),
            "limit" => p.limit = number(MAX_LIMIT as i64)? as usize,
            "days" => p.days = number(MAX_DAYS)?,
            _ => {
                return Err(ApiError::bad_request(
                    &name,
                    "unknown parameter; expected before, limit or days",
                ));
            }
        }
    }
    Ok(p)
}

async fn entity(
    state: &AdminState,
    kind: EntityKind,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<EntityView>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request("id", e.body_text()))?;
    if id.is_empty() {
        return Err(ApiError::bad_request("id", "empty"));
    }
    let p = params(q)?;
    let storage: &dyn Storage = state.storage.as_ref();
    let filter = |state: Option<State>, before: Option<i64>| {
        let mut f = MessageFilter {
            state,
            before,
            ..Default::default()
        };
        match kind {
            EntityKind::Account => f.account_id = Some(id.clone()),
            EntityKind::User => f.user_id = Some(id.clone()),
        }
        f
    };
    let mut messages = storage
        .list(filter(None, p.before), p.limit + 1)
        .await
        .map_err(storage_error)?;
    let next = (messages.len() > p.limit).then(|| {
        messages.truncate(p.limit);
        messages.last().map(|m| m.id)
    });
    let attributes = storage
        .entity_attributes(kind, &id)
        .await
        .map_err(storage_error)?;
    let today = day_of(now_millis());
    let from = today - p.days + 1;
    let counted = storage
        .entity_activity(kind, &id, from)
        .await
        .map_err(storage_error)?;
    let per_day: Vec<DayCount> = (from..=today)
        .map(|day| DayCount {
            day: date(day),
            activities: counted
                .iter()
                .find(|c| c.day == day)
                .map_or(0, |c| c.activities),
        })
        .collect();
    let dead = storage
        .list(filter(Some(State::Dead), None), FAILURES)
        .await
        .map_err(storage_error)?;
    let failing: Vec<StoredMessage> = storage
        .list(filter(Some(State::Pending), None), PENDING_SCAN)
        .await
        .map_err(storage_error)?
        .into_iter()
        .filter(|m| m.attempts > 0)
        .take(FAILURES)
        .collect();
    let found =
        !messages.is_empty() || p.before.is_some() || !attributes.is_empty() || !counted.is_empty();
    let summaries = |list: Vec<StoredMessage>| -> Vec<MessageSummary> {
        list.into_iter().map(MessageSummary::from).collect()
    };
    Ok(Json(EntityView {
        kind,
        id,
        found,
        messages: summaries(messages),
        next: next.flatten(),
        attributes,
        activity: ActivityView {
            days: p.days,
            total: counted.iter().map(|c| c.activities).sum::<u64>(),
            per_day,
        },
        failures: FailuresView {
            dead: summaries(dead),
            failing: summaries(failing),
        },
    }))
}

/// `YYYY-MM-DD` of a UTC day number.
fn date(day: i64) -> String {
    chrono::DateTime::from_timestamp(day.saturating_mul(86_400), 0)
        .map(|t| t.date_naive().to_string())
        .unwrap_or_default()
}
