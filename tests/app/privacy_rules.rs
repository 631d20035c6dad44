//! Issue 18, items 2 and 3: event filters and PII rules per source
//! (docs/privacy.md), end to end. With `traits.email` hashed,
//! `properties.card` dropped and `Debug *`/`Internal*` events denied, the
//! three ways in (Tracking API, `/segment`, `/webhook`) store only hashed
//! values, keep filtered messages without payload, and a fake Totango
//! receives hashed emails and no denied event, also after dead messages are
//! replayed; Segment's Python and Node libraries, configured through `TD_`
//! variables, get exactly the expected requests to Totango; `check-config`
//! redacts the HMAC secret and names invalid settings; `translate --config`
//! shows the rules' effect. SQLite always, PostgreSQL when
//! `TEST_DATABASE_URL` is set (a database per test).

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use totango_destination::config::{Config, PiiRuleConfig, SourceRulesConfig};
use totango_destination::server::{open_storage, run_with_storage};
use totango_destination::storage::{MessageFilter, State, Storage};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const BIN: &str = env!("CARGO_BIN_EXE_totango-destination");
const KEY: &str = "wk-privacy";
const ADMIN_TOKEN: &str = "admin-privacy-token";
const SECRET: &str = "privacy-test-hmac-secret-0123456789";

/// The expected hash, computed here independently of the server's code.
fn hmac_hex(text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(text.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

// ---------------------------------------------------------------------------
// Backends (a few lines of tests/common, kept here on purpose)
// ---------------------------------------------------------------------------

/// A SQLite file in a temporary directory, or a PostgreSQL database of its
/// own on `TEST_DATABASE_URL`'s server, dropped with this.
struct Place {
    dir: tempfile::TempDir,
    pg: Option<(String, String, String)>,
}

impl Place {
    fn sqlite() -> Place {
        Place {
            dir: tempfile::tempdir().unwrap(),
            pg: None,
        }
    }

    /// `None` (said) without `TEST_DATABASE_URL`; under CI that fails.
    fn postgres() -> Option<Place> {
        let Some(admin) = std::env::var("TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs these tests on PostgreSQL: set TEST_DATABASE_URL"
            );
            eprintln!("SKIPPED on PostgreSQL: TEST_DATABASE_URL is not set");
            return None;
        };
        let name = format!("td_test_{}", uuid::Uuid::new_v4().simple());
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&name);
        on_pg(&admin, format!("CREATE DATABASE \"{name}\""));
        Some(Place {
            dir: tempfile::tempdir().unwrap(),
            pg: Some((admin, name, url.to_string())),
        })
    }

    fn both() -> Vec<Place> {
        let mut places = vec![Place::sqlite()];
        places.extend(Place::postgres());
        places
    }

    fn url(&self) -> String {
        match &self.pg {
            Some((_, _, url)) => url.clone(),
            None => format!("sqlite://{}", self.dir.path().join("td.db").display()),
        }
    }

    fn name(&self) -> &'static str {
        if self.pg.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// Every stored payload, as text, straight from the database.
    async fn raw_payloads(&self) -> Vec<String> {
        match &self.pg {
            Some((_, _, url)) => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let rows: Vec<String> = sqlx::query_scalar("SELECT payload FROM td_messages")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                rows
            }
            None => {
                let conn = rusqlite::Connection::open(self.dir.path().join("td.db")).unwrap();
                let mut stmt = conn.prepare("SELECT payload FROM messages").unwrap();
                stmt.query_map([], |r| r.get::<_, String>(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
        }
    }

    /// The bytes of the SQLite files (database and WAL), to search.
    fn sqlite_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for file in ["td.db", "td.db-wal"] {
            if let Ok(bytes) = std::fs::read(self.dir.path().join(file)) {
                all.extend(bytes);
            }
        }
        all
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some((admin, name, _)) = &self.pg {
            on_pg(
                admin,
                format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            );
        }
    }
}

fn on_pg(admin: &str, statement: String) {
    use sqlx::{Connection, Executor};
    let admin = admin.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
                conn.execute(statement.as_str()).await.unwrap();
                conn.close().await.unwrap();
            })
    })
    .join()
    .unwrap();
}

// ---------------------------------------------------------------------------
// A fake Totango whose answer can change, recording every query
// ---------------------------------------------------------------------------

/// The query parameters of one request to Totango.
type Params = BTreeMap<String, String>;

