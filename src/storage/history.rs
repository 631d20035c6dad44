//! The per-minute history behind the operator page's charts: counts of what
//! happened (accepted, delivered, failed attempts, …), Totango's round trips
//! as a histogram, and gauges (queue depth, oldest pending age, concurrency
//! limit), kept in storage so every replica adds into one history that
//! survives restarts.
//!
//! Nothing is written per message: [`HistoryCounters`] adds in memory
//! (atomics) and [`flush_loop`] writes what was added every
//! [`FLUSH_EVERY`] and at shutdown, in one small transaction.
//!
//! Merging across replicas: counts and round-trip buckets are added into the
//! minute's row (`ON CONFLICT … DO UPDATE SET n = n + excluded.n`); gauges
//! keep the highest value any replica sampled in the minute. The round trip
//! is a fixed log-bucket histogram (buckets √2 apart), so p50 and p99 of any
//! span are read from the sum of its minutes' buckets, within ±19 %.

use super::{Millis, Storage, StorageError, now_millis};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One minute, in milliseconds: the history's resolution.
pub const MINUTE_MS: Millis = 60_000;
/// How often counts are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How often history past its retention is deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Minutes of counts kept in memory while storage cannot take them.
const MAX_UNWRITTEN: usize = 60;

/// What is counted, in the order of the storage columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Messages stored by ingest, whatever their outcome (duplicates too).
    Accepted,
    Delivered,
    /// Requests sent to Totango.
    Attempts,
    /// Requests Totango did not accept (an error status, a timeout, no
    /// connection).
    Failed,
    Rejected,
    Duplicate,
    Dead,
    Filtered,
    Unsupported,
    Suppressed,
}

impl Count {
    pub const ALL: [Count; 10] = [
        Count::Accepted,
        Count::Delivered,
        Count::Attempts,
        Count::Failed,
        Count::Rejected,
        Count::Duplicate,
        Count::Dead,
        Count::Filtered,
        Count::Unsupported,
        Count::Suppressed,
    ];

    /// The column (and API) name.
    pub fn name(self) -> &'static str {
        match self {
            Count::Accepted => "accepted",
            Count::Delivered => "delivered",
            Count::Attempts => "attempts",
            Count::Failed => "failed",
            Count::Rejected => "rejected",
            Count::Duplicate => "duplicate",
            Count::Dead => "dead",
            Count::Filtered => "filtered",
            Count::Unsupported => "unsupported",
            Count::Suppressed => "suppressed",
        }
    }

    /// The count a message's final state adds to, if any.
    pub fn of_state(state: super::State) -> Option<Count> {
        use super::State as S;
        Some(match state {
            S::Pending => return None,
            S::Delivered => Count::Delivered,
            S::Filtered => Count::Filtered,
            S::Unsupported => Count::Unsupported,
            S::Duplicate => Count::Duplicate,
            S::Rejected => Count::Rejected,
            S::Dead => Count::Dead,
            S::Suppressed => Count::Suppressed,
        })
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counts by [`Count`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts([u64; Count::ALL.len()]);

impl Counts {
    pub fn get(&self, c: Count) -> u64 {
        self.0[c.index()]
    }

    pub fn set(&mut self, c: Count, n: u64) {
        self.0[c.index()] = n;
    }

    pub fn add(&mut self, other: &Counts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }
}

/// Round-trip buckets: bucket `i > 0` holds [2^(i/2), 2^((i+1)/2)) ms,
/// bucket 0 everything under √2 ms, the last one everything from ~46 s.
pub const RTT_BUCKETS: usize = 32;

/// A histogram of round-trip times, mergeable by adding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RttHistogram(pub [u64; RTT_BUCKETS]);

impl RttHistogram {
    /// The bucket a round trip of `ms` milliseconds falls into.
    pub fn bucket_of(ms: f64) -> usize {
        // Also NaN.
        if ms.is_nan() || ms < std::f64::consts::SQRT_2 {
            return 0;
        }
        ((2.0 * ms.log2()).floor() as usize).min(RTT_BUCKETS - 1)
    }

    /// The value a bucket stands for: its geometric middle, in ms.
    pub fn value_of(bucket: usize) -> f64 {
        if bucket == 0 {
            1.0
        } else {
            2f64.powf((2 * bucket + 1) as f64 / 4.0)
        }
    }

    pub fn record(&mut self, ms: f64) {
        self.0[Self::bucket_of(ms)] += 1;
    }

    pub fn add(&mut self, other: &RttHistogram) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (0 < q ≤ 1) in ms, or `None` without round trips.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Self::value_of(i));
            }
        }
        Some(Self::value_of(RTT_BUCKETS - 1))
    }
}

