//! Requests per minute per client address, for the write keys that have a
//! limit (browser sources).

use super::ApiError;
use crate::config::{Runtime, Source};
use axum::http::StatusCode;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;

/// Client addresses tracked per key before the idle ones are forgotten.
const TRACKED_CLIENTS: usize = 100_000;

/// Requests per minute per client address, per write key that has a limit.
pub struct ClientRates {
    limiters: HashMap<String, (DefaultKeyedRateLimiter<IpAddr>, NonZeroU32)>,
}

impl ClientRates {
    pub fn new(runtime: &Runtime) -> ClientRates {
        let mut limiters = HashMap::new();
        for source in runtime.sources.values().chain([&runtime.default_source]) {
            if let Some(n) = NonZeroU32::new(source.access.client_requests_per_minute) {
                limiters
                    .entry(source.name.clone())
                    .or_insert_with(|| (RateLimiter::keyed(Quota::per_minute(n)), n));
            }
        }
        ClientRates { limiters }
    }

    /// `429` with `Retry-After` when `ip` has used up its rate for `source`.
    /// IPv6 clients count by /64.
    pub fn check(&self, source: &Source, ip: IpAddr) -> Result<(), ApiError> {
        let Some((limiter, per_minute)) = self.limiters.get(&source.name) else {
            return Ok(());
        };
        if limiter.len() > TRACKED_CLIENTS {
            limiter.retain_recent();
        }
        let client = crate::budget::client_prefix(ip, 32, 64);
        limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this client address sent more than {per_minute} requests a minute with \
                     this write key (its client_requests_per_minute); retry later"
                ),
            )
            .with_retry_after(wait.as_secs().max(1))
        })
    }
}
