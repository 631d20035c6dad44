//! Page category memory and per-write-key settings.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_uses_the_category_of_the_users_latest_page() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let page = |user: &str, category: Option<&str>, name: &str| {
        let mut p =
            json!({"type": "page", "userId": user, "context": {"groupId": "acc1"}, "name": name});
        if let Some(c) = category {
            p["category"] = json!(c);
        }
        p
    };

    let batch = json!({"batch": [
        page("u1", Some("Reports"), "Q1"),
        track("u1", "Export"),
        track("u2", "Other user"),
        {"type": "track", "userId": "u1", "event": "Own", "context": {"groupId": "acc1"},
         "properties": {"category": "Billing"}},
        page("u1", None, "Home"),
        track("u1", "After uncategorised page"),
    ]});
    assert_success(&srv.post("/v1/batch", Some(KEY), &batch).await);
    for id in 1..=6 {
        srv.wait_for(id, State::Delivered).await;
    }
    let module = |activity: &str| {
        let h = fake.with_activity(activity);
        assert_eq!(h.len(), 1, "{activity}: {:#?}", fake.hits());
        h[0].get("sdr_m").map(str::to_owned)
    };
    assert_eq!(module("Viewed Reports Page").as_deref(), Some("Reports"));
    assert_eq!(module("Viewed Reports Q1 Page").as_deref(), Some("Reports"));
    assert_eq!(
        module("Export").as_deref(),
        Some("Reports"),
        "remembered category"
    );
    assert_eq!(
        module("Other user").as_deref(),
        Some("Application"),
        "per user"
    );
    assert_eq!(
        module("Own").as_deref(),
        Some("Billing"),
        "own category wins"
    );
    assert_eq!(module("Viewed Home Page").as_deref(), Some("Application"));
    assert_eq!(
        module("After uncategorised page").as_deref(),
        Some("Application"),
        "the latest page had no category"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_key_uses_its_own_settings() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    let mut c = config(&dir, &fake.uri());
    c.sources = vec![SourceConfig {
        name: "eu-app".into(),
        write_key: "key-2".into(),
        totango: SettingsPatch {
            service_id: Some("SP-2222-02".into()),
            default_module: Some("Core".into()),
            api_token: Some("tok-2".into()),
            ..SettingsPatch::default()
        },
        allowed_origins: Vec::new(),
        allowed_calls: Vec::new(),
        client_requests_per_minute: None,
    }];
    let srv = Server::start(c).await;

    assert_success(
        &srv.post("/v1/track", Some("key-2"), &track("u1", "From2"))
            .await,
    );
    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u1", "From1"))
            .await,
    );
    let r = srv
        .post("/segment", Some("key-2"), &track("u2", "Seg2"))
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    for id in 1..=3 {
        srv.wait_for(id, State::Delivered).await;
    }
    let two = &fake.with_activity("From2")[0];
    assert_eq!(two.get("sdr_s"), Some("SP-2222-02"));
    assert_eq!(two.get("api-token"), Some("tok-2"));
    assert_eq!(two.get("sdr_m"), Some("Core"));
    let one = &fake.with_activity("From1")[0];
    assert_eq!(one.get("sdr_s"), Some(SERVICE));
    assert_eq!(one.get("api-token"), None);
    assert_eq!(one.get("sdr_m"), Some("Application"));
    assert_eq!(
        fake.with_activity("Seg2")[0].get("sdr_s"),
        Some("SP-2222-02")
    );
    let m = srv.get(1).await;
    let stored = m.requests.as_ref().unwrap().to_string();
    assert!(
        !stored.contains("tok-2"),
        "the token is added at send time, never stored: {stored}"
    );
    assert_eq!(m.source, "eu-app", "the source name, never the key");
    assert_eq!(m.service_id, "SP-2222-02");
    srv.stop().await;
}
