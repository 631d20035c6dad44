//! Ingest: the three ways in (Tracking API, partner destination, webhook).
//! Every handler authenticates, validates, stores, and answers only after the
//! storage commit. Mapping is used here only to classify (rejected,
//! unsupported, filtered); delivery produces what is sent.

mod browser;
pub mod partner;
pub mod tracking;
pub mod webhook;

pub use crate::web::{ApiError, AppState, ClientRates, IngestState};

use crate::config::{Runtime, Source};
use crate::mapping::{self, Code, Outcome, SettingsPatch};
use crate::segment::{CallType, Message, ParseError};
use crate::storage::{Acceptance, Millis, NewMessage, State};
use crate::telemetry;
use crate::web::answers::{MessageOutcome, OutcomeName, Success, WebhookAnswer};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use base64::Engine;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// `Retry-After` of a 503 while storage is unavailable: a database restart
/// or failover takes seconds.
const STORAGE_RETRY_AFTER_SECS: u64 = 5;

pub fn routes(state: AppState) -> Router<AppState> {
    // The Tracking API answers browsers of the origins a key allows.
    let tracking = Router::new()
        .route(
            "/v1/batch",
            post(tracking::batch).options(browser::preflight),
        )
        .route(
            "/v1/import",
            post(tracking::import).options(browser::preflight),
        )
        .route(
            "/v1/{call}",
            post(tracking::single).options(browser::preflight),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.runtime.clone(),
            browser::cors,
        ));
    let others = Router::new()
        .route("/segment", post(partner::handle))
        .route("/webhook", post(webhook::handle))
        .route_layer(axum::middleware::from_fn(refuse_browsers_from_other_sites));
    tracking
        .merge(others)
        .route_layer(axum::middleware::from_fn_with_state(
            state.runtime.clone(),
            open_mode_hosts_only,
        ))
}

/// In open mode (no write key) any page a browser visits could post events
/// through DNS rebinding: a name the attacker controls resolving to this
/// server makes its requests same-origin. Open mode therefore takes only the
/// loopback names and `auth.allowed_hosts` in `Host`; others get `421`.
async fn open_mode_hosts_only(
    axum::extract::State(runtime): axum::extract::State<Arc<Runtime>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    if runtime.sources.is_empty() {
        let host = req
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{fffd}"))
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        // Without a Host (HTTP/1.0), no browser is involved.
        if let Some(host) = host {
            if !host_allowed(host, &runtime.config.auth.allowed_hosts) {
                return Err(ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "host_not_allowed",
                    format!(
                        "Host: {:?} is not served: without write keys, ingest accepts only \
                         localhost, 127.0.0.1, [::1] and auth.allowed_hosts",
                        host.chars().take(100).collect::<String>()
                    ),
                ));
            }
        }
    }
    Ok(next.run(req).await)
}

/// Whether an open-mode server serves the `Host` value `host`: a loopback
/// name (any port), or an `allowed` entry (its port, when it names one).
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        // `[::1]:8080` or `name:8080`; a bare `[::1]` has its colons inside brackets.
        Some((name, port)) if !port.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host.as_str(),
    };
    let name = name.trim_end_matches('.');
    if matches!(name, "localhost" | "127.0.0.1" | "[::1]") {
        return true;
    }
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        a == host || a.trim_end_matches('.') == name
    })
}

/// Segment and its server-side libraries never send `Origin` or Fetch
/// metadata; a browser does. Without this, any web page could post events to
/// a server on the visitor's machine (`no-cors`, `text/plain`).
async fn refuse_browsers_from_other_sites(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    if let Some(why) = crate::web::auth::cross_site(req.headers()) {
        return Err(cross_site_refusal(why));
    }
    Ok(next.run(req).await)
}

fn cross_site_refusal(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_site",
        format!(
            "refused: {why}; ingest takes server-to-server requests, and browsers of the \
             origins a write key allows (allowed_origins) on the Tracking API"
        ),
    )
}

impl IngestState {
    fn limits(&self) -> &crate::config::LimitsConfig {
        &self.runtime.config.limits
    }

