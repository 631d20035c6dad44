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
/// Readings tried for one that no storing request overlapped.
const EXACT_TRIES: u64 = 8;
/// A reading slower than this is not repeated.
const CHEAP: Duration = Duration::from_millis(20);
/// How long an exact reading is preferred to later overlapped ones.
const KEEP_EXACT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Backpressure {
    reason: RwLock<Option<String>>,
    quiet: crate::telemetry::Throttle,
    /// The last reading: the backlog (messages, bytes), and the committed
    /// totals below when it began.
    measured: Mutex<Reading>,
    /// Admitted and not yet stored (or refused by storage).
    in_flight: Totals,
    /// Stored since the process started.
    committed: Totals,
}

#[derive(Default, Clone, Copy)]
struct Reading {
    messages: u64,
    bytes: u64,
    committed_messages: u64,
    committed_bytes: u64,
    /// When, if no storing request overlapped the reading.
    exact_at: Option<std::time::Instant>,
}

#[derive(Default)]
struct Totals {
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl Totals {
    fn add(&self, messages: u64, bytes: u64) -> (u64, u64) {
        (
            self.messages.fetch_add(messages, Ordering::SeqCst),
            self.bytes.fetch_add(bytes, Ordering::SeqCst),
        )
    }

    fn take(&self, messages: u64, bytes: u64) {
        take(&self.messages, messages);
        take(&self.bytes, bytes);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.messages.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }
}

/// An admitted request's messages, counted as in flight until this is
/// dropped; [`Admitted::stored`] moves them to the committed totals.
pub struct Admitted<'a> {
    backpressure: &'a Backpressure,
    messages: u64,
    bytes: u64,
    stored: bool,
}

impl Admitted<'_> {
    /// Storage committed them.
    pub fn stored(mut self) {
        self.stored = true;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let bp = self.backpressure;
        if self.stored {
            bp.committed.add(self.messages, self.bytes);
        }
        bp.in_flight.take(self.messages, self.bytes);
    }
}

impl Backpressure {
    /// Why ingest is refusing now, if it is.
    pub fn reason(&self) -> Option<String> {
        self.reason.read().expect("backpressure lock").clone()
    }

    /// Admits a request that queues `messages` of `bytes` in all, or says
    /// why not: a bound already reached, or one this request would cross,
    /// estimated as the last reading plus what was committed since it began
    /// plus what is being stored now (counted twice at worst, never missed).
    pub fn admit(
        &self,
        runtime: &Runtime,
        messages: u64,
        bytes: u64,
    ) -> Result<Admitted<'_>, String> {
        if let Some(why) = self.reason() {
            return Err(why);
        }
        let admitted = Admitted {
            backpressure: self,
            messages,
            bytes,
            stored: false,
        };
        if messages == 0 {
            return Ok(admitted);
        }
        let c = &runtime.config.storage;
        let reading = *self.measured.lock().expect("backpressure lock");
        let (flying_messages, flying_bytes) = self.in_flight.add(messages, bytes);
        let (committed_messages, committed_bytes) = self.committed.get();
        let would = (
            reading.messages
                + committed_messages.saturating_sub(reading.committed_messages)
                + flying_messages
                + messages,
            reading.bytes
                + committed_bytes.saturating_sub(reading.committed_bytes)
                + flying_bytes
                + bytes,
        );
        if c.max_backlog_messages > 0 && would.0 > c.max_backlog_messages {
            return Err(format!(
                "the backlog would hold about {} messages (storage.max_backlog_messages = {})",
                would.0, c.max_backlog_messages
            ));
        }
        if c.max_backlog_bytes > 0 && would.1 > c.max_backlog_bytes {
            return Err(format!(
                "the backlog would hold about {} bytes (storage.max_backlog_bytes = {})",
                would.1, c.max_backlog_bytes
            ));
        }
        Ok(admitted)
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
        // What is committed from the start of the reading on counts on top of
        // it. A request being stored while reading may be counted twice
        // (safe, but it refuses early near a bound): while readings are
        // cheap, read again a few times for one no request overlapped.
        let mut attempt = 0;
        let (stats, exact, (committed_messages, committed_bytes)) = loop {
            attempt += 1;
            let before = self.committed.get();
            let quiet_before = self.in_flight.get().0 == 0;
            let started = std::time::Instant::now();
            let stats = storage.queue_stats().await;
            let exact =
                quiet_before && self.in_flight.get().0 == 0 && self.committed.get() == before;
            if stats.is_err() || exact || attempt == EXACT_TRIES || started.elapsed() > CHEAP {
                break (stats, exact, before);
            }
            tokio::time::sleep(Duration::from_millis(attempt)).await;
        };
        match stats {
            Ok(q) => {
                // An overlapped reading replaces an exact one only once that
                // is a few seconds old (it misses what was delivered since).
                let mut measured = self.measured.lock().expect("backpressure lock");
                let fresh = measured
                    .exact_at
                    .is_some_and(|at| at.elapsed() < KEEP_EXACT);
                if exact || !fresh {
                    *measured = Reading {
                        messages: q.depth,
                        bytes: q.bytes,
                        committed_messages,
                        committed_bytes,
                        exact_at: exact.then(std::time::Instant::now),
                    };
                }
                drop(measured);
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

    /// Checks every second until `stop` (the first reading is the caller's).
    pub async fn run(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        storage: Arc<dyn Storage>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            self.check(&runtime, storage.as_ref()).await;
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
