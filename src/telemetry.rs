//! Logging: `tracing` with an env filter (`RUST_LOG`), JSON when
//! `TD_LOG_FORMAT=json`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

/// Messages accepted, by interface (`tracking`, `segment`, `webhook`).
pub const ACCEPTED: &str = "td_messages_accepted_total";
/// Messages by final outcome (delivered, filtered, unsupported, duplicate, rejected, dead).
pub const OUTCOMES: &str = "td_messages_total";
/// Requests sent to Totango, by status class (2xx, 4xx, 5xx, error).
/// Delivery results ignored because their lease had run out and another
/// claim took the message.
pub const STALE_REPORTS: &str = "td_stale_reports_total";
pub const ATTEMPTS: &str = "td_delivery_attempts_total";
pub const DELIVERY_LATENCY: &str = "td_delivery_request_duration_seconds";
pub const HTTP_LATENCY: &str = "td_http_request_duration_seconds";
pub const QUEUE_DEPTH: &str = "td_queue_depth";
pub const OLDEST_PENDING: &str = "td_oldest_pending_age_seconds";
/// Users erased by a Segment `delete` or the admin API.
pub const ERASURES: &str = "td_user_erasures_total";
/// Stored bytes of refused messages (against `storage.max_refused_bytes`).
pub const REFUSED_BYTES: &str = "td_refused_stored_bytes";
/// Connections closed at once because their client address had too many open.
pub const REFUSED_CONNECTIONS: &str = "td_connections_refused_total";
/// The adaptive limit of requests to Totango in flight.
pub const CONCURRENCY_LIMIT: &str = "td_delivery_concurrency_limit";
/// Breaches of Totango's documented limits found at ingest, by rule
/// (`account_text`, `user_text`, `account_name`, `number`, `date`, `account_id`).
pub const LIMIT_BREACHES: &str = "td_totango_limit_breaches_total";
/// Mean round-trip time of requests to Totango over the last window.
pub const DELIVERY_RTT: &str = "td_delivery_rtt_seconds";
/// Totango's health as delivery sees it: 1 for the current `state` (idle,
/// normal, slow, refusing, paused, unreachable), 0 for the others.
pub const TOTANGO_HEALTH: &str = "td_totango_health";

/// How often histogram samples are folded into their buckets. The recorder
/// keeps every sample until then (8 bytes or more each), so without it memory
/// grew with every request for as long as nothing scraped `/metrics`.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The process-wide Prometheus recorder, installed on first use, with a
/// thread that folds histogram samples into buckets every [`UPKEEP_EVERY`].
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_ok() {
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no metrics upkeep thread: histogram samples wait for /metrics");
            }
            metrics::describe_counter!(ACCEPTED, "Messages accepted, by interface");
            metrics::describe_counter!(ERASURES, "Users erased (Segment delete, admin API)");
            metrics::describe_counter!(OUTCOMES, "Messages by final outcome");
            metrics::describe_counter!(
                LIMIT_BREACHES,
                "Breaches of Totango's documented limits found at ingest, by rule"
            );
            metrics::describe_counter!(ATTEMPTS, "Requests sent to Totango, by status class");
            metrics::describe_counter!(
                STALE_REPORTS,
                "Delivery results ignored because their lease had run out"
            );
            metrics::describe_histogram!(DELIVERY_LATENCY, "Latency of requests to Totango");
            metrics::describe_histogram!(HTTP_LATENCY, "Latency of inbound HTTP requests");
            metrics::describe_gauge!(QUEUE_DEPTH, "Messages waiting for delivery");
            metrics::describe_gauge!(
                CONCURRENCY_LIMIT,
                "Adaptive limit of requests to Totango in flight"
            );
            metrics::describe_gauge!(
                DELIVERY_RTT,
                "Mean round-trip time of requests to Totango (last window)"
            );
            metrics::describe_gauge!(
                TOTANGO_HEALTH,
                "Totango's health: 1 for the current state (idle, normal, slow, refusing, paused, unreachable)"
            );
            metrics::describe_gauge!(
                OLDEST_PENDING,
                "Age of the oldest message waiting for delivery"
            );
            metrics::describe_gauge!(
                REFUSED_BYTES,
                "Stored bytes of refused messages (rejected, duplicate, filtered, unsupported)"
            );
        }
        handle
    })
}

/// Counts one message reaching a final outcome.
pub fn count_outcome(outcome: &'static str) {
    metrics::counter!(OUTCOMES, "outcome" => outcome).increment(1);
}

/// Sets `td_totango_health`: 1 for `current`, 0 for the other states.
pub fn totango_health<const N: usize>(current: &'static str, all: [&'static str; N]) {
    for state in all {
        let value = if state == current { 1.0 } else { 0.0 };
        metrics::gauge!(TOTANGO_HEALTH, "state" => state).set(value);
    }
}

/// Counts one breach of Totango's limits (`rule` is a fixed rule name).
pub fn count_limit_breach(rule: &'static str) {
    metrics::counter!(LIMIT_BREACHES, "rule" => rule).increment(1);
}

/// Installs the global subscriber; later calls do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        // JSON escapes control characters itself.
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(false)
            .with_writer(|| EscapingWriter(std::io::stderr()))
            .try_init()
    };
}

/// Text logs, one line per event: control characters in logged values (a
/// newline or ANSI escape in a path or `messageId`) are written escaped, so
/// a client cannot forge log lines or drive the terminal.
pub struct EscapingWriter<W: std::io::Write>(pub W);

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let escaped = escape_controls(buf);
        self.0.write_all(&escaped)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Escapes every control character but the line's final newline.
pub fn escape_controls(buf: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let (body, end) = match buf.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (buf, &b""[..]),
    };
    if !body.iter().any(|b| b.is_ascii_control()) {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b.is_ascii_control() => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            b => out.push(b),
        }
    }
    out.extend_from_slice(end);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_but_the_line_end_is_kept() {
        let line = b"INFO message_id=a\nFAKE ERROR \x1b[31mred\x7f\n";
        let out = escape_controls(line);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "INFO message_id=a\\nFAKE ERROR \\x1b[31mred\\x7f\n"
        );
        assert_eq!(&*escape_controls(b"plain\n"), b"plain\n");
        // UTF-8 text is not touched.
        assert_eq!(
            &*escape_controls("Zürich\n".as_bytes()),
            "Zürich\n".as_bytes()
        );
    }
}

/// Lets a repeated log line through at most once per period (a storage that
/// stays unavailable would otherwise log every second, from every loop).
#[derive(Debug, Default)]
pub struct Throttle(std::sync::Mutex<Option<std::time::Instant>>);

impl Throttle {
    pub const PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

    /// A throttle that has said nothing yet (usable in a `static`).
    pub const fn new() -> Throttle {
        Throttle(std::sync::Mutex::new(None))
    }

    /// True when the line should be logged now.
    pub fn ready(&self) -> bool {
        let mut last = self.0.lock().expect("throttle lock");
        let now = std::time::Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < Self::PERIOD => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}
