//! The health of one Totango endpoint, as delivery sees it.
//!
//! While an endpoint is down (connections refused, or several timeouts or
//! 5xx answers in a row) it is paused as a whole: messages are not sent and
//! spend no attempts; one probe at a time tests it, at growing intervals
//! capped at a few seconds. When a probe (or any request) gets an answer, the
//! endpoint is released and everything that waited for it goes at once.
//!
//! `EndpointState` is the pure decision logic over an explicit clock (unit
//! tested below); `Delivery` keeps one per endpoint and acts on the changes.

use crate::storage::Millis;

/// How an endpoint that fails is paused and probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePolicy {
    /// The first probe goes this long after the endpoint is paused.
    pub first_ms: Millis,
    /// Probe intervals double up to this (so a recovery is noticed within it).
    pub max_ms: Millis,
    /// Timeouts and 5xx answers in a row that pause the endpoint (a refused
    /// connection pauses it at once).
    pub failures_to_pause: u32,
    /// A probe that has not reported after this long (its task is gone) no
    /// longer holds the probe slot.
    pub probe_deadline_ms: Millis,
}

impl ProbePolicy {
    pub fn new(request_timeout_ms: u64) -> ProbePolicy {
        ProbePolicy {
            first_ms: 250,
            max_ms: 4_000,
            failures_to_pause: 3,
            probe_deadline_ms: Millis::try_from(request_timeout_ms)
                .unwrap_or(Millis::MAX / 4)
                .saturating_add(1_000),
        }
    }

    /// The wait before the probe that follows `failed_probes` failed ones:
    /// first × 2^failed_probes, capped, then jittered into [¾, 1] of that
    /// (replicas probing the same endpoint drift apart).
    pub fn interval(&self, failed_probes: u32, rng: &mut impl rand::Rng) -> Millis {
        let shift = failed_probes.min(30);
        let ceiling = self.first_ms.saturating_mul(1 << shift).min(self.max_ms);
        let floor = ceiling - ceiling / 4;
        rng.random_range(floor..=ceiling)
    }
}

/// What one request said about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Totango answered: any status but a 5xx (501 counts as an answer).
    Answered,
    /// No connection could be made (nothing listens, no route, no address).
    Unreachable,
    /// A timeout, a connection broken mid-request, or a 5xx (but 501).
    Failing,
}

impl Health {
    pub fn of(status: Option<u16>, connect_error: bool) -> Health {
        match status {
            Some(s) if super::policy::is_server_failure(s) => Health::Failing,
            Some(_) => Health::Answered,
            None if connect_error => Health::Unreachable,
            None => Health::Failing,
        }
    }
}

/// What a message about to be sent to the endpoint should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The endpoint is up: send.
    Send,
    /// The endpoint is down and its probe is due: this request is the probe.
    Probe,
    /// A probe is in flight: wait for its outcome (until then at most).
    Wait { until: Millis },
    /// The endpoint is paused until then: do not send, spend no attempt.
    Defer { until: Millis },
}

/// What a recorded outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// The endpoint went down; the first probe is due then.
    Paused {
        until: Millis,
    },
    /// A probe failed; the next one is due then.
    Extended {
        until: Millis,
    },
    /// The endpoint answers again after being down this long.
    Released {
        down_ms: Millis,
    },
}

#[derive(Debug, Clone, Default)]
pub struct EndpointState {
    /// Totango asked for a pause (429 + `Retry-After`) until then.
    throttled_until: Millis,
    /// Timeouts and 5xx answers since the last answer.
    failures: u32,
    /// When Totango last answered a request of this process.
    last_answer: Option<Millis>,
    down: Option<Down>,
}

#[derive(Debug, Clone)]
struct Down {
    since: Millis,
    failed_probes: u32,
    next_probe_at: Millis,
    /// When the probe in flight started.
    probe_started: Option<Millis>,
}

impl EndpointState {
    /// Decides for one request about to go out; takes the probe slot when
    /// it returns `Probe`.
    pub fn admit(&mut self, now: Millis, policy: &ProbePolicy) -> Admission {
        if let Some(until) = self.deferred_until(now, policy) {
            return Admission::Defer { until };
        }
        let Some(down) = &mut self.down else {
            return Admission::Send;
        };
        if let Some(started) = down.probe_started {
            let deadline = started.saturating_add(policy.probe_deadline_ms);
            if deadline > now {
                return Admission::Wait { until: deadline };
            }
        }
        down.probe_started = Some(now);
        Admission::Probe
    }

