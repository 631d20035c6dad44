//! Adaptive concurrency toward Totango (AIMD, in the spirit of Vector's
//! adaptive request concurrency): the number of requests in flight grows
//! while the round-trip time holds near its baseline, and shrinks
//! multiplicatively on backpressure (429, 5xx, timeouts, connection errors)
//! or when the round-trip time rises.
//!
//! `Controller` is the pure decision logic over an explicit clock, so tests
//! drive it with a fake one; `AdaptiveConcurrency` wraps it for the workers.

use crate::telemetry;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Growth per window while latency holds (a share of the current limit, at
/// least 1); until the first back-off the limit doubles (slow start).
const GROWTH: f64 = 0.2;
const SLOW_START_GROWTH: f64 = 1.0;
/// The limit counts as used when this share of it was in flight.
const USED_SHARE: f64 = 0.7;
/// Factor applied on backpressure (429, 5xx, timeouts).
const BACKPRESSURE_DECREASE: f64 = 0.7;
/// Factor applied when the round-trip time rises above its baseline.
const LATENCY_DECREASE: f64 = 0.9;
/// A window's mean RTT above `baseline × RTT_TOLERANCE + RTT_SLACK` is "rising".
const RTT_TOLERANCE: f64 = 1.5;
const RTT_SLACK: Duration = Duration::from_millis(5);
/// Weight of the newest window in the baseline (EWMA).
const BASELINE_WEIGHT: f64 = 0.1;
/// Shortest decision window; otherwise a window lasts one baseline RTT.
const MIN_WINDOW: Duration = Duration::from_millis(20);

/// What one response says about Totango's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered (2xx, or a 4xx that is the request's own fault).
    Ok,
    /// 408, 429, 5xx (except 501), timeout or connection error.
    Backpressure,
}

impl Signal {
    pub fn of_status(status: Option<u16>) -> Signal {
        if super::policy::is_overload(status) {
            Signal::Backpressure
        } else {
            Signal::Ok
        }
    }
}

/// The AIMD state; time is a `Duration` since any fixed origin.
#[derive(Debug, Clone)]
pub struct Controller {
    min: f64,
    max: f64,
    limit: f64,
    /// No back-off yet: grow fast.
    slow_start: bool,
    /// EWMA of the windows' mean RTT, in seconds.
    baseline: Option<f64>,
    /// The last window's mean RTT, in seconds.
    last_rtt: Option<f64>,
    window_start: Duration,
    rtt_sum: f64,
    rtt_count: u32,
    backpressure: bool,
    /// Most requests in flight during the window: grow only a limit in use.
    peak_in_flight: usize,
}

impl Controller {
    pub fn new(min: usize, initial: usize, max: usize) -> Controller {
        let min = min.max(1);
        let max = max.max(min);
        Controller {
            min: min as f64,
            max: max as f64,
            limit: initial.clamp(min, max) as f64,
            slow_start: true,
            baseline: None,
            last_rtt: None,
            window_start: Duration::ZERO,
            rtt_sum: 0.0,
            rtt_count: 0,
            backpressure: false,
            peak_in_flight: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The last window's mean round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.last_rtt.map(Duration::from_secs_f64)
    }

    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }

    /// Notes how many requests are in flight (call when one starts).
    pub fn in_flight(&mut self, n: usize) {
        self.peak_in_flight = self.peak_in_flight.max(n);
    }

    /// Records one response (`in_flight`: requests still in flight); at the
    /// end of a window, adjusts the limit. Returns true when the window ended.
    pub fn record(
        &mut self,
        now: Duration,
        rtt: Duration,
        signal: Signal,
        in_flight: usize,
    ) -> bool {
        match signal {
            Signal::Backpressure => self.backpressure = true,
            // Only answers say something about latency (a timeout's "RTT" is the timeout).
            Signal::Ok => {
                self.rtt_sum += rtt.as_secs_f64();
                self.rtt_count += 1;
            }
        }
        let window = self
            .baseline
            .map(Duration::from_secs_f64)
            .unwrap_or_default()
            .max(MIN_WINDOW);
        if now.saturating_sub(self.window_start) < window {
            return false;
        }
        self.end_window(now, in_flight);
        true
    }

    fn end_window(&mut self, now: Duration, in_flight: usize) {
        let mean = (self.rtt_count > 0).then(|| self.rtt_sum / self.rtt_count as f64);
        let rising = match (mean, self.baseline) {
            (Some(m), Some(b)) => m > b * RTT_TOLERANCE + RTT_SLACK.as_secs_f64(),
            _ => false,
        };
        if self.backpressure {
            self.limit = (self.limit * BACKPRESSURE_DECREASE).max(self.min);
            self.slow_start = false;
        } else if rising {
            self.limit = (self.limit * LATENCY_DECREASE).max(self.min);
            self.slow_start = false;
        } else if mean.is_some() && self.peak_in_flight as f64 >= self.limit * USED_SHARE {
            let growth = if self.slow_start {
                SLOW_START_GROWTH
            } else {
                GROWTH
            };
            self.limit = (self.limit + (self.limit * growth).max(1.0)).min(self.max);
        }
        if let Some(m) = mean {
            self.baseline = Some(match self.baseline {
                None => m,
                Some(b) => b + (m - b) * BASELINE_WEIGHT,
            });
            self.last_rtt = Some(m);
        }
        self.window_start = now;
        self.rtt_sum = 0.0;
        self.rtt_count = 0;
        self.backpressure = false;
        self.peak_in_flight = in_flight;
    }
}

