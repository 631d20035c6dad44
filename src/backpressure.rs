//! Backpressure: a monitor reads the backlog (queued messages and their
//! bytes) and the free disk space every second; past a configured bound,
//! ingest answers `503` with `Retry-After` instead of filling the disk, and
//! `/readyz` says why. Between two readings every request is checked at
//! acceptance against the last reading plus what was accepted since (two
//! counters), so a burst cannot overshoot a bound by a second's worth of
//! traffic. What was accepted before is never touched.

use crate::config::{Runtime, StorageUrl};
use crate::storage::Storage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
    /// The backlog at the last reading: (messages, bytes).
    measured: Mutex<(u64, u64)>,
    /// Queued messages and bytes admitted since the last reading.
    admitted_messages: AtomicU64,
    admitted_bytes: AtomicU64,
}

impl Backpressure {
    /// Why ingest is refusing now, if it is.
    pub fn reason(&self) -> Option<String> {
        self.reason.read().expect("backpressure lock").clone()
    }

    /// Admits a request that queues `messages` of `bytes` in all, or says
    /// why not: a bound already reached, or one this request would cross
    /// (estimated from the last reading and what was admitted since).
    pub fn admit(&self, runtime: &Runtime, messages: u64, bytes: u64) -> Result<(), String> {
        if let Some(why) = self.reason() {
            return Err(why);
        }
        if messages == 0 {
            return Ok(());
        }
        let c = &runtime.config.storage;
        let (depth, size) = *self.measured.lock().expect("backpressure lock");
        let before_messages = self.admitted_messages.fetch_add(messages, Ordering::SeqCst);
        let before_bytes = self.admitted_bytes.fetch_add(bytes, Ordering::SeqCst);
        let would = (
            depth + before_messages + messages,
            size + before_bytes + bytes,
        );
        let refuse = if c.max_backlog_messages > 0 && would.0 > c.max_backlog_messages {
            Some(format!(
                "the backlog would hold about {} messages (storage.max_backlog_messages = {})",
                would.0, c.max_backlog_messages
            ))
        } else if c.max_backlog_bytes > 0 && would.1 > c.max_backlog_bytes {
            Some(format!(
                "the backlog would hold about {} bytes (storage.max_backlog_bytes = {})",
                would.1, c.max_backlog_bytes
            ))
        } else {
            None
        };
        match refuse {
            Some(why) => {
                take(&self.admitted_messages, messages);
                take(&self.admitted_bytes, bytes);
                Err(why)
            }
            None => Ok(()),
        }
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
        // What is admitted from now on counts on top of this reading.
        let admitted = (
            self.admitted_messages.load(Ordering::SeqCst),
            self.admitted_bytes.load(Ordering::SeqCst),
        );
        match storage.queue_stats().await {
            Ok(q) => {
                *self.measured.lock().expect("backpressure lock") = (q.depth, q.bytes);
                take(&self.admitted_messages, admitted.0);
                take(&self.admitted_bytes, admitted.1);
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

/// Subtracts `n` from a counter, stopping at zero (a refusal and a reading
/// may both take the same admission back).
fn take(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        Some(v.saturating_sub(n))
    });
}