    /// Finds the source of a write key. With no keys configured every key
    /// (or none) is accepted with the default settings.
    fn source_for(&self, key: Option<&str>) -> Result<&Source, ApiError> {
        let sources = &self.runtime.sources;
        if sources.is_empty() {
            return Ok(&self.runtime.default_source);
        }
        match key.filter(|k| !k.is_empty()) {
            None => Err(ApiError::unauthorized(
                "missing write key: use HTTP Basic auth with the write key as user name",
            )),
            Some(k) => sources
                .find(k)
                .ok_or_else(|| ApiError::unauthorized("unknown write key")),
        }
    }

    /// Stores prepared messages (all or nothing) and wakes delivery. The
    /// messages move to storage (no copy); the answer keeps their summaries.
    async fn store(
        &self,
        prepared: Vec<Prepared>,
        interface: impl Into<crate::storage::AcceptAs>,
    ) -> Result<Vec<(Summary, Kept)>, ApiError> {
        use crate::storage::AcceptError;
        let crate::storage::AcceptAs {
            label: interface,
            options,
        } = interface.into();
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("shutting down"));
        }
        // Deletes are not stored: they erase, after the others are stored.
        let erase: Vec<Option<(String, bool)>> = prepared.iter().map(|p| p.erase.clone()).collect();
        let (queued, queued_bytes) = prepared
            .iter()
            .filter(|p| p.new.state == State::Pending && p.erase.is_none())
            .fold((0u64, 0u64), |(n, b), p| {
                let size = p.new.payload.len() + p.new.settings.len() + p.new.message_id.len();
                (n + 1, b + size as u64)
            });
        let admitted = self
            .backpressure
            .admit(&self.runtime, queued, queued_bytes)
            .map_err(|why| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "backpressure",
                    format!("not accepting messages for now: {why}; retry later"),
                )
                .with_retry_after(crate::backpressure::RETRY_AFTER_SECS)
            })?;
        let (batch, summaries): (Vec<NewMessage>, Vec<Summary>) =
            prepared.into_iter().map(|p| (p.new, p.summary)).unzip();
        let batch: Vec<NewMessage> = batch
            .into_iter()
            .zip(&erase)
            .filter(|(_, e)| e.is_none())
            .map(|(m, _)| m)
            .collect();
        let stored = if batch.is_empty() {
            Ok(Vec::new())
        } else {
            self.storage.accept_with(batch, options).await
        };
        let stored = stored
            .map_err(|e| match e {
                // Only asked for by the webhook's first-element signature.
                AcceptError::AlreadyStored(_) => ApiError::unauthorized(
                    "X-Signature: the signed element was already accepted; a replayed array is refused",
                ),
                AcceptError::Storage(e) => {
                    // While storage is down every request fails alike: said
                    // once a minute, not once per request.
                    static QUIET: telemetry::Throttle = telemetry::Throttle::new();
                    if QUIET.ready() {
                        tracing::error!(error = %e, "could not store accepted messages (said once a minute)");
                    }
                    ApiError::from(&e).with_retry_after(STORAGE_RETRY_AFTER_SECS)
                }
            })?;
        admitted.stored();
        // Each delete in order, durable before the answer.
        let mut stored = stored.into_iter();
        let mut accepted = Vec::with_capacity(summaries.len());
        for (summary, erase) in summaries.iter().zip(erase) {
            let Some((user_id, suppress)) = erase else {
                let row = stored.next().expect("one acceptance per stored message");
                accepted.push(Kept::Row(row));
                continue;
            };
            let reason = format!(
                "delete message {:?} from source {}",
                summary.message_id, interface
            );
            let erased = self
                .storage
                .erase_user(crate::storage::Erase {
                    user_id,
                    suppress,
                    reason,
                })
                .await
                .map_err(|e| ApiError::from(&e).with_retry_after(STORAGE_RETRY_AFTER_SECS))?;
            metrics::counter!(telemetry::ERASURES).increment(1);
            accepted.push(Kept::Erased(erased));
        }
        metrics::counter!(telemetry::ACCEPTED, "interface" => interface)
            .increment(summaries.len() as u64);
        for (s, kept) in summaries.iter().zip(&accepted) {
            let Kept::Row(a) = kept else { continue };
            if !matches!(a, Acceptance::Duplicate { .. }) {
                for rule in &s.breaches {
                    telemetry::count_limit_breach(rule.as_str());
                }
            }
            match (a, s.state) {
                (Acceptance::Duplicate { .. }, _) => {
                    telemetry::count_outcome(State::Duplicate.as_str())
                }
                (_, State::Pending) => {}
                (_, state) => telemetry::count_outcome(state.as_str()),
            }
        }
        Ok(summaries.into_iter().zip(accepted).collect())
    }
}