/// What the operator sees of delivery's concurrency.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ConcurrencyStats {
    pub concurrency_limit: usize,
    /// The last measured mean round-trip time, in milliseconds.
    pub rtt_ms: Option<f64>,
    pub in_flight: usize,
}

/// The controller shared by the delivery workers, on the real clock.
pub struct AdaptiveConcurrency {
    controller: Mutex<Controller>,
    origin: Instant,
    in_flight: AtomicUsize,
    limit: AtomicUsize,
}

impl AdaptiveConcurrency {
    pub fn new(min: usize, initial: usize, max: usize) -> AdaptiveConcurrency {
        let controller = Controller::new(min, initial, max);
        let limit = controller.limit();
        metrics::gauge!(telemetry::CONCURRENCY_LIMIT).set(limit as f64);
        AdaptiveConcurrency {
            controller: Mutex::new(controller),
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    /// Requests that may start now.
    pub fn free(&self) -> usize {
        self.limit
            .load(Ordering::Relaxed)
            .saturating_sub(self.in_flight.load(Ordering::Relaxed))
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A message's delivery starts.
    pub fn start(&self) {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.controller
            .lock()
            .expect("controller lock")
            .in_flight(n);
    }

    /// A message's delivery ended.
    pub fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records one request's round trip and what it said.
    pub fn record(&self, rtt: Duration, signal: Signal) {
        let mut c = self.controller.lock().expect("controller lock");
        let in_flight = self.in_flight();
        if c.record(self.origin.elapsed(), rtt, signal, in_flight) {
            self.limit.store(c.limit(), Ordering::Relaxed);
            metrics::gauge!(telemetry::CONCURRENCY_LIMIT).set(c.limit() as f64);
            if let Some(rtt) = c.rtt() {
                metrics::gauge!(telemetry::DELIVERY_RTT).set(rtt.as_secs_f64());
            }
        }
    }

    pub fn stats(&self) -> ConcurrencyStats {
        let rtt = self.controller.lock().expect("controller lock").rtt();
        ConcurrencyStats {
            concurrency_limit: self.limit(),
            rtt_ms: rtt.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0),
            in_flight: self.in_flight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs `windows` windows of `per_window` responses each at `rtt`, the
    /// limit fully used; returns the clock after them.
    fn drive(
        c: &mut Controller,
        mut now: Duration,
        windows: usize,
        rtt: Duration,
        signal: Signal,
    ) -> Duration {
        for _ in 0..windows {
            let window = c.baseline().unwrap_or_default().max(MIN_WINDOW);
            c.in_flight(c.limit());
            for _ in 0..4 {
                now += window / 4;
                c.record(now, rtt, signal, c.limit());
            }
        }
        now
    }

    #[test]
    fn grows_while_latency_holds() {
        let mut c = Controller::new(4, 64, 1024);
        drive(&mut c, Duration::ZERO, 30, 100 * MS, Signal::Ok);
        assert_eq!(c.limit(), 1024);
        assert_eq!(c.rtt(), Some(100 * MS));
    }

    #[test]
    fn does_not_grow_an_unused_limit() {
        let mut c = Controller::new(4, 64, 1024);
        let mut now = Duration::ZERO;
        for _ in 0..100 {
            c.in_flight(10);
            now += 30 * MS;
            c.record(now, 10 * MS, Signal::Ok, 10);
        }
        assert_eq!(c.limit(), 64);
    }

    #[test]
    fn backs_off_on_429_5xx_and_timeouts() {
        for status in [Some(429), Some(503), Some(500), None] {
            let mut c = Controller::new(4, 256, 1024);
            let now = drive(&mut c, Duration::ZERO, 3, 100 * MS, Signal::Ok);
            let before = c.limit();
            let signal = Signal::of_status(status);
            assert_eq!(signal, Signal::Backpressure, "{status:?}");
            drive(&mut c, now, 1, 100 * MS, signal);
            assert!(c.limit() < before, "{status:?}: {} !< {before}", c.limit());
            drive(&mut c, now, 30, 100 * MS, signal);
            assert_eq!(c.limit(), 4, "{status:?}: floor is the minimum");
        }
    }

    #[test]
    fn client_errors_are_not_backpressure() {
        assert_eq!(Signal::of_status(Some(200)), Signal::Ok);
        assert_eq!(Signal::of_status(Some(400)), Signal::Ok);
        assert_eq!(Signal::of_status(Some(501)), Signal::Ok);
        assert_eq!(Signal::of_status(Some(408)), Signal::Backpressure);
    }

    #[test]
    fn backs_off_on_rising_latency_and_recovers() {
        let mut c = Controller::new(4, 64, 1024);
        let now = drive(&mut c, Duration::ZERO, 10, 100 * MS, Signal::Ok);
        let grown = c.limit();
        assert!(grown > 64);
        // Latency triples: the limit comes down.
        let now = drive(&mut c, now, 5, 300 * MS, Signal::Ok);
        let reduced = c.limit();
        assert!(reduced < grown, "{reduced} !< {grown}");
        // Latency recovers: it grows again, up to the maximum.
        drive(&mut c, now, 40, 100 * MS, Signal::Ok);
        assert_eq!(c.limit(), 1024);
    }

    #[test]
    fn stays_within_bounds() {
        let mut c = Controller::new(4, 2000, 1024);
        assert_eq!(c.limit(), 1024);
        let mut c2 = Controller::new(4, 1, 1024);
        assert_eq!(c2.limit(), 4);
        drive(&mut c, Duration::ZERO, 50, 100 * MS, Signal::Ok);
        assert_eq!(c.limit(), 1024);
        drive(&mut c2, Duration::ZERO, 50, 100 * MS, Signal::Backpressure);
        assert_eq!(c2.limit(), 4);
    }
}
