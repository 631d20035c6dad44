//! The `[privacy]` section: what a user deletion does and how long payloads
//! are kept by outcome (docs/privacy.md).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// A Segment `delete` also suppresses the user: its later messages are
    /// recorded as `suppressed`, without payload, never delivered, until
    /// the suppression is lifted (`TD_PRIVACY__SUPPRESS_ON_DELETE`).
    pub suppress_on_delete: bool,
    /// How long a delivered message keeps its payload (and settings,
    /// translated requests, Totango's answer), seconds; 0: as long as the
    /// message is kept (`storage.retention_secs`).
    pub delivered_payload_secs: u64,
    /// The same for rejected, duplicate, filtered, unsupported messages.
    pub refused_payload_secs: u64,
    /// The same for dead messages; a dead message without its payload can
    /// no longer be replayed.
    pub dead_payload_secs: u64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            suppress_on_delete: false,
            delivered_payload_secs: 24 * 3600,
            refused_payload_secs: 3600,
            dead_payload_secs: 7 * 24 * 3600,
        }
    }
}
