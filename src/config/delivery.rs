//! The `[delivery]` section: retries, concurrency and timeouts toward Totango.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_retry_age_secs: u64,
    /// Outbound requests in flight at first; it then adapts between the bounds.
    pub concurrency: usize,
    /// Lower bound of the adaptive concurrency.
    pub min_concurrency: usize,
    /// Upper bound of the adaptive concurrency (also the connection pool size).
    pub max_concurrency: usize,
    pub request_timeout_ms: u64,
}
