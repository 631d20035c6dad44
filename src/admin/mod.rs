//! The operator's view: a page at `GET /` and a JSON API under `/api/`
//! (http-api.md "Operations"). Reads storage and queues replays; it never
//! talks to Totango itself.
//!
//! Auth: every request needs the admin token, as `Authorization: Bearer
//! <token>`, or the session cookie that `/login` sets. A reverse proxy makes
//! every request look local, so there is no "local only" exception. Without a
//! configured token one is generated at first start (see [`auth`]).

pub mod entity;
pub mod history;
pub mod privacy;
pub mod views;

use crate::storage::{MessageFilter, State, Storage, StoredMessage, now_millis};
use crate::web::answers::ErrorBody;
use crate::web::auth::{self, AdminAuth, Check, Credential};
use crate::web::{Actor, AdminState, ApiError, AppState};
use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use views::{MessagePage, MessageView, QueueView, Replayed, Stats, TotangoView};

/// Most bytes of a `POST /login` body (a form with one token field).
pub const LOGIN_BODY_LIMIT: usize = 4096;

const PAGE: &str = include_str!("page.html");
const LOGIN: &str = include_str!("login.html");
const SCRIPT: &str = include_str!("page.js");
/// Helpers both pages use (`$`, `api`, `notice`, `el`, …), loaded before their own script.
const COMMON_SCRIPT: &str = include_str!("common.js");
const STYLE: &str = include_str!("page.css");
/// uPlot (vendor/README.md), for the page's charts.
const UPLOT_SCRIPT: &str = include_str!("vendor/uPlot.iife.min.js");
const UPLOT_STYLE: &str = include_str!("vendor/uPlot.min.css");
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
/// Most bytes of message views one list answer carries; the rest is on the
/// next page (`next`), so a list of large messages stays a bounded answer.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;
/// The operator page: its own script and style only, never framed.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; \
    frame-ancestors 'none'";

/// The operator page and the admin API. `operator_api` holds routes whose
/// handlers live elsewhere (insights) but take the same credential check and
/// find the same [`Actor`] for the audit trail.
pub fn routes(state: AppState, operator_api: Router<AppState>) -> Router<AppState> {
    let api = Router::new()
        .route("/api/messages", get(list))
        .route("/api/messages/{id}", get(one))
        .route("/api/messages/{id}/replay", post(replay_one))
        .route("/api/replay", post(replay_matching))
        .route("/api/stats", get(stats))
        .route("/api/accounts/{id}", get(entity::account))
        .route("/api/history", get(history::history))
        .route(
            "/api/users/{user_id}",
            get(entity::user).delete(privacy::erase_user),
        )
        .route(
            "/api/suppressions",
            get(privacy::list_suppressions).post(privacy::suppress),
        )
        .route("/api/suppressions/{user_id}", delete(privacy::lift))
        .route("/api/audit", get(privacy::audit))
        .merge(operator_api)
        .route_layer(middleware::from_fn_with_state(state, authorize));
    Router::new()
        .route("/", get(page))
        .route(
            "/login",
            get(login_link)
                .post(login_form)
                .layer(DefaultBodyLimit::max(LOGIN_BODY_LIMIT)),
        )
        .route("/logout", post(logout))
        .route(
            "/assets/common.js",
            get(|| async { javascript(COMMON_SCRIPT) }),
        )
        .route("/assets/operator.js", get(|| async { javascript(SCRIPT) }))
        .route("/assets/operator.css", get(style))
        .route("/accounts/{id}", get(entity::page))
        .route("/users/{id}", get(entity::page))
        .route(
            "/assets/entity.js",
            get(|| async { javascript(entity::SCRIPT) }),
        )
        .route(
            "/assets/uplot.js",
            get(|| async { javascript(UPLOT_SCRIPT) }),
        )
        .route("/assets/uplot.css", get(uplot_style))
        .merge(api)
}

fn html(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
        ],
        Html(body),
    )
        .into_response()
}

/// The page holds no data itself, but it is served only to a signed-in
/// operator; anyone else gets the sign-in form.
async fn page(Extract(admin): Extract<Arc<AdminAuth>>, req: Request) -> Response {
    signed_in_page(&admin, req.headers(), peer(&req), PAGE).await
}

