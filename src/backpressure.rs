//! Backpressure: a monitor reads the backlog (queued messages and their
//! bytes) and the free disk space every second; past a configured bound,
//! ingest answers `503` with `Retry-After` instead of filling the disk, and
//! `/readyz` says why. What was accepted before is never touched.

use crate::config::{Runtime, StorageUrl};
use crate::storage::Storage;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the monitor looks.
const EVERY: Duration = Duration::from_secs(1);
/// What a refused client is told to wait, seconds.
pub const RETRY_AFTER_SECS: u64 = 30;

#[derive(Default)]
pub struct Backpressure {
    reason: RwLock<Option<String>>,
    quiet: crate::telemetry::Throttle,
}

impl Backpressure {
    /// Why ingest is refusing now, if it is.
    pub fn reason(&self) -> Option<String> {
        self.reason.read().expect("backpressure lock").clone()
    }

    fn set(&self, reason: Option<String>) {
        let mut current = self.reason.write().expect("backpressure lock");
        if *current != reason {
            match &reason {
                Some(r) => tracing::warn!("ingest paused: {r}"),
                None => tracing::info!("ingest resumed: back under the backlog and disk bounds"),
            }
            *current = reason;
        }
    }

    /// Checks once: the bounds of `storage.*` against the backlog and the disk.
    pub async fn check(&self, runtime: &Runtime, storage: &dyn Storage) {
        let c = &runtime.config.storage;
        let mut reason = None;
        match storage.queue_stats().await {
            Ok(q) => {
                if c.max_backlog_messages > 0 && q.depth >= c.max_backlog_messages {
                    reason = Some(format!(
                        "the backlog holds {} messages (storage.max_backlog_messages = {})",
                        q.depth, c.max_backlog_messages
                    ));
                } else if c.max_backlog_bytes > 0 && q.bytes >= c.max_backlog_bytes {
                    reason = Some(format!(
                        "the backlog holds {} bytes (storage.max_backlog_bytes = {})",
                        q.bytes, c.max_backlog_bytes
                    ));
                }
            }
            Err(e) => {
                if self.quiet.ready() {
                    tracing::warn!(error = %e, "backlog unknown (said once a minute)");
                }
            }
        }
        if reason.is_none() {
            if let StorageUrl::Sqlite(db) = &runtime.storage {
                let dir = db
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                if let Ok(free) = fs4::available_space(dir) {
                    if free < c.min_free_disk_bytes {
                        reason = Some(format!(
                            "{free} bytes free on the database's disk (storage.min_free_disk_bytes = {})",
                            c.min_free_disk_bytes
                        ));
                    }
                }
            }
        }
        self.set(reason);
    }

    /// Checks every second until `stop`.
    pub async fn run(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        storage: Arc<dyn Storage>,
        stop: CancellationToken,
    ) {
        loop {
            self.check(&runtime, storage.as_ref()).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
    }
}
