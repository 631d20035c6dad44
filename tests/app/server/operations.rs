//! Operations and unknown endpoints: health, readiness, request IDs, JSON
//! errors for unknown paths and methods.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_request_ids() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv.send(srv.http.get(srv.url("/healthz"))).await;
    assert_eq!(r.status, 200, "{r:#?}");
    let r = srv.send(srv.http.get(srv.url("/readyz"))).await;
    assert_eq!(r.status, 200, "{r:#?}");

    let r = srv
        .send(
            srv.http
                .get(srv.url("/healthz"))
                .header("x-request-id", "req-abc-123"),
        )
        .await;
    assert_eq!(
        r.headers.get("x-request-id").map(|v| v.to_str().unwrap()),
        Some("req-abc-123")
    );
    let r = srv.send(srv.http.get(srv.url("/healthz"))).await;
    let generated = r
        .headers
        .get("x-request-id")
        .expect("a generated request id");
    assert!(!generated.is_empty());
    let r2 = srv.send(srv.http.get(srv.url("/healthz"))).await;
    assert_ne!(
        r2.headers.get("x-request-id"),
        Some(generated),
        "ids are unique"
    );

    // Error answers carry the request id too.
    let r = srv
        .send(
            srv.request("/v1/track", Some("bad"), "{}")
                .header("x-request-id", "req-err"),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.headers.get("x-request-id").map(|v| v.to_str().unwrap()),
        Some("req-err")
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoints_are_json_404() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv.send(srv.http.get(srv.url("/nope"))).await;
    assert_error(&r, 404, "not_found", "endpoint");
    let r = srv.post("/v2/track", Some(KEY), &track("u1", "E")).await;
    assert_error(&r, 404, "not_found", "endpoint");
    let r = srv.post("/v1/purchase", Some(KEY), &track("u1", "E")).await;
    assert_error(&r, 404, "not_found", "/v1/purchase");
    assert_eq!(srv.counts().await, counts(&[]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_a_json_error() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv.send(srv.http.get(srv.url("/v1/track"))).await;
    assert_eq!(r.status, 405, "{r:#?}");
    assert!(
        r.json["message"].is_string() && r.json["code"].is_string(),
        "every 4xx answer is {{\"message\", \"code\"}}: {r:#?}"
    );
    srv.stop().await;
}