#[derive(Clone)]
struct Fake {
    status: Arc<AtomicU16>,
    log: Arc<Mutex<Vec<Params>>>,
}

impl Respond for Fake {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let params = request.url.query_pairs().into_owned().collect();
        self.log.lock().unwrap().push(params);
        ResponseTemplate::new(self.status.load(Ordering::SeqCst))
    }
}

impl Fake {
    async fn start(status: u16) -> (Fake, MockServer) {
        let fake = Fake {
            status: Arc::new(AtomicU16::new(status)),
            log: Arc::default(),
        };
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::method("GET"))
            .respond_with(fake.clone())
            .mount(&server)
            .await;
        (fake, server)
    }

    fn requests(&self) -> Vec<Params> {
        self.log.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------
// The three ways in, and replays
// ---------------------------------------------------------------------------

fn rules_config(place: &Place, endpoint: &str) -> Config {
    let mut c = Config::default();
    c.storage.url = place.url();
    c.admin.token = Some(ADMIN_TOKEN.into());
    c.admin.token_file = Some(place.dir.path().join("admin-token"));
    c.insights.snapshot_path = Some(place.dir.path().join("insights.db").display().to_string());
    c.totango.service_id = Some("SP-1234-01".into());
    c.totango.endpoint = Some(endpoint.into());
    c.auth.write_keys = vec![KEY.into()];
    c.delivery.retry_base_ms = 20;
    c.delivery.retry_max_ms = 100;
    c.delivery.request_timeout_ms = 2_000;
    c.privacy.hmac_secret = Some(SECRET.into());
    c.privacy.filters.deny_events = vec!["Debug *".into(), "Internal*".into()];
    c.privacy.pii = vec![
        PiiRuleConfig {
            path: "traits.email".into(),
            action: "hash".into(),
        },
        PiiRuleConfig {
            path: "properties.card".into(),
            action: "drop".into(),
        },
    ];
    c
}

struct InProcess {
    base: String,
    storage: Arc<dyn Storage>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), totango_destination::server::RunError>>,
    http: reqwest::Client,
}

