//! A local stand-in for Totango's pixel endpoint, for benchmarks and manual
//! tests: answers every `GET /pixel.gif/` with 200 and a 1×1 GIF, and counts.
//!
//! `cargo run --release --example fake_totango -- 127.0.0.1:18091 [--delay-ms N]`
//! (or `FAKE_TOTANGO_DELAY_MS=N`): each answer waits N ms first, like a real
//! round trip to Totango. `GET /count` tells how many pixel requests arrived.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const GIF: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

struct Fake {
    count: AtomicU64,
    delay: Duration,
}

#[tokio::main]
async fn main() {
    let mut addr = "127.0.0.1:18091".to_owned();
    let mut delay_ms: u64 = std::env::var("FAKE_TOTANGO_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--delay-ms" {
            let value = args.next().unwrap_or_default();
            delay_ms = value.parse().unwrap_or_else(|_| {
                eprintln!("--delay-ms: {value:?} is not a number of milliseconds");
                std::process::exit(2)
            });
        } else {
            addr = arg;
        }
    }
    let fake = Arc::new(Fake {
        count: AtomicU64::new(0),
        delay: Duration::from_millis(delay_ms),
    });
    let app =
        Router::new()
            .route(
                "/pixel.gif/",
                get(|State(f): State<Arc<Fake>>| async move {
                    if !f.delay.is_zero() {
                        tokio::time::sleep(f.delay).await;
                    }
                    f.count.fetch_add(1, Ordering::Relaxed);
                    ([(header::CONTENT_TYPE, "image/gif")], GIF)
                }),
            )
            .route(
                "/count",
                get(|State(f): State<Arc<Fake>>| async move {
                    f.count.load(Ordering::Relaxed).to_string()
                }),
            )
            .with_state(fake);
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("fake Totango on http://{addr}, answering after {delay_ms} ms");
    axum::serve(listener, app).await.expect("serve");
}
