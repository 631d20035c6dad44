//! The `[limits]` section: what one request, one client and the process may hold.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_message_bytes: usize,
    /// Body of a single-message request.
    pub max_body_bytes: usize,
    /// Body of `/v1/batch`, `/v1/import` and `/webhook` (RudderStack's
    /// libraries build batches up to 4 MB).
    #[serde(default = "default_batch_body")]
    pub max_batch_body_bytes: usize,
    /// Total size of one request's messages as stored (after a batch's
    /// `context` is merged into every item).
    pub max_request_stored_bytes: usize,
    pub max_batch_messages: usize,
    /// Time a client has to send its request headers.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send its whole request body (at most).
    pub body_read_timeout_ms: u64,
    /// Slowest accepted body: a body's deadline is 5 s plus its declared
    /// length at this rate (capped by `body_read_timeout_ms`).
    pub min_body_bytes_per_sec: usize,
    /// Open client connections at most; more wait to be accepted.
    pub max_connections: usize,
    /// Open connections from one client address at most; more are closed at
    /// once (0: no per-client cap). Behind a reverse proxy every client has
    /// the proxy's address: raise it there, or cap per client in the proxy.
    /// A client is an address prefix: see `client_prefix_v4`/`_v6`.
    pub max_connections_per_client: usize,
    /// IPv4 addresses sharing this many leading bits are one client for
    /// `max_connections_per_client` (24: a /24; 32: each address).
    #[serde(default = "default_prefix_v4")]
    pub client_prefix_v4: u8,
    /// IPv6 addresses sharing this many leading bits are one client (64: a
    /// /64, what one host or site usually gets; 128: each address).
    #[serde(default = "default_prefix_v6")]
    pub client_prefix_v6: u8,
    /// Request body bytes (after decompression) all requests together may
    /// hold at once; beyond it a body is answered `503` + `Retry-After`.
    #[serde(default = "default_inflight")]
    pub max_inflight_body_bytes: usize,
    /// Time before a body's first bytes count, for a request that carries no
    /// credential in its headers (no `Authorization`, no `X-Signature`, no
    /// session cookie), milliseconds; then the bytes that arrive buy time at
    /// `min_body_bytes_per_sec`. Credentialed requests get 5 s.
    #[serde(default = "default_uncredentialed_grace")]
    pub uncredentialed_body_grace_ms: u64,
}

pub(super) fn default_prefix_v4() -> u8 {
    24
}

pub(super) fn default_prefix_v6() -> u8 {
    64
}

pub(super) fn default_batch_body() -> usize {
    4 * 1024 * 1024
}

pub(super) fn default_inflight() -> usize {
    64 * 1024 * 1024
}

pub(super) fn default_uncredentialed_grace() -> u64 {
    2_000
}
