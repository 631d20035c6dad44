//! Throttling of wrong admin credentials per client address: each address
//! has an allowance of [`BURST`] wrong tokens (or login codes) that refills
//! at [`PER_SECOND`] a second; once it is spent the address is locked out
//! for [`LOCKOUT`], and every attempt from it, right or wrong, is answered
//! `429` with `Retry-After` without being checked (so a lockout tells an
//! attacker nothing). IPv6 clients are counted by /64 (one host usually has
//! the whole /64). In memory, per process.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong attempts an address may make in a row.
pub const BURST: f64 = 30.0;
/// How fast the allowance comes back: the sustained guessing rate.
pub const PER_SECOND: f64 = 2.0;
/// How long an address that spent its allowance is locked out.
pub const LOCKOUT: Duration = Duration::from_secs(60);
/// Addresses tracked at most (the oldest entries are forgotten first).
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Wrong attempts still allowed, as of `at`.
    allowance: f64,
    at: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn refilled(&self, now: Instant) -> f64 {
        (self.allowance + now.saturating_duration_since(self.at).as_secs_f64() * PER_SECOND)
            .min(BURST)
    }
}

#[derive(Debug, Default)]
pub struct Throttle {
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// The key of an address: IPv4 as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Throttle {
    /// `Err(wait)` while this address is locked out.
    pub fn check(&self, ip: Option<IpAddr>) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    /// Counts a wrong credential from this address.
    pub fn failed(&self, ip: Option<IpAddr>) {
        self.failed_at(ip, Instant::now())
    }

    fn check_at(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let Some(ip) = ip else { return Ok(()) };
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(&key(ip)).and_then(|e| e.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    fn failed_at(&self, ip: Option<IpAddr>, now: Instant) {
        let Some(ip) = ip else { return };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_TRACKED {
            entries
                .retain(|_, e| e.refilled(now) < BURST || e.locked_until.is_some_and(|u| u > now));
            if entries.len() >= MAX_TRACKED {
                // Still full: forget the oldest half rather than grow.
                let mut ats: Vec<Instant> = entries.values().map(|e| e.at).collect();
                ats.sort_unstable();
                let cut = ats[ats.len() / 2];
                entries.retain(|_, e| e.at > cut);
            }
        }
        let e = entries.entry(key(ip)).or_insert(Entry {
            allowance: BURST,
            at: now,
            locked_until: None,
        });
        if e.locked_until.is_some_and(|u| u > now) {
            return;
        }
        e.allowance = e.refilled(now) - 1.0;
        e.at = now;
        e.locked_until = None;
        if e.allowance < 0.0 {
            e.locked_until = Some(now + LOCKOUT);
            e.allowance = 0.0;
            e.at = now + LOCKOUT;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_wrong_tries_then_a_lockout_per_address_and_v6_prefix() {
        let t = Throttle::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let now = Instant::now();
        for _ in 0..BURST as usize {
            assert!(t.check_at(Some(a), now).is_ok());
            t.failed_at(Some(a), now);
        }
        assert!(t.check_at(Some(a), now).is_ok(), "the burst is forgiven");
        t.failed_at(Some(a), now);
        let wait = t.check_at(Some(a), now).unwrap_err();
        assert_eq!(wait, LOCKOUT);
        assert!(
            t.check_at(Some(b), now).is_ok(),
            "other addresses are not locked"
        );
        assert!(
            t.check_at(Some(a), now + LOCKOUT).is_ok(),
            "the lockout ends"
        );
        // One /64 is one client.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        for i in 0..=BURST as u32 {
            let other: IpAddr = format!("2001:db8::{:x}", i + 100).parse().unwrap();
            t.failed_at(Some(other), now);
        }
        assert!(t.check_at(Some(v6), now).is_err());
        // At the sustained rate (2 a second) an address is never locked.
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        for i in 0..500u32 {
            t.failed_at(Some(c), now + Duration::from_millis(500) * i);
            assert!(
                t.check_at(Some(c), now + Duration::from_millis(500) * i)
                    .is_ok()
            );
        }
        // Faster than that, the burst runs out: 6k guesses a second get ~30.
        let d: IpAddr = "192.0.2.4".parse().unwrap();
        let mut let_through = 0;
        for i in 0..6000u32 {
            let at = now + Duration::from_micros(166) * i;
            if t.check_at(Some(d), at).is_ok() {
                let_through += 1;
                t.failed_at(Some(d), at);
            }
        }
        assert!(let_through <= BURST as usize + 3, "{let_through}");
    }
}
