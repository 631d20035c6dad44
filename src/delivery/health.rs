//! Totango's health as the operator sees it, from what delivery already
//! learns: each attempt's answer (or why there was none), its round trip,
//! and 429 pauses. One of: idle (nothing sent yet), answering normally,
//! slow, refusing (HTTP errors), paused by a 429 until a time, unreachable
//! since a time with the last error.
//!
//! `HealthTracker` is pure over an explicit clock (unit tested below);
//! `Delivery` keeps one for all endpoints and feeds it. It decides nothing
//! about sending: `endpoint.rs` does.

use super::policy::{Verdict, classify_status};
use crate::storage::Millis;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Duration;

/// Answers kept to judge slowness and refusals.
const RECENT: usize = 20;
/// Timeouts and broken connections in a row that make Totango unreachable
/// (a refused connection does at once), as the endpoint pause counts them.
const FAILURES_TO_UNREACHABLE: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Nothing sent to Totango yet by this process.
    Idle,
    /// Answering normally.
    Normal,
    /// The median round trip of the recent answers is over the threshold.
    Slow,
    /// The last answer was an HTTP error, and so were at least half of the
    /// recent ones.
    Refusing,
    /// Totango answered 429 with `Retry-After`: nothing is sent until then.
    Paused,
    /// No answer at all: connections refused, or timeouts in a row.
    Unreachable,
}

impl HealthState {
    pub const ALL: [HealthState; 6] = [
        HealthState::Idle,
        HealthState::Normal,
        HealthState::Slow,
        HealthState::Refusing,
        HealthState::Paused,
        HealthState::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Idle => "idle",
            HealthState::Normal => "normal",
            HealthState::Slow => "slow",
            HealthState::Refusing => "refusing",
            HealthState::Paused => "paused",
            HealthState::Unreachable => "unreachable",
        }
    }
}

/// What `/api/stats` says of Totango (`"totango"`).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TotangoHealth {
    pub state: HealthState,
    /// When the current trouble began (refusing, unreachable), ms.
    pub since: Option<Millis>,
    /// When the 429 pause ends (paused), ms.
    pub until: Option<Millis>,
    /// The last failure: a transport error, or the HTTP status refused with.
    pub last_error: Option<String>,
    /// The last HTTP status Totango answered, and when.
    pub last_status: Option<u16>,
    pub last_answer_at: Option<Millis>,
    /// Median round trip of the recent answers, ms.
    pub rtt_p50_ms: Option<f64>,
    /// One sentence for the operator.
    pub summary: String,
}

#[derive(Debug, Clone, Copy)]
struct Answer {
    rtt_ms: f64,
    error: bool,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    slow_ms: f64,
    recent: VecDeque<Answer>,
    last_status: Option<u16>,
    last_answer_at: Option<Millis>,
    /// Start of the current run of error answers.
    refusing_since: Option<Millis>,
    /// Attempts without an answer since the last answer, and since when.
    failures: u32,
    failing_since: Option<Millis>,
    connect_error: bool,
    last_error: Option<String>,
    paused_until: Millis,
}

impl HealthTracker {
    /// `slow`: a median round trip above it is slow.
    pub fn new(slow: Duration) -> HealthTracker {
        HealthTracker {
            slow_ms: slow.as_secs_f64() * 1000.0,
            recent: VecDeque::with_capacity(RECENT),
            last_status: None,
            last_answer_at: None,
            refusing_since: None,
            failures: 0,
            failing_since: None,
            connect_error: false,
            last_error: None,
            paused_until: 0,
        }
    }

    /// Records one attempt: Totango's status, or `error` when there was
    /// none (`connect_error`: no connection could be made).
    pub fn attempt(
        &mut self,
        now: Millis,
        status: Option<u16>,
        connect_error: bool,
        error: Option<&str>,
        rtt: Duration,
    ) {
        match status {
            Some(s) => {
                let refused = classify_status(s) != Verdict::Success;
                self.failures = 0;
                self.failing_since = None;
                self.last_status = Some(s);
                self.last_answer_at = Some(now);
                if refused {
                    self.refusing_since.get_or_insert(now);
                    self.last_error = Some(format!("HTTP {s}"));
                } else {
                    self.refusing_since = None;
                }
                if self.recent.len() == RECENT {
                    self.recent.pop_front();
                }
                self.recent.push_back(Answer {
                    rtt_ms: rtt.as_secs_f64() * 1000.0,
                    error: refused,
                });
            }
            None => {
                self.failures = self.failures.saturating_add(1);
                self.failing_since.get_or_insert(now);
                self.connect_error = connect_error;
                self.last_error = Some(error.unwrap_or("no answer").to_owned());
            }
        }
    }

