//! `/webhook`: arrays, keys, signatures and signed elements accepted once.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_without_secret_takes_arrays_and_requires_a_key() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let body = json!([track("u1", "W1"), track("u2", "W2")]);
    let r = srv.post("/webhook", None, &body).await;
    assert_error(&r, 401, "unauthorized", "write key");
    let r = srv.post("/webhook", Some(KEY), &body).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;
    assert_eq!(fake.with_activity("W1").len(), 1);
    assert_eq!(fake.with_activity("W2").len(), 1);

    // A single object works too.
    let r = srv.post("/webhook", Some(KEY), &track("u3", "W3")).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(3, State::Delivered).await;

    // A rejected message → 400, but its valid sibling is kept and delivered.
    let body = json!([track("u4", "W4"), {"type": "group", "userId": "u4"}]);
    let r = srv.post("/webhook", Some(KEY), &body).await;
    assert_error(&r, 400, "missing_group_id", "groupId");
    assert!(
        r.json["message"].as_str().unwrap().contains("[1]"),
        "{r:#?}"
    );
    srv.wait_for(4, State::Delivered).await;
    srv.wait_for(5, State::Rejected).await;
    assert_eq!(fake.with_activity("W4").len(), 1);

    // A malformed item names its index.
    let r = srv
        .post(
            "/webhook",
            Some(KEY),
            &json!([track("u5", "W5"), {"type": "track", "traits": 1}]),
        )
        .await;
    assert_error(&r, 400, "invalid_field", "[1].traits");

    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_with_secret_checks_the_signature() {
    const SECRET: &str = "hook-secret";
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some(SECRET.into());
    let srv = Server::start(c).await;
    let signed = |body: &[u8], sig: Option<String>| {
        let mut req = srv.request("/webhook", None, body.to_vec());
        if let Some(s) = sig {
            req = req.header("X-Signature", s);
        }
        req
    };

    // Signature of the whole body.
    let one = serde_json::to_vec(&track("u1", "S1")).unwrap();
    let r = srv.send(signed(&one, Some(hmac_hex(SECRET, &one)))).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;

    // An array signed by its first element only is refused by default: the
    // rest of the array would be unauthenticated.
    let mut first = track("u2", "S2");
    first["messageId"] = json!("first-2");
    let array = serde_json::to_vec(&json!([first, track("u3", "S3")])).unwrap();
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&first).unwrap());
    let r = srv.send(signed(&array, Some(sig))).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");

    // An array signed whole.
    let array2 = serde_json::to_vec(&json!([track("u4", "S4"), track("u5", "S4b")])).unwrap();
    let r = srv
        .send(signed(&array2, Some(hmac_hex(SECRET, &array2))))
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(2, State::Delivered).await;
    srv.wait_for(3, State::Delivered).await;

    // Wrong, other-secret, missing and non-hex signatures → 401; nothing stored.
    let other = serde_json::to_vec(&track("u5", "S5")).unwrap();
    let r = srv.send(signed(&other, Some(hmac_hex(SECRET, &one)))).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    let r = srv
        .send(signed(&other, Some(hmac_hex("not-the-secret", &other))))
        .await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    let r = srv.send(signed(&other, None)).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    let r = srv.send(signed(&other, Some("zz-not-hex".into()))).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");

    // The signature of the first element does not vouch for a lone object.
    let r = srv
        .send(signed(&other, Some(hmac_hex(SECRET, b"[]"))))
        .await;
    assert_eq!(r.status, 401, "{r:#?}");

    assert_eq!(srv.counts().await, counts(&[("delivered", 3)]));
    assert!(fake.with_activity("S5").is_empty());
    assert!(fake.with_activity("S3").is_empty());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_element_signatures_when_enabled_are_never_accepted_twice() {
    const SECRET: &str = "hook-secret";
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some(SECRET.into());
    c.auth.webhook_first_element_signature = true;
    let srv = Server::start(c).await;
    let signed = |body: &[u8], sig: String| {
        srv.request("/webhook", None, body.to_vec())
            .header("X-Signature", sig)
    };
    // As Segment's batched Actions sign: the first element, compact.
    let mut first = track("u2", "S2");
    first["messageId"] = json!("first-2");
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&first).unwrap());
    let array = serde_json::to_vec_pretty(&json!([first, track("u3", "S3")])).unwrap();
    let r = srv.send(signed(&array, sig.clone())).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;

    // The same signed element with other messages appended: a replay.
    let forged = serde_json::to_vec(&json!([first, track("u9", "Forged")])).unwrap();
    let r = srv.send(signed(&forged, sig)).await;
    assert_error(&r, 401, "unauthorized", "already accepted");

    // A signed first element without a messageId cannot be recognised again.
    let anonymous = track("u4", "S4");
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&anonymous).unwrap());
    let array = serde_json::to_vec(&json!([anonymous, track("u5", "S5")])).unwrap();
    let r = srv.send(signed(&array, sig)).await;
    assert_error(&r, 401, "unauthorized", "messageId");

    assert_eq!(srv.counts().await, counts(&[("delivered", 2)]));
    assert!(fake.with_activity("Forged").is_empty());
    srv.stop().await;
}

/// Twelve arrays sharing one signed first element, sent at once: exactly one
/// is accepted (recording the element and storing the array are one step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_arrays_sharing_a_signed_element_are_accepted_once() {
    const SECRET: &str = "hook-secret";
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some(SECRET.into());
    c.auth.webhook_first_element_signature = true;
    let srv = Arc::new(Server::start(c).await);
    let mut first = track("u1", "Signed");
    first["messageId"] = json!("signed-first");
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&first).unwrap());
    let posts: Vec<_> = (0..12)
        .map(|i| {
            let (srv, first, sig) = (srv.clone(), first.clone(), sig.clone());
            tokio::spawn(async move {
                let items: Vec<Value> = std::iter::once(first)
                    .chain((0..50).map(|j| track(&format!("r{i}-{j}"), &format!("Extra{i}"))))
                    .collect();
                let body = serde_json::to_vec(&Value::Array(items)).unwrap();
                let r = srv
                    .send(
                        srv.request("/webhook", None, body)
                            .header("X-Signature", sig),
                    )
                    .await;
                assert!(
                    r.status == 200 || r.status == 401,
                    "unexpected answer: {r:#?}"
                );
                r.status == 200
            })
        })
        .collect();
    let mut accepted = 0;
    for p in posts {
        accepted += usize::from(p.await.unwrap());
    }
    assert_eq!(accepted, 1, "arrays accepted with one signed element");
    let stored: u64 = srv.counts().await.values().sum();
    assert_eq!(stored, 51, "only the accepted array is stored");
    Arc::into_inner(srv).expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_with_secret_authenticates_before_parsing() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some("s3cret".into());
    let srv = Server::start(c).await;
    let r = srv.post_raw("/webhook", None, "{not json").await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    srv.stop().await;
}
