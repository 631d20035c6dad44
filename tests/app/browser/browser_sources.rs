//! Sending from a browser: Segment's analytics.js (@segment/analytics-next,
//! installed from npm in `tests/browser`) runs in Debian's Chromium on a page
//! of an allowed origin and on a page of another origin, and calls identify,
//! group, page and track against the real server. The allowed page's calls
//! must reach a fake Totango mapped right; the other page's must not reach
//! the server at all. Skipped with a message when Chromium or the node
//! modules are missing, except under CI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::TestApp;
use crate::support::totango::FakeTotango;
use crate::support::wait;
use axum::extract::Path as UrlPath;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use serde_json::Value;
use totango_destination::storage::MessageFilter;

const WRITE_KEY: &str = "wk-browser-public";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// analytics-next's browser bundle and the chunks it loads beside it.
fn bundle_dir() -> PathBuf {
    browser_dir().join("node_modules/@segment/analytics-next/dist/umd")
}

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>A website that uses analytics.js</title>
<script src="/ajs/index.js"></script>
<p>Hello</p>
"#;

/// Serves the page and the bundle on a new port, as one website (origin).
async fn website() -> SocketAddr {
    async fn bundle_file(UrlPath(name): UrlPath<String>) -> impl IntoResponse {
        if name.contains('/') || name.contains("..") {
            return StatusCode::NOT_FOUND.into_response();
        }
        match tokio::fs::read(bundle_dir().join(&name)).await {
            Ok(bytes) => ([(header::CONTENT_TYPE, "text/javascript")], bytes).into_response(),
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { Html(PAGE) }))
        .route("/ajs/{name}", axum::routing::get(bundle_file));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Runs `analytics_next.mjs` on `page`; returns its summary.
fn run_page(page: &str, api_host: &str, user: &str, account: &str, expect: &str) -> Value {
    let out = std::process::Command::new("node")
        .arg("analytics_next.mjs")
        .args([page, api_host, WRITE_KEY, user, account, expect])
        .current_dir(browser_dir())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"))
}

/// The query parameters of every pixel request for Totango user `user`.
async fn requests_for(fake: &FakeTotango, user: &str) -> Vec<Vec<(String, String)>> {
    fake.hits()
        .into_iter()
        .map(|h| h.params.into_iter().collect::<Vec<_>>())
        .filter(|params| params.iter().any(|(k, v)| k == "sdr_u" && v == user))
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_js_sends_from_an_allowed_origin_only() {
    if super::browser().is_none() {
        return;
    }

    let fake = FakeTotango::ok().await;
    let allowed_site = website().await;
    let other_site = website().await;
    let dir = crate::support::place();
    let mut config = crate::support::config(&dir, &fake.uri());
    config.auth.write_keys = vec![WRITE_KEY.into()];
    config.auth.allowed_origins = vec![format!("http://{allowed_site}")];
    config.auth.allowed_calls = ["identify", "group", "page", "track"]
        .map(String::from)
        .to_vec();
    let srv = TestApp::start(config).await;
    let api_host = format!("{}/v1", srv.base.trim_start_matches("http://"));

    // The allowed website: every call answered 200, with CORS headers.
    let allowed = run_page(
        &format!("http://{allowed_site}/"),
        &api_host,
        "web-user",
        "web-acct",
        "delivered",
    );
    let posts: Vec<&Value> = allowed["answers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["method"] == "POST")
        .collect();
    let mut paths: Vec<&str> = posts.iter().map(|a| a["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(paths, ["/v1/g", "/v1/i", "/v1/p", "/v1/t"], "{allowed}");
    assert!(posts.iter().all(|a| a["status"] == 200), "{allowed}");
    assert_eq!(allowed["failures"], serde_json::json!([]), "{allowed}");
    assert_eq!(allowed["errors"], serde_json::json!([]), "{allowed}");

    // ... and reach Totango mapped as docs/mapping.md says.
    let delivered = wait::until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || {
            let got = requests_for(&fake, "web-user").await;
            // identify, group (with its user), two page activities, track.
            if got.len() >= 5 { Ok(got) } else { Err(got) }
        },
    )
    .await
    .unwrap_or_else(|got| got);
    assert_eq!(delivered.len(), 5, "{delivered:#?}");
    for params in &delivered {
        assert_eq!(param(params, "sdr_s"), Some("SP-1234-01"), "{params:?}");
        assert_eq!(param(params, "sdr_o"), Some("web-acct"), "{params:?}");
    }
    let identify = delivered
        .iter()
        .find(|p| param(p, "sdr_u.email").is_some())
        .expect("identify delivered");
    assert_eq!(param(identify, "sdr_u.email"), Some("web-user@example.com"));
    assert_eq!(param(identify, "sdr_u.name"), Some("Ann"));
    let group = delivered
        .iter()
        .find(|p| param(p, "sdr_odn").is_some())
        .expect("group delivered");
    assert_eq!(param(group, "sdr_odn"), Some("Acme"));
    assert_eq!(param(group, "sdr_o.Status"), Some("Pro"));
    let mut activities: Vec<(&str, &str)> = delivered
        .iter()
        .filter_map(|p| Some((param(p, "sdr_a")?, param(p, "sdr_m")?)))
        .collect();
    activities.sort();
    assert_eq!(
        activities.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [
            "Opened Report",
            "Viewed Docs Index Page",
            "Viewed Docs Page"
        ],
        "{delivered:#?}"
    );
    assert!(
        activities[1..].iter().all(|(_, m)| *m == "Docs"),
        "page activities in the page's category: {activities:?}"
    );

    // Another website with the same (public) key: the browser is refused at
    // the preflight, so nothing is sent, and nothing of it is stored.
    let other = run_page(
        &format!("http://{other_site}/"),
        &api_host,
        "other-user",
        "other-acct",
        "blocked",
    );
    let answers = other["answers"].as_array().unwrap();
    assert!(
        answers
            .iter()
            .all(|a| a["method"] == "OPTIONS" && a["status"] == 403),
        "only refused preflights: {other}"
    );
    assert!(
        other["failures"].as_array().unwrap().len() >= 4,
        "every call blocked: {other}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(requests_for(&fake, "other-user").await.is_empty());
    let stored = srv
        .storage
        .list(
            MessageFilter {
                user_id: Some("other-user".into()),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert!(stored.is_empty(), "{stored:#?}");
    srv.stop().await;
}
