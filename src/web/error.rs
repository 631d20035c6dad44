//! One error shape for every API answer: `{"message": "...", "code": "..."}`.
//! The project's error policy (typed errors below the command line, `anyhow`
//! only in `src/cli/`, no message matching) is in docs/architecture.md.

use super::answers::{ErrorBody, MessageOutcome};
use crate::segment::ParseError;
use crate::storage::StorageError;
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Per-message outcomes (the webhook's, when some were rejected).
    pub outcomes: Option<Vec<MessageOutcome>>,
    /// `WWW-Authenticate` of a 401 (Basic, for write keys, unless set).
    pub challenge: Option<&'static str>,
    /// `Retry-After` seconds of a 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            outcomes: None,
            challenge: None,
            retry_after: None,
        }
    }

    pub fn bad_request(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("{field}: {reason}"),
        )
    }

    pub fn invalid_message(prefix: &str, e: &ParseError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.code(), format!("{prefix}{e}"))
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn unavailable(message: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("body: larger than {limit} bytes"),
        )
    }

    pub fn with_challenge(mut self, challenge: &'static str) -> Self {
        self.challenge = Some(challenge);
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_outcomes(mut self, outcomes: Vec<MessageOutcome>) -> Self {
        self.outcomes = Some(outcomes);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Backpressure or storage down: every request gets it alike and
            // its cause is logged where it is found (once a minute).
            tracing::debug!(status = %self.status, code = %self.code, "{}", self.message);
        } else if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = %self.code, "{}", self.message);
        } else {
            tracing::info!(status = %self.status, code = %self.code, "{}", self.message);
        }
        let body = ErrorBody {
            message: self.message,
            code: self.code.to_owned(),
            outcomes: self.outcomes,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = self
                .challenge
                .unwrap_or("Basic realm=\"totango-destination\"");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(challenge),
            );
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        resp
    }
}
/// A storage failure as a client sees it: `503` and a word on why; the
/// details (paths, hosts) are for the log only.
impl From<&StorageError> for ApiError {
    fn from(e: &StorageError) -> Self {
        ApiError::unavailable(match e {
            StorageError::Corrupt(_) => "storage damaged",
            StorageError::Closed => "shutting down",
            StorageError::Unavailable(_) | StorageError::Conflict(_) => "storage unavailable",
        })
    }
}