    /// Until when a request would be deferred now (throttled, or down and
    /// its next probe not due); `None` when it would be sent, probe or wait.
    pub fn deferred_until(&self, now: Millis, policy: &ProbePolicy) -> Option<Millis> {
        if self.throttled_until > now {
            return Some(self.throttled_until);
        }
        let down = self.down.as_ref()?;
        let probing = down
            .probe_started
            .is_some_and(|s| s.saturating_add(policy.probe_deadline_ms) > now);
        (!probing && down.next_probe_at > now).then_some(down.next_probe_at)
    }

    /// When the endpoint is down: when its next probe is due (a message that
    /// failed because of the outage is due again then, not later).
    pub fn next_probe_at(&self) -> Option<Millis> {
        self.down.as_ref().map(|d| d.next_probe_at)
    }

    /// Records what a request (`probe`: sent as the probe) found.
    pub fn record(
        &mut self,
        now: Millis,
        health: Health,
        probe: bool,
        policy: &ProbePolicy,
        rng: &mut impl rand::Rng,
    ) -> Change {
        if health == Health::Answered {
            self.failures = 0;
            self.last_answer = Some(now);
            return match self.down.take() {
                Some(d) => Change::Released {
                    down_ms: now.saturating_sub(d.since),
                },
                None => Change::None,
            };
        }
        if let Some(down) = &mut self.down {
            // Requests sent before the pause fail as well; only probes move
            // the schedule.
            if !probe {
                return Change::None;
            }
            down.failed_probes = down.failed_probes.saturating_add(1);
            down.probe_started = None;
            down.next_probe_at = now.saturating_add(policy.interval(down.failed_probes, rng));
            return Change::Extended {
                until: down.next_probe_at,
            };
        }
        self.failures = self.failures.saturating_add(1);
        if health == Health::Unreachable || self.failures >= policy.failures_to_pause {
            let until = now.saturating_add(policy.interval(0, rng));
            self.down = Some(Down {
                since: now,
                failed_probes: 0,
                next_probe_at: until,
                probe_started: None,
            });
            return Change::Paused { until };
        }
        Change::None
    }

    /// Totango asked for a pause (429); extends, never shortens.
    pub fn throttle(&mut self, until: Millis) {
        self.throttled_until = self.throttled_until.max(until);
    }

    /// Takes an outage pause another process recorded: down until `until`,
    /// then probed. Ignored when this process saw an answer since that pause
    /// may have been decided (its own evidence is newer). Returns whether the
    /// endpoint went down here.
    pub fn adopt_outage(&mut self, until: Millis, now: Millis, policy: &ProbePolicy) -> bool {
        if until <= now
            || self
                .last_answer
                .is_some_and(|t| t >= until.saturating_sub(policy.max_ms))
        {
            return false;
        }
        match &mut self.down {
            Some(down) => {
                if down.probe_started.is_none() {
                    down.next_probe_at = down.next_probe_at.max(until);
                }
                false
            }
            None => {
                self.down = Some(Down {
                    since: now,
                    failed_probes: 0,
                    next_probe_at: until,
                    probe_started: None,
                });
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy() -> ProbePolicy {
        ProbePolicy::new(10_000)
    }

    #[test]
    fn health_of_an_outcome() {
        assert_eq!(Health::of(None, true), Health::Unreachable);
        assert_eq!(Health::of(None, false), Health::Failing);
        for s in [500, 502, 503, 504, 599] {
            assert_eq!(Health::of(Some(s), false), Health::Failing, "{s}");
        }
        for s in [200, 201, 400, 404, 408, 429, 501] {
            assert_eq!(Health::of(Some(s), false), Health::Answered, "{s}");
        }
    }

    #[test]
    fn intervals_grow_and_are_capped_at_a_few_seconds() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (k, ceiling) in [
            (0, 250),
            (1, 500),
            (2, 1000),
            (3, 2000),
            (4, 4000),
            (5, 4000),
        ] {
            for _ in 0..50 {
                let i = p.interval(k, &mut rng);
                assert!(i <= ceiling && i >= ceiling * 3 / 4, "{k}: {i}");
            }
        }
        assert!(p.interval(u32::MAX, &mut rng) <= 4000, "no overflow");
    }

    #[test]
    fn a_refused_connection_pauses_at_once_and_probes_one_at_a_time() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut e = EndpointState::default();
        assert_eq!(e.admit(0, &p), Admission::Send);
        let Change::Paused { until } = e.record(10, Health::Unreachable, false, &p, &mut rng)
        else {
            panic!("not paused");
        };
        assert!((10 + 187..=10 + 250).contains(&until), "{until}");
        // Requests in flight before the pause fail too: nothing changes.
        assert_eq!(
            e.record(11, Health::Unreachable, false, &p, &mut rng),
            Change::None
        );
        // Paused: every request is deferred to the probe time, spending nothing.
        assert_eq!(e.admit(20, &p), Admission::Defer { until });
        assert_eq!(e.deferred_until(20, &p), Some(until));
        assert_eq!(e.next_probe_at(), Some(until));
        // At the probe time one request probes; the others wait for it.
        assert_eq!(e.admit(until, &p), Admission::Probe);
        assert_eq!(e.deferred_until(until + 1, &p), None);
        let wait = e.admit(until + 1, &p);
        assert_eq!(
            wait,
            Admission::Wait {
                until: until + p.probe_deadline_ms
            }
        );
        // The probe fails: the next one after a longer interval.
        let Change::Extended { until: next } =
            e.record(until + 2, Health::Unreachable, true, &p, &mut rng)
        else {
            panic!("not extended");
        };
        assert!(next - (until + 2) >= 375 && next - (until + 2) <= 500);
        assert_eq!(e.admit(until + 3, &p), Admission::Defer { until: next });
        // Probe after probe, the interval stops growing at the cap.
        let mut t = next;
        for _ in 0..10 {
            assert_eq!(e.admit(t, &p), Admission::Probe);
            let Change::Extended { until: n } = e.record(t, Health::Failing, true, &p, &mut rng)
            else {
                panic!("not extended");
            };
            assert!(n - t <= p.max_ms);
            t = n;
        }
        assert!(t - next <= 10 * p.max_ms);
        // A probe is answered: released, and everything goes again.
        assert_eq!(e.admit(t, &p), Admission::Probe);
        assert_eq!(
            e.record(t + 5, Health::Answered, true, &p, &mut rng),
            Change::Released {
                down_ms: t + 5 - 10
            }
        );
        assert_eq!(e.admit(t + 6, &p), Admission::Send);
        assert_eq!(e.next_probe_at(), None);
    }

    #[test]
    fn timeouts_and_5xx_pause_only_in_a_row() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut e = EndpointState::default();
        // One bad message among good ones never pauses the endpoint.
        for t in 0..100 {
            assert_eq!(
                e.record(t, Health::Failing, false, &p, &mut rng),
                Change::None
            );
            assert_eq!(
                e.record(t, Health::Answered, false, &p, &mut rng),
                Change::None
            );
        }
        assert_eq!(
            e.record(200, Health::Failing, false, &p, &mut rng),
            Change::None
        );
        assert_eq!(
            e.record(201, Health::Failing, false, &p, &mut rng),
            Change::None
        );
        assert!(matches!(
            e.record(202, Health::Failing, false, &p, &mut rng),
            Change::Paused { .. }
        ));
    }

