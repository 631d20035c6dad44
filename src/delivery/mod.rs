//! Delivery: claims due messages from storage, sends their Totango requests
//! and reports back. Retry state lives in storage (`next_attempt_at`), never
//! only in memory. How many requests are in flight adapts to Totango's
//! answers (`concurrency`); results are written in batches.

pub mod client;
pub mod concurrency;
pub mod endpoint;
pub mod health;
pub mod policy;

use crate::config::Runtime;
use crate::mapping::{self, Outcome, SettingsPatch, TotangoRequest};
use crate::segment::Message;
use crate::storage::history::Count;
use crate::storage::{
    Claimed, Disposition, LastResponse, Millis, Report, State, Storage, now_millis,
};
use crate::telemetry;
use client::TotangoClient;
pub use concurrency::ConcurrencyStats;
use concurrency::{AdaptiveConcurrency, Signal};
use endpoint::{Admission, Change, EndpointState, Health, ProbePolicy};
use health::{HealthState, HealthTracker, TotangoHealth};
use policy::{Backoff, Verdict};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Longest idle wait between storage polls.
const MAX_IDLE_WAIT: Duration = Duration::from_secs(1);
/// How often pauses recorded by other processes are read.
const PAUSE_REFRESH: Duration = Duration::from_millis(500);
/// Most messages claimed at once.
const CLAIM_BATCH: usize = 512;
/// Longest pause between attempts to record results while storage fails.
const REPORT_RETRY_MAX: Duration = Duration::from_secs(5);
/// How long results are still tried after delivery stopped.
const REPORT_FLUSH: Duration = Duration::from_secs(10);
/// Shared pauses under this prefix are outages (probed at their end); the
/// others are Totango's 429s (sent to at their end). Storage treats the
/// endpoint as an opaque name.
const OUTAGE_PREFIX: &str = "outage ";

/// The request parameter that carries the SDR token; added at send time from
/// the current settings, never stored.
const API_TOKEN: &str = "api-token";

pub struct Delivery {
    storage: Arc<dyn Storage>,
    runtime: Arc<Runtime>,
    client: TotangoClient,
    backoff: Backoff,
    max_retry_age_ms: Millis,
    concurrency: AdaptiveConcurrency,
    grace: Duration,
    /// Results waiting to be written, and the signal that there are some.
    reports: Mutex<Vec<Report>>,
    reports_ready: Notify,
    /// Endpoint → its health: 429 pauses and outages this process saw,
    /// merged with storage's shared pauses before claims.
    endpoints: Mutex<HashMap<String, EndpointState>>,
    probe: ProbePolicy,
    /// Bumped at every endpoint change; messages waiting for a probe watch it.
    endpoint_changes: watch::Sender<u64>,
    /// Bumped when an endpoint comes back (ends the dispatcher's pause).
    releases: AtomicU64,
    /// Storage failures repeat while it is down; they are logged once a minute.
    quiet: telemetry::Throttle,
    /// When the shared pauses were last read.
    pauses_read: Mutex<Option<std::time::Instant>>,
    /// Cancelled when delivery stops: claimed messages not yet started are
    /// given back instead of sent.
    stopping: CancellationToken,
    /// Results that could not be recorded are said once a minute.
    quiet_reports: telemetry::Throttle,
    /// Totango's health as the operator sees it, and the state last
    /// published as the `td_totango_health` metric.
    health: Mutex<(HealthTracker, Option<HealthState>)>,
}

/// A claimed message in this process's hands. Dropped before its report was
/// queued (its task aborted at shutdown, or it panicked), it gives the
/// message back, so a live replica never sits on a claim it dropped.
struct Held {
    delivery: Arc<Delivery>,
    id: i64,
    lease: i64,
    sent: u32,
    reported: bool,
}

impl Held {
    /// Its report is about to be queued: nothing to give back.
    fn reported(mut self) {
        self.reported = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.reported {
            self.delivery
                .queue_report(release(self.id, self.lease, self.sent));
        }
    }
}

/// Gives a claimed message back, due now, without spending an attempt.
fn release(id: i64, lease: i64, sent: u32) -> Report {
    Report::untouched(id, lease, sent).given_back()
}

