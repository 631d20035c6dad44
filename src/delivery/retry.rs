//! Whether to retry (from the response class) and how long to wait
//! (exponential backoff with full jitter, honouring `Retry-After`).

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