/// The user name of an `Authorization: Basic` header.
fn basic_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || ApiError::unauthorized("Authorization: expected Basic credentials");
    let value = value.to_str().map_err(|_| bad())?;
    let (scheme, encoded) = value.trim().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = text.split_once(':').map(|(u, _)| u).unwrap_or(&text);
    Ok(Some(user.to_owned()))
}

/// Which body limit a route has.
#[derive(Debug, Clone, Copy)]
enum BodyKind {
    /// One message (`limits.max_body_bytes`).
    Single,
    /// `/v1/batch`, `/v1/import` and `/webhook` (`limits.max_batch_body_bytes`).
    Batch,
}

/// Reads the whole body within the configured limit (`413` beyond it). The
/// deadline and the global budget are the transport's (`crate::budget`):
/// `408` for a late body, `503` + `Retry-After` over budget.
async fn read_body(
    state: &IngestState,
    headers: &HeaderMap,
    body: Body,
    kind: BodyKind,
) -> Result<Bytes, ApiError> {
    let limit = match kind {
        BodyKind::Single => state.limits().max_body_bytes,
        BodyKind::Batch => state.limits().max_batch_body_bytes,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let read = axum::body::to_bytes(body, limit).await;
    read.map_err(|e| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::too_large(limit);
            }
            if s.is::<tower_http::timeout::TimeoutError>() || s.is::<crate::budget::BodyLate>() {
                return body_timeout();
            }
            if s.is::<crate::budget::OverBudget>() {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "over_budget",
                    "body: the server holds as many request bytes as it may; retry later",
                )
                .with_retry_after(crate::budget::RETRY_AFTER_SECS);
            }
            source = s.source();
        }
        ApiError::bad_request("body", format!("could not read the request body: {e}"))
    })
}

fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        "body: not received in time",
    )
}

/// One message ready to store, with what the mapping made of it.
#[derive(Debug)]
struct Prepared {
    new: NewMessage,
    summary: Summary,
    /// A Segment `delete` of this user (and whether to suppress it):
    /// nothing is stored of the message; what storage holds of the user is
    /// erased once the request's other messages are stored (docs/privacy.md).
    erase: Option<(String, bool)>,
}

/// What an answer says of a message (kept after the message went to storage).
#[derive(Debug, Clone)]
struct Summary {
    message_id: String,
    state: State,
    outcome: Outcome,
    code: Option<&'static str>,
    message: Option<String>,
    warnings: Vec<String>,
    /// Breaches of Totango's limits, counted once the message is accepted.
    breaches: Vec<mapping::LimitRule>,
}

/// What became of one message of a request.
#[derive(Debug, Clone, Copy)]
pub enum Kept {
    /// Stored, or recorded as a duplicate.
    Row(Acceptance),
    /// A `delete`: no row of its own; what it erased.
    Erased(crate::storage::Erased),
}

impl Summary {
    fn outcome(&self, kept: Kept) -> MessageOutcome {
        let mut answer = MessageOutcome {
            message_id: self.message_id.clone(),
            outcome: OutcomeName::Accepted,
            code: None,
            message: None,
            warnings: Vec::new(),
            erased: None,
        };
        match kept {
            Kept::Erased(erased) => {
                answer.outcome = OutcomeName::Erased;
                answer.erased = Some(erased);
            }
            Kept::Row(Acceptance::Duplicate { .. }) => {
                answer.outcome = OutcomeName::Duplicate;
                answer.code = Some("duplicate".to_owned());
                answer.warnings = self.warnings.clone();
            }
            Kept::Row(Acceptance::Stored { .. }) => {
                answer.outcome = match self.outcome {
                    Outcome::Send => OutcomeName::Accepted,
                    Outcome::Filtered => OutcomeName::Filtered,
                    Outcome::Unsupported => OutcomeName::Unsupported,
                    Outcome::Rejected => OutcomeName::Rejected,
                };
                answer.code = self.code.map(str::to_owned);
                answer.message = self.message.clone();
                answer.warnings = self.warnings.clone();
            }
        }
        answer
    }
}