/// `body` for a signed-in operator; the sign-in form (or `429`) otherwise.
pub(super) async fn signed_in_page(
    admin: &AdminAuth,
    headers: &HeaderMap,
    address: Option<IpAddr>,
    body: &'static str,
) -> Response {
    match admin.check(headers, address).await {
        Check::Valid(_) => html(StatusCode::OK, body),
        Check::Locked(wait) => too_many(wait),
        Check::Unavailable => html(StatusCode::SERVICE_UNAVAILABLE, LOGIN),
        Check::Missing | Check::Wrong => html(StatusCode::UNAUTHORIZED, LOGIN),
    }
}

/// The client's address (the connection's peer).
pub fn peer(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip())
}

/// `429` with `Retry-After` for an address locked out after wrong tokens.
fn too_many(wait: std::time::Duration) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!("too many wrong admin tokens from this address; try again in {secs} s"),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, secs.max(1).into());
    resp
}

fn javascript(body: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

async fn uplot_style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        UPLOT_STYLE,
    )
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

#[derive(Deserialize)]
struct CodeQuery {
    code: Option<String>,
}

/// `GET /login?code=…`: the login link printed at first start (or by
/// `admin-link`). The code is good once, for 15 minutes; it sets the
/// session cookie and sends the browser on to `/`, out of the address bar.
/// Without a code (or with the old `?token=`, never accepted in a URL):
/// the sign-in form.
async fn login_link(
    Extract(admin): Extract<Arc<AdminAuth>>,
    Extract(storage): Extract<Arc<dyn Storage>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<CodeQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(code) = q.ok().and_then(|Query(q)| q.code) else {
        return html(StatusCode::OK, LOGIN);
    };
    let peer = Some(addr.ip());
    if let Err(wait) = admin.throttle().check(peer) {
        return too_many(wait);
    }
    match admin.redeem_code(&code).await {
        Ok(true) => signed_in(&admin, storage.as_ref(), addr, "login link", &headers).await,
        Ok(false) => {
            admin.throttle().failed(peer);
            html(StatusCode::UNAUTHORIZED, LOGIN)
        }
        Err(e) => {
            tracing::error!(error = %e, "admin session store unavailable");
            html(StatusCode::SERVICE_UNAVAILABLE, LOGIN)
        }
    }
}

/// `POST /login` from the sign-in form: the token in the body (at most
/// [`LOGIN_BODY_LIMIT`] bytes, not compressed).
async fn login_form(
    Extract(admin): Extract<Arc<AdminAuth>>,
    Extract(storage): Extract<Arc<dyn Storage>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if auth::cross_site(&headers).is_some() {
        return html(StatusCode::FORBIDDEN, LOGIN);
    }
    let peer = Some(addr.ip());
    if let Err(wait) = admin.throttle().check(peer) {
        return too_many(wait);
    }
    let form = match form {
        Ok(axum::Form(form)) => form,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return html(StatusCode::PAYLOAD_TOO_LARGE, LOGIN);
        }
        Err(_) => return html(StatusCode::BAD_REQUEST, LOGIN),
    };
    if !admin.token_matches(&form.token) {
        admin.throttle().failed(peer);
        return html(StatusCode::UNAUTHORIZED, LOGIN);
    }
    signed_in(&admin, storage.as_ref(), addr, "sign-in form", &headers).await
}

/// Keeps a sign-in or sign-out in the audit trail (logged if it cannot be).
async fn audit_session(
    storage: &dyn Storage,
    actor: String,
    addr: SocketAddr,
    action: &str,
    how: &str,
) {
    let entry = crate::storage::AuditEntry {
        actor,
        address: Some(addr.ip().to_string()),
        action: action.to_owned(),
        detail: json!({"by": how}),
        count: None,
    };
    if let Err(e) = storage.record_audit(entry).await {
        tracing::error!(error = %e, action, "could not record an admin action in the audit trail");
    }
}

async fn signed_in(
    admin: &AdminAuth,
    storage: &dyn Storage,
    addr: SocketAddr,
    how: &str,
    headers: &HeaderMap,
) -> Response {
    match admin.start_session(headers).await {
        Ok(cookie) => {
            // The new session's name, as its later actions will show it.
            let mut with_cookie = HeaderMap::new();
            if let Some(id) = cookie.split(';').next() {
                if let Ok(v) = id.parse() {
                    with_cookie.insert(header::COOKIE, v);
                }
            }
            let actor = auth::actor(&with_cookie, &Credential::Cookie);
            audit_session(storage, actor, addr, "login", how).await;
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/".to_owned()),
                    (header::SET_COOKIE, cookie),
                    (header::CACHE_CONTROL, "no-store".to_owned()),
                ],
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "admin session store unavailable");
            html(StatusCode::SERVICE_UNAVAILABLE, LOGIN)
        }
    }
}

