//! The operator page's history charts, Totango's health banner and an
//! account page, in Chromium (`tests/browser/dashboard.mjs`), after a
//! scripted load: messages delivered, one refused (dead), then Totango
//! silent (timeouts: unreachable). Screenshots are kept under
//! `target/tmp/screenshots/`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::TestApp;
use crate::support::totango::{FakeTotango, Reply};
use crate::support::wait;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charts_health_and_account_page_show_what_happened() {
    let Some((browser_dir, chromium)) = super::browser() else {
        return;
    };

    // Totango takes everything but "Broken Feature" (400) until it goes
    // silent: then every request outlives the delivery timeout.
    let silent = Arc::new(AtomicBool::new(false));
    let fake = {
        let silent = silent.clone();
        FakeTotango::replying(move |_, params| {
            if silent.load(Ordering::SeqCst) {
                Reply::ok().after(Duration::from_secs(10))
            } else if params.get("sdr_a").map(String::as_str) == Some("Broken Feature") {
                Reply::status(400).body("totango says no")
            } else {
                Reply::ok()
            }
        })
        .await
    };
    let dir = crate::support::place();
    let mut config = crate::support::config(&dir, &fake.uri());
    config.delivery.request_timeout_ms = 300;
    let srv = TestApp::start(config.clone()).await;
    let base = srv.base.clone();
    let http = reqwest::Client::new();
    // The token the server generated at first start, beside the database.
    let _ = http.get(format!("{base}/healthz")).send().await;
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let token = token.trim().to_owned();
    let admin = async |path: &str| -> Value {
        let r = http
            .get(format!("{base}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
    };
    let send = async |path: &str, body: &str| {
        let r = http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{body}");
    };

    send(
        "/v1/group",
        r#"{"userId":"u1","groupId":"acme","traits":{"name":"Acme Inc","plan":"Enterprise"}}"#,
    )
    .await;
    send(
        "/v1/identify",
        r#"{"userId":"u1","traits":{"email":"u1@example.com"},"context":{"groupId":"acme"}}"#,
    )
    .await;
    for _ in 0..3 {
        send(
            "/v1/track",
            r#"{"userId":"u1","event":"Working Feature","context":{"groupId":"acme"}}"#,
        )
        .await;
    }
    send(
        "/v1/track",
        r#"{"userId":"u2","event":"Broken Feature","context":{"groupId":"acme"}}"#,
    )
    .await;
    wait::until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let s = admin("/api/stats").await;
            if s["outcomes"]["delivered"] == 5 && s["outcomes"]["dead"] == 1 {
                Ok(())
            } else {
                Err(s)
            }
        },
    )
    .await
    .unwrap_or_else(|s| panic!("the first messages did not settle: {s}"));

    // Totango goes silent; what comes next waits for it.
    silent.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        send(
            "/v1/track",
            r#"{"userId":"u3","event":"Later Feature","context":{"groupId":"acme"}}"#,
        )
        .await;
    }
    wait::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || {
            let s = admin("/api/stats").await;
            if s["totango"]["state"] == "unreachable" {
                Ok(())
            } else {
                Err(s)
            }
        },
    )
    .await
    .unwrap_or_else(|s| panic!("Totango was never judged unreachable: {s}"));
    // The history is written every 10 s.
    wait::until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || {
            let h = admin("/api/history?range=hour").await;
            if h["totals"]["accepted"].as_u64() >= Some(9) && h["totals"]["delivered"] == 5 {
                Ok(())
            } else {
                Err(h["totals"].clone())
            }
        },
    )
    .await
    .unwrap_or_else(|t| panic!("the history never held the load: {t}"));

    let runtime = config.validate().unwrap();
    let (auth, _) = totango_destination::web::auth::AdminAuth::load(&runtime).unwrap();
    let link = auth.login_link(&base);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let stdout = super::run_node(
        &browser_dir,
        &chromium,
        "dashboard.mjs",
        &[base.as_ref(), link.as_ref(), shots.as_os_str()],
    )
    .await;
    assert!(stdout.contains("dashboard: ok"), "{stdout}");
    for shot in ["operator-dashboard.png", "account-page.png"] {
        let size = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(size > 10_000, "{shot}: {size} bytes");
    }
    srv.stop().await;
}
