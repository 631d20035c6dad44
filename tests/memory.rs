//! Issue 6.1: one authenticated request could take the process down by
//! having its batch-level `context` copied into 2,500 items (2.47 GB for a
//! 499 KB body). This test counts the bytes the whole process allocates
//! (a counting global allocator) while such requests run against the real
//! server, and bounds the peak: memory must stay proportional to the body.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
mod support;

use serde_json::json;
use support::TestApp;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1024 * 1024;

/// The tests here measure the whole process's allocations: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `/v1/batch` body of about `body_bytes` whose batch-level context is
/// `context_bytes` and is meant to be copied into every one of 2,500 items.
fn amplifying_batch(context_bytes: usize) -> Vec<u8> {
    let items: Vec<_> = (0..2_500)
        .map(
            |i| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("m{i}")}),
        )
        .collect();
    let body = json!({
        "batch": items,
        "context": {"groupId": "acme", "blob": "x".repeat(context_bytes)},
    });
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_context_amplification_stays_bounded() {
    let _serial = SERIAL.lock().await;
    let dir = support::place();
    let srv = TestApp::start(support::config(&dir, "http://127.0.0.1:9")).await;
    let http = reqwest::Client::new();
    // Two shapes: a context larger than a message (each merged item is over
    // the limit) and a 30 KB context (each item fits, the request does not).
    let bodies = [amplifying_batch(300_000), amplifying_batch(30_000)];
    for body in &bodies {
        assert!(body.len() < 500 * 1024, "{} bytes", body.len());
    }
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    // Four at once, as in the finding that aborted the process.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let body = bodies[i % 2].clone();
        let http = http.clone();
        let url = format!("{}/v1/batch", srv.base);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, text)
        }));
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 400, "{text}");
        assert!(
            text.contains("message_too_large") || text.contains("request_too_large"),
            "{text}"
        );
    }
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    // Eight requests of < 0.5 MB each, plus the test's own copies of the
    // bodies: without the limits on merged items this was gigabytes.
    assert!(
        peak < 96 * MIB,
        "peak allocation grew by {} MiB",
        peak / MIB
    );
    eprintln!(
        "peak allocation during the attack: {:.1} MiB",
        peak as f64 / MIB as f64
    );
    let counts = srv.storage.counts().await.unwrap();
    assert!(
        counts.iter().all(|(_, n)| *n == 0),
        "nothing stored: {counts:?}"
    );
    srv.stop().await;
}

/// Every inbound request records its latency in a histogram, and the
/// Prometheus recorder keeps each sample until its buckets are updated. They
/// were updated only when something scraped `/metrics`: a server under load
/// that nobody scraped grew by ~23 bytes a request, without end (+23 MB per
/// million `/healthz`). The samples are now folded into buckets every second.
#[test]
fn histogram_samples_are_not_kept_until_a_scrape() {
    let _serial = SERIAL.blocking_lock();
    totango_destination::telemetry::metrics();
    let before = CURRENT.load(Ordering::Relaxed);
    // 4 MB of samples if they were all kept.
    for i in 0..500_000u32 {
        metrics::histogram!(totango_destination::telemetry::HTTP_LATENCY, "route" => "/healthz")
            .record(f64::from(i % 100) / 1000.0);
    }
    let grown = |since: usize| CURRENT.load(Ordering::Relaxed).saturating_sub(since);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while grown(before) > MIB / 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Freed blocks are reclaimed as threads pass through the recorder.
        metrics::histogram!(totango_destination::telemetry::HTTP_LATENCY, "route" => "/healthz")
            .record(0.0);
    }
    assert!(
        grown(before) <= MIB / 4,
        "{} KiB still held for 500,000 samples nobody scraped",
        grown(before) / 1024
    );
}
