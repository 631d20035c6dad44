//! The bodies the ingest APIs answer with, typed so that the OpenAPI
//! document (`/api/openapi.json`) is generated from what is sent.

use crate::storage::Erased;
use serde::Serialize;
use utoipa::ToSchema;

/// The Tracking API's answer to an accepted request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Success {
    pub success: bool,
}

impl Success {
    pub const YES: Success = Success { success: true };
}

/// What became of one message: the `/segment` answer, and each element of
/// the webhook's `outcomes`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageOutcome {
    #[serde(rename = "messageId")]
    pub message_id: String,
    pub outcome: OutcomeName,
    /// Why it was refused (mapping.md codes), or `duplicate`.
    pub code: Option<String>,
    pub message: Option<String>,
    /// Mapping warnings and breaches of Totango's limits.
    pub warnings: Vec<String>,
    /// What a `delete` erased (only with outcome `erased`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased: Option<Erased>,
}

/// The outcome names of an ingest answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeName {
    Accepted,
    Filtered,
    Unsupported,
    Rejected,
    Duplicate,
    Erased,
}

/// The webhook's answer when nothing was rejected.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WebhookAnswer {
    pub success: bool,
    pub outcomes: Vec<MessageOutcome>,
}

/// Every error answer: `{"message": …, "code": …}`; the webhook adds the
/// per-message `outcomes` of a request with rejected messages.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcomes: Option<Vec<MessageOutcome>>,
}
