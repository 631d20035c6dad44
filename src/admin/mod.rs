//! The operator's view: a page at `GET /` and a JSON API under `/api/`
//! (http-api.md "Operations"). Reads storage and queues replays; it never
//! talks to Totango itself.
//!
//! Auth: `Authorization: Bearer <admin.token>` when a token is configured;
//! without one, only clients on a loopback address are served.

use crate::ingest::{ApiError, AppState};
use crate::storage::{MessageFilter, State, StoredMessage, now_millis};
use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State as Extract};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;

const PAGE: &str = include_str!("page.html");
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let api = Router::new()
        .route("/api/messages", get(list))
        .route("/api/messages/{id}", get(one))
        .route("/api/messages/{id}/replay", post(replay_one))
        .route("/api/replay", post(replay_matching))
        .route("/api/stats", get(stats))
        .route_layer(middleware::from_fn_with_state(state, authorize));
    Router::new().route("/", get(page)).merge(api)
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
            ),
        ],
        Html(PAGE),
    )
}

async fn authorize(
    Extract(state): Extract<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match state.runtime.config.admin.token.as_deref() {
        Some(token) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                return Err(ApiError::unauthorized(
                    "Authorization: expected Bearer <admin token>",
                ));
            }
        }
        None => {
            if let Some(why) = not_local(&req) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "admin API without admin.token (TD_ADMIN__TOKEN) serves local requests only: {why}"
                    ),
                ));
            }
        }
    }
    Ok(next.run(req).await)
}

/// Why a request does not count as local, when it does not: a non-loopback
/// peer, a reverse proxy in between (its forwarding headers), a Host that is
/// not a loopback name (DNS rebinding) or a cross-site browser request.
fn not_local(req: &Request) -> Option<&'static str> {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>();
    if !peer.is_some_and(|ConnectInfo(addr)| addr.ip().is_loopback()) {
        return Some("the client is not on a loopback address");
    }
    let h = req.headers();
    if h.contains_key(header::FORWARDED)
        || h.contains_key("x-forwarded-for")
        || h.contains_key("x-real-ip")
    {
        return Some("the request came through a proxy");
    }
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return Some("the Host header is not a loopback name");
    }
    let cross_site = h
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site");
    let foreign_origin = h
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o.split_once("://").map(|(_, rest)| rest) != Some(host));
    if cross_site || foreign_origin {
        return Some("the request comes from another site");
    }
    None
}

fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Query parameters shared by listing and bulk replay.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Filters {
    outcome: Option<String>,
    message_id: Option<String>,
    user_id: Option<String>,
    group_id: Option<String>,
    before: Option<i64>,
    limit: Option<usize>,
}

impl Filters {
    fn to_filter(&self) -> Result<MessageFilter, ApiError> {
        let state = match self.outcome.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(State::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "outcome",
                    format!("{s:?} is not one of pending, delivered, filtered, unsupported, duplicate, rejected, dead"),
                )
            })?),
        };
        let text = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        Ok(MessageFilter {
            id: None,
            state,
            message_id: text(&self.message_id),
            user_id: text(&self.user_id),
            account_id: text(&self.group_id),
            before: self.before,
        })
    }
}

fn query<T: serde::de::DeserializeOwned + Default>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request("query", e.body_text()))
}

fn storage_error(e: crate::storage::StorageError) -> ApiError {
    tracing::error!(error = %e, "admin API storage error");
    ApiError::unavailable("storage unavailable")
}

/// A stored message as the operator sees it: the Segment input, the Totango
/// requests (with their URL) and Totango's last answer.
fn view(state: &AppState, m: StoredMessage) -> Value {
    let mut v = serde_json::to_value(&m).unwrap_or_default();
    let base = state
        .runtime
        .settings_for(&m.source, &Default::default())
        .map(|s| s.base_url().to_owned())
        .ok();
    if let (Some(base), Some(Value::Array(reqs))) = (base, v.get_mut("requests")) {
        for r in reqs {
            let url = serde_json::from_value::<crate::mapping::TotangoRequest>(r.clone())
                .map(|t| t.url(&base))
                .ok();
            if let (Some(url), Some(obj)) = (url, r.as_object_mut()) {
                obj.insert("url".into(), Value::String(url));
            }
        }
    }
    // The public name of the state is "outcome" (mapping.md).
    if let Some(obj) = v.as_object_mut() {
        if let Some(s) = obj.remove("state") {
            obj.insert("outcome".into(), s);
        }
    }
    v
}

async fn list(
    Extract(state): Extract<Arc<AppState>>,
    q: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut rows = state
        .storage
        .list(q.to_filter()?, limit + 1)
        .await
        .map_err(storage_error)?;
    let next = (rows.len() > limit).then(|| {
        rows.truncate(limit);
        rows.last().map(|m| m.id)
    });
    let messages: Vec<Value> = rows.into_iter().map(|m| view(&state, m)).collect();
    Ok(Json(json!({"messages": messages, "next": next.flatten()})))
}

async fn one(
    Extract(state): Extract<Arc<AppState>>,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    match state.storage.get(id).await.map_err(storage_error)? {
        Some(m) => Ok(Json(view(&state, m))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("message {id}: not found"),
        )),
    }
}

async fn replay_one(
    Extract(state): Extract<Arc<AppState>>,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let Some(m) = state.storage.get(id).await.map_err(storage_error)? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("message {id}: not found"),
        ));
    };
    if m.state != State::Dead {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_dead",
            format!(
                "message {id}: only dead messages can be replayed (it is {})",
                m.state.as_str()
            ),
        ));
    }
    let filter = MessageFilter {
        id: Some(id),
        ..Default::default()
    };
    let replayed = state
        .storage
        .replay(filter, now_millis())
        .await
        .map_err(storage_error)?;
    state.delivery.wake();
    Ok(Json(json!({"replayed": replayed.len(), "ids": replayed})))
}

async fn replay_matching(
    Extract(state): Extract<Arc<AppState>>,
    q: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let filter = q.to_filter()?;
    if filter.state.is_some_and(|s| s != State::Dead) {
        return Err(ApiError::bad_request(
            "outcome",
            "only dead messages can be replayed",
        ));
    }
    let replayed = state
        .storage
        .replay(filter, now_millis())
        .await
        .map_err(storage_error)?;
    if !replayed.is_empty() {
        state.delivery.wake();
    }
    Ok(Json(json!({"replayed": replayed.len(), "ids": replayed})))
}

async fn stats(Extract(state): Extract<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let counts = state.storage.counts().await.map_err(storage_error)?;
    let queue = state.storage.queue_stats().await.map_err(storage_error)?;
    let mut by_outcome = serde_json::Map::new();
    for s in State::ALL {
        let n = counts.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
        by_outcome.insert(s.as_str().into(), n.into());
    }
    let oldest = queue
        .oldest_received_at
        .map(|t| (now_millis() - t).max(0) as f64 / 1000.0);
    Ok(Json(json!({
        "outcomes": by_outcome,
        "queue": {"depth": queue.depth, "oldest_pending_age_seconds": oldest},
        "delivery": state.delivery.stats(),
    })))
}
