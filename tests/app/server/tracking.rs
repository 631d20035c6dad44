//! The Tracking API (`/v1/<call>`): single calls reach Totango, rejected and
//! unsupported calls are recorded, CORS for browser sources, filtered pages,
//! filled message IDs and mapping warnings.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_api_single_calls_reach_totango() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv
        .post(
            "/v1/identify",
            Some(KEY),
            &json!({"userId": "u1", "context": {"groupId": "acc1"},
                    "traits": {"name": "Ann", "email": "ann@example.com", "id": "u1"}}),
        )
        .await;
    assert_success(&r);
    let r = srv
        .post(
            "/v1/group",
            Some(KEY),
            &json!({"userId": "u1", "groupId": "acc1", "traits": {"name": "Acme", "plan": "Pro"}}),
        )
        .await;
    assert_success(&r);
    let r = srv
        .post(
            "/v1/page",
            Some(KEY),
            &json!({"userId": "u1", "context": {"groupId": "acc1"}, "name": "Home"}),
        )
        .await;
    assert_success(&r);
    // writeKey in the body instead of Basic auth; a client clock 5 s "late".
    let r = srv
        .post(
            "/v1/track",
            None,
            &json!({"writeKey": KEY, "userId": "u1", "context": {"groupId": "acc1"},
                    "event": "Clicked Button",
                    "timestamp": "2020-01-01T00:00:00.000Z", "sentAt": "2020-01-01T00:00:05.000Z"}),
        )
        .await;
    assert_success(&r);

    for id in 1..=4 {
        srv.wait_for(id, State::Delivered).await;
    }

    let hits = fake.hits();
    assert_eq!(hits.len(), 4, "{hits:#?}");
    for h in &hits {
        assert_eq!(h.get("sdr_s"), Some(SERVICE), "{h:?}");
        assert_eq!(h.get("sdr_o"), Some("acc1"), "{h:?}");
        assert_eq!(h.get("sdr_u"), Some("u1"), "{h:?}");
    }
    let identify = hits
        .iter()
        .find(|h| h.get("sdr_u.name").is_some())
        .expect("identify");
    assert_eq!(identify.get("sdr_u.name"), Some("Ann"));
    assert_eq!(identify.get("sdr_u.email"), Some("ann@example.com"));
    assert_eq!(identify.get("sdr_u.id"), None, "id is dropped");
    let group = hits
        .iter()
        .find(|h| h.get("sdr_odn").is_some())
        .expect("group");
    assert_eq!(group.get("sdr_odn"), Some("Acme"));
    assert_eq!(group.get("sdr_o.Status"), Some("Pro"));
    let page = &fake.with_activity("Viewed Home Page");
    assert_eq!(page.len(), 1, "{hits:#?}");
    assert_eq!(page[0].get("sdr_m"), Some("Application"));
    let t = &fake.with_activity("Clicked Button");
    assert_eq!(t.len(), 1, "{hits:#?}");
    assert_eq!(t[0].get("sdr_m"), Some("Application"));

    // What Segment's API fills was filled in the stored payload.
    let stored = srv.get(1).await;
    assert_eq!(stored.call, "identify");
    assert_eq!(stored.payload["type"], "identify");
    let mid = stored.payload["messageId"]
        .as_str()
        .expect("messageId filled");
    assert!(!mid.is_empty());
    assert_eq!(stored.message_id, mid);
    let received = millis_of(&stored.payload["receivedAt"]);
    assert!((received - stored.received_at).abs() < 1000, "{stored:#?}");
    assert_eq!(
        millis_of(&stored.payload["timestamp"]),
        received,
        "timestamp defaults to receivedAt"
    );

    // Skew correction: timestamp = receivedAt − (sentAt − originalTimestamp).
    let t = srv.get(4).await;
    assert_eq!(
        t.payload["originalTimestamp"], "2020-01-01T00:00:00.000Z",
        "{:#}",
        t.payload
    );
    assert_eq!(
        millis_of(&t.payload["receivedAt"]) - millis_of(&t.payload["timestamp"]),
        5000,
        "{:#}",
        t.payload
    );
    assert!(
        t.payload.get("writeKey").is_none(),
        "the write key is not stored: {:#}",
        t.payload
    );

    // Authentication.
    let body = track("u1", "Nope");
    let r = srv.post("/v1/track", Some("wrong-key"), &body).await;
    assert_error(&r, 401, "unauthorized", "write key");
    let r = srv.post("/v1/track", None, &body).await;
    assert_error(&r, 401, "unauthorized", "write key");
    let mut with_wrong = body.clone();
    with_wrong["writeKey"] = json!("wrong-key");
    let r = srv.post("/v1/track", None, &with_wrong).await;
    assert_eq!(r.status, 401, "{r:#?}");
    assert_eq!(
        srv.counts().await,
        counts(&[("delivered", 4)]),
        "refused calls store nothing"
    );

    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_api_accepts_rejected_and_unsupported_calls_and_records_them() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    // Valid Segment, but Totango needs an account: accepted (200), recorded rejected.
    let r = srv
        .post(
            "/v1/track",
            Some(KEY),
            &json!({"userId": "u1", "event": "E"}),
        )
        .await;
    assert_success(&r);
    let m = srv.wait_for(1, State::Rejected).await;
    assert_eq!(m.code.as_deref(), Some("missing_group_id"));
    assert!(
        m.reason
            .as_deref()
            .unwrap_or("")
            .contains("context.groupId"),
        "{m:#?}"
    );

    let r = srv
        .post(
            "/v1/screen",
            Some(KEY),
            &json!({"userId": "u1", "name": "Home"}),
        )
        .await;
    assert_success(&r);
    srv.wait_for(2, State::Unsupported).await;

    let r = srv
        .post(
            "/v1/alias",
            Some(KEY),
            &json!({"userId": "u1", "previousId": "anon"}),
        )
        .await;
    assert_success(&r);
    srv.wait_for(3, State::Unsupported).await;

    // integrations.Totango = false: filtered, nothing sent.
    let mut t = track("u1", "Hidden");
    t["integrations"] = json!({"Totango": false});
    assert_success(&srv.post("/v1/track", Some(KEY), &t).await);
    srv.wait_for(4, State::Filtered).await;

    // A wrong type names the field.
    let r = srv
        .post(
            "/v1/identify",
            Some(KEY),
            &json!({"userId": "u1", "traits": "x"}),
        )
        .await;
    assert_error(&r, 400, "invalid_field", "traits");

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fake.hits().is_empty(), "{:#?}", fake.hits());
    srv.stop().await;
}

