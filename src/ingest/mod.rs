//! Ingest: the three ways in (Tracking API, partner destination, webhook).
//! Every handler authenticates, validates, stores, and answers only after the
//! storage commit. Mapping is used here only to classify (rejected,
//! unsupported, filtered); delivery produces what is sent.

mod error;
mod partner;
mod tracking;
mod webhook;

pub use error::ApiError;

use crate::config::{Runtime, Source};
use crate::delivery::Delivery;
use crate::mapping::{self, Code, Outcome, SettingsPatch};
use crate::segment::{CallType, Message, ParseError};
use crate::storage::{Acceptance, Millis, NewMessage, State, Storage, StorageError};
use crate::telemetry;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use base64::Engine;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared by every handler.
pub struct AppState {
    pub storage: Arc<dyn Storage>,
    pub delivery: Arc<Delivery>,
    pub runtime: Arc<Runtime>,
    pub shutting_down: AtomicBool,
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/batch", post(tracking::batch))
        .route("/v1/import", post(tracking::batch))
        .route("/v1/{call}", post(tracking::single))
        .route("/segment", post(partner::handle))
        .route("/webhook", post(webhook::handle))
}

impl AppState {
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
                .get(k)
                .ok_or_else(|| ApiError::unauthorized("unknown write key")),
        }
    }

    /// Stores prepared messages (all or nothing) and wakes delivery.
    async fn store(
        &self,
        prepared: &[Prepared],
        interface: &'static str,
    ) -> Result<Vec<Acceptance>, ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("shutting down"));
        }
        let batch = prepared.iter().map(|p| p.new.clone()).collect();
        let accepted = self.storage.accept(batch).await.map_err(|e| {
            tracing::error!(error = %e, "could not store accepted messages");
            match e {
                StorageError::Closed => ApiError::unavailable("shutting down"),
                StorageError::Backend(_) => ApiError::unavailable("storage unavailable"),
            }
        })?;
        if prepared.iter().any(|p| p.new.state == State::Pending) {
            self.delivery.wake();
        }
        metrics::counter!(telemetry::ACCEPTED, "interface" => interface)
            .increment(prepared.len() as u64);
        for (p, a) in prepared.iter().zip(&accepted) {
            match (a, p.new.state) {
                (Acceptance::Duplicate { .. }, _) => {
                    telemetry::count_outcome(State::Duplicate.as_str())
                }
                (_, State::Pending) => {}
                (_, state) => telemetry::count_outcome(state.as_str()),
            }
        }
        Ok(accepted)
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

/// Reads the whole body within the configured limit (`413` beyond it).
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.limits().max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let deadline = std::time::Duration::from_millis(state.limits().body_read_timeout_ms);
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| body_timeout())?;
    read.map_err(|e| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::too_large(limit);
            }
            if s.is::<tower_http::timeout::TimeoutError>() {
                return body_timeout();
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
#[derive(Debug, Clone)]
struct Prepared {
    new: NewMessage,
    outcome: Outcome,
    code: Option<Code>,
    message: Option<String>,
}

impl Prepared {
    fn outcome_json(&self, acceptance: Acceptance) -> Value {
        let (outcome, code, message) = match acceptance {
            Acceptance::Duplicate { .. } => ("duplicate", Some("duplicate"), None),
            Acceptance::Stored { .. } => (
                match self.outcome {
                    Outcome::Send => "accepted",
                    other => other.as_str(),
                },
                self.code.map(Code::as_str),
                self.message.as_deref(),
            ),
        };
        serde_json::json!({
            "messageId": self.new.message_id,
            "outcome": outcome,
            "code": code,
            "message": message,
            "warnings": self.new.warnings,
        })
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

/// Parses, validates and classifies one message. `field` prefixes error
/// paths (`batch[3].`), so a client learns which message is wrong.
fn prepare(
    value: Value,
    source: &Source,
    header_settings: Option<&SettingsPatch>,
    field: &str,
    received_at: Millis,
) -> Result<Prepared, ApiError> {
    let at = |e: &ParseError| ApiError::invalid_message(field, e);
    let msg = Message::from_value(&value).map_err(|e| at(&e))?;
    msg.context_group_id().map_err(|e| at(&e))?;
    let overrides = header_settings.cloned().unwrap_or_default();
    let patch = source.settings.merged(&overrides);
    let settings = patch.resolve().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_settings",
            format!("settings: {e} (set it in the server configuration or X-Segment-Settings)"),
        )
    })?;
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
    let account_id = match msg.call {
        CallType::Group => msg.group_id.clone(),
        _ => msg.context_group_id().ok().flatten(),
    };
    let new = NewMessage {
        source: source.name.clone(),
        message_id: msg.message_id.clone().unwrap_or_default(),
        call: msg.call.as_str().to_owned(),
        service_id: settings.service_id.clone(),
        user_id: msg.user_id.clone(),
        account_id,
        ordering_key: mapping::ordering_key(&msg)
            .map(|key| format!("{}\u{1f}{key}", settings.service_id)),
        payload: value.to_string(),
        settings: serde_json::to_string(&overrides).expect("settings serialise"),
        state,
        code: t.code.map(|c| c.as_str().to_owned()),
        reason: t.message.clone(),
        warnings: t.warnings.clone(),
        received_at,
        set_page_category,
        needs_page_category,
    };
    for w in &new.warnings {
        tracing::info!(message_id = %new.message_id, "{w}");
    }
    Ok(Prepared {
        new,
        outcome: t.outcome,
        code: t.code,
        message: t.message,
    })
}

/// Parses a body that must be JSON, naming what is wrong.
fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
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
    })
}

fn check_message_size(state: &AppState, raw_len: usize, field: &str) -> Result<(), ApiError> {
    let max = state.limits().max_message_bytes;
    if raw_len > max {
        let name = if field.is_empty() {
            "message"
        } else {
            field.trim_end_matches('.')
        };
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "message_too_large",
            format!("{name}: {raw_len} bytes; a message may be at most {max} bytes"),
        ));
    }
    Ok(())
}