/// Fills `messageId` when absent, as Segment's API does.
fn fill_message_id(obj: &mut Map<String, Value>) {
    // An empty messageId is no id: it would make every such message a duplicate.
    let missing = match obj.get("messageId") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    };
    if missing {
        obj.insert(
            "messageId".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
    }
}

/// How a message that is not valid Segment is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invalid {
    /// The whole request is refused (`400`): a single-message request.
    Refuse,
    /// The message alone is stored as `rejected` (batch items, webhook array
    /// elements): Segment's libraries drop a whole batch on a `400`.
    RejectItem,
}

/// Parses, validates and classifies one message. `field` prefixes error
/// paths (`batch[3].`), so a client learns which message is wrong. The
/// request-wide limits are checked on the message as it will be stored.
fn prepare(
    limits: &mut RequestLimits<'_>,
    value: Value,
    source: &Source,
    header_settings: Option<&SettingsPatch>,
    field: &str,
    received_at: Millis,
    invalid: Invalid,
) -> Result<Prepared, ApiError> {
    let none = SettingsPatch::default();
    let overrides = header_settings.unwrap_or(&none);
    let settings = source.settings_with(overrides).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_settings",
            format!("settings: {e} (set it in the server configuration or X-Segment-Settings)"),
        )
    })?;
    if header_settings.is_some_and(|h| h.service_id.is_some()) {
        warn_once(&settings);
    }
    // Privacy rules come first: what they drop or hash never reaches the
    // stored payload, and a message they filter is kept without one.
    let mut value = value;
    if let Err(denied) = source.rules.apply(&mut value) {
        let payload = "{}".to_owned();
        limits.count(payload.len(), field)?;
        return Ok(refused_item(
            &value,
            Refusal {
                outcome: Outcome::Filtered,
                code: Code::FilteredByRule.as_str(),
                reason: denied.reason,
            },
            source,
            &settings.service_id,
            payload,
            overrides.without_token().to_stored_json(),
            received_at,
        ));
    }
    let payload = value.to_string();
    if let Some(e) = limits.too_large(payload.len(), field) {
        if invalid == Invalid::Refuse {
            return Err(e);
        }
        // Kept as a bounded summary: the message is what was too large.
        let kept = too_large_payload(&value, &payload);
        limits.count(kept.len(), field)?;
        return Ok(refused_item(
            &value,
            Refusal {
                outcome: Outcome::Rejected,
                code: "message_too_large",
                reason: e.message,
            },
            source,
            &settings.service_id,
            kept,
            overrides.without_token().to_stored_json(),
            received_at,
        ));
    }
    limits.count(payload.len(), field)?;
    // The request's own settings (X-Segment-Settings), token included, for
    // delivery; messages that will never be sent keep none of the token.
    let settings_json = overrides.to_stored_json();
    let parsed = Message::from_value(&value).and_then(|msg| {
        msg.context_group_id()?;
        Ok(msg)
    });
    let msg = match (parsed, invalid) {
        (Ok(msg), Invalid::Refuse) if !source.access.allows_call(msg.call) => {
            return Err(browser::call_not_allowed(field, msg.call));
        }
        (Ok(msg), Invalid::RejectItem) if !source.access.allows_call(msg.call) => {
            let e = browser::call_not_allowed(field, msg.call);
            return Ok(refused_item(
                &value,
                Refusal {
                    outcome: Outcome::Rejected,
                    code: e.code,
                    reason: e.message,
                },
                source,
                &settings.service_id,
                payload,
                overrides.without_token().to_stored_json(),
                received_at,
            ));
        }
        (Ok(msg), _) => msg,
        (Err(e), Invalid::Refuse) => return Err(ApiError::invalid_message(field, &e)),
        (Err(e), Invalid::RejectItem) => {
            return Ok(refused_item(
                &value,
                Refusal::invalid(&e, field),
                source,
                &settings.service_id,
                payload,
                overrides.without_token().to_stored_json(),
                received_at,
            ));
        }
    };
    if msg.call == CallType::Delete {
        return erasure(
            &msg,
            &value,
            source,
            &settings.service_id,
            received_at,
            invalid,
            field,
        );
    }
    drop(value);
    let t = mapping::translate(&msg, &settings, None);
    // A page sets the user's latest page category for later track calls, even
    // when it sends nothing; storage applies it at acceptance, in order.
    let set_page_category = (msg.call == CallType::Page
        && (t.outcome == Outcome::Send || t.code == Some(Code::NoPageActivity)))
    .then(|| mapping::page_category(&msg));
    let needs_page_category = t.outcome == Outcome::Send && mapping::track_uses_page_category(&msg);
    let state = match t.outcome {
        Outcome::Send => State::Pending,
        Outcome::Filtered => State::Filtered,
        Outcome::Unsupported => State::Unsupported,
        Outcome::Rejected => State::Rejected,
    };
    let settings_json = if state == State::Pending {
        settings_json
    } else {
        overrides.without_token().to_stored_json()
    };
    let account_id = match msg.call {
        CallType::Group => msg.group_id.clone(),
        _ => msg.context_group_id().ok().flatten(),
    };
    let message_id = msg.message_id.clone().unwrap_or_default();
    for w in &t.warnings {
        tracing::info!(message_id = %message_id, "{w}");
    }
    let new = NewMessage {
        source: source.name.clone(),
        message_id: message_id.clone(),
        call: msg.call.as_str().to_owned(),
        service_id: settings.service_id.clone(),
        user_id: msg.user_id.clone(),
        account_id,
        ordering_key: mapping::ordering_key(&msg)
            .map(|key| format!("{}\u{1f}{key}", settings.service_id)),
        payload: payload.into(),
        settings: settings_json.into(),
        state,
        code: t.code.map(|c| c.as_str().to_owned()),
        reason: t.message.clone(),
        warnings: t.warnings.clone(),
        received_at,
        set_page_category,
        needs_page_category,
    };
    Ok(Prepared {
        new,
        summary: Summary {
            message_id,
            state,
            outcome: t.outcome,
            code: t.code.map(Code::as_str),
            message: t.message,
            warnings: t.warnings,
            breaches: t.breaches,
        },
        erase: None,
    })
}