impl Delivery {
    pub fn new(
        storage: Arc<dyn Storage>,
        runtime: Arc<Runtime>,
    ) -> Result<Arc<Delivery>, reqwest::Error> {
        let config = &runtime.config.delivery;
        let timeout = Duration::from_millis(config.request_timeout_ms);
        Ok(Arc::new(Delivery {
            storage,
            runtime: runtime.clone(),
            client: TotangoClient::new(timeout, config.max_concurrency)?,
            backoff: Backoff {
                base_ms: config.retry_base_ms,
                max_ms: config.retry_max_ms,
            },
            max_retry_age_ms: (config.max_retry_age_secs as Millis).saturating_mul(1000),
            concurrency: AdaptiveConcurrency::new(
                config.min_concurrency,
                config.concurrency,
                config.max_concurrency,
            ),
            grace: timeout * 2 + Duration::from_secs(1),
            reports: Mutex::new(Vec::new()),
            reports_ready: Notify::new(),
            endpoints: Mutex::new(HashMap::new()),
            probe: ProbePolicy::new(config.request_timeout_ms),
            endpoint_changes: watch::Sender::new(0),
            releases: AtomicU64::new(0),
            quiet: telemetry::Throttle::default(),
            pauses_read: Mutex::new(None),
            stopping: CancellationToken::new(),
            quiet_reports: telemetry::Throttle::default(),
            // Slow: a median round trip over a quarter of the timeout.
            health: Mutex::new((HealthTracker::new(timeout / 4), None)),
        }))
    }

    /// Wakes the dispatcher (a delivery finished, so a permit is free).
    pub fn wake(&self) {
        self.storage.notifier().notify_one();
    }

    /// The adaptive concurrency as it stands.
    pub fn stats(&self) -> ConcurrencyStats {
        self.concurrency.stats()
    }

    /// Totango's health as this process sees it now.
    pub fn health(&self) -> TotangoHealth {
        self.health
            .lock()
            .expect("health lock")
            .0
            .report(now_millis())
    }

    /// Sets the `td_totango_health` gauges when the state changed.
    fn publish_health(&self) {
        let mut health = self.health.lock().expect("health lock");
        let state = health.0.state_at(now_millis());
        if health.1 != Some(state) {
            health.1 = Some(state);
            telemetry::totango_health(state.as_str(), HealthState::ALL.map(|s| s.as_str()));
        }
    }

