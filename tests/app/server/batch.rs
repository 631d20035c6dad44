//! `/v1/batch`: batch-level context, named errors, items rejected alone,
//! `sentAt` skew and duplicates inside a batch.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_merges_batch_level_context_and_integrations() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({
                "batch": [
                    {"type": "track", "userId": "u1", "event": "E1"},
                    {"type": "identify", "userId": "u2", "traits": {"plan": "x"},
                     "context": {"groupId": "own-acc"}}
                ],
                "context": {"groupId": "batch-acc"}
            }),
        )
        .await;
    assert_success(&r);
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;
    let e1 = fake.with_activity("E1");
    assert_eq!(e1.len(), 1, "{:#?}", fake.hits());
    assert_eq!(
        e1[0].get("sdr_o"),
        Some("batch-acc"),
        "batch context merged"
    );
    let u2 = fake.for_user("u2");
    assert_eq!(u2.len(), 1);
    assert_eq!(
        u2[0].get("sdr_o"),
        Some("own-acc"),
        "the item's own context wins"
    );
    assert_eq!(u2[0].get("sdr_u.plan"), Some("x"));

    // /v1/import is the same, and batch-level integrations apply too.
    let r = srv
        .post(
            "/v1/import",
            None,
            &json!({
                "writeKey": KEY,
                "batch": [{"type": "track", "userId": "u3", "event": "E3"}],
                "context": {"groupId": "batch-acc"},
                "integrations": {"All": false}
            }),
        )
        .await;
    assert_success(&r);
    let m = srv.wait_for(3, State::Filtered).await;
    assert_eq!(m.payload["integrations"], json!({"All": false}));
    assert_eq!(fake.hits().len(), 2);

    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_errors_are_named_and_nothing_of_the_batch_is_stored() {
    // A request that is not a usable batch at all is refused whole.
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_batch_messages = 3;
    c.limits.max_message_bytes = 512;
    c.limits.max_body_bytes = 4096;
    c.limits.max_batch_body_bytes = 4096;
    let srv = Server::start(c).await;
    let ok = track("u1", "E");

    // Too many messages.
    let r = srv
        .post("/v1/batch", Some(KEY), &json!({"batch": [ok, ok, ok, ok]}))
        .await;
    assert_error(&r, 400, "batch_too_large", "batch");

    // A single call over max_message_bytes.
    let mut big = track("u1", "Big");
    big["properties"] = json!({"blob": "x".repeat(600)});
    let r = srv.post("/v1/track", Some(KEY), &big).await;
    assert_error(&r, 400, "message_too_large", "message");

    // A body over max_body_bytes.
    let mut huge = track("u1", "Huge");
    huge["properties"] = json!({"blob": "x".repeat(5000)});
    let r = srv
        .post("/v1/batch", Some(KEY), &json!({"batch": [huge]}))
        .await;
    assert_eq!(r.status, 413, "{r:#?}");
    assert!(
        r.json["message"].is_string() && r.json["code"].is_string(),
        "{r:#?}"
    );

    // Malformed JSON.
    let r = srv
        .post_raw("/v1/batch", Some(KEY), &b"{\"batch\": [{"[..])
        .await;
    assert_error(&r, 400, "malformed_json", "JSON");
    let r = srv.post_raw("/v1/track", Some(KEY), &b"not json"[..]).await;
    assert_error(&r, 400, "malformed_json", "JSON");

    // Not a batch at all.
    let r = srv
        .post("/v1/batch", Some(KEY), &json!({"batch": "x"}))
        .await;
    assert_error(&r, 400, "invalid_field", "batch");
    // Trailing bytes after the JSON body.
    let r = srv
        .post_raw("/v1/batch", Some(KEY), &b"{\"batch\": []} {}"[..])
        .await;
    assert_error(&r, 400, "malformed_json", "trailing");
    // A batch context larger than any message would make every item too large...
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": [ok], "context": {"blob": "x".repeat(600)}}),
        )
        .await;
    assert_error(&r, 400, "message_too_large", "context");
    assert_eq!(srv.counts().await, counts(&[]), "nothing stored");
    srv.stop().await;

    // ... or all together.
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_request_stored_bytes = 2_000;
    c.limits.max_batch_body_bytes = 2_000;
    let srv = Server::start(c).await;
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": vec![ok.clone(); 20], "context": {"blob": "x".repeat(300)}}),
        )
        .await;
    assert_error(&r, 400, "request_too_large", "batch[");

    // Auth applies to batches too.
    let r = srv
        .post("/v1/batch", Some("wrong"), &json!({"batch": [ok]}))
        .await;
    assert_eq!(r.status, 401, "{r:#?}");

    assert_eq!(
        srv.counts().await,
        counts(&[]),
        "nothing of a refused batch is stored"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fake.hits().is_empty());
    srv.stop().await;
}