/// Gauges sampled during a span; each the highest value seen (`None`: not
/// sampled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    pub queue_depth: Option<u64>,
    /// Age of the oldest queued message, ms.
    pub oldest_pending_ms: Option<u64>,
    /// The adaptive concurrency limit toward Totango (the highest any
    /// replica had).
    pub concurrency_limit: Option<u64>,
}

impl Gauges {
    pub fn merge(&mut self, other: &Gauges) {
        let max = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.queue_depth = max(self.queue_depth, other.queue_depth);
        self.oldest_pending_ms = max(self.oldest_pending_ms, other.oldest_pending_ms);
        self.concurrency_limit = max(self.concurrency_limit, other.concurrency_limit);
    }
}

/// One span of history: a minute as written, or a bucket of minutes as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryRow {
    /// Start of the span, ms since the epoch (a whole minute).
    pub at: Millis,
    pub counts: Counts,
    pub rtt: RttHistogram,
    pub gauges: Gauges,
}

impl HistoryRow {
    pub fn new(at: Millis) -> HistoryRow {
        HistoryRow {
            at,
            ..HistoryRow::default()
        }
    }

    /// Adds `other` (a span inside this one) into it.
    pub fn merge(&mut self, other: &HistoryRow) {
        self.counts.add(&other.counts);
        self.rtt.add(&other.rtt);
        self.gauges.merge(&other.gauges);
    }
}

/// Which history to read: `[from, to)`, in buckets of `step_ms` (a whole
/// number of minutes; buckets start at multiples of it since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    pub from: Millis,
    pub to: Millis,
    pub step_ms: Millis,
}