    /// Runs until `shutdown`, then claims nothing more, gives back what it
    /// claimed and has not started, lets requests under way finish (within a
    /// grace period; what does not finish is given back too) and writes the
    /// results. Nothing stays claimed by a process that stopped.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let stop_reports = CancellationToken::new();
        let reporter = tokio::spawn(self.clone().write_reports(stop_reports.clone()));
        let mut tasks = JoinSet::new();
        // While everything claimed went to paused endpoints: claim nothing
        // until the earliest of those pauses ends or an endpoint comes back
        // (so an outage does not churn the whole backlog through storage).
        let mut hold: Option<(Millis, u64)> = None;
        loop {
            while tasks.try_join_next().is_some() {}
            self.publish_health();
            let free = self.concurrency.free();
            // Claim in batches sized to the free permits: waiting until a
            // quarter of the limit is free keeps claims (commits) few.
            let worth = (self.concurrency.limit() / 4).clamp(1, CLAIM_BATCH);
            let mut wait = MAX_IDLE_WAIT;
            if let Some((until, releases)) = hold {
                let now = now_millis();
                if now >= until || self.releases.load(Ordering::SeqCst) != releases {
                    hold = None;
                } else {
                    wait = Duration::from_millis((until - now) as u64).min(MAX_IDLE_WAIT);
                }
            }
            if hold.is_none() && (free >= worth || (free > 0 && self.concurrency.in_flight() == 0))
            {
                let limit = free.min(CLAIM_BATCH);
                self.refresh_pauses().await;
                let now = now_millis();
                let releases = self.releases.load(Ordering::SeqCst);
                // Read before claiming: an erase after this re-checks the claims.
                let erasures = self.storage.erasures();
                match self.storage.claim(limit).await {
                    Ok(batch) => {
                        let full = batch.messages.len() == limit;
                        let claimed = batch.messages.len();
                        let mut deferred: Option<Millis> = None;
                        let mut sent = 0usize;
                        for m in batch.messages {
                            if let Some((report, until)) = self.defer_at_claim(&m, now) {
                                self.queue_report(report);
                                deferred = Some(deferred.map_or(until, |d| d.min(until)));
                                continue;
                            }
                            sent += 1;
                            self.concurrency.start();
                            let this = self.clone();
                            let held = Held {
                                delivery: self.clone(),
                                id: m.id,
                                lease: m.lease,
                                sent: m.sent,
                                reported: false,
                            };
                            tasks.spawn(async move {
                                let report = this.deliver(m, erasures).await;
                                this.concurrency.finish();
                                held.reported();
                                this.queue_report(report);
                                this.wake();
                            });
                        }
                        if let Some(until) = deferred.filter(|_| claimed > 0 && sent == 0) {
                            hold = Some((until, releases));
                            wait = Duration::from_millis((until - now).max(1) as u64)
                                .min(MAX_IDLE_WAIT);
                        } else if full {
                            continue;
                        }
                        if let (Some(due), None) = (batch.next_due, hold) {
                            wait =
                                Duration::from_millis((due - now).max(1) as u64).min(MAX_IDLE_WAIT);
                        }
                    }
                    Err(e) => {
                        if self.quiet.ready() {
                            tracing::error!(error = %e, "could not claim messages (said once a minute)");
                        }
                    }
                }
            }
            let notifier = self.storage.notifier();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notifier.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.stopping.cancel();
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(
                "in-flight deliveries did not finish in time; they go back to the queue"
            );
            tasks.abort_all();
            // Aborted tasks drop their `Held`, which queues the release.
            while tasks.join_next().await.is_some() {}
        }
        stop_reports.cancel();
        let _ = reporter.await;
    }

    fn queue_report(&self, report: Report) {
        self.reports.lock().expect("reports lock").push(report);
        self.reports_ready.notify_one();
    }

    /// Writes finished deliveries' results, all waiting ones in one storage
    /// call. While storage is unavailable the results wait and are tried
    /// again (with a growing pause), up to [`REPORT_FLUSH`] after delivery
    /// stopped; what is still unrecorded then stays claimed by this process
    /// and goes back to the queue when it is judged gone (PostgreSQL) or at
    /// the next start (SQLite).
    async fn write_reports(self: Arc<Self>, stop: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        let mut flush_until: Option<tokio::time::Instant> = None;
        loop {
            let batch = std::mem::take(&mut *self.reports.lock().expect("reports lock"));
            if batch.is_empty() {
                if stop.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = self.reports_ready.notified() => {}
                }
                continue;
            }
            let outcomes: Vec<(i64, State)> = batch
                .iter()
                .filter_map(|r| match r.disposition.outcome().0 {
                    State::Pending => None,
                    state => Some((r.id, state)),
                })
                .collect();
            match self.storage.report(batch.clone()).await {
                Err(e) if e.is_transient() => {
                    let waiting = batch.len();
                    {
                        // Back in front of what arrived since, in order.
                        let mut reports = self.reports.lock().expect("reports lock");
                        let newer = std::mem::replace(&mut *reports, batch);
                        reports.extend(newer);
                    }
                    if self.quiet_reports.ready() {
                        tracing::error!(error = %e, waiting, "could not record delivery results; trying again (said once a minute)");
                    }
                    if stop.is_cancelled() {
                        let until = *flush_until
                            .get_or_insert_with(|| tokio::time::Instant::now() + REPORT_FLUSH);
                        if tokio::time::Instant::now() >= until {
                            let left = self.reports.lock().expect("reports lock").len();
                            tracing::error!(
                                results = left,
                                "stopping with delivery results unrecorded; their messages are sent again"
                            );
                            return;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled(), if !stop.is_cancelled() => {}
                    }
                    pause = (pause * 2).min(REPORT_RETRY_MAX);
                    continue;
                }
                Ok(stale) => {
                    pause = Duration::from_millis(100);
                    // A stale report's message is counted by whoever holds
                    // the newer lease, not here.
                    for (id, state) in outcomes {
                        if !stale.contains(&id) {
                            telemetry::count_outcome(state.as_str());
                        }
                    }
                    if !stale.is_empty() {
                        metrics::counter!(telemetry::STALE_REPORTS).increment(stale.len() as u64);
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not record delivery results"),
            }
        }
    }

    /// Decides for one request to `endpoint` (and takes the probe slot
    /// when it is the probe).
    fn admit(&self, endpoint: &str) -> Admission {
        let mut endpoints = self.endpoints.lock().expect("endpoint lock");
        match endpoints.get_mut(endpoint) {
            Some(state) => state.admit(now_millis(), &self.probe),
            None => Admission::Send,
        }
    }

    /// Records what a request found out about its endpoint and acts on the
    /// change: shares an outage pause, wakes what waits for a probe.
    async fn record_health(&self, endpoint: &str, health: Health, probe: bool, error: &str) {
        let change = {
            let mut endpoints = self.endpoints.lock().expect("endpoint lock");
            if health == Health::Answered && !endpoints.contains_key(endpoint) {
                return;
            }
            let state = endpoints.entry(endpoint.to_owned()).or_default();
            state.record(now_millis(), health, probe, &self.probe, &mut rand::rng())
        };
        match change {
            Change::None => return,
            Change::Paused { until } => {
                tracing::warn!(
                    endpoint,
                    error,
                    "Totango endpoint down: pausing it, probing until it answers"
                );
                self.share_pause(&format!("{OUTAGE_PREFIX}{endpoint}"), until)
                    .await;
            }
            Change::Extended { until } => {
                tracing::debug!(endpoint, error, "Totango endpoint still down");
                self.share_pause(&format!("{OUTAGE_PREFIX}{endpoint}"), until)
                    .await;
            }
            Change::Released { down_ms } => {
                tracing::info!(
                    endpoint,
                    down_ms,
                    "Totango endpoint answers again: sending what waited for it"
                );
                self.releases.fetch_add(1, Ordering::SeqCst);
                self.wake();
            }
        }
        self.endpoint_changes
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// When the endpoint is down: when its next probe is due.
    fn next_probe_at(&self, endpoint: &str) -> Option<Millis> {
        let endpoints = self.endpoints.lock().expect("endpoint lock");
        endpoints
            .get(endpoint)
            .and_then(EndpointState::next_probe_at)
    }

    /// Totango answered 429 with `Retry-After`: nothing goes to `endpoint`
    /// until `until`, here and in every process sharing storage.
    async fn throttle(&self, endpoint: &str, until: Millis) {
        {
            let mut endpoints = self.endpoints.lock().expect("endpoint lock");
            endpoints
                .entry(endpoint.to_owned())
                .or_default()
                .throttle(until);
        }
        self.health.lock().expect("health lock").0.paused(until);
        self.share_pause(endpoint, until).await;
    }

    async fn share_pause(&self, key: &str, until: Millis) {
        if let Err(e) = self.storage.pause_endpoint(key, until).await {
            tracing::warn!(error = %e, "could not share a pause of the Totango endpoint");
        }
    }

    /// Takes the pauses other processes recorded (at most twice a second).
    async fn refresh_pauses(&self) {
        {
            let mut last = self.pauses_read.lock().expect("pause lock");
            if last.is_some_and(|t| t.elapsed() < PAUSE_REFRESH) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        match self.storage.paused_endpoints().await {
            Ok(shared) => {
                let now = now_millis();
                let mut endpoints = self.endpoints.lock().expect("endpoint lock");
                for (key, until) in shared {
                    match key.strip_prefix(OUTAGE_PREFIX) {
                        Some(endpoint) => {
                            let state = endpoints.entry(endpoint.to_owned()).or_default();
                            if state.adopt_outage(until, now, &self.probe) {
                                tracing::info!(
                                    endpoint,
                                    "Totango endpoint paused by another process: probing it at the pause's end"
                                );
                            }
                        }
                        None => {
                            endpoints.entry(key).or_default().throttle(until);
                            self.health.lock().expect("health lock").0.paused(until);
                        }
                    }
                }
            }
            Err(e) => {
                if self.quiet.ready() {
                    tracing::warn!(error = %e, "could not read endpoint pauses (said once a minute)");
                }
            }
        }
    }

    /// A claimed message whose endpoint is paused now is not sent: it is
    /// due again when the pause ends, without spending an attempt.
    fn defer_at_claim(&self, m: &Claimed, now: Millis) -> Option<(Report, Millis)> {
        let until = {
            let endpoints = self.endpoints.lock().expect("endpoint lock");
            if endpoints.is_empty() {
                return None;
            }
            let overrides: SettingsPatch = serde_json::from_str(&m.settings).ok()?;
            let settings = self.runtime.settings_for(&m.source, &overrides).ok()?;
            endpoints
                .get(settings.base_url())?
                .deferred_until(now, &self.probe)?
        };
        let report = Report::untouched(m.id, m.lease, m.sent);
        Some((self.retry_at(report, m, until, None), until))
    }

    /// `report` as a retry at `next`, or dead when `next` is past the
    /// message's retry age.
    fn retry_at(
        &self,
        report: Report,
        m: &Claimed,
        next: Millis,
        last: Option<&LastResponse>,
    ) -> Report {
        if policy::past_retry_age(m.retry_from, self.max_retry_age_ms, next) {
            let attempts = m.attempts + u32::from(report.attempted);
            let reason = match last {
                Some(l) => format!(
                    "retries exhausted after {attempts} attempts; last: {}",
                    describe(Some(l))
                ),
                None => format!(
                    "retries exhausted after {attempts} attempts; the Totango endpoint was still paused"
                ),
            };
            return report.dead("retries_exhausted", reason);
        }
        Report {
            disposition: Disposition::Retry {
                next_attempt_at: next,
            },
            ..report
        }
    }

    /// Sends what is left of one message and says what became of it.
    /// `erasures` is [`Storage::erasures`] as it was before the claim.
    pub async fn deliver(&self, m: Claimed, erasures: u64) -> Report {
        let stored = m.settings.clone();
        let mut report = self.attempt(m, erasures).await;
        // A token the request brought is kept only while the message may
        // still be sent (pending, or dead and replayable).
        if !matches!(
            report.disposition,
            Disposition::Retry { .. } | Disposition::Dead { .. }
        ) {
            if let Ok(p) = serde_json::from_str::<SettingsPatch>(&stored) {
                if p.api_token.is_some() {
                    report.settings = Some(p.without_token().to_stored_json());
                }
            }
        }
        report
    }

    /// One delivery of a claimed message, in three steps: prepare (what to
    /// send, or a final outcome without sending), send (transport only) and
    /// settle (what Totango's answer means, by `policy`).
    async fn attempt(&self, m: Claimed, erasures: u64) -> Report {
        let report = Report::untouched(m.id, m.lease, m.sent);
        match self.prepare(&m, report) {
            Prepared::Send(plan, report) => self.send_all(&m, &plan, report, erasures).await,
            Prepared::Done(report) => report,
        }
    }

    /// Decodes a claimed message into the requests still to send, with the
    /// settings to send them with; or its final report when it will not be
    /// sent (unreadable, or the mapping does not send it). No I/O.
    fn prepare(&self, m: &Claimed, mut report: Report) -> Prepared {
        // Settings come from the configuration as it is now (a fixed endpoint or
        // rotated token applies to queued messages), plus the request's overrides.
        let overrides: SettingsPatch = match serde_json::from_str(&m.settings) {
            Ok(s) => s,
            Err(e) => {
                return Prepared::Done(
                    report.dead("internal", format!("stored settings unreadable: {e}")),
                );
            }
        };
        let settings = match self.runtime.settings_for(&m.source, &overrides) {
            Ok(s) => s,
            Err(e) => {
                return Prepared::Done(report.dead("invalid_settings", format!("settings: {e}")));
            }
        };
        let requests: Vec<TotangoRequest> = match &m.requests {
            Some(text) => match serde_json::from_str(text) {
                Ok(r) => r,
                Err(e) => {
                    return Prepared::Done(
                        report.dead("internal", format!("stored requests unreadable: {e}")),
                    );
                }
            },
            None => {
                let msg = Message::from_json(&m.payload).map_err(|e| e.to_string());
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => {
                        return Prepared::Done(
                            report.dead("internal", format!("stored message unreadable: {e}")),
                        );
                    }
                };
                let t = mapping::translate(&msg, &settings, m.latest_page_category.as_deref());
                if t.outcome != Outcome::Send {
                    report.disposition = Disposition::Final {
                        state: match t.outcome {
                            Outcome::Filtered => State::Filtered,
                            Outcome::Unsupported => State::Unsupported,
                            _ => State::Rejected,
                        },
                        code: t.code.map(|c| c.as_str().to_owned()),
                        reason: t.message,
                    };
                    return Prepared::Done(report);
                }
                let mut requests = t.requests;
                for r in &mut requests {
                    r.params.shift_remove(API_TOKEN);
                }
                report.requests = serde_json::to_string(&requests).ok();
                requests
            }
        };
        Prepared::Send(Plan { settings, requests }, report)
    }

    /// Sends the plan's requests not yet accepted, one after the other, each
    /// when its endpoint admits it; settles each answer.
    async fn send_all(
        &self,
        m: &Claimed,
        plan: &Plan,
        mut report: Report,
        mut erasures: u64,
    ) -> Report {
        let endpoint = plan.settings.base_url();
        // Set after waiting for a probe where erasures are announced (they
        // can be lost): the claim is checked before sending all the same.
        let recheck_after_wait = !self.storage.erasures_are_exact();
        let mut waited = false;
        while (report.sent as usize) < plan.requests.len() {
            // Not started yet and delivery stops, or this process may have
            // lost its claims: give the message back.
            if !report.attempted && (self.stopping.is_cancelled() || !self.storage.holds_claims()) {
                return report.given_back();
            }
            let probe = loop {
                // Subscribed before deciding, so no change is missed.
                let mut changes = self.endpoint_changes.subscribe();
                // An erase since the claim (or since the last check) may have
                // cancelled this message: its user's data must not leave.
                let seen = self.storage.erasures();
                if seen != erasures || waited {
                    match self.storage.holds_claim(m.id, m.lease).await {
                        Ok(true) => (erasures, waited) = (seen, false),
                        // Cancelled: the report is stale and ignored. Or it
                        // cannot be told: not sent, given back.
                        Ok(false) | Err(_) => return report.given_back(),
                    }
                }
                match self.admit(endpoint) {
                    Admission::Send => break false,
                    Admission::Probe => break true,
                    Admission::Defer { until } => {
                        return self.retry_at(report, m, until, None);
                    }
                    Admission::Wait { until } => {
                        let left = (until - now_millis()).max(1) as u64;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(left)) => {}
                            _ = changes.changed() => {}
                            _ = self.stopping.cancelled(), if !report.attempted => {
                                return report.given_back();
                            }
                        }
                        waited = recheck_after_wait;
                    }
                }
            };
            let started = std::time::Instant::now();
            let attempt = self
                .client
                .send(&send_url(
                    &plan.requests[report.sent as usize],
                    endpoint,
                    plan.settings.api_token.as_deref(),
                ))
                .await;
            report = match self
                .settle(m, endpoint, probe, started.elapsed(), attempt, report)
                .await
            {
                Settled::Next(report) => report,
                Settled::Done(report) => return report,
            };
        }
        report
    }

    /// What one answer means for the message (by `policy`), for the
    /// concurrency limit and for the endpoint's health; and its metrics.
    async fn settle(
        &self,
        m: &Claimed,
        endpoint: &str,
        probe: bool,
        rtt: Duration,
        attempt: client::Attempt,
        mut report: Report,
    ) -> Settled {
        metrics::histogram!(telemetry::DELIVERY_LATENCY).record(rtt.as_secs_f64());
        let status = attempt.status;
        // A refused connection says nothing about Totango's load (the
        // endpoint pause deals with it): the limit keeps what it learnt,
        // and the backlog of an outage goes at the speed it had before.
        if !attempt.connect_error {
            self.concurrency.record(rtt, Signal::of_status(status));
        }
        let class = match status {
            Some(s) if s < 300 => "2xx",
            Some(s) if s < 400 => "3xx",
            Some(s) if s < 500 => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        metrics::counter!(telemetry::ATTEMPTS, "class" => class).increment(1);
        let history = self.storage.history_counters();
        history.add(Count::Attempts, 1);
        if policy::verdict(status) != Verdict::Success {
            history.add(Count::Failed, 1);
        }
        if !attempt.connect_error {
            history.round_trip(rtt);
        }
        self.health.lock().expect("health lock").0.attempt(
            now_millis(),
            status,
            attempt.connect_error,
            attempt.error.as_deref(),
            rtt,
        );
        report.attempted = true;
        let health = Health::of(status, attempt.connect_error);
        self.record_health(
            endpoint,
            health,
            probe,
            attempt.error.as_deref().unwrap_or_default(),
        )
        .await;
        report.last = Some(LastResponse {
            status,
            body: attempt.body,
            error: attempt.error,
        });
        match policy::verdict(status) {
            Verdict::Success => {
                report.sent += 1;
                Settled::Next(report)
            }
            Verdict::Dead => {
                let reason = format!("Totango answered HTTP {}", status.unwrap_or_default());
                Settled::Done(report.dead("rejected_by_totango", reason))
            }
            Verdict::Retry => {
                // Failed because the endpoint is down: due again at its next
                // probe, not after this message's own backoff.
                let probe_at = match health {
                    Health::Answered => None,
                    _ => self.next_probe_at(endpoint),
                };
                let plan = policy::retry_plan(
                    &self.backoff,
                    m.attempts,
                    status,
                    attempt.retry_after,
                    probe_at,
                    now_millis(),
                    &mut rand::rng(),
                );
                if let Some(until) = plan.pause_endpoint_until {
                    self.throttle(endpoint, until).await;
                }
                let last = report.last.clone();
                Settled::Done(self.retry_at(report, m, plan.next_attempt_at, last.as_ref()))
            }
        }
    }
}

/// What a claimed message will send, once prepared.
struct Plan {
    settings: mapping::Settings,
    requests: Vec<TotangoRequest>,
}

/// A prepared message: to send, or done without sending.
enum Prepared {
    Send(Plan, Report),
    Done(Report),
}

/// After one answer: send the next request, or the message's report.
enum Settled {
    Next(Report),
    Done(Report),
}

impl Report {
    /// A claimed message's report before anything is done with it.
    fn untouched(id: i64, lease: i64, sent: u32) -> Report {
        Report {
            id,
            lease,
            requests: None,
            sent,
            attempted: false,
            disposition: Disposition::Delivered,
            last: None,
            settings: None,
        }
    }

    /// Due again now; an attempt is spent only if one was made.
    fn given_back(self) -> Report {
        Report {
            disposition: Disposition::Retry {
                next_attempt_at: now_millis(),
            },
            ..self
        }
    }

    fn dead(mut self, code: &str, reason: String) -> Report {
        self.disposition = Disposition::Dead {
            code: code.to_owned(),
            reason,
        };
        self
    }
}

/// The URL to GET, with the current token (stored requests carry none).
fn send_url(request: &TotangoRequest, endpoint: &str, token: Option<&str>) -> String {
    match token {
        None => request.url(endpoint),
        Some(t) => {
            let mut r = request.clone();
            r.params.insert(API_TOKEN.to_owned(), t.to_owned());
            r.url(endpoint)
        }
    }
}

fn describe(last: Option<&LastResponse>) -> String {
    match last {
        Some(LastResponse {
            status: Some(s), ..
        }) => format!("HTTP {s}"),
        Some(LastResponse { error: Some(e), .. }) => e.clone(),
        _ => "no response".into(),
    }
}