/// One item over `limits.max_message_bytes` costs only itself, on each of the
/// three ways in that take several messages: it is stored `rejected`
/// (`message_too_large`) with a bounded summary of its payload, and the
/// others are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_item_is_rejected_alone_on_every_way_in() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_message_bytes = 2_000;
    let srv = Server::start(c).await;
    let big = |user: &str| {
        json!({"type": "track", "userId": user, "event": "Big", "messageId": format!("big-{user}"),
               "context": {"groupId": "acc1"}, "properties": {"blob": "x".repeat(40_000)}})
    };
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": [track("b1", "E"), big("b-big"), track("b2", "E")]}),
        )
        .await;
    assert_success(&r);
    let r = srv
        .post(
            "/v1/import",
            Some(KEY),
            &json!({"batch": [big("i-big"), track("i1", "E")]}),
        )
        .await;
    assert_success(&r);
    let r = srv
        .post(
            "/webhook",
            Some(KEY),
            &json!([track("w1", "E"), big("w-big")]),
        )
        .await;
    // /webhook reports a rejected element with 400 (Segment does not retry it);
    // the other element is kept.
    assert_error(&r, 400, "message_too_large", "[1]");
    assert_eq!(r.json["outcomes"][0]["outcome"], "accepted", "{r:#?}");
    assert_eq!(r.json["outcomes"][1]["outcome"], "rejected", "{r:#?}");

    wait::until(WAIT, Duration::from_millis(20), async || {
        if fake.hits().len() < 4 {
            Err(())
        } else {
            Ok(())
        }
    })
    .await
    .unwrap_or_else(|()| panic!("delivered: {:?}", fake.hits()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.hits().len(), 4, "{:?}", fake.hits());
    for user in ["b1", "b2", "i1", "w1"] {
        assert_eq!(fake.for_user(user).len(), 1, "{user} delivered once");
    }
    for user in ["b-big", "i-big", "w-big"] {
        assert!(fake.for_user(user).is_empty(), "{user} not delivered");
    }
    let rejected = srv
        .storage
        .list(
            totango_destination::storage::MessageFilter {
                state: Some(State::Rejected),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(rejected.len(), 3, "{rejected:#?}");
    for m in &rejected {
        assert_eq!(m.code.as_deref(), Some("message_too_large"), "{m:#?}");
        let reason = m.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("at most 2000 bytes"), "{reason}");
        let user = m.user_id.as_deref().unwrap_or_default();
        assert!(user.ends_with("-big"), "{m:#?}");
        assert_eq!(m.payload["messageId"], format!("big-{user}"));
        assert!(m.payload["truncated"]["bytes"].as_u64().unwrap() > 40_000);
        let kept = m.payload.to_string().len();
        assert!(
            kept < 2_000,
            "the payload is kept as a bounded prefix: {kept} bytes"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_bad_batch_item_is_rejected_alone_and_the_rest_delivered() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let mut items = vec![track("u1", "Good 1")];
    items.push(
        json!({"type": "track", "userId": "u1", "event": "Bad group",
        "context": {"groupId": {"id": "acme"}}}),
    );
    items.push(
        json!({"type": "track", "userId": "u1", "event": "Bad time", "timestamp": 1700000000}),
    );
    items.push(json!({"userId": "u1", "event": "No type"}));
    items.push(json!({"type": "purchase", "userId": "u1"}));
    items.push(json!({"type": "identify", "userId": "u1", "traits": "x"}));
    items.push(json!(7));
    // A call Totango cannot take (a `delete` would erase u1: issue 18).
    items.push(json!({"type": "screen", "userId": "u1", "name": "Home"}));
    items.push(track("u1", "Good 2"));
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": items, "context": {"groupId": "acme"}}),
        )
        .await;
    assert_success(&r);
    let good1 = srv.wait_for(1, State::Delivered).await;
    assert_eq!(good1.state, State::Delivered);
    srv.wait_for(9, State::Delivered).await;
    let expect = [
        (2, "invalid_field", "batch[1].context.groupId"),
        (3, "invalid_field", "batch[2].timestamp"),
        (4, "missing_type", "batch[3].type"),
        (5, "unknown_type", "batch[4].type"),
        (6, "invalid_field", "batch[5].traits"),
        (7, "invalid_message", "batch[6]"),
    ];
    for (id, code, field) in expect {
        let m = srv.get(id).await;
        assert_eq!(m.state, State::Rejected, "{m:#?}");
        assert_eq!(m.code.as_deref(), Some(code), "{m:#?}");
        let reason = m.reason.clone().unwrap_or_default();
        assert!(reason.contains(field), "{reason:?} names {field}");
    }
    let screen = srv.get(8).await;
    assert_eq!(screen.state, State::Unsupported, "{screen:#?}");
    let events: Vec<String> = fake
        .hits()
        .iter()
        .filter_map(|h| h.get("sdr_a").map(str::to_owned))
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.contains(&"Good 1".to_owned()) && events.contains(&"Good 2".to_owned()));

    // /webhook arrays too: the bad element is stored as rejected, reported
    // with 400, and the others are kept.
    let r = srv
        .post(
            "/webhook",
            Some(KEY),
            &json!([track("u2", "Hook good"), {"type": "track", "userId": "u2", "timestamp": 5,
                "event": "Hook bad", "context": {"groupId": "acme"}}]),
        )
        .await;
    assert_error(&r, 400, "invalid_field", "[1].timestamp");
    assert_eq!(r.json["outcomes"][0]["outcome"], "accepted", "{r:#?}");
    assert_eq!(r.json["outcomes"][1]["outcome"], "rejected", "{r:#?}");
    srv.wait_for(10, State::Delivered).await;
    assert_eq!(srv.get(11).await.state, State::Rejected);

    // delete erases its user (issue 18): 200 on /webhook and /segment, with
    // outcome `erased`; the Tracking API has no path of its own for it.
    let del = json!({"type": "delete", "userId": "u3", "context": {"groupId": "acme"}});
    let r = srv.post("/webhook", Some(KEY), &del).await;
    assert_success(&r);
    assert_eq!(r.json["outcomes"][0]["outcome"], "erased", "{r:#?}");
    let r = srv.post("/segment", Some(KEY), &del).await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json["outcome"], "erased", "{r:#?}");
    let r = srv.post("/v1/delete", Some(KEY), &del).await;
    assert_eq!(r.status, 404, "{r:#?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_sent_at_corrects_skew_and_duplicates_inside_a_batch_are_dropped() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let mut a = track("u1", "Skewed");
    a["timestamp"] = json!("2020-01-01T00:00:00.000Z");
    a["messageId"] = json!("same-id");
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": [a, a], "sentAt": "2020-01-01T00:00:03.000Z"}),
        )
        .await;
    assert_success(&r);
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(
        millis_of(&m.payload["receivedAt"]) - millis_of(&m.payload["timestamp"]),
        3000,
        "{:#}",
        m.payload
    );
    assert_eq!(m.payload["originalTimestamp"], "2020-01-01T00:00:00.000Z");
    srv.wait_for(2, State::Duplicate).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.with_activity("Skewed").len(), 1);
    srv.stop().await;
}