/// A Segment `delete`: the user to erase, or (without a userId) a refusal
/// naming the field.
fn erasure(
    msg: &Message,
    value: &Value,
    source: &Source,
    service_id: &str,
    received_at: Millis,
    invalid: Invalid,
    field: &str,
) -> Result<Prepared, ApiError> {
    let Some(user) = msg.user_id.clone().filter(|u| !u.is_empty()) else {
        let reason = format!("{field}userId: a delete needs the userId of the user to erase");
        if invalid == Invalid::Refuse {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::InvalidField.as_str(),
                reason,
            ));
        }
        return Ok(refused_item(
            value,
            Refusal {
                outcome: Outcome::Rejected,
                code: Code::InvalidField.as_str(),
                reason,
            },
            source,
            service_id,
            crate::storage::EMPTY_JSON.to_owned(),
            crate::storage::EMPTY_JSON.to_owned(),
            received_at,
        ));
    };
    let message_id = msg.message_id.clone().unwrap_or_default();
    Ok(Prepared {
        new: NewMessage {
            source: source.name.clone(),
            message_id: message_id.clone(),
            call: msg.call.as_str().to_owned(),
            service_id: service_id.to_owned(),
            user_id: None,
            account_id: None,
            ordering_key: None,
            payload: crate::storage::StoredJson::empty(),
            settings: crate::storage::StoredJson::empty(),
            state: State::Suppressed,
            code: None,
            reason: None,
            warnings: Vec::new(),
            received_at,
            set_page_category: None,
            needs_page_category: false,
        },
        summary: Summary {
            message_id,
            state: State::Suppressed,
            outcome: Outcome::Send,
            code: None,
            message: None,
            warnings: Vec::new(),
            breaches: Vec::new(),
        },
        erase: Some((user, source.rules.suppress_on_delete)),
    })
}

/// Why a message is stored as `rejected` (a batch item on its own) or
/// `filtered` (by a privacy rule).
struct Refusal {
    outcome: Outcome,
    code: &'static str,
    reason: String,
}

