//! Segment's own libraries against the release binary (issue 7): the Python
//! library (segment-analytics-python, `tests/clients/python`) and the Node
//! library (@segment/analytics-node, `tests/clients/node`) each send 1,000
//! identify, group, page and track calls, and every one must be accepted and
//! delivered to a fake Totango: nothing lost. RudderStack's libraries
//! (rudder-sdk-python, @rudderstack/rudder-sdk-node) speak the same API and
//! are held to the same, with identify traits arriving from `context.traits`.
//!
//! Needs a virtualenv with the Python library in `target/clients-venv`
//! (or `TD_CLIENTS_PYTHON` naming its python) and `npm ci` in
//! `tests/clients/node`; a test whose tool is missing is skipped with a
//! message, except under CI where it fails. `.ci/run` installs both.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

use crate::support::binary::{self, Served};
use crate::support::totango::FakeTotango;
use crate::support::wait;
const WRITE_KEY: &str = "wk-clients";
const ADMIN_TOKEN: &str = "admin-clients-token";
const EVENTS: usize = 1000;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The library's tool, or `None` after saying why the test is skipped.
fn tool(name: &str, found: Option<PathBuf>, install: &str) -> Option<PathBuf> {
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the {name} client: {install}"
        );
        eprintln!("SKIPPED: the {name} client is not installed ({install})");
    }
    found
}

fn python() -> Option<PathBuf> {
    python_with("segment.analytics")
}

fn python_with(module: &str) -> Option<PathBuf> {
    let candidate = std::env::var_os("TD_CLIENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/clients-venv/bin/python"));
    let importable = std::process::Command::new(&candidate)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    tool(
        "Python",
        importable.then_some(candidate),
        "python3 -m venv target/clients-venv && target/clients-venv/bin/pip install -r tests/clients/python/requirements.txt",
    )
}

fn node() -> Option<PathBuf> {
    node_with("@segment/analytics-node")
}

fn node_with(package: &str) -> Option<PathBuf> {
    let installed = root()
        .join("tests/clients/node/node_modules")
        .join(package)
        .exists();
    let node_runs = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    tool(
        "Node",
        (installed && node_runs).then(|| PathBuf::from("node")),
        "node and `npm ci` in tests/clients/node",
    )
}