/// The start of the minute `at` falls in.
pub fn minute_of(at: Millis) -> Millis {
    at.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// What this process counted since the last flush, in memory.
#[derive(Debug, Default)]
pub struct HistoryCounters {
    counts: [AtomicU64; Count::ALL.len()],
    rtt: [AtomicU64; RTT_BUCKETS],
}

impl HistoryCounters {
    pub fn add(&self, c: Count, n: u64) {
        if n > 0 {
            self.counts[c.index()].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts one round trip to Totango.
    pub fn round_trip(&self, rtt: Duration) {
        let bucket = RttHistogram::bucket_of(rtt.as_secs_f64() * 1000.0);
        self.rtt[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes what was counted (leaving zero).
    pub fn take(&self) -> (Counts, RttHistogram) {
        let mut counts = Counts::default();
        for c in Count::ALL {
            counts.set(c, self.counts[c.index()].swap(0, Ordering::Relaxed));
        }
        let mut rtt = RttHistogram::default();
        for (i, b) in self.rtt.iter().enumerate() {
            rtt.0[i] = b.swap(0, Ordering::Relaxed);
        }
        (counts, rtt)
    }

    /// Counts a stored batch: every message is accepted; duplicates and
    /// messages refused at acceptance add to their outcome too.
    pub fn accepted(&self, states: impl Iterator<Item = (super::State, bool)>) {
        let mut counts = Counts::default();
        for (state, duplicate) in states {
            counts.set(Count::Accepted, counts.get(Count::Accepted) + 1);
            let outcome = if duplicate {
                Some(Count::Duplicate)
            } else {
                Count::of_state(state)
            };
            if let Some(c) = outcome {
                counts.set(c, counts.get(c) + 1);
            }
        }
        for c in Count::ALL {
            self.add(c, counts.get(c));
        }
    }
}

/// How the history is written and kept.
#[derive(Debug, Clone, Copy)]
pub struct HistoryOptions {
    /// History older than this is deleted.
    pub retention_ms: Millis,
    pub flush_every: Duration,
}

/// Writes what `storage`'s [`HistoryCounters`] hold every
/// `options.flush_every` (at whole multiples of it on the clock, so every
/// replica's ticks fall in the same minutes), with the gauges sampled then
/// (`concurrency_limit` tells the limit toward Totango), and once more when
/// `stop` is cancelled. Counts land in the minute their flush interval
/// belongs to. What storage cannot take is kept (up to an hour) and written
/// with the next flush. Prunes history past its retention.
pub async fn flush_loop(
    storage: Arc<dyn Storage>,
    concurrency_limit: impl Fn() -> u64 + Send + 'static,
    options: HistoryOptions,
    stop: CancellationToken,
) {
    let every = options.flush_every.max(Duration::from_millis(100));
    let every_ms = every.as_millis() as Millis;
    let mut unwritten: Vec<HistoryRow> = Vec::new();
    let mut last_prune: Option<tokio::time::Instant> = None;
    let quiet = crate::telemetry::Throttle::default();
    loop {
        let now = now_millis();
        let next_tick = (now.div_euclid(every_ms) + 1) * every_ms;
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_millis((next_tick - now).max(1) as u64)) => false,
        };
        let now = now_millis();
        // The interval just ended: its middle names the minute.
        let minute = if stopping {
            minute_of(now)
        } else {
            minute_of(now - every_ms / 2)
        };
        let (counts, rtt) = storage.history_counters().take();
        let mut row = HistoryRow {
            at: minute,
            counts,
            rtt,
            gauges: Gauges {
                concurrency_limit: Some(concurrency_limit()),
                ..Gauges::default()
            },
        };
        match storage.queue_stats().await {
            Ok(q) => {
                row.gauges.queue_depth = Some(q.depth);
                row.gauges.oldest_pending_ms =
                    Some(q.oldest_received_at.map_or(0, |t| (now - t).max(0) as u64));
            }
            Err(e) if quiet.ready() => {
                tracing::warn!(error = %e, "history: queue stats unavailable (said once a minute)")
            }
            Err(_) => {}
        }
        match unwritten.last_mut() {
            Some(last) if last.at == row.at => last.merge(&row),
            _ => unwritten.push(row),
        }
        match storage.add_history(unwritten.clone()).await {
            Ok(()) => unwritten.clear(),
            Err(e) => {
                if quiet.ready() {
                    tracing::warn!(error = %e, minutes = unwritten.len(), "could not write the history; keeping it to try again (said once a minute)");
                }
                if unwritten.len() > MAX_UNWRITTEN {
                    unwritten.drain(..unwritten.len() - MAX_UNWRITTEN);
                }
            }
        }
        if stopping {
            return;
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(tokio::time::Instant::now());
            if let Err(e) = storage
                .prune_history(minute_of(now - options.retention_ms))
                .await
            {
                tracing::warn!(error = %e, "could not prune the history");
            }
        }
    }
}

/// Checks a history write before it reaches the database.
pub(crate) fn check_rows(rows: &[HistoryRow]) -> Result<(), StorageError> {
    for r in rows {
        if r.at.rem_euclid(MINUTE_MS) != 0 {
            return Err(StorageError::Corrupt(
                format!("history row at {}: not the start of a minute", r.at).into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_sqrt_two_apart_and_quantiles_read_them_back() {
        assert_eq!(RttHistogram::bucket_of(0.0), 0);
        assert_eq!(RttHistogram::bucket_of(1.0), 0);
        assert_eq!(RttHistogram::bucket_of(1.5), 1);
        assert_eq!(RttHistogram::bucket_of(2.0), 2);
        assert_eq!(RttHistogram::bucket_of(f64::NAN), 0);
        assert_eq!(RttHistogram::bucket_of(1e9), RTT_BUCKETS - 1);
        for ms in [3.0, 40.0, 250.0, 1_700.0, 9_000.0] {
            let v = RttHistogram::value_of(RttHistogram::bucket_of(ms));
            assert!((v / ms - 1.0).abs() < 0.2, "{ms} read back as {v}");
        }
        let mut h = RttHistogram::default();
        for _ in 0..98 {
            h.record(20.0);
        }
        h.record(3_000.0);
        h.record(3_000.0);
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((16.0..24.0).contains(&p50), "{p50}");
        assert!((2_500.0..3_600.0).contains(&p99), "{p99}");
        assert_eq!(RttHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn merged_histograms_give_the_quantiles_of_all_round_trips() {
        let (mut a, mut b) = (RttHistogram::default(), RttHistogram::default());
        for _ in 0..10 {
            a.record(10.0);
        }
        for _ in 0..30 {
            b.record(100.0);
        }
        a.add(&b);
        assert_eq!(a.total(), 40);
        assert!(a.quantile(0.5).unwrap() > 80.0);
        assert!(a.quantile(0.2).unwrap() < 12.0);
    }

    #[test]
    fn counters_take_what_was_added() {
        let c = HistoryCounters::default();
        c.add(Count::Delivered, 3);
        c.accepted(
            [
                (super::super::State::Pending, false),
                (super::super::State::Rejected, false),
                (super::super::State::Pending, true),
            ]
            .into_iter(),
        );
        c.round_trip(Duration::from_millis(5));
        let (counts, rtt) = c.take();
        assert_eq!(counts.get(Count::Accepted), 3);
        assert_eq!(counts.get(Count::Rejected), 1);
        assert_eq!(counts.get(Count::Duplicate), 1);
        assert_eq!(counts.get(Count::Delivered), 3);
        assert_eq!(rtt.total(), 1);
        let (counts, rtt) = c.take();
        assert!(counts.is_zero());
        assert_eq!(rtt.total(), 0);
    }
}