impl Refusal {
    /// Not valid Segment; the reason names the field.
    fn invalid(e: &ParseError, field: &str) -> Refusal {
        let code = match e {
            ParseError::NotAnObject => Code::InvalidMessage,
            ParseError::MissingType => Code::MissingType,
            ParseError::UnknownType(_) => Code::UnknownType,
            ParseError::InvalidField { .. } => Code::InvalidField,
        };
        Refusal {
            outcome: Outcome::Rejected,
            code: code.as_str(),
            reason: format!("{field}{e}"),
        }
    }
}

/// A message kept as `rejected` (a batch item on its own) or `filtered`
/// (by a privacy rule), with `payload` as it is to be stored.
fn refused_item(
    value: &Value,
    why: Refusal,
    source: &Source,
    service_id: &str,
    payload: String,
    settings: String,
    received_at: Millis,
) -> Prepared {
    let text = |k: &str| {
        value
            .get(k)
            .and_then(|v| crate::segment::scalar_text(v).ok().flatten())
    };
    let message_id = text("messageId").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let call = value
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= 32)
        .unwrap_or("unknown")
        .to_owned();
    let outcome = why.outcome;
    let state = match outcome {
        Outcome::Filtered => State::Filtered,
        _ => State::Rejected,
    };
    Prepared {
        new: NewMessage {
            source: source.name.clone(),
            message_id: message_id.clone(),
            call,
            service_id: service_id.to_owned(),
            user_id: text("userId"),
            account_id: text("groupId"),
            ordering_key: None,
            payload: payload.into(),
            settings: settings.into(),
            set_page_category: None,
            needs_page_category: false,
            state,
            code: Some(why.code.to_owned()),
            reason: Some(why.reason.clone()),
            warnings: Vec::new(),
            received_at,
        },
        summary: Summary {
            message_id,
            state,
            outcome,
            code: Some(why.code),
            message: Some(why.reason),
            warnings: Vec::new(),
            breaches: Vec::new(),
        },
        erase: None,
    }
}

/// How much of a message over `limits.max_message_bytes` is kept.
const TOO_LARGE_PREFIX_BYTES: usize = 1024;

/// What is stored of a message over the size limit: its short identifying
/// fields, its size, and the first [`TOO_LARGE_PREFIX_BYTES`] of its JSON.
fn too_large_payload(value: &Value, payload: &str) -> String {
    let mut kept = Map::new();
    for key in [
        "type",
        "messageId",
        "userId",
        "anonymousId",
        "groupId",
        "event",
        "name",
    ] {
        if let Some(v) = value.get(key) {
            let short = match v {
                Value::String(s) => s.len() <= 256,
                Value::Number(_) => true,
                _ => false,
            };
            if short {
                kept.insert(key.to_owned(), v.clone());
            }
        }
    }
    let mut cut = TOO_LARGE_PREFIX_BYTES.min(payload.len());
    while !payload.is_char_boundary(cut) {
        cut -= 1;
    }
    kept.insert(
        "truncated".to_owned(),
        serde_json::json!({"bytes": payload.len(), "prefix": &payload[..cut]}),
    );
    Value::Object(kept).to_string()
}

/// Logs the warnings of settings a request brought (`X-Segment-Settings`)
/// once per service ID, not once per message.
fn warn_once(settings: &crate::mapping::Settings) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let warnings = settings.warnings();
    if warnings.is_empty() {
        return;
    }
    let mut seen = SEEN.lock().expect("warning lock");
    let seen = seen.get_or_insert_with(HashSet::new);
    // Bounded: a client cycling through IDs cannot grow this without end.
    if seen.len() < 1_000 && seen.insert(settings.service_id.clone()) {
        for w in warnings {
            tracing::warn!("X-Segment-Settings: {w} (said once per service ID)");
        }
    }
}

/// Parses a body that must be JSON, naming what is wrong.
fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    // Most bodies are valid: parse without tracking the path (it costs on
    // every value) and again with it only to name the field of an error.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("body: malformed JSON: {inner}"),
            )
        } else {
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("{field}: {inner}"),
            )
        }
    })?;
    // Only whitespace may follow the JSON value.
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("body: trailing data after the JSON value: {e}"),
        )
    })?;
    Ok(value)
}

