//! Keys and what is kept: open mode without write keys, header API tokens
//! and write keys in bodies never stored.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_write_keys_any_key_is_accepted() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.write_keys.clear();
    let srv = Server::start(c).await;

    assert_success(&srv.post("/v1/track", None, &track("u1", "Open1")).await);
    assert_success(
        &srv.post("/v1/track", Some("anything"), &track("u1", "Open2"))
            .await,
    );
    let r = srv.post("/webhook", None, &track("u1", "Open3")).await;
    assert_eq!(r.status, 200, "{r:#?}");
    let r = srv
        .post("/segment", Some("whatever"), &track("u1", "Open4"))
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    for id in 1..=4 {
        srv.wait_for(id, State::Delivered).await;
    }
    assert_eq!(fake.hits().len(), 4);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_api_token_is_used_and_not_kept_once_delivered() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let settings = base64::engine::general_purpose::STANDARD
        .encode(json!({"apiToken": "hdr-secret-tok"}).to_string());
    let r = srv
        .send(
            srv.request(
                "/segment",
                Some(KEY),
                serde_json::to_vec(&track("u1", "Tok")).unwrap(),
            )
            .header("X-Segment-Settings", settings),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    let hits = fake.with_activity("Tok");
    assert_eq!(hits[0].get("api-token"), Some("hdr-secret-tok"));
    // Nothing in the database keeps the token once the message is delivered.
    let stored = stored_settings(&dir, 1).await;
    assert!(!stored.contains("hdr-secret-tok"), "{stored}");
    // Nor does the admin API show it.
    let m = serde_json::to_string(&srv.get(1).await).unwrap();
    assert!(!m.contains("hdr-secret-tok"), "{m}");
    srv.stop().await;
}

/// Issue 14.13: a `writeKey` in a body is a credential, not data: it is
/// stripped before storage on every way in (it was kept on `/segment` and
/// `/webhook`, and shown by the admin API), rejected messages included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_key_in_a_body_is_never_stored() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let with_key = |mut m: Value| {
        m["writeKey"] = json!("secret-in-body");
        m
    };
    let r = srv
        .post("/segment", Some(KEY), &with_key(track("u1", "S")))
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    let r = srv
        .post("/webhook", Some(KEY), &with_key(track("u2", "W")))
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    // An array with a rejected element (group without groupId).
    let body = json!([
        with_key(track("u3", "W3")),
        with_key(json!({"type": "group", "userId": "u3"}))
    ]);
    let r = srv.post("/webhook", Some(KEY), &body).await;
    assert_eq!(r.status, 400, "{r:#?}");
    let r = srv
        .post("/v1/track", None, &with_key(track("u4", "T")))
        .await;
    assert_eq!(
        r.status, 401,
        "the body key is not a configured key: {r:#?}"
    );
    let r = srv
        .post("/v1/track", Some(KEY), &with_key(track("u4", "T")))
        .await;
    assert_success(&r);
    let body = json!({"batch": [with_key(track("u5", "B")), with_key(json!({"type": "track"}))]});
    let r = srv.post("/v1/batch", Some(KEY), &body).await;
    assert_success(&r);

    let stored = all_stored(&srv).await;
    assert_eq!(stored.len(), 7, "{stored:#?}");
    for m in &stored {
        assert!(
            m.payload.get("writeKey").is_none()
                && !m.payload.to_string().contains("secret-in-body"),
            "message {} keeps the write key: {}",
            m.id,
            m.payload
        );
    }
    srv.stop().await;
}
