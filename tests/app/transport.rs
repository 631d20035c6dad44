//! Issue 14, items 2 and 4, against the real server: a global budget of
//! request body bytes in flight (decoded), body deadlines that follow the
//! bytes that arrive (short for requests without a credential in their
//! headers), and the per-client connection cap counted per address prefix.
//! Memory figures are measured by `bench/memory_attacks.sh`, not here.

use base64::Engine;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use totango_destination::config::Config;

use crate::support::TestApp;

const KEY: &str = "wk-transport";

fn config(place: &crate::support::TestPlace) -> Config {
    let mut c = crate::support::config(place, "http://127.0.0.1:9");
    c.auth.write_keys = vec![KEY.into()];
    c
}

fn addr(srv: &TestApp) -> SocketAddr {
    srv.base.trim_start_matches("http://").parse().unwrap()
}

/// A connection from `from` (a loopback address) to the server.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

fn basic() -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"));
    format!("Authorization: Basic {b}\r\n")
}

/// Request head of a chunked POST.
fn chunked_head(path: &str, extra: &str) -> Vec<u8> {
    let kind = if path == "/login" {
        "application/x-www-form-urlencoded"
    } else {
        "application/json"
    };
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n\
         Transfer-Encoding: chunked\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads an answer until the connection closes or `within` passes; the
/// status and body (None when nothing came).
async fn answer(stream: &mut TcpStream, within: Duration) -> Option<(u16, String)> {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

fn batch_of(bytes: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({"batch": [{
        "type": "track", "userId": "u", "event": "E",
        "context": {"groupId": "acc"},
        "properties": {"pad": "x".repeat(bytes)}
    }]}))
    .unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Issue 14.2: request bodies held at once are bounded by
/// `limits.max_inflight_body_bytes`, counted after decompression: past it a
/// body is answered `503 over_budget` with `Retry-After`, and the bytes come
/// back when the requests holding them end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_global_budget_are_503_with_retry_after() {
    let place = crate::support::place();
    let mut c = config(&place);
    c.limits.max_body_bytes = 100_000;
    c.limits.max_batch_body_bytes = 100_000;
    c.limits.max_message_bytes = 100_000;
    c.limits.max_inflight_body_bytes = 150_000;
    let srv = TestApp::start(c).await;
    let to = addr(&srv);
    let http = reqwest::Client::new();
    let post_gzip = |body: Vec<u8>| {
        http.post(format!("{}/v1/batch", srv.base))
            .basic_auth(KEY, Some(""))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(gzip(&body))
            .send()
    };

    // An authenticated body of 90 KB, stalled before its end, holds 90 KB.
    let mut holder = TcpStream::connect(to).await.unwrap();
    let mut req = chunked_head("/v1/batch", &basic());
    req.extend(chunk(&vec![b' '; 90_000]));
    holder.write_all(&req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 80 KB once decoded (under 1 KB sent gzipped) does not fit beside it.
    let r = post_gzip(batch_of(80_000)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["code"], "over_budget", "{body}");
    assert!(body["message"].as_str().unwrap().contains("body"), "{body}");
    // A small request still fits.
    let r = post_gzip(batch_of(1_000)).await.unwrap();
    assert_eq!(r.status(), 200);

    // Once the holder is gone, its bytes are free again.
    drop(holder);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = post_gzip(batch_of(80_000)).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    srv.stop().await;
}

/// Issue 14.2: a body with no credential in its headers (its key may be in
/// the body) has `limits.uncredentialed_body_grace_ms` plus what its bytes
/// earn at `min_body_bytes_per_sec`, chunked and gzipped bodies included; it
/// used to have the whole `body_read_timeout_ms` (30 s), and a stalled gzip
/// body inflating to 2 MB held its memory that long. A credentialed body
/// keeps its longer grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncredentialed_stalled_bodies_get_a_short_deadline() {
    let place = crate::support::place();
    let mut c = config(&place);
    c.limits.body_read_timeout_ms = 30_000;
    c.limits.uncredentialed_body_grace_ms = 1_000;
    let srv = TestApp::start(c).await;
    let to = addr(&srv);

    // A gzip bomb's first bytes (half of 400 KB of spaces), then nothing.
    let bomb = gzip(&vec![b' '; 400_000]);
    let mut cases = Vec::new();
    for (name, path, extra, body) in [
        ("chunked", "/v1/batch", "", chunk(b"{\"batch\": [")),
        (
            "gzip chunked",
            "/v1/batch",
            "Content-Encoding: gzip\r\n",
            chunk(&bomb[..bomb.len() / 2]),
        ),
        ("chunked /login", "/login", "", chunk(b"token=")),
    ] {
        let mut s = TcpStream::connect(to).await.unwrap();
        let mut req = chunked_head(path, extra);
        req.extend(body);
        s.write_all(&req).await.unwrap();
        cases.push((name, path, s));
    }
    let started = Instant::now();
    for (name, path, mut s) in cases {
        let got = answer(&mut s, Duration::from_secs(10)).await;
        let (status, text) = got.unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(status, 408, "{name} {path}: {text}");
        assert!(text.contains("body_timeout"), "{name}: {text}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered before the 30 s body_read_timeout_ms"
    );

    // With a credential in its headers, the same stall is given longer.
    let mut s = TcpStream::connect(to).await.unwrap();
    let mut req = chunked_head("/v1/batch", &basic());
    req.extend(chunk(b"{\"batch\": ["));
    s.write_all(&req).await.unwrap();
    assert!(
        answer(&mut s, Duration::from_millis(2_500)).await.is_none(),
        "a credentialed body keeps its 5 s grace"
    );
    srv.stop().await;
}

/// Issue 14.4: 1,500 unauthenticated chunked trickles from 6 addresses of
/// one /24 (each address under `max_connections_per_client`) made honest
/// requests wait 20–30 s. The cap now counts a /24 (IPv4) or /64 (IPv6) as
/// one client, and uncredentialed bodies have a short deadline, so honest
/// requests with credentials, from elsewhere, are served within a second
/// while the attack runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_clients_are_served_during_a_trickle_flood() {
    let place = crate::support::place();
    let srv = TestApp::start(config(&place)).await;
    let to = addr(&srv);
    let attack_for = Duration::from_secs(6);
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..1_500u32 {
        let from = IpAddr::from([127, 0, 0, 2 + (i % 6) as u8]);
        attackers.spawn(async move {
            let started = Instant::now();
            // Connect again whenever the server closes, until the attack ends.
            while started.elapsed() < attack_for {
                // A closed or refused connection is opened again a moment later.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(mut s) = connect_from(from, to).await else {
                    continue;
                };
                if s.write_all(&chunked_head("/v1/batch", "")).await.is_err() {
                    continue;
                }
                while started.elapsed() < attack_for {
                    if s.write_all(&chunk(b" ")).await.is_err() {
                        break;
                    }
                    let mut buf = [0u8; 1024];
                    match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(_)) => break,
                        Err(_) => {}
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let honest = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 1, 1]))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..8 {
        let started = Instant::now();
        let r = honest
            .post(format!("{}/v1/track", srv.base))
            .basic_auth(KEY, Some(""))
            .header("content-type", "application/json")
            .body(
                json!({"userId": "u", "event": format!("honest {i}"), "context": {"groupId": "a"}})
                    .to_string(),
            )
            .send()
            .await
            .expect("the honest request is answered");
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        slowest < Duration::from_secs(1),
        "honest requests took up to {slowest:?} during the flood"
    );
    while attackers.join_next().await.is_some() {}
    srv.stop().await;
}