/// The size limits of one request, checked on each message as it will be
/// stored (after a batch's `context` and `integrations` were merged into it):
/// at most `max_message_bytes` each and `max_request_stored_bytes` in all, so
/// what a request holds in memory stays proportional to its body.
struct RequestLimits<'a> {
    limits: &'a crate::config::LimitsConfig,
    stored: usize,
}

impl<'a> RequestLimits<'a> {
    fn new(state: &'a IngestState) -> Self {
        RequestLimits {
            limits: state.limits(),
            stored: 0,
        }
    }

    /// A message as sent, before anything is merged into it.
    fn check_raw(&self, len: usize, field: &str) -> Result<(), ApiError> {
        let max = self.limits.max_message_bytes;
        if len > max {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "message_too_large",
                format!(
                    "{}: {len} bytes; a message may be at most {max} bytes",
                    field_name(field)
                ),
            ));
        }
        Ok(())
    }

    /// A message over the per-message limit, as it will be stored.
    fn too_large(&self, len: usize, field: &str) -> Option<ApiError> {
        let max = self.limits.max_message_bytes;
        (len > max).then(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "message_too_large",
                format!(
                    "{}: {len} bytes as stored; a message may be at most {max} bytes",
                    field_name(field)
                ),
            )
        })
    }

    /// Counts a message as stored towards the request's total.
    fn count(&mut self, len: usize, field: &str) -> Result<(), ApiError> {
        self.stored += len;
        let total = self.limits.max_request_stored_bytes;
        if self.stored > total {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "request_too_large",
                format!(
                    "{}: the messages of this request take more than {total} bytes once \
                     the batch context is merged into each; send smaller batches",
                    field_name(field)
                ),
            ));
        }
        Ok(())
    }
}

fn field_name(field: &str) -> &str {
    if field.is_empty() {
        "message"
    } else {
        field.trim_end_matches('.')
    }
}

#[cfg(test)]
mod host_tests {
    use super::host_allowed;

    #[test]
    fn open_mode_serves_loopback_and_configured_hosts_only() {
        let none: [String; 0] = [];
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(host_allowed(ok, &none), "{ok}");
        }
        for bad in [
            "rebind.attacker.example:8080",
            "rebind.attacker.example",
            "127.0.0.2:8080",
            "localhost.attacker.example",
            "",
            "[::2]:80",
        ] {
            assert!(!host_allowed(bad, &none), "{bad}");
        }
        let allowed = ["td.internal".to_owned(), "td.example:9000".to_owned()];
        assert!(host_allowed("td.internal:8080", &allowed));
        assert!(host_allowed("TD.internal", &allowed));
        assert!(host_allowed("td.example:9000", &allowed));
        assert!(!host_allowed("td.example:9001", &allowed));
    }
}

#[cfg(test)]
mod parse_tests {
    use super::parse_json;
    use serde::Deserialize;
    use serde_json::{Map, Value};

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        batch: Vec<Inner>,
    }

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn errors_name_the_field_though_valid_bodies_parse_without_the_path() {
        let ok: Body = parse_json(br#"{"batch": [{"n": 1}, {"n": 2}]}"#).unwrap();
        assert_eq!(ok.batch.len(), 2);
        let e = parse_json::<Body>(br#"{"batch": [{"n": 1}, {"n": "x"}]}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_field"));
        assert!(
            e.message.starts_with("batch[1].n: invalid type"),
            "{}",
            e.message
        );
        let e = parse_json::<Body>(br#"{"batch": 5}"#).unwrap_err();
        assert!(
            e.message.starts_with("batch: invalid type"),
            "{}",
            e.message
        );
        let e = parse_json::<Map<String, Value>>(br#"{"a": 1"#).unwrap_err();
        assert_eq!(e.code, "malformed_json", "{}", e.message);
        let e = parse_json::<Map<String, Value>>(br#"{"a": 1} x"#).unwrap_err();
        assert_eq!(e.code, "malformed_json", "{}", e.message);
        assert!(e.message.contains("trailing"), "{}", e.message);
        let e = parse_json::<Map<String, Value>>(b"[1]").unwrap_err();
        assert_eq!(
            (e.code, e.message.starts_with("body: ")),
            ("invalid_field", true),
            "{}",
            e.message
        );
    }
}