/// Issue 14.3 (ingest side): a batch whose large `context` is merged into
/// many items that are rejected (no `userId`) stored the merged context with
/// each of them: 34 KB sent became ~4 MB of rejected rows. Messages that will
/// never be sent are now stored as their client sent them, so what a request
/// stores stays within a small multiple of its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_batch_items_do_not_store_the_batch_context_each() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let items: Vec<Value> = (0..130)
        .map(|i| json!({"type": "track", "event": format!("e{i}")}))
        .collect();
    let mut body = json!({
        "batch": items,
        "context": {"groupId": "acc1", "blob": "x".repeat(30_000)},
    });
    // One item that will be sent keeps the merged context (delivery needs it).
    body["batch"]
        .as_array_mut()
        .unwrap()
        .push(track("u1", "Sent"));
    let sent = serde_json::to_vec(&body).unwrap();
    let r = srv.post_raw("/v1/batch", Some(KEY), sent.clone()).await;
    assert_success(&r);

    let stored = all_stored(&srv).await;
    assert_eq!(stored.len(), 131);
    let rejected: Vec<&StoredMessage> = stored
        .iter()
        .filter(|m| m.state == State::Rejected)
        .collect();
    assert_eq!(rejected.len(), 130, "{:?}", srv.counts().await);
    for m in &rejected {
        assert_eq!(m.code.as_deref(), Some("missing_user_id"), "{m:#?}");
        assert!(m.payload.get("context").is_none(), "{}", m.payload);
        assert!(m.payload["event"].is_string() && m.payload["messageId"].is_string());
    }
    let kept = stored.iter().find(|m| m.state != State::Rejected).unwrap();
    assert_eq!(
        kept.payload["context"]["blob"].as_str().unwrap().len(),
        30_000
    );
    let total: usize = stored.iter().map(|m| m.payload.to_string().len()).sum();
    assert!(
        total < 3 * sent.len(),
        "{} bytes sent were stored as {total} bytes of payloads",
        sent.len()
    );
    srv.stop().await;
}
