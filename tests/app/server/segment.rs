//! `/segment`, the partner destination protocol, and its settings header.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_endpoint_follows_the_partner_protocol() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    // Valid → 200, delivered.
    let r = srv.post("/segment", Some(KEY), &track("u1", "Seg")).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    let hit = &fake.with_activity("Seg");
    assert_eq!(hit.len(), 1);
    assert_eq!(hit[0].get("sdr_s"), Some(SERVICE));

    // Rejected → 400 naming the field, and recorded.
    let r = srv
        .post(
            "/segment",
            Some(KEY),
            &json!({"type": "group", "userId": "u1", "traits": {"name": "Acme"}}),
        )
        .await;
    assert_error(&r, 400, "missing_group_id", "groupId");
    let m = srv.wait_for(2, State::Rejected).await;
    assert_eq!(m.code.as_deref(), Some("missing_group_id"));

    // screen / alias → 501.
    let r = srv
        .post(
            "/segment",
            Some(KEY),
            &json!({"type": "screen", "userId": "u1", "name": "S"}),
        )
        .await;
    assert_eq!(r.status, 501, "{r:#?}");
    assert!(r.json["message"].is_string(), "{r:#?}");
    let r = srv
        .post(
            "/segment",
            Some(KEY),
            &json!({"type": "alias", "userId": "u1", "previousId": "p"}),
        )
        .await;
    assert_eq!(r.status, 501, "{r:#?}");

    // Bad or missing key → 401.
    let r = srv.post("/segment", Some("nope"), &track("u1", "X")).await;
    assert_error(&r, 401, "unauthorized", "key");
    let r = srv.post("/segment", None, &track("u1", "X")).await;
    assert_eq!(r.status, 401, "{r:#?}");

    // Invalid messages → 400 naming the field.
    let r = srv
        .post("/segment", Some(KEY), &json!({"userId": "u1"}))
        .await;
    assert_error(&r, 400, "missing_type", "type");
    let r = srv
        .post(
            "/segment",
            Some(KEY),
            &json!({"type": "identify", "userId": "u1", "traits": 5}),
        )
        .await;
    assert_error(&r, 400, "invalid_field", "traits");

    // X-Segment-Settings overrides the configured settings for this request.
    let page = json!({"type": "page", "userId": "u9", "context": {"groupId": "acc1"},
                      "category": "Docs", "name": "Index"});
    let r = srv
        .send(
            srv.request("/segment", Some(KEY), serde_json::to_vec(&page).unwrap())
                .header(
                    "X-Segment-Settings",
                    settings_header(&json!({"serviceId": "SP-9999-01", "trackNamedPages": false,
                                            "someOtherSetting": 1})),
                ),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    let ids = srv.counts().await.values().sum::<u64>() as i64;
    let m = srv.wait_for(ids, State::Delivered).await;
    assert_eq!(m.service_id, "SP-9999-01");
    let u9 = fake.for_user("u9");
    assert_eq!(u9.len(), 1, "the named activity is dropped: {u9:#?}");
    assert_eq!(u9[0].get("sdr_a"), Some("Viewed Docs Page"));
    assert_eq!(u9[0].get("sdr_s"), Some("SP-9999-01"));

    // An unreadable header → 400 naming it.
    let r = srv
        .send(
            srv.request("/segment", Some(KEY), serde_json::to_vec(&page).unwrap())
                .header("X-Segment-Settings", "%%%not base64"),
        )
        .await;
    assert_error(&r, 400, "invalid_settings", "X-Segment-Settings");

    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_settings_header_cannot_set_the_endpoint_and_is_validated() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    // No service ID in the configuration: Segment sends it per request.
    let mut c = config(&dir, &fake.uri());
    c.totango.service_id = None;
    let srv = Server::start(c).await;
    let with_settings = |body: &Value, settings: &Value| {
        srv.request("/segment", Some(KEY), serde_json::to_vec(body).unwrap())
            .header("X-Segment-Settings", settings_header(settings))
    };

    let r = srv
        .send(with_settings(
            &track("u1", "Routed"),
            &json!({"serviceId": "SP-4444-04", "endpoint": "http://127.0.0.1:9"}),
        ))
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    let hit = &fake.with_activity("Routed");
    assert_eq!(
        hit.len(),
        1,
        "sent to the configured endpoint, not the header's"
    );
    assert_eq!(hit[0].get("sdr_s"), Some("SP-4444-04"));

    // Without any service ID: a clear 400 naming the setting.
    let r = srv
        .post("/segment", Some(KEY), &track("u1", "NoService"))
        .await;
    assert_error(&r, 400, "invalid_settings", "service_id");

    // A setting of the wrong type is named.
    let r = srv
        .send(with_settings(
            &track("u1", "BadSetting"),
            &json!({"serviceId": "SP-4444-04", "trackNamedPages": "yes"}),
        ))
        .await;
    assert_error(&r, 400, "invalid_settings", "trackNamedPages");
    assert_eq!(srv.counts().await, counts(&[("delivered", 1)]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_partner_settings_leave_the_configured_ones() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let settings = json!({"serviceId": "", "defaultModule": "", "region": "", "apiToken": "", "trackNamedPages": true});
    let r = srv
        .send(
            srv.request(
                "/segment",
                Some(KEY),
                serde_json::to_vec(&track("u1", "Blank")).unwrap(),
            )
            .header("X-Segment-Settings", settings_header(&settings)),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    let hit = &fake.with_activity("Blank")[0];
    assert_eq!(hit.get("sdr_s"), Some(SERVICE));
    assert_eq!(hit.get("sdr_m"), Some("Application"));
    assert_eq!(hit.get("api-token"), None);
    srv.stop().await;
}
