//! Load and the backlog bound: concurrent requests, 503 past the bound or
//! below the free-disk floor.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_all_stored_and_delivered() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Arc::new(Server::start(config(&dir, &fake.uri())).await);

    let n = 60;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let srv = srv.clone();
        tasks.spawn(async move {
            let path = ["/v1/track", "/segment", "/webhook"][i % 3];
            let mut m = track(&format!("c{}", i % 7), &format!("C{i}"));
            m["messageId"] = json!(format!("conc-{i}"));
            srv.post(path, Some(KEY), &m).await.status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    for id in 1..=n as i64 {
        srv.wait_for(id, State::Delivered).await;
    }
    assert_eq!(srv.counts().await, counts(&[("delivered", n as u64)]));
    let mut events: Vec<String> = fake
        .hits()
        .iter()
        .map(|h| h.get("sdr_a").unwrap().to_owned())
        .collect();
    events.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("C{i}")).collect();
    expected.sort();
    assert_eq!(events, expected, "each exactly once");
    Arc::into_inner(srv).expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_backlog_bound_ingest_answers_503_and_keeps_what_it_had() {
    // Totango unreachable: everything stays queued.
    let dir = crate::support::place();
    let mut c = config(&dir, "http://127.0.0.1:9");
    c.storage.max_backlog_messages = 3;
    let srv = Server::start(c).await;
    for i in 0..3 {
        assert_success(
            &srv.post("/v1/track", Some(KEY), &track("u1", &format!("E{i}")))
                .await,
        );
    }
    // The monitor notices within a second or so; poll until it does.
    let refused = wait::until(WAIT, Duration::from_millis(50), async || {
        let r = srv.post("/v1/track", Some(KEY), &track("u1", "More")).await;
        if r.status == 503 {
            return Ok(r);
        }
        assert_success(&r);
        Err(())
    })
    .await
    .expect("never refused");
    assert_eq!(refused.json["code"], "backpressure", "{refused:#?}");
    assert!(
        refused.json["message"]
            .as_str()
            .unwrap()
            .contains("max_backlog_messages"),
        "{refused:#?}"
    );
    assert_eq!(refused.headers["retry-after"], "30");
    // Refused at acceptance already; `/readyz` follows the monitor's reading.
    let ready = wait::until(WAIT, Duration::from_millis(50), async || {
        let ready = srv.send(srv.http.get(srv.url("/readyz"))).await;
        if ready.status == 503 {
            Ok(ready)
        } else {
            Err(ready)
        }
    })
    .await
    .unwrap_or_else(|ready| ready);
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json["status"], "backpressure");
    assert!(
        ready.json["reason"].as_str().unwrap().contains("backlog"),
        "{ready:#?}"
    );
    // Nothing accepted before was touched.
    let counts = srv.counts().await;
    let pending = counts.get("pending").copied().unwrap_or(0);
    assert!(pending >= 3, "{counts:?}");
    assert_eq!(counts.len(), 1, "{counts:?}");
    srv.stop().await;
}

/// Bursts from several clients at once cannot overshoot the backlog bound:
/// every request is checked at acceptance against the last reading plus what
/// was admitted since, not only by the once-a-second monitor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bursts_do_not_overshoot_the_backlog_bound() {
    let dir = crate::support::place();
    let mut c = config(&dir, "http://127.0.0.1:9");
    c.storage.max_backlog_messages = 1_000;
    let srv = Arc::new(Server::start(c).await);
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let srv = srv.clone();
            tokio::spawn(async move {
                let mut accepted = 0usize;
                for round in 0..10 {
                    let items: Vec<Value> = (0..100)
                        .map(|i| {
                            json!({"type": "track", "userId": format!("u{client}-{i}"),
                                   "event": format!("E{round}"),
                                   "context": {"groupId": "acme"}})
                        })
                        .collect();
                    let r = srv
                        .post("/v1/batch", Some(KEY), &json!({"batch": items}))
                        .await;
                    match r.status {
                        200 => accepted += 100,
                        503 => assert_eq!(r.json["code"], "backpressure", "{r:#?}"),
                        other => panic!("unexpected answer {other}: {r:#?}"),
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for c in clients {
        accepted += c.await.unwrap();
    }
    let pending = srv.counts().await.get("pending").copied().unwrap_or(0);
    assert_eq!(
        pending as usize, accepted,
        "every accepted message is queued"
    );
    assert!(
        accepted <= 1_000,
        "{accepted} messages queued against a bound of 1,000"
    );
    assert!(accepted >= 500, "only {accepted} accepted below the bound");
    Arc::into_inner(srv).expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_disk_floor_ingest_answers_503() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    if dir.is_postgres() {
        eprintln!("skipping: the free disk floor watches a SQLite file's disk");
        return;
    }
    let mut c = config(&dir, &fake.uri());
    // No disk has this much free: the floor is always crossed.
    c.storage.min_free_disk_bytes = u64::MAX;
    let srv = Server::start(c).await;
    wait::until(WAIT, Duration::from_millis(50), async || {
        let ready = srv.send(srv.http.get(srv.url("/readyz"))).await;
        if ready.status == 503 {
            assert!(
                ready.json["reason"]
                    .as_str()
                    .unwrap()
                    .contains("min_free_disk_bytes")
            );
            return Ok(());
        }
        Err(())
    })
    .await
    .expect("never not ready");
    let r = srv.post("/v1/track", Some(KEY), &track("u1", "E")).await;
    assert_eq!(r.status, 503, "{r:#?}");
    assert_eq!(r.json["code"], "backpressure");
    assert_eq!(srv.counts().await, counts(&[]));
    srv.stop().await;
}
