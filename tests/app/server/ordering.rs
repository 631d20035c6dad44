//! Dedupe and the order of attribute updates.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_message_id_is_delivered_once() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let mut m = track("u1", "Once");
    m["messageId"] = json!("m-dup-1");
    assert_success(&srv.post("/v1/track", Some(KEY), &m).await);
    assert_success(&srv.post("/v1/track", Some(KEY), &m).await);
    // The same messageId through the partner protocol is a duplicate too.
    let r = srv.post("/segment", Some(KEY), &m).await;
    assert_eq!(r.status, 200, "{r:#?}");

    srv.wait_for(1, State::Delivered).await;
    let d = srv.wait_for(2, State::Duplicate).await;
    assert_eq!(d.message_id, "m-dup-1");
    srv.wait_for(3, State::Duplicate).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.with_activity("Once").len(), 1, "{:#?}", fake.hits());
    assert_eq!(
        srv.counts().await,
        counts(&[("delivered", 1), ("duplicate", 2)])
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_holds_back_only_its_own_users_attribute_updates() {
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    // 503 (retry after 1 s) to the first attribute update for user A only
    // (A's activity has no order to keep and may reach the fake first).
    let fake = Fake::with(move |_, p| {
        if p.get("sdr_u").map(String::as_str) == Some("A")
            && p.contains_key("sdr_u.n")
            && !f.swap(true, Ordering::SeqCst)
        {
            Reply::status(503).header("Retry-After", "1")
        } else {
            reply(200)
        }
    })
    .await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    for (user, n) in [("A", "1"), ("A", "2"), ("A", "3"), ("B", "1")] {
        assert_success(
            &srv.post("/v1/identify", Some(KEY), &identify(user, n))
                .await,
        );
    }
    assert_success(&srv.post("/v1/track", Some(KEY), &track("A", "act")).await);
    for id in 1..=5 {
        srv.wait_for(id, State::Delivered).await;
    }
    assert_eq!(srv.get(1).await.attempts, 2);

    let a: Vec<Hit> = fake
        .for_user("A")
        .into_iter()
        .filter(|h| h.get("sdr_u.n").is_some())
        .collect();
    let seen: Vec<(&str, u16)> = a
        .iter()
        .map(|h| (h.get("sdr_u.n").unwrap(), h.status))
        .collect();
    assert_eq!(
        seen,
        [("1", 503), ("1", 200), ("2", 200), ("3", 200)],
        "A's updates in acceptance order, the failed one first"
    );
    let b = fake.for_user("B");
    assert_eq!(b.len(), 1);
    assert!(
        b[0].at < a[1].at,
        "B was delivered {:?} after A's retry: it waited for A",
        b[0].at.duration_since(a[1].at)
    );
    // A's activity does not wait for A's attribute updates either.
    let act = fake.with_activity("act");
    assert_eq!(act.len(), 1);
    assert!(act[0].at < a[1].at, "A's activity waited for A's retry");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_with_flaky_totango_keep_each_users_update_order() {
    // Every third request fails.
    let fake = Fake::with(|n, _| if n % 3 == 0 { reply(503) } else { reply(200) }).await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let users = 8;
    let per_user = 8;
    let mut batch = Vec::new();
    for e in 0..per_user {
        for u in 0..users {
            batch.push(identify(&format!("user-{u}"), &e.to_string()));
        }
    }
    assert_success(
        &srv.post("/v1/batch", Some(KEY), &json!({"batch": batch}))
            .await,
    );
    for id in 1..=(users * per_user) as i64 {
        srv.wait_for(id, State::Delivered).await;
    }
    for u in 0..users {
        let events: Vec<String> = fake
            .for_user(&format!("user-{u}"))
            .iter()
            .filter(|h| h.status == 200)
            .map(|h| h.get("sdr_u.n").unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..per_user).map(|e| e.to_string()).collect();
        assert_eq!(events, expected, "user-{u}");
    }
    srv.stop().await;
}