/// Ends the session everywhere (it is deleted from storage) and clears the cookie.
async fn logout(
    Extract(admin): Extract<Arc<AdminAuth>>,
    Extract(storage): Extract<Arc<dyn Storage>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if auth::cross_site(&headers).is_some() {
        return html(StatusCode::FORBIDDEN, LOGIN);
    }
    if admin.check(&headers, Some(addr.ip())).await == Check::Valid(Credential::Cookie) {
        let actor = auth::actor(&headers, &Credential::Cookie);
        audit_session(storage.as_ref(), actor, addr, "logout", "sign-out").await;
    }
    if let Err(e) = admin.end_session(&headers).await {
        tracing::error!(error = %e, "admin session store unavailable");
        return html(StatusCode::SERVICE_UNAVAILABLE, LOGIN);
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_owned()),
            (header::SET_COOKIE, auth::AdminAuth::clear_cookie()),
        ],
    )
        .into_response()
}

/// For the server's layers, outside request decompression: `POST /login`
/// takes no `Content-Encoding` (`415`), so its body limit is the bytes sent.
pub async fn refuse_encoded_login(req: Request) -> Result<Request, Response> {
    if req.uri().path() == "/login" && req.headers().contains_key(header::CONTENT_ENCODING) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            "Content-Encoding: /login takes an uncompressed form",
        )
        .into_response());
    }
    Ok(req)
}

async fn authorize(
    Extract(admin): Extract<Arc<AdminAuth>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let unauthorized = || {
        ApiError::unauthorized("Authorization: expected Bearer <admin token>")
            .with_challenge("Bearer realm=\"totango-destination admin\"")
    };
    let credential = match admin.check(req.headers(), peer(&req)).await {
        Check::Missing | Check::Wrong => return Err(unauthorized()),
        Check::Locked(wait) => return Ok(too_many(wait)),
        Check::Unavailable => return Err(ApiError::unavailable("admin sessions unavailable")),
        // A cookie rides along with any request the browser makes: changes
        // must come from the page itself, not from another site.
        Check::Valid(Credential::Cookie) if req.method() != axum::http::Method::GET => {
            if let Some(why) = auth::cross_site(req.headers()) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("refused: {why}"),
                ));
            }
            Credential::Cookie
        }
        Check::Valid(credential) => credential,
    };
    // Who acts, for the audit trail.
    let actor = Actor {
        who: auth::actor(req.headers(), &credential),
        address: peer(&req).map(|ip| ip.to_string()),
    };
    req.extensions_mut().insert(actor);
    Ok(next.run(req).await)
}

/// Query parameters shared by listing and bulk replay.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct Filters {
    /// pending, delivered, filtered, unsupported, duplicate, rejected, dead
    /// or suppressed.
    outcome: Option<String>,
    message_id: Option<String>,
    user_id: Option<String>,
    /// The account (Segment `groupId`).
    group_id: Option<String>,
    /// The `next` of the previous page.
    before: Option<i64>,
    /// Messages per page (1 to 500; 50 by default).
    limit: Option<usize>,
}

impl Filters {
    fn to_filter(&self) -> Result<MessageFilter, ApiError> {
        let state = match self.outcome.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(State::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "outcome",
                    format!("{s:?} is not one of pending, delivered, filtered, unsupported, duplicate, rejected, dead, suppressed"),
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

/// The `{id}` of a path, or a JSON error naming it.
fn message_id(
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Result<i64, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|_| ApiError::bad_request("id", "expected a message number"))
}

fn query<T: serde::de::DeserializeOwned + Default>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request("query", e.body_text()))
}

fn storage_error(e: crate::storage::StorageError) -> ApiError {
    tracing::error!(error = %e, "admin API storage error");
    ApiError::from(&e)
}

/// A stored message as the operator sees it (see [`MessageView`]).
fn view(state: &AdminState, m: StoredMessage) -> MessageView {
    let base = state
        .runtime
        .settings_for(&m.source, &Default::default())
        .map(|s| s.base_url().to_owned())
        .ok();
    MessageView::new(m, base.as_deref())
}

