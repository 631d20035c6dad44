//! What one process lets its clients hold: a global budget of request body
//! bytes in flight (after decompression), body deadlines that follow the
//! bytes that actually arrive, and the client address prefixes the
//! per-client connection cap counts. Server-level: every route is covered.
//!
//! Two layers wrap each request body. Outside the decompression layer,
//! [`pace`] gives the wire body its deadline: a grace period (short for a
//! request carrying no credential in its headers), extended by every byte
//! received at `limits.min_body_bytes_per_sec`, capped by
//! `limits.body_read_timeout_ms`. Inside it, [`charge`] takes each decoded
//! chunk from the global budget as it is read; the bytes stay charged until
//! the answer is produced. A body over budget or late is answered `503` +
//! `Retry-After` or `408` (JSON), and the connection is closed.

use crate::config::LimitsConfig;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

/// `Retry-After` of a body refused for want of budget, seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Request bodies refused by the transport, by reason (`budget`, `late`).
pub const REFUSED_BODIES: &str = "td_bodies_refused_total";

/// Grace of a request that carries a credential in its headers.
const CREDENTIALED_GRACE: Duration = Duration::from_secs(5);

/// The process-wide budget and the body deadline settings.
pub struct Transport {
    budget: Arc<Semaphore>,
    grace: Duration,
    uncredentialed_grace: Duration,
    bytes_per_sec: u64,
    most: Duration,
}

impl Transport {
    pub fn new(limits: &LimitsConfig) -> Arc<Transport> {
        let most = Duration::from_millis(limits.body_read_timeout_ms);
        let permits = limits.max_inflight_body_bytes.min(Semaphore::MAX_PERMITS);
        Arc::new(Transport {
            budget: Arc::new(Semaphore::new(permits)),
            grace: CREDENTIALED_GRACE.min(most),
            uncredentialed_grace: Duration::from_millis(limits.uncredentialed_body_grace_ms)
                .min(most),
            bytes_per_sec: limits.min_body_bytes_per_sec.max(1) as u64,
            most,
        })
    }

    /// Body bytes charged to requests right now.
    pub fn in_flight(&self, limits: &LimitsConfig) -> usize {
        limits
            .max_inflight_body_bytes
            .min(Semaphore::MAX_PERMITS)
            .saturating_sub(self.budget.available_permits())
    }
}

/// What happened to one request's body; shared by its two body layers and
/// the middleware that answers for them.
struct Guard {
    budget: Arc<Semaphore>,
    held: AtomicUsize,
    over_budget: AtomicBool,
    late: AtomicBool,
}

impl Guard {
    fn release(&self) {
        let n = self.held.swap(0, Ordering::AcqRel);
        if n > 0 {
            self.budget.add_permits(n);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release();
    }
}

/// A body refused because the process holds as many body bytes as it may.
#[derive(Debug)]
pub struct OverBudget;

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body: the server holds as many request bytes as it may")
    }
}

impl std::error::Error for OverBudget {}

/// A body whose bytes did not arrive in time.
#[derive(Debug)]
pub struct BodyLate;

impl std::fmt::Display for BodyLate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body: not received in time")
    }
}

impl std::error::Error for BodyLate {}

/// Whether the request carries a credential in its headers: a Basic or
/// Bearer `Authorization`, a webhook `X-Signature`, or the operator's
/// session cookie. Only its presence counts here; each route checks it.
pub fn has_credential(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key("x-signature")
        || headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("td_session="))
}

