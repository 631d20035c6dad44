//! What the privacy controls keep in storage: user erasures (and their
//! tombstones), suppressions, and the audit trail of operator actions.

use super::Millis;
use serde::Serialize;

/// The outcome code of messages that were not sent because their user was
/// erased or is suppressed.
pub const USER_DELETED: &str = "user_deleted";
/// The outcome code of messages recorded for a suppressed user.
pub const SUPPRESSED: &str = "suppressed";
/// The reason kept on a message whose payload was erased.
pub const PAYLOAD_ERASED: &str = "payload erased (user deletion)";

/// Erase what is stored about one user.
#[derive(Debug, Clone)]
pub struct Erase {
    pub user_id: String,
    /// Also suppress the user (later messages recorded, never delivered).
    pub suppress: bool,
    /// Why, kept in the tombstone (e.g. "delete message m-1 from web").
    pub reason: String,
}

/// What an erase did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Erased {
    /// Stored messages whose payload was erased.
    pub messages: u64,
    /// Of those, queued or dead ones that will now never be sent.
    pub cancelled: u64,
}

/// A user whose messages are recorded without payload and never delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Suppression {
    #[serde(rename = "userId")]
    pub user_id: String,
    pub since: Millis,
    pub reason: String,
}

/// One operator action, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Who: `session:<first 12 hex of its digest>`, `token`, or
    /// `cli:<login name>` for the command line.
    pub actor: String,
    /// The client address, when known.
    pub address: Option<String>,
    /// What: `login`, `logout`, `replay`, `purge`, `erase`, `suppress`,
    /// `unsuppress`, `insights_run`.
    pub action: String,
    /// The filter or target (JSON).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// How many messages (records, for an insights run from the command
    /// line) it concerned, when that applies.
    pub count: Option<u64>,
}

/// A kept audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub id: i64,
    pub at: Millis,
    #[serde(flatten)]
    pub entry: AuditEntry,
}