/// `GET /api/messages`: newest first, paged (`next`).
#[utoipa::path(get, path = "/api/messages", tag = "messages", params(Filters),
    responses((status = 200, body = MessagePage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn list(
    Extract(state): Extract<AdminState>,
    q: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut filter = q.to_filter()?;
    // Read in small pages and stop at MAX_LIST_BYTES, so neither this
    // answer nor what is held to build it grows with the message size.
    const CHUNK: usize = 25;
    let mut messages: Vec<MessageView> = Vec::new();
    let mut bytes = 0;
    let mut next = None;
    'pages: loop {
        let want = (limit - messages.len()).min(CHUNK);
        let rows = state
            .storage
            .list(filter.clone(), want + 1)
            .await
            .map_err(storage_error)?;
        let more = rows.len() > want;
        for m in rows.into_iter().take(want) {
            let id = m.id;
            let v = view(&state, m);
            bytes += serde_json::to_string(&v).map_or(0, |t| t.len());
            if bytes > MAX_LIST_BYTES && !messages.is_empty() {
                next = messages.last().map(|m| m.summary.id);
                break 'pages;
            }
            messages.push(v);
            filter.before = Some(id);
        }
        if !more {
            break;
        }
        if messages.len() >= limit {
            next = filter.before;
            break;
        }
    }
    Ok(Json(MessagePage { messages, next }))
}

/// `GET /api/messages/{id}`.
#[utoipa::path(get, path = "/api/messages/{id}", tag = "messages",
    params(("id" = i64, Path, description = "The message number")),
    responses((status = 200, body = MessageView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn one(
    Extract(state): Extract<AdminState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let id = message_id(id)?;
    match state.storage.get(id).await.map_err(storage_error)? {
        Some(m) => Ok(Json(view(&state, m))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("message {id}: not found"),
        )),
    }
}

/// `POST /api/messages/{id}/replay`: a dead message is queued again.
#[utoipa::path(post, path = "/api/messages/{id}/replay", tag = "messages",
    params(("id" = i64, Path, description = "The message number")),
    responses((status = 200, body = Replayed), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn replay_one(
    Extract(state): Extract<AdminState>,
    axum::Extension(actor): axum::Extension<Actor>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Replayed>, ApiError> {
    let id = message_id(id)?;
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
    let replayed = state.storage.replay(filter).await.map_err(storage_error)?;
    actor
        .record(
            &*state.storage,
            "replay",
            json!({"id": id}),
            Some(replayed.len() as u64),
        )
        .await;
    Ok(Json(Replayed {
        replayed: replayed.len(),
        ids: replayed,
    }))
}

/// `POST /api/replay`: every dead message matching the filters is queued
/// again (at most 10,000 per call).
#[utoipa::path(post, path = "/api/replay", tag = "messages", params(Filters),
    responses((status = 200, body = Replayed), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn replay_matching(
    Extract(state): Extract<AdminState>,
    axum::Extension(actor): axum::Extension<Actor>,
    q: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Replayed>, ApiError> {
    let q = query(q)?;
    let detail = json!({
        "outcome": q.outcome, "messageId": q.message_id, "userId": q.user_id, "groupId": q.group_id,
    });
    let filter = q.to_filter()?;
    if filter.state.is_some_and(|s| s != State::Dead) {
        return Err(ApiError::bad_request(
            "outcome",
            "only dead messages can be replayed",
        ));
    }
    let replayed = state.storage.replay(filter).await.map_err(storage_error)?;
    actor
        .record(
            &*state.storage,
            "replay",
            detail,
            Some(replayed.len() as u64),
        )
        .await;
    Ok(Json(Replayed {
        replayed: replayed.len(),
        ids: replayed,
    }))
}

/// `GET /api/stats`: messages by outcome, the queue, delivery.
#[utoipa::path(get, path = "/api/stats", tag = "messages",
    responses((status = 200, body = Stats), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn stats(Extract(state): Extract<AdminState>) -> Result<Json<Stats>, ApiError> {
    // The queue first: a message leaves the queue in the transaction that
    // settles its outcome, so an empty queue read first means the counts read
    // next hold no stale `pending` (two statements, two snapshots).
    let queue = state.storage.queue_stats().await.map_err(storage_error)?;
    let counts = state.storage.counts().await.map_err(storage_error)?;
    let mut outcomes = std::collections::BTreeMap::new();
    for s in State::ALL {
        let n = counts.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
        outcomes.insert(s.as_str().to_owned(), n);
    }
    let oldest = queue
        .oldest_received_at
        .map(|t| (now_millis() - t).max(0) as f64 / 1000.0);
    // Totango's health, with what waits for it: the whole queue, since
    // every queued message goes to Totango.
    Ok(Json(Stats {
        outcomes,
        queue: QueueView {
            depth: queue.depth,
            oldest_pending_age_seconds: oldest,
        },
        delivery: state.delivery.stats(),
        totango: TotangoView {
            health: state.delivery.health(),
            waiting: queue.depth,
        },
    }))
}