/// Outer layer (before decompression): the wire body's deadline, and the
/// answer when its body was late or over budget.
pub async fn pace(State(t): State<Arc<Transport>>, req: Request, next: Next) -> Response {
    let guard = Arc::new(Guard {
        budget: t.budget.clone(),
        held: AtomicUsize::new(0),
        over_budget: AtomicBool::new(false),
        late: AtomicBool::new(false),
    });
    let grace = if has_credential(req.headers()) {
        t.grace
    } else {
        t.uncredentialed_grace
    };
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let paced = Paced {
        inner: body,
        guard: guard.clone(),
        started,
        grace,
        bytes_per_sec: t.bytes_per_sec,
        most: t.most,
        received: 0,
        sleep: Box::pin(tokio::time::sleep_until(started + grace)),
    };
    parts.extensions.insert(guard.clone());
    let resp = next.run(Request::from_parts(parts, Body::new(paced))).await;
    let resp = if guard.over_budget.load(Ordering::Acquire) {
        metrics::counter!(REFUSED_BODIES, "reason" => "budget").increment(1);
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_budget",
            "body: the server holds as many request bytes as it may; retry later",
            Some(RETRY_AFTER_SECS),
        )
    } else if guard.late.load(Ordering::Acquire) {
        metrics::counter!(REFUSED_BODIES, "reason" => "late").increment(1);
        refuse(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "body: not received in time",
            None,
        )
    } else {
        resp
    };
    guard.release();
    resp
}

/// Inner layer (after decompression): each decoded chunk is charged to the
/// global budget as it is read.
pub async fn charge(req: Request, next: Next) -> Response {
    let Some(guard) = req.extensions().get::<Arc<Guard>>().cloned() else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let charged = Charged { inner: body, guard };
    next.run(Request::from_parts(parts, Body::new(charged)))
        .await
}

/// An answer for a body the transport refused; the connection is closed (the
/// rest of the body is not read).
fn refuse(status: StatusCode, code: &str, message: &str, retry: Option<u64>) -> Response {
    let mut resp = (
        status,
        Json(serde_json::json!({"message": message, "code": code})),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if let Some(secs) = retry {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

struct Paced {
    inner: Body,
    guard: Arc<Guard>,
    started: Instant,
    grace: Duration,
    bytes_per_sec: u64,
    most: Duration,
    received: u64,
    sleep: Pin<Box<Sleep>>,
}

impl Paced {
    /// The time the bytes received so far allow the body.
    fn allowance(&self) -> Duration {
        let earned = Duration::from_millis(self.received.saturating_mul(1000) / self.bytes_per_sec);
        (self.grace + earned).min(self.most)
    }
}

impl HttpBody for Paced {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    let deadline = this.started + this.allowance();
                    this.sleep.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                ready!(this.sleep.as_mut().poll(cx));
                this.guard.late.store(true, Ordering::Release);
                Poll::Ready(Some(Err(Box::new(BodyLate))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct Charged {
    inner: Body,
    guard: Arc<Guard>,
}

impl HttpBody for Charged {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len();
            let taken = u32::try_from(n)
                .ok()
                .and_then(|n| this.guard.budget.try_acquire_many(n).ok());
            match taken {
                Some(permit) => {
                    permit.forget();
                    this.guard.held.fetch_add(n, Ordering::AcqRel);
                }
                None if n == 0 => {}
                None => {
                    this.guard.over_budget.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(Box::new(OverBudget))));
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client a connection counts against for
/// `limits.max_connections_per_client`: its address with only the first
/// `v4`/`v6` bits kept (an IPv4-mapped IPv6 address counts as IPv4).
pub fn client_prefix(ip: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_address_prefixes() {
        let p = |s: &str| client_prefix(s.parse().unwrap(), 24, 64);
        assert_eq!(p("192.0.2.7"), p("192.0.2.200"));
        assert_ne!(p("192.0.2.7"), p("192.0.3.7"));
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(p("::ffff:192.0.2.9"), p("192.0.2.1"));
        let exact = |s: &str| client_prefix(s.parse().unwrap(), 32, 128);
        assert_ne!(exact("192.0.2.7"), exact("192.0.2.8"));
        assert_ne!(exact("2001:db8::1"), exact("2001:db8::2"));
        assert_eq!(
            client_prefix("203.0.113.9".parse().unwrap(), 1, 1),
            "128.0.0.0".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn credentials_in_headers_are_recognised() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(!has_credential(&h(&[])));
        assert!(!has_credential(&h(&[("cookie", "other=1")])));
        assert!(has_credential(&h(&[("authorization", "Basic eDo=")])));
        assert!(has_credential(&h(&[("x-signature", "00")])));
        assert!(has_credential(&h(&[("cookie", "a=1; td_session=x")])));
    }
}
