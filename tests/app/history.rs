//! Issue 19 from the outside: `/api/history` counts what was accepted,
//! delivered and failed (written by the 10-second flush), keeps it across a
//! restart, and refuses a bad `range` naming it; `/api/stats` says how
//! Totango is doing (refusing with HTTP errors; unreachable since a time,
//! with the last error and what waits), as does `td_totango_health`.

use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::binary::{self, Served};
use crate::support::totango::{FakeTotango, Reply};
use crate::support::{TestApp, wait};
use totango_destination::storage::{State, Storage};

const ADMIN: &str = "history-admin";

async fn get(http: &reqwest::Client, url: String, token: Option<&str>) -> (u16, Value) {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let body = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
    (status, body)
}

async fn track(http: &reqwest::Client, base: &str, user: &str) {
    let body =
        format!(r#"{{"userId":"{user}","event":"Clicked","context":{{"groupId":"acct-{user}"}}}}"#);
    let r = http
        .post(format!("{base}/v1/track"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn wait_count(storage: &dyn Storage, state: State, n: u64) {
    wait::until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let counts = storage.counts().await.unwrap();
            if counts.iter().any(|(s, c)| *s == state && *c == n) {
                Ok(())
            } else {
                Err(counts)
            }
        },
    )
    .await
    .unwrap_or_else(|counts| panic!("never {n} {state:?}: {counts:?}"));
}

/// `/api/history?range=…` once `ready` accepts its totals (the flush runs
/// every 10 s).
async fn history_when(
    http: &reqwest::Client,
    base: &str,
    range: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    wait::until(
        Duration::from_secs(40),
        Duration::from_millis(250),
        async || {
            let (status, body) = get(
                http,
                format!("{base}/api/history?range={range}"),
                Some(ADMIN),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            if ready(&body["totals"]) {
                Ok(body)
            } else {
                Err(body)
            }
        },
    )
    .await
    .unwrap_or_else(|last| panic!("history never as expected: {last}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_counts_deliveries_then_refusals_and_survives_a_restart() {
    let answer = Arc::new(Mutex::new(Reply::ok()));
    let fake = {
        let answer = answer.clone();
        FakeTotango::replying(move |_, _| answer.lock().unwrap().clone()).await
    };
    let place = crate::support::place();
    let mut config = crate::support::config(&place, &fake.uri());
    config.admin.token = Some(ADMIN.into());
    config.delivery.retry_base_ms = 50;
    config.delivery.retry_max_ms = 200;
    let app = TestApp::start(config.clone()).await;
    let http = reqwest::Client::new();
    let (_, stats) = get(&http, app.url("/api/stats"), Some(ADMIN)).await;
    assert_eq!(stats["totango"]["state"], "idle", "{stats}");
    for user in ["u1", "u2", "u3"] {
        track(&http, &app.base, user).await;
    }
    wait_count(&*app.storage, State::Delivered, 3).await;
    let (_, stats) = get(&http, app.url("/api/stats"), Some(ADMIN)).await;
    assert_eq!(stats["totango"]["state"], "normal", "{stats}");
    assert!(stats["totango"]["rtt_p50_ms"].is_number(), "{stats}");
    // The keys that were there stay as they were.
    for key in ["outcomes", "queue", "delivery"] {
        assert!(stats[key].is_object(), "{key}: {stats}");
    }

    // Totango refuses from now on.
    *answer.lock().unwrap() = Reply::status(503).body("unavailable");
    for user in ["u4", "u5"] {
        track(&http, &app.base, user).await;
    }
    let stats = wait::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let (_, stats) = get(&http, app.url("/api/stats"), Some(ADMIN)).await;
            if stats["totango"]["state"] == "refusing" {
                Ok(stats)
            } else {
                Err(stats)
            }
        },
    )
    .await
    .unwrap_or_else(|s| panic!("never refusing: {s}"));
    let t = &stats["totango"];
    assert_eq!(t["last_error"], "HTTP 503", "{t}");
    assert_eq!(t["last_status"], 503, "{t}");
    assert!(t["since"].is_i64(), "{t}");
    assert_eq!(t["waiting"], 2, "{t}");
    assert!(t["summary"].as_str().unwrap().contains("HTTP 503"), "{t}");

    let h = history_when(&http, &app.base, "hour", |t| {
        t["accepted"] == 5 && t["delivered"] == 3 && t["failed"].as_u64() >= Some(2)
    })
    .await;
    assert!(h["totals"]["attempts"].as_u64() >= Some(5), "{h}");
    assert_eq!(h["totals"]["rejected"], 0, "{h}");
    assert_eq!(h["step_seconds"], 60);
    let series = &h["series"];
    assert_eq!(series["time"].as_array().unwrap().len(), 60, "{h}");
    let some = |name: &str| {
        series[name]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.is_number())
    };
    for name in [
        "delivered",
        "rtt_p50_ms",
        "rtt_p99_ms",
        "concurrency_limit",
        "queue_depth",
    ] {
        assert!(some(name), "{name} has no point: {h}");
    }
    // The day: buckets of 3 minutes, the same totals.
    let (status, day) = get(&http, app.url("/api/history?range=day"), Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(day["series"]["time"].as_array().unwrap().len(), 480);
    assert_eq!(day["step_seconds"], 180);
    assert_eq!(day["totals"]["delivered"], 3, "{day}");

    // Bad input: 400 naming what is wrong; no credential: 401.
    let (status, body) = get(&http, app.url("/api/history?range=year"), Some(ADMIN)).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "invalid_field");
    assert!(
        body["message"].as_str().unwrap().starts_with("range:"),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("year"), "{body}");
    let (status, body) = get(&http, app.url("/api/history?ranges=day"), Some(ADMIN)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("ranges"),
        "{body}"
    );
    let (status, _) = get(&http, app.url("/api/history"), None).await;
    assert_eq!(status, 401);

    // A restart keeps the history: read before the new process flushes.
    app.stop().await;
    let app = TestApp::start(config).await;
    let (status, h) = get(&http, app.url("/api/history"), Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(h["range"], "hour");
    assert_eq!(h["totals"]["accepted"], 5, "{h}");
    assert_eq!(h["totals"]["delivered"], 3, "{h}");
    app.stop().await;
}

/// A closed port: what `unreachable` looks like, in the real binary (its
/// own metrics recorder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_totango_is_said_in_stats_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = binary::serve_sqlite_totango_down(&dir.path().join("td.db"));
    cmd.env("TD_ADMIN__TOKEN", ADMIN)
        .env("TD_DELIVERY__RETRY_BASE_MS", "50")
        .env("TD_DELIVERY__RETRY_MAX_MS", "200");
    let served = tokio::task::block_in_place(|| Served::start(cmd));
    let http = reqwest::Client::new();
    for user in ["u1", "u2"] {
        track(&http, &served.base, user).await;
    }
    let stats = wait::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let (_, stats) = get(&http, served.url("/api/stats"), Some(ADMIN)).await;
            if stats["totango"]["state"] == "unreachable" {
                Ok(stats)
            } else {
                Err(stats)
            }
        },
    )
    .await
    .unwrap_or_else(|s| panic!("never unreachable: {s}\n{}", served.tail(20)));
    let t = &stats["totango"];
    assert!(t["since"].is_i64(), "{t}");
    assert!(!t["last_error"].as_str().unwrap_or("").is_empty(), "{t}");
    assert_eq!(t["waiting"], 2, "{t}");
    assert!(
        t["summary"].as_str().unwrap().contains("unreachable since"),
        "{t}"
    );
    let metrics = wait::until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        async || {
            let text = http
                .get(served.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if text.contains("td_totango_health{state=\"unreachable\"} 1") {
                Ok(text)
            } else {
                Err(text)
            }
        },
    )
    .await
    .unwrap_or_else(|m| panic!("no unreachable gauge: {m}"));
    assert!(
        metrics.contains("td_totango_health{state=\"normal\"} 0"),
        "{metrics}"
    );
}

/// Two replicas on one PostgreSQL database (two apps in this process, each
/// with its own storage and delivery): each one's `/api/history` shows what
/// both accepted and delivered. Skipped without `TEST_DATABASE_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgresql_show_one_history() {
    let Some(db) = crate::support::pg::TestDatabase::create("two replicas, one history") else {
        return;
    };
    let fake = FakeTotango::ok().await;
    let place = crate::support::place();
    let mut config = crate::support::config(&place, &fake.uri());
    config.storage.url = db.url().to_owned();
    config.admin.token = Some(ADMIN.into());
    let a = TestApp::start(config.clone()).await;
    let b = TestApp::start(config).await;
    let http = reqwest::Client::new();
    for user in ["a1", "a2"] {
        track(&http, &a.base, user).await;
    }
    for user in ["b1", "b2", "b3"] {
        track(&http, &b.base, user).await;
    }
    for app in [&a, &b] {
        let h = history_when(&http, &app.base, "hour", |t| {
            t["accepted"] == 5 && t["delivered"] == 5
        })
        .await;
        assert_eq!(h["totals"]["duplicate"], 0, "{h}");
    }
    a.stop().await;
    b.stop().await;
}