/// The release binary on a port of its own with a fake Totango that answers 200.
struct Server {
    base: String,
    fake: FakeTotango,
    served: Served,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Server {
    async fn start() -> Server {
        let fake = FakeTotango::ok().await;
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = binary::serve();
        cmd.env(
            "TD_STORAGE__URL",
            format!("sqlite://{}", dir.path().join("td.db").display()),
        )
        .env("TD_TOTANGO__SERVICE_ID", "SP-1234-01")
        .env("TD_TOTANGO__ENDPOINT", fake.uri())
        .env("TD_AUTH__WRITE_KEYS", WRITE_KEY)
        .env("TD_ADMIN__TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn");
        let served = Served::start(cmd);
        let server = Server {
            base: served.base.clone(),
            fake,
            served,
            _dir: dir,
            http: reqwest::Client::new(),
        };
        wait::until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            async || {
                let up = server
                    .http
                    .get(format!("{}/healthz", server.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if up { Ok(()) } else { Err(()) }
            },
        )
        .await
        .unwrap_or_else(|()| panic!("server did not start: {}", server.log()));
        server
    }

    fn log(&self) -> String {
        self.served.output()
    }

    async fn admin(&self, path_and_query: &str) -> Value {
        let body = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until nothing is pending, then returns the outcome counts.
    async fn settled_outcomes(&self) -> Value {
        wait::until(
            Duration::from_secs(120),
            Duration::from_millis(100),
            async || {
                let stats = self.admin("/api/stats").await;
                if stats["queue"]["depth"] == 0 {
                    Ok(stats["outcomes"].clone())
                } else {
                    Err(stats)
                }
            },
        )
        .await
        .unwrap_or_else(|stats| panic!("delivery did not finish: {stats}"))
    }

    /// The `sdr_u` of every request the fake Totango received.
    async fn delivered_users(&self) -> Vec<String> {
        self.fake
            .hits()
            .iter()
            .filter_map(|h| h.get("sdr_u").map(str::to_owned))
            .collect()
    }

    /// `sdr_u` → `sdr_u.email` of every request that carried an email attribute.
    async fn delivered_emails(&self) -> std::collections::BTreeMap<String, String> {
        self.fake
            .hits()
            .iter()
            .filter_map(|h| {
                let get = |key: &str| h.get(key).map(str::to_owned);
                Some((get("sdr_u")?, get("sdr_u.email")?))
            })
            .collect()
    }

    async fn stop(self) {
        drop(self.served);
    }
}

/// Runs a client script; returns its JSON summary.
async fn run_client(program: &Path, args: &[String]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new(program)
            .args(args)
            .current_dir(root())
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("client finished within 5 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("client summary is not JSON ({e}): {stdout}"))
}

fn script_args(script: &str, server: &Server, prefix: &str, extra: &[&str]) -> Vec<String> {
    script_args_n(script, server, prefix, EVENTS, extra)
}

fn script_args_n(
    script: &str,
    server: &Server,
    prefix: &str,
    count: usize,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        script.to_owned(),
        "--host".into(),
        server.base.clone(),
        "--write-key".into(),
        WRITE_KEY.into(),
        "--count".into(),
        count.to_string(),
        "--prefix".into(),
        prefix.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Every call of the run reached Totango once: one request per call (the page
/// calls have a name and no category, so one activity each).
async fn assert_all_delivered(server: &Server, prefix: &str, summary: &Value) {
    assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
    let outcomes = server.settled_outcomes().await;
    assert_eq!(
        outcomes["delivered"],
        EVENTS,
        "{outcomes}\n{}",
        server.log()
    );
    for other in ["dead", "rejected", "duplicate", "filtered", "unsupported"] {
        assert_eq!(outcomes[other], 0, "{other}: {outcomes}");
    }
    let users = server.delivered_users().await;
    let expected: BTreeSet<String> = (0..EVENTS).map(|i| format!("{prefix}-{i}")).collect();
    let got: BTreeSet<String> = users.iter().cloned().collect();
    assert_eq!(users.len(), EVENTS, "one Totango request per call");
    assert_eq!(got, expected, "every user reached Totango");
}

/// After a run with one wrongly typed call: that call alone is stored as
/// `rejected` (`invalid_field`), every other one is delivered.
async fn assert_only_bad_item_rejected(server: &Server, prefix: &str, summary: &Value) {
    assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
    let outcomes = server.settled_outcomes().await;
    assert_eq!(outcomes["delivered"], EVENTS, "{outcomes}");
    assert_eq!(outcomes["rejected"], 1, "{outcomes}");
    let rejected = server.admin("/api/messages?outcome=rejected").await;
    let bad = &rejected["messages"][0];
    assert_eq!(bad["code"], "invalid_field", "{rejected}");
    assert_eq!(
        bad["payload"]["userId"],
        format!("{prefix}-bad"),
        "{rejected}"
    );
    let got: BTreeSet<String> = server.delivered_users().await.into_iter().collect();
    assert_eq!(got.len(), EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_library_delivers_every_event() {
    let Some(python) = python() else { return };
    let server = Server::start().await;
    let args = script_args("tests/clients/python/send_events.py", &server, "py", &[]);
    let summary = run_client(&python, &args).await;
    assert_eq!(summary["sent"], EVENTS);
    assert_all_delivered(&server, "py", &summary).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_library_delivers_every_event() {
    let Some(node) = node() else { return };
    let server = Server::start().await;
    let args = script_args("tests/clients/node/send_events.mjs", &server, "node", &[]);
    let summary = run_client(&node, &args).await;
    assert_eq!(summary["sent"], EVENTS);
    assert!(
        summary["maxBodyBytes"].as_u64().unwrap() < 512_000,
        "{summary}"
    );
    assert_all_delivered(&server, "node", &summary).await;
    server.stop().await;
}

/// The Node library's own size estimate does not bound its batches: with
/// `flushAt: 2500` it sends bodies far over 500 KB. `/v1/batch` takes bodies
/// up to `limits.max_batch_body_bytes` (4 MiB), so none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_library_batch_size_is_bounded_by_flush_at_only() {
    let Some(node) = node() else { return };
    let server = Server::start().await;
    let args = script_args_n(
        "tests/clients/node/send_events.mjs",
        &server,
        "big",
        2500,
        &["--flush-at", "2500"],
    );
    let summary = run_client(&node, &args).await;
    assert!(
        summary["maxBodyBytes"].as_u64().unwrap() > 512_000,
        "{summary}"
    );
    assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
    assert!(summary["statuses"].get("413").is_none(), "{summary}");
    let outcomes = server.settled_outcomes().await;
    assert_eq!(outcomes["delivered"], 2500, "{outcomes}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn python_library_loses_nothing_when_one_event_is_wrongly_typed() {
    let Some(python) = python() else { return };
    let server = Server::start().await;
    let args = script_args(
        "tests/clients/python/send_events.py",
        &server,
        "pybad",
        &["--bad-item"],
    );
    let summary = run_client(&python, &args).await;
    assert_only_bad_item_rejected(&server, "pybad", &summary).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn node_library_loses_nothing_when_one_event_is_wrongly_typed() {
    let Some(node) = node() else { return };
    let server = Server::start().await;
    let args = script_args(
        "tests/clients/node/send_events.mjs",
        &server,
        "nodebad",
        &["--bad-item"],
    );
    let summary = run_client(&node, &args).await;
    assert_only_bad_item_rejected(&server, "nodebad", &summary).await;
    server.stop().await;
}

/// Every identify call of a run (every fourth user) reached Totango with its
/// email trait, wherever the library put the traits.
async fn assert_identify_traits_delivered(server: &Server, prefix: &str) {
    let emails = server.delivered_emails().await;
    for i in (0..EVENTS).step_by(4) {
        let user = format!("{prefix}-{i}");
        assert_eq!(
            emails.get(&user),
            Some(&format!("{user}@example.com")),
            "identify traits of {user}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudderstack_python_library_delivers_every_event_with_identify_traits() {
    let Some(python) = python_with("rudderstack.analytics") else {
        return;
    };
    let server = Server::start().await;
    let args = script_args(
        "tests/clients/python/send_events.py",
        &server,
        "rpy",
        &["--library", "rudder"],
    );
    let summary = run_client(&python, &args).await;
    assert_eq!(summary["sent"], EVENTS);
    assert_all_delivered(&server, "rpy", &summary).await;
    assert_identify_traits_delivered(&server, "rpy").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudderstack_node_library_delivers_every_event_with_identify_traits() {
    let Some(node) = node_with("@rudderstack/rudder-sdk-node") else {
        return;
    };
    let server = Server::start().await;
    let args = script_args(
        "tests/clients/node/send_events_rudder.mjs",
        &server,
        "rnode",
        &[],
    );
    let summary = run_client(&node, &args).await;
    assert_eq!(summary["sent"], EVENTS);
    assert_all_delivered(&server, "rnode", &summary).await;
    assert_identify_traits_delivered(&server, "rnode").await;
    server.stop().await;
}

/// One 40 KB event (over the 32 KB message limit) inside a 100-event batch:
/// it alone is stored `rejected` (`message_too_large`), the 99 others are
/// delivered.
async fn assert_only_big_item_rejected(server: &Server, prefix: &str, summary: &Value) {
    assert_eq!(summary["sent"], 100, "{summary}");
    assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
    let outcomes = server.settled_outcomes().await;
    assert_eq!(outcomes["delivered"], 99, "{outcomes}\n{}", server.log());
    assert_eq!(outcomes["rejected"], 1, "{outcomes}");
    let rejected = server.admin("/api/messages?outcome=rejected").await;
    let big = &rejected["messages"][0];
    assert_eq!(big["code"], "message_too_large", "{rejected}");
    assert_eq!(
        big["payload"]["userId"],
        format!("{prefix}-big"),
        "{rejected}"
    );
    let users: BTreeSet<String> = server.delivered_users().await.into_iter().collect();
    let expected: BTreeSet<String> = (0..99).map(|i| format!("{prefix}-{i}")).collect();
    assert_eq!(users, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudderstack_python_library_loses_nothing_for_one_oversized_event() {
    let Some(python) = python_with("rudderstack.analytics") else {
        return;
    };
    let server = Server::start().await;
    let args = script_args_n(
        "tests/clients/python/send_events.py",
        &server,
        "rpybig",
        99,
        &["--library", "rudder", "--big-item"],
    );
    let summary = run_client(&python, &args).await;
    assert_only_big_item_rejected(&server, "rpybig", &summary).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudderstack_node_library_loses_nothing_for_one_oversized_event() {
    let Some(node) = node_with("@rudderstack/rudder-sdk-node") else {
        return;
    };
    let server = Server::start().await;
    let args = script_args_n(
        "tests/clients/node/send_events_rudder.mjs",
        &server,
        "rnodebig",
        99,
        &["--big-item", "--flush-at", "100"],
    );
    let summary = run_client(&node, &args).await;
    assert_only_big_item_rejected(&server, "rnodebig", &summary).await;
    server.stop().await;
}
