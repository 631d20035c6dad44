//! Delivery policy, in one place: what Totango's answer means (success,
//! retry, dead; overload for the concurrency limit; a failing endpoint), how
//! long to wait (exponential backoff with full jitter, honouring
//! `Retry-After`), the 429 rule (the endpoint pauses until `Retry-After`) and
//! the retry-age cut-off. Pure functions: no I/O, no clock of their own.

use crate::storage::Millis;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Retry,
    Dead,
}

/// Totango's success is 200 or 201 only; 408, 429 and 5xx except 501 are
/// worth retrying; anything else will not get better.
pub fn classify_status(status: u16) -> Verdict {
    match status {
        200 | 201 => Verdict::Success,
        408 | 429 => Verdict::Retry,
        501 => Verdict::Dead,
        500..=599 => Verdict::Retry,
        _ => Verdict::Dead,
    }
}

/// A 5xx that says Totango (or a proxy before it) is failing; 501 is an
/// answer about the request, not about the server.
pub fn is_server_failure(status: u16) -> bool {
    status >= 500 && status != 501
}

/// An attempt that says Totango is loaded: no answer (timeout, connection
/// error), 408, 429 or a failing 5xx.
pub fn is_overload(status: Option<u16>) -> bool {
    match status {
        None | Some(408) | Some(429) => true,
        Some(s) => is_server_failure(s),
    }
}

/// The verdict of one attempt: its status, or no answer at all (timeouts
/// and connection errors are transient by nature).
pub fn verdict(status: Option<u16>) -> Verdict {
    status.map_or(Verdict::Retry, classify_status)
}

/// When a failed attempt is tried again, and whether the endpoint pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPlan {
    pub next_attempt_at: Millis,
    /// A 429 with `Retry-After` pauses the endpoint until then.
    pub pause_endpoint_until: Option<Millis>,
}

/// The next attempt of a message that has had `attempts` before this one:
/// its own backoff, at least `Retry-After`; when the endpoint is down
/// (`probe_at`: its next probe), due at that probe rather than after its own
/// backoff, and still not before `Retry-After`.
pub fn retry_plan(
    backoff: &Backoff,
    attempts: u32,
    status: Option<u16>,
    retry_after: Option<Duration>,
    probe_at: Option<Millis>,
    now: Millis,
    rng: &mut impl rand::Rng,
) -> RetryPlan {
    let delay = backoff.delay(attempts + 1, retry_after, rng);
    let mut next = now.saturating_add(millis(delay));
    if let Some(probe_at) = probe_at {
        next = probe_at.max(now.saturating_add(retry_after.map_or(0, millis)));
    }
    RetryPlan {
        next_attempt_at: next,
        pause_endpoint_until: match (status, retry_after) {
            (Some(429), Some(ra)) => Some(now.saturating_add(millis(ra))),
            _ => None,
        },
    }
}

/// Whether an attempt at `next` is past the retry age of a message retried
/// since `retry_from`: then it is dead instead.
pub fn past_retry_age(retry_from: Millis, max_retry_age_ms: Millis, next: Millis) -> bool {
    next > retry_from.saturating_add(max_retry_age_ms)
}

pub fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Backoff {
    /// The ceiling for the `attempt`-th retry (1-based): base × 2^(attempt−1), capped.
    pub fn ceiling_ms(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(40);
        self.base_ms.saturating_mul(1u64 << shift).min(self.max_ms)
    }

    /// Full jitter: uniform in [0, ceiling], never below `retry_after`.
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl rand::Rng,
    ) -> Duration {
        let jittered = Duration::from_millis(rng.random_range(0..=self.ceiling_ms(attempt)));
        match retry_after {
            Some(ra) => jittered.max(ra),
            None => jittered,
        }
    }
}

/// Longest `Retry-After` taken at its word (a week); a delay past the retry
/// age makes the message dead anyway.
const MAX_RETRY_AFTER_SECS: u64 = 7 * 24 * 3600;

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(MAX_RETRY_AFTER_SECS)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    Some(wait.min(Duration::from_secs(MAX_RETRY_AFTER_SECS)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn overload_and_failure_classes() {
        for s in [None, Some(408), Some(429), Some(500), Some(503)] {
            assert!(is_overload(s), "{s:?}");
        }
        for s in [Some(200), Some(400), Some(404), Some(501)] {
            assert!(!is_overload(s), "{s:?}");
        }
        assert_eq!(verdict(None), Verdict::Retry);
        assert_eq!(verdict(Some(201)), Verdict::Success);
        assert_eq!(verdict(Some(400)), Verdict::Dead);
    }

    #[test]
    fn a_retry_waits_its_backoff_or_the_endpoints_probe_and_never_less_than_retry_after() {
        let b = Backoff {
            base_ms: 1_000,
            max_ms: 60_000,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let now = 1_000_000;
        // Own backoff: within the ceiling of the third attempt.
        let p = retry_plan(&b, 2, Some(503), None, None, now, &mut rng);
        assert!(
            p.next_attempt_at >= now && p.next_attempt_at <= now + 4_000,
            "{p:?}"
        );
        assert_eq!(p.pause_endpoint_until, None);
        // A 429 with Retry-After pauses the endpoint and waits at least that.
        let ra = Some(Duration::from_secs(30));
        let p = retry_plan(&b, 0, Some(429), ra, None, now, &mut rng);
        assert_eq!(p.pause_endpoint_until, Some(now + 30_000));
        assert!(p.next_attempt_at >= now + 30_000, "{p:?}");
        // Endpoint down: due at its probe, even when that is sooner.
        let p = retry_plan(&b, 9, None, None, Some(now + 5), now, &mut rng);
        assert_eq!(p.next_attempt_at, now + 5);
        // ...but not before what Totango asked for.
        let p = retry_plan(&b, 9, Some(503), ra, Some(now + 5), now, &mut rng);
        assert_eq!(p.next_attempt_at, now + 30_000);
    }

    #[test]
    fn the_retry_age_cuts_off_after_the_configured_age() {
        assert!(!past_retry_age(1_000, 500, 1_500));
        assert!(past_retry_age(1_000, 500, 1_501));
        assert!(!past_retry_age(i64::MAX - 1, 500, i64::MAX));
    }

    #[test]
    fn status_classes() {
        for s in [200, 201] {
            assert_eq!(classify_status(s), Verdict::Success, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify_status(s), Verdict::Retry, "{s}");
        }
        for s in [202, 204, 301, 302, 400, 401, 403, 404, 413, 501] {
            assert_eq!(classify_status(s), Verdict::Dead, "{s}");
        }
    }

    #[test]
    fn ceilings_double_and_cap() {
        let b = Backoff {
            base_ms: 1000,
            max_ms: 300_000,
        };
        let c: Vec<u64> = (1..=11).map(|a| b.ceiling_ms(a)).collect();
        assert_eq!(
            c,
            [
                1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000, 300000, 300000
            ]
        );
        assert_eq!(b.ceiling_ms(500), 300_000, "no overflow");
    }

    #[test]
    fn jitter_stays_within_the_ceiling_and_honours_retry_after() {
        let b = Backoff {
            base_ms: 1000,
            max_ms: 300_000,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(3, None, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(4000)));
        // Full jitter spreads over the range rather than clustering at the top.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(1000)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(3000)));
        for _ in 0..50 {
            assert!(b.delay(1, Some(Duration::from_secs(30)), &mut rng) >= Duration::from_secs(30));
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("18446744073709551", now),
            Some(Duration::from_secs(MAX_RETRY_AFTER_SECS)),
            "huge values are capped"
        );
    }
}