    #[test]
    fn a_probe_that_never_reports_frees_the_slot() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut e = EndpointState::default();
        let Change::Paused { until } = e.record(0, Health::Unreachable, false, &p, &mut rng) else {
            panic!("not paused");
        };
        assert_eq!(e.admit(until, &p), Admission::Probe);
        let deadline = until + p.probe_deadline_ms;
        assert_eq!(
            e.admit(deadline - 1, &p),
            Admission::Wait { until: deadline }
        );
        assert_eq!(e.admit(deadline, &p), Admission::Probe, "taken over");
    }

    #[test]
    fn a_429_pause_defers_then_sends_without_probing() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut e = EndpointState::default();
        assert_eq!(
            e.record(0, Health::Answered, false, &p, &mut rng),
            Change::None
        );
        e.throttle(1_000);
        e.throttle(500);
        assert_eq!(e.admit(10, &p), Admission::Defer { until: 1_000 });
        assert_eq!(e.admit(1_000, &p), Admission::Send);
    }

    #[test]
    fn another_replicas_outage_pause_is_taken_unless_this_one_saw_an_answer_since() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        // Idle here: the pause is taken, then probed like an own one.
        let mut idle = EndpointState::default();
        assert!(idle.adopt_outage(5_000, 1_000, &p));
        assert_eq!(idle.admit(1_000, &p), Admission::Defer { until: 5_000 });
        assert_eq!(idle.admit(5_000, &p), Admission::Probe);
        assert!(
            !idle.adopt_outage(4_000, 1_000, &p),
            "an ended pause is not taken"
        );
        // Answered here after that pause was decided: this process's own,
        // newer evidence wins.
        let mut busy = EndpointState::default();
        busy.record(4_500, Health::Answered, false, &p, &mut rng);
        assert!(!busy.adopt_outage(6_000, 4_600, &p));
        assert_eq!(busy.admit(4_600, &p), Admission::Send);
        // An answer long before the pause does not count.
        let mut stale = EndpointState::default();
        stale.record(0, Health::Answered, false, &p, &mut rng);
        assert!(stale.adopt_outage(10_000, 7_000, &p));
    }
}