/// Browser sources: a key's `allowed_origins` get CORS answers on the
/// Tracking API (short paths and `text/plain` bodies, as analytics.js sends
/// them), the key is still required, the key's `allowed_calls` and rate per
/// client address hold, and every other origin stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sources_get_cors_answers_for_their_origins_only() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.allowed_origins = vec!["https://app.example.com".into()];
    c.sources = vec![SourceConfig {
        name: "web".into(),
        write_key: "k-web".into(),
        totango: SettingsPatch::default(),
        allowed_origins: vec!["https://*.shop.example".into()],
        allowed_calls: vec!["identify".into(), "track".into()],
        client_requests_per_minute: Some(5),
    }];
    let srv = Server::start(c).await;
    let browser = |path: &str, origin: &str| {
        srv.http
            .post(srv.url(path))
            .header("origin", origin)
            .header("sec-fetch-site", "cross-site")
            .header("content-type", "text/plain")
    };
    let preflight = |path: &str, origin: &str| {
        srv.http
            .request(reqwest::Method::OPTIONS, srv.url(path))
            .header("origin", origin)
            .header("sec-fetch-site", "cross-site")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
    };
    let body = |user: &str| track(user, "Clicked").to_string();

    // The preflight of an allowed origin, on a short path and a long one.
    for path in ["/v1/t", "/v1/track", "/v1/batch"] {
        let r = srv.send(preflight(path, "https://app.example.com")).await;
        assert_eq!(r.status, 204, "{path}: {r:#?}");
        assert_eq!(
            r.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(r.headers["access-control-allow-methods"], "POST");
        assert_eq!(
            r.headers["access-control-allow-headers"],
            "authorization,content-type"
        );
    }
    let r = srv.send(preflight("/v1/t", "https://a.shop.example")).await;
    assert_eq!(r.status, 204, "{r:#?}");
    // Any other origin: refused, without CORS headers.
    for origin in ["https://evil.example", "https://shop.example", "null"] {
        let r = srv.send(preflight("/v1/t", origin)).await;
        assert_error(&r, 403, "cross_site", "refused");
        assert!(r.headers.get("access-control-allow-origin").is_none());
    }
    // Only the Tracking API answers browsers.
    let r = srv
        .send(preflight("/webhook", "https://app.example.com"))
        .await;
    assert_eq!(r.status, 405, "{r:#?}");
    assert!(r.headers.get("access-control-allow-origin").is_none());

    // A post from the allowed origin, text/plain, key in Authorization.
    let r = srv
        .send(
            browser("/v1/t", "https://app.example.com")
                .basic_auth(KEY, Some(""))
                .body(body("web-1")),
        )
        .await;
    assert_success(&r);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    // ... or with writeKey in the body (what analytics.js also sends).
    let mut with_key = track("web-2", "Clicked");
    with_key["writeKey"] = json!(KEY);
    let r = srv
        .send(browser("/v1/t", "https://app.example.com").body(with_key.to_string()))
        .await;
    assert_success(&r);
    // The key is still required; the answer still carries CORS headers so
    // that the page can read it.
    let r = srv
        .send(browser("/v1/t", "https://app.example.com").body(body("web-3")))
        .await;
    assert_eq!(r.status, 401, "{r:#?}");
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    // Another key's origin is not this key's.
    let r = srv
        .send(
            browser("/v1/t", "https://a.shop.example")
                .basic_auth(KEY, Some(""))
                .body(body("web-4")),
        )
        .await;
    assert_error(&r, 403, "cross_site", "allowed_origins");
    // Other origins: refused before anything is read.
    let r = srv
        .send(
            browser("/v1/t", "https://evil.example")
                .basic_auth(KEY, Some(""))
                .body(body("web-5")),
        )
        .await;
    assert_error(&r, 403, "cross_site", "refused");
    assert!(r.headers.get("access-control-allow-origin").is_none());

    // The "web" key: its calls only, at 5 requests a minute per client.
    let web = |path: &str, body: String| {
        browser(path, "https://a.shop.example")
            .basic_auth("k-web", Some(""))
            .body(body)
    };
    let r = srv
        .send(web(
            "/v1/i",
            json!({"userId": "web-6", "traits": {"name": "Ann"}, "context": {"groupId": "acc1"}})
                .to_string(),
        ))
        .await;
    assert_success(&r);
    let r = srv
        .send(web(
            "/v1/g",
            json!({"userId": "web-6", "groupId": "acc1"}).to_string(),
        ))
        .await;
    assert_error(&r, 403, "call_not_allowed", "group");
    let r = srv
        .send(web(
            "/v1/batch",
            json!({"batch": [track("web-7", "Clicked"), {"type": "group", "groupId": "acc1"}]})
                .to_string(),
        ))
        .await;
    assert_success(&r);
    for _ in 0..2 {
        let r = srv.send(web("/v1/t", body("web-8"))).await;
        assert_success(&r);
    }
    let r = srv.send(web("/v1/t", body("web-9"))).await;
    assert_error(&r, 429, "rate_limited", "client_requests_per_minute");
    assert!(r.headers.contains_key("retry-after"), "{r:#?}");

    // What was accepted: the allowed posts, the batch's group rejected alone.
    let c = srv.counts().await;
    assert_eq!(c.get("rejected"), Some(&1), "{c:?}");
    let stored: u64 = c.values().sum();
    assert_eq!(stored, 7, "{c:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_without_activity_is_filtered_and_sends_nothing() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let page = json!({"userId": "u1", "context": {"groupId": "acc1"}});
    assert_success(&srv.post("/v1/page", Some(KEY), &page).await);
    let m = srv.wait_for(1, State::Filtered).await;
    assert_eq!(m.code.as_deref(), Some("no_page_activity"));
    // On /segment a filtered message is a success (nothing to do by design).
    let mut seg = page.clone();
    seg["type"] = json!("page");
    let r = srv.post("/segment", Some(KEY), &seg).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(2, State::Filtered).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fake.hits().is_empty(), "{:#?}", fake.hits());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_message_ids_are_filled_not_deduplicated() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    for event in ["A", "B", "C"] {
        let mut body = track("u1", event);
        body["messageId"] = json!("");
        assert_success(&srv.post("/v1/track", Some(KEY), &body).await);
    }
    for id in 1..=3 {
        let m = srv.wait_for(id, State::Delivered).await;
        assert!(!m.message_id.is_empty(), "{m:#?}");
    }
    assert_eq!(fake.for_user("u1").len(), 3);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_warnings_are_answered_and_kept() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let body = json!({"type": "identify", "userId": "u1", "context": {"groupId": "acme"},
        "traits": {"created": "yesterday", "email": "a@acme.example"}});
    let r = srv.post("/webhook", Some(KEY), &body).await;
    assert_eq!(r.status, 200, "{r:#?}");
    let warning = r.json["outcomes"][0]["warnings"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(warning.starts_with("traits.created"), "{r:#?}");
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(m.warnings, [warning]);
    let hit = &fake.for_user("u1")[0];
    assert_eq!(hit.get("sdr_u.email"), Some("a@acme.example"));
    assert_eq!(hit.get("sdr_u.Create Date"), None);
    srv.stop().await;
}
