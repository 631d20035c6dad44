//! The admin API's answers, typed so that the OpenAPI document
//! (`/api/openapi.json`) is generated from what is sent.

use crate::delivery::ConcurrencyStats;
use crate::delivery::health::TotangoHealth;
use crate::storage::{
    AuditRecord, EntityAttribute, EntityKind, Erased, LastResponse, State, StoredMessage,
    Suppression,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A stored message as the operator sees it: what the list shows
/// ([`MessageSummary`]), the Segment input and the Totango requests (with
/// their URL). Times are milliseconds since the epoch.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    #[serde(flatten)]
    pub summary: MessageSummary,
    /// The Segment input as stored (`null` once its payload is dropped).
    #[schema(value_type = Object)]
    pub payload: Value,
    /// The Totango requests, once translated.
    pub requests: Option<Vec<RequestView>>,
}

/// One Totango request: its parameters in sending order, and where it goes
/// (secrets in the URL redacted).
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestView {
    #[schema(value_type = Object)]
    pub params: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl MessageView {
    /// `base`: the Totango endpoint the message's source sends to.
    pub fn new(mut m: StoredMessage, base: Option<&str>) -> MessageView {
        let requests = m.requests.take().map(|r| match r {
            Value::Array(items) => items
                .into_iter()
                .map(|r| {
                    let url = base.and_then(|base| {
                        serde_json::from_value::<crate::mapping::TotangoRequest>(r.clone())
                            .ok()
                            .map(|t| crate::secret::redact_url(&t.url(base)))
                    });
                    let params = match r {
                        Value::Object(mut o) => o.remove("params").unwrap_or(Value::Null),
                        other => other,
                    };
                    RequestView { params, url }
                })
                .collect(),
            _ => Vec::new(),
        });
        let payload = std::mem::take(&mut m.payload);
        MessageView {
            summary: MessageSummary::from(m),
            payload,
            requests,
        }
    }
}

/// `GET /api/messages`: newest first; `next` is the `before` of the next
/// page (`null` on the last).
#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub messages: Vec<MessageView>,
    pub next: Option<i64>,
}

/// What a replay queued again.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    pub replayed: usize,
    pub ids: Vec<i64>,
}

/// `GET /api/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stats {
    /// Messages by outcome (every outcome, zero included).
    pub outcomes: BTreeMap<String, u64>,
    pub queue: QueueView,
    pub delivery: ConcurrencyStats,
    pub totango: TotangoView,
}

/// Totango's health as this replica sees it, and how many messages wait
/// for it (the whole queue: every queued message goes to Totango).
#[derive(Debug, Serialize, ToSchema)]
pub struct TotangoView {
    #[serde(flatten)]
    pub health: TotangoHealth,
    pub waiting: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub depth: u64,
    pub oldest_pending_age_seconds: Option<f64>,
}

/// `DELETE /api/users/{userId}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasedUser {
    pub erased: Erased,
    pub suppressed: bool,
}

/// `GET /api/suppressions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SuppressionList {
    pub suppressions: Vec<Suppression>,
}

/// `POST`/`DELETE /api/suppressions…`: where the user now stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct SuppressionState {
    #[serde(rename = "userId")]
    pub user_id: String,
    pub suppressed: bool,
}

/// `GET /api/audit`: newest first; `next` is the `before` of the next page.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditRecord>,
    pub next: Option<i64>,
}

/// `GET /api/accounts/{id}`, `GET /api/users/{id}`: what one account or
/// user sent, what Totango should now hold for it, its activity, its
/// failures. An id never seen answers `found: false` with empty lists.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntityView {
    pub kind: EntityKind,
    pub id: String,
    pub found: bool,
    /// Newest first; `next` is the `before` of the next page.
    pub messages: Vec<MessageSummary>,
    pub next: Option<i64>,
    /// The last value of each attribute Totango accepted for it.
    pub attributes: Vec<EntityAttribute>,
    pub activity: ActivityView,
    pub failures: FailuresView,
}

/// Activities Totango accepted, per UTC day.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityView {
    pub days: i64,
    pub total: u64,
    pub per_day: Vec<DayCount>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DayCount {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub activities: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FailuresView {
    pub dead: Vec<MessageSummary>,
    /// Queued messages with failed attempts.
    pub failing: Vec<MessageSummary>,
}

/// A message as the entity page lists it: no payload or requests (the
/// message's own JSON has them), Totango's last answer included.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageSummary {
    pub id: i64,
    pub message_id: String,
    pub call: String,
    pub source: String,
    pub service_id: String,
    pub user_id: Option<String>,
    pub account_id: Option<String>,
    pub outcome: State,
    pub code: Option<String>,
    pub reason: Option<String>,
    pub warnings: Vec<String>,
    pub sent: u32,
    pub attempts: u32,
    pub last_response: Option<LastResponse>,
    pub received_at: i64,
    pub updated_at: i64,
    pub next_attempt_at: Option<i64>,
}

impl From<StoredMessage> for MessageSummary {
    fn from(m: StoredMessage) -> Self {
        MessageSummary {
            id: m.id,
            message_id: m.message_id,
            call: m.call,
            source: m.source,
            service_id: m.service_id,
            user_id: m.user_id,
            account_id: m.account_id,
            outcome: m.state,
            code: m.code,
            reason: m.reason,
            warnings: m.warnings,
            sent: m.sent,
            attempts: m.attempts,
            last_response: m.last_response,
            received_at: m.received_at,
            updated_at: m.updated_at,
            next_attempt_at: m.next_attempt_at,
        }
    }
}
