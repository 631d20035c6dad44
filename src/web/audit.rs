//! Who made an admin request, and keeping what they did in the audit trail
//! (docs/privacy.md). Set by the admin API's credential check; any handler
//! behind it (admin, insights) records its actions through it.

use crate::storage::{AuditEntry, Storage};
use serde_json::Value;

/// Who made an admin request.
#[derive(Debug, Clone)]
pub struct Actor {
    pub who: String,
    pub address: Option<String>,
}

impl Actor {
    /// Keeps an action in the audit trail. A failure is logged, not
    /// returned: the action itself already happened.
    pub async fn record(
        &self,
        storage: &dyn Storage,
        action: &str,
        detail: Value,
        count: Option<u64>,
    ) {
        let entry = AuditEntry {
            actor: self.who.clone(),
            address: self.address.clone(),
            action: action.to_owned(),
            detail,
            count,
        };
        if let Err(e) = storage.record_audit(entry).await {
            tracing::error!(error = %e, action, "could not record an admin action in the audit trail");
        }
    }
}
