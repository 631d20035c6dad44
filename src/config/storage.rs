//! The `[storage]` section and the backend its URL names.

use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `sqlite://PATH` (embedded) or `postgres://…`. Printed without its
    /// password (userinfo or a `password=` parameter).
    #[serde(serialize_with = "serialize_storage_url")]
    pub url: String,
    /// How long an accepted `messageId` is remembered for deduplication.
    pub dedupe_window_secs: u64,
    /// How long finished messages (not pending, not dead) are kept; 0 keeps them forever.
    pub retention_secs: u64,
    /// How long messages that were never to be sent (rejected, duplicate,
    /// filtered, unsupported) are kept; 0: as long as `retention_secs`.
    pub refused_retention_secs: u64,
    /// Past this many queued messages ingest answers 503 (0: no bound).
    pub max_backlog_messages: u64,
    /// Past this many bytes of queued messages ingest answers 503 (0: no bound).
    pub max_backlog_bytes: u64,
    /// Past this many stored bytes of refused messages (rejected, duplicate,
    /// filtered, unsupported; kept `refused_retention_secs`), further ones
    /// are kept without payload and settings (0: no bound).
    pub max_refused_bytes: u64,
    /// Below this much free space where the database lives, ingest answers 503.
    pub min_free_disk_bytes: u64,
    /// How long a claim holds a message when its holder cannot be watched:
    /// SQLite within one process, and claims made by a version without
    /// replica heartbeats. A replica's claims last as long as it lives.
    pub lease_secs: u64,
    /// How often each replica records that it is alive (PostgreSQL).
    pub heartbeat_secs: u64,
    /// A replica not heard from for this long is gone: the messages it held
    /// are claimable again at once (PostgreSQL).
    pub replica_timeout_secs: u64,
    /// Database connections each process keeps (PostgreSQL).
    pub pool_size: u32,
    /// How long the per-minute history behind the operator page's charts
    /// is kept; at least an hour.
    pub history_retention_secs: u64,
}

/// The shortest `storage.history_retention_secs`: the page's shortest chart.
pub const MIN_HISTORY_RETENTION_SECS: u64 = 3600;

fn serialize_storage_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_storage_url(url))
}

/// `url` without the secrets a database URL can carry.
pub fn redact_storage_url(url: &str) -> String {
    let url = crate::secret::redact_url(url);
    let Some((base, query)) = url.split_once('?') else {
        return url;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=[redacted]"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// The storage backend named by `storage.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

pub fn parse_storage_url(url: &str) -> Result<StorageUrl, ConfigError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(ConfigError::invalid(
                "storage.url",
                "sqlite:// needs a file path",
            ));
        }
        return Ok(StorageUrl::Sqlite(PathBuf::from(path)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(StorageUrl::Postgres(url.to_owned()));
    }
    Err(ConfigError::invalid(
        "storage.url",
        format!("{url:?}: expected sqlite://PATH or postgres://…"),
    ))
}
