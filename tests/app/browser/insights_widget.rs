//! The insights widget in a real browser (Debian's Chromium driven by
//! playwright-core, `tests/browser/widget.mjs`), served by the real server
//! from a snapshot written by a sync against fake Totango and Salesforce.
//! Skipped with a message when Chromium or the node module is missing,
//! except under CI.

use serde_json::json;
use totango_destination::insights::{Target, sign, sync_and_store};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_renders_in_a_290_px_frame() {
    let Some((browser_dir, chromium)) = super::browser() else {
        return;
    };

    // One account, red and online, as Totango's Search API answers it.
    let totango = MockServer::start().await;
    let hit = json!({
        "name": "acct-2", "display_name": "Account 2", "is_online": true,
        "last_activity_time": 1_700_000_000_000i64,
        "selected_fields": [
            {"health": "red", "health_prev": "yellow"}, "Enterprise", 52, -1,
            {"unique_users": 12}, "Daily", "40", ["vip", "cohort-2"], "001000000000000002"
        ]
    });
    Mock::given(method("POST"))
        .and(path("/api/v1/search/accounts"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "success",
            "response": {"accounts": {"total_hits": 1, "hits": [hit]}}
        })))
        .mount(&totango)
        .await;
    let salesforce = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/services/oauth2/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "t", "instance_url": salesforce.uri()})),
        )
        .mount(&salesforce)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/services/data/v60.0/composite/sobjects"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!([{"id": "001000000000000002", "success": true, "errors": []}]),
            ),
        )
        .mount(&salesforce)
        .await;

    let dir = crate::support::place();
    let mut c = crate::support::config(&dir, "http://127.0.0.1:9");
    let i = &mut c.insights;
    i.totango_api_url = Some(totango.uri());
    i.totango_app_token = Some("tok".into());
    i.salesforce.login_url = salesforce.uri();
    i.salesforce.client_id = Some("id".into());
    i.salesforce.client_secret = Some("secret".into());
    i.widget_secret = Some("widget-secret".into());
    i.frame_ancestors = "'self' http://crm.test".into();
    let runtime = c.clone().validate().unwrap();
    let outcome = sync_and_store(
        &runtime,
        false,
        &totango_destination::insights::sync::NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(outcome.summary.records_updated, 1, "{:#?}", outcome.summary);

    let srv = crate::support::TestApp::start(c).await;
    let sig = sign("widget-secret", Target::Account, "acct-2", None);
    let url = format!("{}/insights/accounts/acct-2?sig={sig}", srv.base);
    let screenshot = dir.path().join("widget.png");
    let stdout = super::run_node(
        &browser_dir,
        &chromium,
        "widget.mjs",
        &[url.as_ref(), screenshot.as_os_str()],
    )
    .await;
    assert!(stdout.contains("widget page: ok"), "{stdout}");
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 5_000,
        "screenshot written"
    );
    if let Ok(keep) = std::env::var("TD_KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
    srv.stop().await;
}