impl InProcess {
    async fn start(config: Config) -> InProcess {
        let runtime = config.validate().unwrap();
        let storage = open_storage(&runtime).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_storage(
            runtime,
            listener,
            storage.clone(),
            shutdown.clone(),
        ));
        InProcess {
            base,
            storage,
            shutdown,
            task,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(KEY, Some(""))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Waits until no message is pending.
    async fn settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.storage.queue_stats().await.unwrap().depth > 0 {
            assert!(Instant::now() < deadline, "delivery did not settle");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn all(&self) -> Vec<totango_destination::storage::StoredMessage> {
        self.storage
            .list(MessageFilter::default(), 1000)
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn identify(user: &str, email: &str) -> Value {
    json!({
        "type": "identify", "userId": user, "messageId": format!("m-{user}"),
        "traits": {"email": email, "name": "Ann"},
        "context": {"groupId": "acme", "traits": {"email": email}},
    })
}

fn track(user: &str, event: &str) -> Value {
    json!({
        "type": "track", "userId": user, "event": event,
        "messageId": format!("m-{user}-{event}"),
        "properties": {"card": "4111 1111 1111 1111", "plan": "Pro"},
        "context": {"groupId": "acme"},
    })
}

/// The emails sent, one per way in; none may reach storage or Totango.
const EMAILS: [(&str, &str); 4] = [
    ("u-single", "single@example.com"),
    ("u-batch", "batch@example.com"),
    ("u-partner", "partner@example.com"),
    ("u-hook", "hook@example.com"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_hold_for_every_way_in_and_for_replays() {
    for place in Place::both() {
        every_way_in_then_replay(&place).await;
    }
}

async fn every_way_in_then_replay(place: &Place) {
    let backend = place.name();
    // Totango refuses everything at first: what is sent goes dead.
    let (fake, totango) = Fake::start(400).await;
    let srv = InProcess::start(rules_config(place, &totango.uri())).await;

    let (status, _) = srv
        .post("/v1/identify", identify("u-single", EMAILS[0].1))
        .await;
    assert_eq!(status, 200, "{backend}");
    let (status, _) = srv.post("/v1/track", track("u-single", "Debug tap")).await;
    assert_eq!(status, 200, "{backend}: a filtered message is accepted");
    let batch = json!({"batch": [
        identify("u-batch", EMAILS[1].1),
        track("u-batch", "Internal ping"),
        track("u-batch", "Signed Up"),
    ]});
    let (status, _) = srv.post("/v1/batch", batch).await;
    assert_eq!(status, 200, "{backend}");
    let (status, body) = srv
        .post("/segment", identify("u-partner", EMAILS[2].1))
        .await;
    assert_eq!(
        (status, &body["outcome"]),
        (200, &json!("accepted")),
        "{body}"
    );
    let (status, body) = srv.post("/segment", track("u-partner", "Debug view")).await;
    assert_eq!(status, 200, "{backend}: {body}");
    assert_eq!(body["outcome"], "filtered", "{body}");
    assert_eq!(body["code"], "filtered_by_rule", "{body}");
    let hook = json!([identify("u-hook", EMAILS[3].1), track("u-hook", "Debug x")]);
    let (status, body) = srv.post("/webhook", hook).await;
    assert_eq!(status, 200, "{backend}: {body}");
    let outcomes: Vec<&Value> = body["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| &o["outcome"])
        .collect();
    assert_eq!(outcomes, [&json!("accepted"), &json!("filtered")], "{body}");
    srv.settled().await;

    // Storage: filtered messages without payload, named rule; others hashed.
    let stored = srv.all().await;
    assert_eq!(stored.len(), 9, "{backend}");
    let filtered: Vec<_> = stored
        .iter()
        .filter(|m| m.state == State::Filtered)
        .collect();
    assert_eq!(filtered.len(), 4, "{backend}");
    for m in &filtered {
        assert_eq!(m.payload, json!({}), "{backend}: {m:?}");
        assert_eq!(m.code.as_deref(), Some("filtered_by_rule"));
        let reason = m.reason.as_deref().unwrap();
        assert!(
            reason.contains("is denied by privacy.filters.deny_events["),
            "{reason}"
        );
        assert_eq!(m.call, "track");
        assert!(m.requests.is_none());
    }
    let dead: Vec<_> = stored.iter().filter(|m| m.state == State::Dead).collect();
    assert_eq!(dead.len(), 5, "{backend}: 4 identify and Signed Up");
    for (user, email) in EMAILS {
        let m = dead
            .iter()
            .find(|m| m.user_id.as_deref() == Some(user) && m.call == "identify")
            .unwrap();
        assert_eq!(m.payload["traits"]["email"], hmac_hex(email), "{backend}");
        assert_eq!(m.payload["context"]["traits"]["email"], hmac_hex(email));
        assert_eq!(m.payload["traits"]["name"], "Ann", "other traits stay");
    }
    let signed_up = dead.iter().find(|m| m.call == "track").unwrap();
    assert_eq!(signed_up.payload["properties"], json!({"plan": "Pro"}));
    for text in place.raw_payloads().await {
        assert!(!text.contains("@example.com"), "{backend}: {text}");
        assert!(!text.contains("4111"), "{backend}: {text}");
        assert!(
            !text.contains("Debug") && !text.contains("Internal"),
            "{text}"
        );
    }
    if place.pg.is_none() {
        let bytes = place.sqlite_bytes();
        // (A filtered message's reason names its event; its payload is gone.)
        for needle in ["@example.com", "4111 1111"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle:?} is in the SQLite files"
            );
        }
    }

    // Replay the dead messages with Totango answering again.
    let first_round = fake.requests().len();
    assert_eq!(
        first_round, 5,
        "{backend}: each dead message was tried once"
    );
    fake.status.store(200, Ordering::SeqCst);
    let replayed = srv
        .http
        .post(format!("{}/api/replay?outcome=dead", srv.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let replayed: Value = serde_json::from_slice(&replayed).unwrap();
    assert_eq!(replayed["replayed"], 5, "{backend}: {replayed}");
    srv.settled().await;
    let stored = srv.all().await;
    assert_eq!(
        stored
            .iter()
            .filter(|m| m.state == State::Delivered)
            .count(),
        5,
        "{backend}"
    );
    let requests = fake.requests();
    let replay_round = &requests[first_round..];
    assert_eq!(replay_round.len(), 5, "{backend}: {replay_round:?}");
    // Every request ever sent: hashed emails, no card, no denied event.
    for r in &requests {
        let text = format!("{r:?}");
        assert!(!text.contains("@example.com"), "{backend}: {text}");
        assert!(!text.contains("4111"), "{backend}: {text}");
        let activity = r.get("sdr_a").map(String::as_str).unwrap_or("");
        assert!(
            !activity.starts_with("Debug") && !activity.starts_with("Internal"),
            "{backend}: {text}"
        );
    }
    let emails: BTreeMap<&str, &str> = replay_round
        .iter()
        .filter_map(|r| Some((r.get("sdr_u")?.as_str(), r.get("sdr_u.email")?.as_str())))
        .collect();
    let expected: BTreeMap<&str, String> = EMAILS.iter().map(|(u, e)| (*u, hmac_hex(e))).collect();
    assert_eq!(
        emails,
        expected.iter().map(|(u, h)| (*u, h.as_str())).collect(),
        "{backend}"
    );
    let activities: Vec<&str> = replay_round
        .iter()
        .filter_map(|r| r.get("sdr_a").map(String::as_str))
        .collect();
    assert_eq!(activities, ["Signed Up"], "{backend}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_adds_its_own_rules_to_the_global_ones() {
    for place in Place::both() {
        let backend = place.name();
        let (fake, totango) = Fake::start(200).await;
        let mut c = rules_config(&place, &totango.uri());
        c.sources = serde_json::from_value(json!([
            {"name": "web", "write_key": "k-web"}
        ]))
        .unwrap();
        let mut own = SourceRulesConfig::default();
        own.filters.deny_calls = vec!["page".into()];
        own.pii = vec![PiiRuleConfig {
            path: "traits.email".into(),
            action: "drop".into(),
        }];
        c.privacy.sources.insert("web".into(), own);
        let srv = InProcess::start(c).await;
        let post = |path: &'static str, body: Value| {
            srv.http
                .post(format!("{}{path}", srv.base))
                .basic_auth("k-web", Some(""))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
        };
        let page = json!({"type": "page", "userId": "w1", "name": "Home",
                          "context": {"groupId": "acme"}});
        assert_eq!(post("/v1/page", page).await.unwrap().status(), 200);
        assert_eq!(
            post("/v1/identify", identify("w1", "web@example.com"))
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            post("/v1/track", track("w1", "Debug tap"))
                .await
                .unwrap()
                .status(),
            200
        );
        srv.settled().await;
        let stored = srv.all().await;
        let reasons: BTreeSet<String> = stored
            .iter()
            .filter(|m| m.state == State::Filtered)
            .map(|m| m.reason.clone().unwrap())
            .collect();
        assert_eq!(
            reasons,
            BTreeSet::from([
                "page calls are denied by privacy.sources.web.filters.deny_calls[0]".to_owned(),
                "event \"Debug tap\" is denied by privacy.filters.deny_events[0] (\"Debug *\")"
                    .to_owned(),
            ]),
            "{backend}"
        );
        let id = stored.iter().find(|m| m.call == "identify").unwrap();
        assert_eq!(id.state, State::Delivered, "{backend}");
        assert_eq!(id.payload["traits"], json!({"name": "Ann"}), "dropped");
        let requests = fake.requests();
        assert_eq!(requests.len(), 1, "{backend}: {requests:?}");
        assert!(!requests[0].contains_key("sdr_u.email"));
        srv.stop().await;
    }
}

// ---------------------------------------------------------------------------
// Segment's libraries, configured through TD_ variables
// ---------------------------------------------------------------------------

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The client's program, or `None` after saying why (under CI: a failure).
fn client(name: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the {name} client (.ci/run)"
        );
        eprintln!("SKIPPED: the {name} client is not installed (see .ci/run)");
    }
    found
}

fn python() -> Option<PathBuf> {
    let python = root().join("target/clients-venv/bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import segment.analytics"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    client("Python", ok.then_some(python))
}

fn node() -> Option<PathBuf> {
    let installed = root()
        .join("tests/clients/node/node_modules/@segment/analytics-node")
        .exists();
    client("Node", installed.then(|| PathBuf::from("node")))
}

/// The release binary, rules set by `TD_` variables only.
struct Binary {
    base: String,
    served: crate::support::binary::Served,
    http: reqwest::Client,
}

impl Binary {
    async fn start(place: &Place, totango: &str) -> Binary {
        let mut cmd = crate::support::binary::serve();
        cmd.env("TD_STORAGE__URL", place.url())
            .env("TD_ADMIN__TOKEN_FILE", place.dir.path().join("admin-token"))
            .env("TD_TOTANGO__SERVICE_ID", "SP-1234-01")
            .env("TD_TOTANGO__ENDPOINT", totango)
            .env("TD_AUTH__WRITE_KEYS", KEY)
            .env("TD_ADMIN__TOKEN", ADMIN_TOKEN)
            .env("TD_PRIVACY__HMAC_SECRET", SECRET)
            .env("TD_PRIVACY__PII", "traits.email=hash")
            .env("TD_PRIVACY__FILTERS__DENY_EVENTS", "Created *")
            .env("RUST_LOG", "warn");
        // Listens on a port it picks and reports (no race for a free one).
        let served =
            tokio::task::spawn_blocking(move || crate::support::binary::Served::start(cmd))
                .await
                .unwrap();
        Binary {
            base: served.url(""),
            served,
            http: reqwest::Client::new(),
        }
    }

    async fn outcomes(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let stats = self
                .http
                .get(format!("{}/api/stats", self.base))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let stats: Value = serde_json::from_slice(&stats).unwrap();
            if stats["queue"]["depth"] == 0 {
                return stats["outcomes"].clone();
            }
            assert!(Instant::now() < deadline, "not settled: {stats}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        let served = self.served;
        tokio::task::spawn_blocking(move || served.kill())
            .await
            .unwrap();
    }
}

/// Calls each library sends: identify (with an email trait), group, page
/// and track ("Created Report", denied), in turn.
const CALLS: usize = 200;

async fn run_client(program: &Path, args: &[&str]) {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(program)
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
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(summary["errors"], json!({}), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_libraries_mixed_stream_reaches_totango_hashed_and_filtered() {
    let python = python();
    let node = node();
    for place in Place::both() {
        let backend = place.name();
        let (fake, totango) = Fake::start(200).await;
        let srv = Binary::start(&place, &totango.uri()).await;
        let count = CALLS.to_string();
        let mut prefixes = Vec::new();
        if let Some(python) = &python {
            let args = [
                "tests/clients/python/send_events.py",
                "--host",
                &srv.base,
                "--write-key",
                KEY,
                "--count",
                &count,
                "--prefix",
                "py",
            ];
            run_client(python, &args).await;
            prefixes.push("py");
        }
        if let Some(node) = &node {
            let args = [
                "tests/clients/node/send_events.mjs",
                "--host",
                &srv.base,
                "--write-key",
                KEY,
                "--count",
                &count,
                "--prefix",
                "node",
            ];
            run_client(node, &args).await;
            prefixes.push("node");
        }
        if prefixes.is_empty() {
            srv.stop().await;
            return;
        }
        let outcomes = srv.outcomes().await;
        let per_call = CALLS / 4 * prefixes.len();
        assert_eq!(outcomes["delivered"], 3 * per_call, "{backend}: {outcomes}");
        assert_eq!(outcomes["filtered"], per_call, "{backend}: {outcomes}");
        for other in ["dead", "rejected", "duplicate", "unsupported", "pending"] {
            assert_eq!(outcomes[other], 0, "{backend}: {other}: {outcomes}");
        }
        // Exactly one request per identify, group and page call: for user
        // `{prefix}-{i}`, call i % 4 (identify, group, page, track).
        let requests = fake.requests();
        assert_eq!(requests.len(), 3 * per_call, "{backend}");
        let mut expected_users = BTreeSet::new();
        let mut expected_emails = BTreeMap::new();
        for prefix in &prefixes {
            for i in 0..CALLS {
                let user = format!("{prefix}-{i}");
                match i % 4 {
                    0 => {
                        expected_emails
                            .insert(user.clone(), hmac_hex(&format!("{user}@example.com")));
                        expected_users.insert(user);
                    }
                    1 | 2 => {
                        expected_users.insert(user);
                    }
                    _ => {}
                }
            }
        }
        let users: BTreeSet<String> = requests
            .iter()
            .filter_map(|r| r.get("sdr_u").cloned())
            .collect();
        assert_eq!(
            users, expected_users,
            "{backend}: no track call's user reached Totango"
        );
        let emails: BTreeMap<String, String> = requests
            .iter()
            .filter_map(|r| Some((r.get("sdr_u")?.clone(), r.get("sdr_u.email")?.clone())))
            .collect();
        assert_eq!(
            emails, expected_emails,
            "{backend}: hashed emails, one per identify"
        );
        for r in &requests {
            let text = format!("{r:?}");
            assert!(!text.contains("@example.com"), "{backend}: {text}");
            assert_ne!(r.get("sdr_a").map(String::as_str), Some("Created Report"));
        }
        srv.stop().await;
    }
}

// ---------------------------------------------------------------------------
// check-config and translate
// ---------------------------------------------------------------------------

const RULES_TOML: &str = r#"
[auth]
write_keys = ["k-default"]

[[sources]]
name = "web"
write_key = "k-web"

[privacy]
hmac_secret = "privacy-test-hmac-secret-0123456789"
filters = { deny_events = ["Debug *", "Internal*"] }
pii = [{ path = "traits.email", action = "hash" }, { path = "properties.card", action = "drop" }]

[privacy.sources.web]
filters = { allow_calls = ["identify", "track"] }
"#;

fn run_bin(args: &[&str], dir: &Path, stdin: &str) -> (i32, String, String) {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("TD_PRIVACY__HMAC_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails before reading stdin closes it: not an error here.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_shows_the_rules_and_redacts_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("td.toml"), RULES_TOML).unwrap();
    let (code, out, err) = run_bin(&["check-config", "--config", "td.toml"], dir.path(), "");
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(SECRET), "{out}");
    assert!(out.contains("hmac_secret = \"[redacted]\""), "{out}");
    assert!(
        out.contains("Debug *") && out.contains("traits.email"),
        "{out}"
    );
    assert!(
        out.contains("allow_calls = [\"identify\", \"track\"]"),
        "{out}"
    );

    for (toml, setting) in [
        (
            RULES_TOML.replace("action = \"drop\"", "action = \"erase\""),
            "privacy.pii[1].action",
        ),
        (
            RULES_TOML.replace("hmac_secret = \"privacy-test-hmac-secret-0123456789\"", ""),
            "privacy.hmac_secret",
        ),
        (
            RULES_TOML.replace("[privacy.sources.web]", "[privacy.sources.webb]"),
            "privacy.sources.webb",
        ),
        (
            RULES_TOML.replace("\"identify\", \"track\"", "\"identify\", \"tracks\""),
            "privacy.sources.web.filters.allow_calls[1]",
        ),
    ] {
        std::fs::write(dir.path().join("bad.toml"), toml).unwrap();
        let (code, out, err) = run_bin(&["check-config", "--config", "bad.toml"], dir.path(), "");
        assert_ne!(code, 0, "{out}");
        assert!(err.contains(&format!("{setting}:")), "{setting}: {err}");
        assert!(!err.contains(SECRET), "{err}");
    }
}

#[test]
fn translate_shows_the_rules_of_a_configured_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("td.toml"), RULES_TOML).unwrap();
    let settings = r#"{"service_id":"SP-1234-01"}"#;
    let message = identify("u1", "ann@example.com").to_string();
    let translate = |extra: &[&str], stdin: &str| {
        let mut args = vec!["translate", "--settings", settings];
        args.extend_from_slice(extra);
        let (code, out, err) = run_bin(&args, dir.path(), stdin);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    // Without --config: as before, the raw value.
    let plain = translate(&[], &message);
    assert_eq!(plain["outcome"], "send");
    assert_eq!(
        plain["requests"][0]["params"]["sdr_u.email"],
        "ann@example.com"
    );
    let ruled = translate(&["--config", "td.toml"], &message);
    assert_eq!(
        ruled["requests"][0]["params"]["sdr_u.email"],
        hmac_hex("ann@example.com")
    );
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&plain), keys(&ruled), "the output keeps its shape");
    let denied = translate(
        &["--config", "td.toml"],
        &track("u1", "Debug tap").to_string(),
    );
    assert_eq!(denied["outcome"], "filtered");
    assert_eq!(denied["code"], "filtered_by_rule");
    assert_eq!(denied["requests"], json!([]));
    assert!(
        denied["message"]
            .as_str()
            .unwrap()
            .contains("privacy.filters.deny_events[0]"),
        "{denied}"
    );
    let page = json!({"type": "page", "userId": "u1", "name": "Home",
                      "context": {"groupId": "acme"}})
    .to_string();
    assert_eq!(
        translate(&["--config", "td.toml"], &page)["outcome"],
        "send"
    );
    let web = translate(&["--config", "td.toml", "--source", "web"], &page);
    assert_eq!(web["outcome"], "filtered", "{web}");
    assert!(
        web["message"]
            .as_str()
            .unwrap()
            .contains("privacy.sources.web.filters.allow_calls"),
        "{web}"
    );
    let (code, _, err) = run_bin(
        &["translate", "--config", "td.toml", "--source", "nope"],
        dir.path(),
        &page,
    );
    assert_ne!(code, 0);
    assert!(err.contains("--source"), "{err}");
}
