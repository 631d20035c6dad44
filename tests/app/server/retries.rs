//! Retries and dead letters: 5xx, 429 and Retry-After, 4xx, the retry age,
//! and resending only what Totango has not accepted.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_success() {
    let fake = Fake::with(|n, _| if n < 2 { reply(500) } else { reply(200) }).await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(&srv.post("/v1/track", Some(KEY), &track("u1", "R")).await);
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(m.attempts, 3, "{m:#?}");
    assert_eq!(
        m.last_response.as_ref().and_then(|l| l.status),
        Some(200),
        "{m:#?}"
    );
    let statuses: Vec<u16> = fake.hits().iter().map(|h| h.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_honours_retry_after() {
    let fake = Fake::with(|n, _| {
        if n == 0 {
            Reply::status(429).header("Retry-After", "1")
        } else {
            reply(200)
        }
    })
    .await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u1", "Limited"))
            .await,
    );
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(m.attempts, 2, "{m:#?}");
    let hits = fake.hits();
    assert_eq!(
        hits.iter().map(|h| h.status).collect::<Vec<_>>(),
        [429, 200]
    );
    let waited = hits[1].at.duration_since(hits[0].at);
    assert!(
        waited >= Duration::from_millis(950),
        "retried after only {waited:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_pauses_the_whole_endpoint() {
    let fake = Fake::with(|n, _| {
        if n == 0 {
            Reply::status(429).header("Retry-After", "1")
        } else {
            reply(200)
        }
    })
    .await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u1", "First"))
            .await,
    );
    // Once the 429 is recorded, another user's message must wait as well.
    srv.wait_until(1, "the 429 is recorded", |m| m.attempts >= 1)
        .await;
    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u2", "Second"))
            .await,
    );
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;

    let hits = fake.hits();
    assert_eq!(hits[0].status, 429, "{hits:#?}");
    let second = &fake.with_activity("Second");
    assert_eq!(second.len(), 1);
    let waited = second[0].at.duration_since(hits[0].at);
    assert!(
        waited >= Duration::from_millis(950),
        "another user's message went out {waited:?} after the 429"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_error_from_totango_is_dead_without_retry() {
    let fake = Fake::with(|_, _| Reply::status(400).body("bad service id")).await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(&srv.post("/v1/track", Some(KEY), &track("u1", "Bad")).await);
    let m = srv.wait_for(1, State::Dead).await;
    assert_eq!(m.code.as_deref(), Some("rejected_by_totango"), "{m:#?}");
    let last = m.last_response.as_ref().expect("last response kept");
    assert_eq!(last.status, Some(400));
    assert_eq!(last.body.as_deref(), Some("bad service id"));
    assert_eq!(m.attempts, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.hits().len(), 1, "no retry after a 400");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_after_max_retry_age() {
    let fake = Fake::with(|_, _| reply(503)).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.delivery.max_retry_age_secs = 1;
    let srv = Server::start(c).await;

    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u1", "Never"))
            .await,
    );
    let m = srv.wait_for(1, State::Dead).await;
    assert_eq!(m.code.as_deref(), Some("retries_exhausted"), "{m:#?}");
    assert!(m.attempts >= 2, "{m:#?}");
    assert_eq!(m.last_response.as_ref().and_then(|l| l.status), Some(503));
    assert_eq!(fake.hits().len() as u32, m.attempts);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_statuses_are_dead_at_once() {
    let fake = Fake::with(|_, p| match p.get("sdr_u").map(String::as_str) {
        Some("u501") => reply(501),
        Some("u404") => reply(404),
        Some("u201") => reply(201),
        _ => reply(200),
    })
    .await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    for user in ["u501", "u404", "u201"] {
        assert_success(&srv.post("/v1/track", Some(KEY), &track(user, "E")).await);
    }
    for (id, status) in [(1, 501), (2, 404)] {
        let m = srv.wait_for(id, State::Dead).await;
        assert_eq!(m.code.as_deref(), Some("rejected_by_totango"), "{m:#?}");
        assert_eq!(
            m.last_response.as_ref().and_then(|l| l.status),
            Some(status)
        );
        assert_eq!(m.attempts, 1, "{m:#?}");
    }
    srv.wait_for(3, State::Delivered).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.hits().len(), 3, "no retries: {:#?}", fake.hits());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_resends_only_the_requests_totango_has_not_accepted() {
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    // A page sends two activities; the second fails once.
    let fake = Fake::with(move |_, p| {
        if p.get("sdr_a").map(String::as_str) == Some("Viewed Docs Index Page")
            && !f.swap(true, Ordering::SeqCst)
        {
            reply(503)
        } else {
            reply(200)
        }
    })
    .await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let page = json!({"userId": "u1", "context": {"groupId": "acc1"},
                      "category": "Docs", "name": "Index"});
    assert_success(&srv.post("/v1/page", Some(KEY), &page).await);
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(m.sent, 2, "{m:#?}");
    assert_eq!(
        fake.with_activity("Viewed Docs Page").len(),
        1,
        "{:#?}",
        fake.hits()
    );
    let index: Vec<u16> = fake
        .with_activity("Viewed Docs Index Page")
        .iter()
        .map(|h| h.status)
        .collect();
    assert_eq!(index, [503, 200]);
    srv.stop().await;
}