    /// Totango asked for a pause (429) until `until`; extends, never shortens.
    pub fn paused(&mut self, until: Millis) {
        self.paused_until = self.paused_until.max(until);
    }

    fn median_rtt(&self) -> Option<f64> {
        let mut rtts: Vec<f64> = self.recent.iter().map(|a| a.rtt_ms).collect();
        if rtts.is_empty() {
            return None;
        }
        rtts.sort_by(f64::total_cmp);
        Some(rtts[(rtts.len() - 1) / 2])
    }

    /// The state at `now`.
    pub fn state_at(&self, now: Millis) -> HealthState {
        let errors = self.recent.iter().filter(|a| a.error).count();
        if self.failures > 0 && (self.connect_error || self.failures >= FAILURES_TO_UNREACHABLE) {
            HealthState::Unreachable
        } else if self.paused_until > now {
            HealthState::Paused
        } else if self.refusing_since.is_some() && errors * 2 >= self.recent.len() {
            HealthState::Refusing
        } else if self.median_rtt().is_some_and(|m| m > self.slow_ms) {
            HealthState::Slow
        } else if self.last_answer_at.is_some() {
            HealthState::Normal
        } else {
            HealthState::Idle
        }
    }

    /// The whole report at `now`.
    pub fn report(&self, now: Millis) -> TotangoHealth {
        let state = self.state_at(now);
        let rtt = self.median_rtt();
        let time = |ms: Millis| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default()
        };
        let ms = |v: f64| {
            if v >= 1000.0 {
                format!("{:.1} s", v / 1000.0)
            } else {
                format!("{v:.0} ms")
            }
        };
        let (since, until) = match state {
            HealthState::Unreachable => (self.failing_since, None),
            HealthState::Refusing => (self.refusing_since, None),
            HealthState::Paused => (None, Some(self.paused_until)),
            _ => (None, None),
        };
        let summary = match state {
            HealthState::Idle => "Nothing sent to Totango yet.".to_owned(),
            HealthState::Normal => format!(
                "Totango answers normally (median round trip {}).",
                ms(rtt.unwrap_or_default())
            ),
            HealthState::Slow => format!(
                "Totango is slow: median round trip {} over its last {} answers.",
                ms(rtt.unwrap_or_default()),
                self.recent.len()
            ),
            HealthState::Refusing => format!(
                "Totango refuses requests: {} since {}.",
                self.last_error.as_deref().unwrap_or("HTTP errors"),
                time(since.unwrap_or(now))
            ),
            HealthState::Paused => format!(
                "Totango asked for a pause (HTTP 429): nothing is sent until {}.",
                time(self.paused_until)
            ),
            HealthState::Unreachable => format!(
                "Totango is unreachable since {}: {}.",
                time(since.unwrap_or(now)),
                self.last_error.as_deref().unwrap_or("no answer")
            ),
        };
        TotangoHealth {
            state,
            since,
            until,
            last_error: match state {
                HealthState::Normal | HealthState::Idle | HealthState::Slow => None,
                _ => self.last_error.clone(),
            },
            last_status: self.last_status,
            last_answer_at: self.last_answer_at,
            rtt_p50_ms: rtt.map(|v| (v * 10.0).round() / 10.0),
            summary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn tracker() -> HealthTracker {
        HealthTracker::new(2_500 * MS)
    }

    #[test]
    fn idle_until_something_was_sent_then_normal() {
        let mut t = tracker();
        assert_eq!(t.state_at(0), HealthState::Idle);
        t.attempt(10, Some(200), false, None, 40 * MS);
        let r = t.report(20);
        assert_eq!(r.state, HealthState::Normal);
        assert_eq!(r.rtt_p50_ms, Some(40.0));
        assert_eq!(r.last_status, Some(200));
        assert_eq!(r.last_error, None);
        assert!(r.summary.contains("40 ms"), "{}", r.summary);
    }

    #[test]
    fn slow_when_the_median_round_trip_is_over_the_threshold() {
        let mut t = tracker();
        for i in 0..10 {
            t.attempt(i, Some(200), false, None, 3_000 * MS);
        }
        assert_eq!(t.state_at(20), HealthState::Slow);
        // One fast answer does not make the median fast.
        t.attempt(30, Some(200), false, None, 10 * MS);
        assert_eq!(t.state_at(40), HealthState::Slow);
        for i in 0..15 {
            t.attempt(50 + i, Some(200), false, None, 10 * MS);
        }
        assert_eq!(t.state_at(100), HealthState::Normal);
    }

    #[test]
    fn refusing_while_the_answers_are_errors_since_the_first() {
        let mut t = tracker();
        t.attempt(0, Some(200), false, None, 10 * MS);
        t.attempt(100, Some(503), false, None, 10 * MS);
        let r = t.report(150);
        // One error in two answers: half of them.
        assert_eq!(r.state, HealthState::Refusing);
        assert_eq!(r.since, Some(100));
        assert_eq!(r.last_error.as_deref(), Some("HTTP 503"));
        t.attempt(200, Some(400), false, None, 10 * MS);
        assert_eq!(t.report(250).since, Some(100), "the run's start is kept");
        t.attempt(300, Some(200), false, None, 10 * MS);
        assert_eq!(t.state_at(350), HealthState::Normal);
    }

    #[test]
    fn a_lone_error_among_many_successes_is_not_refusing() {
        let mut t = tracker();
        for i in 0..10 {
            t.attempt(i, Some(200), false, None, 10 * MS);
        }
        t.attempt(20, Some(500), false, None, 10 * MS);
        assert_eq!(t.state_at(30), HealthState::Normal);
    }

    #[test]
    fn paused_by_a_429_until_its_end() {
        let mut t = tracker();
        t.attempt(0, Some(200), false, None, 10 * MS);
        t.attempt(10, Some(429), false, None, 10 * MS);
        t.paused(5_000);
        t.paused(4_000);
        let r = t.report(1_000);
        assert_eq!(r.state, HealthState::Paused);
        assert_eq!(r.until, Some(5_000), "a pause is extended, never shortened");
        assert!(r.summary.contains("429"), "{}", r.summary);
        // The pause over and Totango answering: normal again.
        t.attempt(5_100, Some(200), false, None, 10 * MS);
        assert_eq!(t.state_at(5_200), HealthState::Normal);
    }

    #[test]
    fn unreachable_at_once_on_a_refused_connection_with_its_error() {
        let mut t = tracker();
        t.attempt(0, Some(200), false, None, 10 * MS);
        t.attempt(1_000, None, true, Some("connection refused"), MS);
        t.attempt(2_000, None, true, Some("connection refused"), MS);
        let r = t.report(3_000);
        assert_eq!(r.state, HealthState::Unreachable);
        assert_eq!(r.since, Some(1_000));
        assert_eq!(r.last_error.as_deref(), Some("connection refused"));
        assert!(r.summary.contains("connection refused"), "{}", r.summary);
        // Unreachable wins over a pause; an answer ends it.
        t.paused(10_000);
        assert_eq!(t.state_at(3_000), HealthState::Unreachable);
        t.attempt(4_000, Some(200), false, None, 10 * MS);
        assert_eq!(t.state_at(4_100), HealthState::Paused);
        assert_eq!(t.state_at(10_100), HealthState::Normal);
    }

    #[test]
    fn timeouts_make_it_unreachable_only_in_a_row() {
        let mut t = tracker();
        t.attempt(0, Some(200), false, None, 10 * MS);
        t.attempt(100, None, false, Some("timed out"), 10_000 * MS);
        t.attempt(200, None, false, Some("timed out"), 10_000 * MS);
        assert_eq!(t.state_at(300), HealthState::Normal);
        t.attempt(300, None, false, Some("timed out"), 10_000 * MS);
        let r = t.report(400);
        assert_eq!(r.state, HealthState::Unreachable);
        assert_eq!(r.since, Some(100));
        assert_eq!(r.last_error.as_deref(), Some("timed out"));
    }
}
