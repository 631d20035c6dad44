//! A local stand-in for Totango's pixel endpoint, for benchmarks and manual
//! tests: answers every `GET /pixel.gif/` with 200 and a 1×1 GIF, and counts.
//!
//! `cargo run --release --example fake_totango -- 127.0.0.1:18091`;
//! `GET /count` tells how many pixel requests arrived.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const GIF: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18091".into());
    let count = Arc::new(AtomicU64::new(0));
    let app =
        Router::new()
            .route(
                "/pixel.gif/",
                get(|State(c): State<Arc<AtomicU64>>| async move {
                    c.fetch_add(1, Ordering::Relaxed);
                    ([(header::CONTENT_TYPE, "image/gif")], GIF)
                }),
            )
            .route(
                "/count",
                get(|State(c): State<Arc<AtomicU64>>| async move {
                    c.load(Ordering::Relaxed).to_string()
                }),
            )
            .with_state(count);
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("fake Totango on http://{addr}");
    axum::serve(listener, app).await.expect("serve");
}
