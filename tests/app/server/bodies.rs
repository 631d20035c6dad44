//! Request bodies: chunked bodies over the limit, gzip, unknown encodings.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_body_bytes = 4096;
    let srv = Server::start(c).await;

    let mut body = serde_json::to_vec(&track("u1", "Chunked")).unwrap();
    body.truncate(body.len() - 1);
    body.extend_from_slice(b",\"properties\":{\"blob\":\"");
    body.extend(std::iter::repeat_n(b'x', 6000));
    body.extend_from_slice(b"\"}}");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"));
    let mut req = format!(
        "POST /v1/track HTTP/1.1\r\nHost: test\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (status, text) = raw_http(srv.addr, &req).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("body_too_large"), "{text}");
    assert_eq!(srv.counts().await, counts(&[]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_accepted_and_limited_after_decompression() {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let gzip = |bytes: &[u8]| {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let send = |body: Vec<u8>| {
        srv.send(
            srv.http
                .post(srv.url("/v1/track"))
                .basic_auth(KEY, Some(""))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(body),
        )
    };
    let r = send(gzip(&serde_json::to_vec(&track("u-gz", "Zipped")).unwrap())).await;
    assert_success(&r);
    srv.wait_for(1, State::Delivered).await;
    assert_eq!(fake.with_activity("Zipped").len(), 1);
    // 2 MB of zeros compresses to a few KB; the limit applies to what it expands to.
    let bomb = gzip(&vec![b' '; 2_000_000]);
    assert!(bomb.len() < 10_000);
    let r = send(bomb).await;
    assert_error(&r, 413, "body_too_large", "body");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_content_encoding_is_a_json_415() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let r = srv
        .send(
            srv.request("/v1/track", Some(KEY), b"xx".to_vec())
                .header("content-encoding", "br-unknown"),
        )
        .await;
    assert_error(&r, 415, "unsupported_encoding", "Content-Encoding");
    srv.stop().await;
}
