//! End-to-end tests of the real server: HTTP in (Tracking API, `/segment`,
//! `/webhook`), storage, delivery to a fake Totango (wiremock), and restart
//! recovery. Every test starts its own server on an ephemeral port with its
//! own database: a SQLite file, or a PostgreSQL database with
//! `TEST_BACKEND=postgres`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use totango_destination::config::{Config, Runtime, SourceConfig};
use totango_destination::mapping::SettingsPatch;
use totango_destination::server::{RunError, open_storage, run_with_storage};
use totango_destination::storage::{State, Storage, StoredMessage};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const KEY: &str = "key-1";
const SERVICE: &str = "SP-3126-05";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Fake Totango
// ---------------------------------------------------------------------------

type Params = BTreeMap<String, String>;

/// One request the fake received.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    params: Params,
    status: u16,
}

impl Hit {
    fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

type Decide = dyn Fn(usize, &Params) -> (u16, ResponseTemplate) + Send + Sync;

/// Records every pixel request and answers what `decide` says
/// (`decide(n, params)`, `n` counting from 0).
struct Scripted {
    count: AtomicUsize,
    log: Arc<Mutex<Vec<Hit>>>,
    decide: Box<Decide>,
}

impl Respond for Scripted {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        let params: Params = req.url.query_pairs().into_owned().collect();
        let (status, template) = (self.decide)(n, &params);
        self.log.lock().unwrap().push(Hit {
            at: Instant::now(),
            params,
            status,
        });
        template
    }
}

struct Fake {
    server: MockServer,
    log: Arc<Mutex<Vec<Hit>>>,
}

impl Fake {
    async fn with(
        decide: impl Fn(usize, &Params) -> (u16, ResponseTemplate) + Send + Sync + 'static,
    ) -> Fake {
        let server = MockServer::start().await;
        let log = Arc::new(Mutex::new(Vec::new()));
        Mock::given(method("GET"))
            .and(path("/pixel.gif/"))
            .respond_with(Scripted {
                count: AtomicUsize::new(0),
                log: log.clone(),
                decide: Box::new(decide),
            })
            .mount(&server)
            .await;
        Fake { server, log }
    }

    /// Answers 200 to everything.
    async fn ok() -> Fake {
        Fake::with(|_, _| reply(200)).await
    }

    fn uri(&self) -> String {
        self.server.uri()
    }

    fn hits(&self) -> Vec<Hit> {
        self.log.lock().unwrap().clone()
    }

    /// Requests whose `sdr_a` (activity) is `activity`.
    fn with_activity(&self, activity: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.get("sdr_a") == Some(activity))
            .collect()
    }

    /// Requests for Totango user `user`.
    fn for_user(&self, user: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.get("sdr_u") == Some(user))
            .collect()
    }
}

fn reply(status: u16) -> (u16, ResponseTemplate) {
    (status, ResponseTemplate::new(status))
}

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

/// A configuration for a test: storage in `place`, default service, one write
/// key, fast retries.
fn config(place: &common::TestPlace, endpoint: &str) -> Config {
    let mut c = Config::default();
    place.configure(&mut c);
    c.totango.service_id = Some(SERVICE.into());
    c.totango.endpoint = Some(endpoint.into());
    c.auth.write_keys = vec![KEY.into()];
    c.delivery.retry_base_ms = 20;
    c.delivery.retry_max_ms = 100;
    c.delivery.request_timeout_ms = 2_000;
    c
}

/// The request settings stored with message `id`, read from the database.
async fn stored_settings(place: &common::TestPlace, id: i64) -> String {
    if place.is_postgres() {
        let pool = sqlx::PgPool::connect(&place.storage_url()).await.unwrap();
        let stored = sqlx::query_scalar("SELECT settings FROM td_messages WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        stored
    } else {
        let conn = rusqlite::Connection::open(place.path().join("td.db")).unwrap();
        conn.query_row("SELECT settings FROM messages WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
    }
}

struct Server {
    addr: SocketAddr,
    runtime: Runtime,
    storage: Arc<dyn Storage>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
    http: reqwest::Client,
}

/// A response, with its body parsed as JSON (`Null` when empty, the text as
/// a JSON string when it is not JSON).
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    json: Value,
}

impl Server {
    async fn start(config: Config) -> Server {
        let runtime = config.validate().expect("valid test configuration");
        let storage = open_storage(&runtime).await.expect("open storage");
        Server::start_with(runtime, storage).await
    }

    async fn start_with(runtime: Runtime, storage: Arc<dyn Storage>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_storage(
            runtime.clone(),
            listener,
            storage.clone(),
            shutdown.clone(),
        ));
        Server {
            addr,
            runtime,
            storage,
            shutdown,
            task,
            http: reqwest::Client::new(),
        }
    }

    /// Stops the server (as on SIGTERM) and waits until it has returned.
    /// Returns the runtime, to start again on the same database.
    async fn stop(self) -> Runtime {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server ran without error");
        self.runtime
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.expect("request reaches the server");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("response body");
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Resp {
            status,
            headers,
            json,
        }
    }

    /// POSTs raw bytes as JSON, with `key` as Basic user when given.
    fn request(
        &self,
        path: &str,
        key: Option<&str>,
        body: impl Into<Vec<u8>>,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.into());
        if let Some(k) = key {
            req = req.basic_auth(k, Some(""));
        }
        req
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Resp {
        self.send(self.request(path, key, serde_json::to_vec(body).unwrap()))
            .await
    }

    async fn post_raw(&self, path: &str, key: Option<&str>, body: impl Into<Vec<u8>>) -> Resp {
        self.send(self.request(path, key, body)).await
    }

    async fn get(&self, id: i64) -> StoredMessage {
        self.storage
            .get(id)
            .await
            .expect("storage readable")
            .unwrap_or_else(|| panic!("message {id} is stored"))
    }

    /// Waits until message `id` is in `state`; fails early when it reached a
    /// different final state.
    async fn wait_for(&self, id: i64, state: State) -> StoredMessage {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.storage.get(id).await.expect("storage readable");
            if let Some(m) = &seen {
                if m.state == state {
                    return m.clone();
                }
                if m.state != State::Pending {
                    panic!("message {id} ended {:?}, not {state:?}: {m:#?}", m.state);
                }
            }
            if Instant::now() > deadline {
                panic!("message {id} did not become {state:?} in time: {seen:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `check` holds for message `id`.
    async fn wait_until(
        &self,
        id: i64,
        what: &str,
        check: impl Fn(&StoredMessage) -> bool,
    ) -> StoredMessage {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.storage.get(id).await.expect("storage readable");
            if let Some(m) = seen.as_ref().filter(|m| check(m)) {
                return m.clone();
            }
            if Instant::now() > deadline {
                panic!("message {id}: {what} did not happen in time: {seen:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stored messages by state name (states with no message are absent).
    async fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.storage
            .counts()
            .await
            .expect("storage readable")
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.as_str(), n))
            .collect()
    }
}

/// Asserts a `{"message", "code"}` error answer whose message names `names`.
#[track_caller]
fn assert_error(r: &Resp, status: u16, code: &str, names: &str) {
    assert_eq!(r.status, status, "status of {r:#?}");
    assert_eq!(r.json["code"], code, "code of {r:#?}");
    let message = r.json["message"]
        .as_str()
        .unwrap_or_else(|| panic!("message in {r:#?}"));
    assert!(message.contains(names), "{message:?} should name {names:?}");
}

#[track_caller]
fn assert_success(r: &Resp) {
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json["success"], true, "{r:#?}");
}

fn counts(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

fn track(user: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event, "context": {"groupId": "acc1"}})
}

/// An identify of `user` whose trait `n` tells the updates apart (`sdr_u.n`).
fn identify(user: &str, n: &str) -> Value {
    json!({"type": "identify", "userId": user, "traits": {"n": n}, "context": {"groupId": "acc1"}})
}

fn hmac_hex(secret: &str, data: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

fn millis_of(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("{v} is a time")))
        .unwrap_or_else(|e| panic!("{v}: {e}"))
        .timestamp_millis()
}

// ---------------------------------------------------------------------------
// 1. Tracking API
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_api_single_calls_reach_totango() {
    let fake = Fake::ok().await;
    let dir = common::place();
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
    let dir = common::place();
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
    let dir = common::place();
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

// ---------------------------------------------------------------------------
// 2. /v1/batch
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_merges_batch_level_context_and_integrations() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({
                "batch": [
                    {"type": "track", "userId": "u1", "event": "E1"},
                    {"type": "identify", "userId": "u2", "traits": {"plan": "x"},
                     "context": {"groupId": "own-acc"}}
                ],
                "context": {"groupId": "batch-acc"}
            }),
        )
        .await;
    assert_success(&r);
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;
    let e1 = fake.with_activity("E1");
    assert_eq!(e1.len(), 1, "{:#?}", fake.hits());
    assert_eq!(
        e1[0].get("sdr_o"),
        Some("batch-acc"),
        "batch context merged"
    );
    let u2 = fake.for_user("u2");
    assert_eq!(u2.len(), 1);
    assert_eq!(
        u2[0].get("sdr_o"),
        Some("own-acc"),
        "the item's own context wins"
    );
    assert_eq!(u2[0].get("sdr_u.plan"), Some("x"));

    // /v1/import is the same, and batch-level integrations apply too.
    let r = srv
        .post(
            "/v1/import",
            None,
            &json!({
                "writeKey": KEY,
                "batch": [{"type": "track", "userId": "u3", "event": "E3"}],
                "context": {"groupId": "batch-acc"},
                "integrations": {"All": false}
            }),
        )
        .await;
    assert_success(&r);
    let m = srv.wait_for(3, State::Filtered).await;
    assert_eq!(m.payload["integrations"], json!({"All": false}));
    assert_eq!(fake.hits().len(), 2);

    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_errors_are_named_and_nothing_of_the_batch_is_stored() {
    // A request that is not a usable batch at all is refused whole.
    let fake = Fake::ok().await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_batch_messages = 3;
    c.limits.max_message_bytes = 512;
    c.limits.max_body_bytes = 4096;
    c.limits.max_batch_body_bytes = 4096;
    let srv = Server::start(c).await;
    let ok = track("u1", "E");

    // Too many messages.
    let r = srv
        .post("/v1/batch", Some(KEY), &json!({"batch": [ok, ok, ok, ok]}))
        .await;
    assert_error(&r, 400, "batch_too_large", "batch");

    // A single call over max_message_bytes.
    let mut big = track("u1", "Big");
    big["properties"] = json!({"blob": "x".repeat(600)});
    let r = srv.post("/v1/track", Some(KEY), &big).await;
    assert_error(&r, 400, "message_too_large", "message");

    // A body over max_body_bytes.
    let mut huge = track("u1", "Huge");
    huge["properties"] = json!({"blob": "x".repeat(5000)});
    let r = srv
        .post("/v1/batch", Some(KEY), &json!({"batch": [huge]}))
        .await;
    assert_eq!(r.status, 413, "{r:#?}");
    assert!(
        r.json["message"].is_string() && r.json["code"].is_string(),
        "{r:#?}"
    );

    // Malformed JSON.
    let r = srv
        .post_raw("/v1/batch", Some(KEY), &b"{\"batch\": [{"[..])
        .await;
    assert_error(&r, 400, "malformed_json", "JSON");
    let r = srv.post_raw("/v1/track", Some(KEY), &b"not json"[..]).await;
    assert_error(&r, 400, "malformed_json", "JSON");

    // Not a batch at all.
    let r = srv
        .post("/v1/batch", Some(KEY), &json!({"batch": "x"}))
        .await;
    assert_error(&r, 400, "invalid_field", "batch");
    // Trailing bytes after the JSON body.
    let r = srv
        .post_raw("/v1/batch", Some(KEY), &b"{\"batch\": []} {}"[..])
        .await;
    assert_error(&r, 400, "malformed_json", "trailing");
    // A batch context larger than any message would make every item too large...
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": [ok], "context": {"blob": "x".repeat(600)}}),
        )
        .await;
    assert_error(&r, 400, "message_too_large", "context");
    assert_eq!(srv.counts().await, counts(&[]), "nothing stored");
    srv.stop().await;

    // ... or all together.
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_request_stored_bytes = 2_000;
    c.limits.max_batch_body_bytes = 2_000;
    let srv = Server::start(c).await;
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": vec![ok.clone(); 20], "context": {"blob": "x".repeat(300)}}),
        )
        .await;
    assert_error(&r, 400, "request_too_large", "batch[");

    // Auth applies to batches too.
    let r = srv
        .post("/v1/batch", Some("wrong"), &json!({"batch": [ok]}))
        .await;
    assert_eq!(r.status, 401, "{r:#?}");

    assert_eq!(
        srv.counts().await,
        counts(&[]),
        "nothing of a refused batch is stored"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fake.hits().is_empty());
    srv.stop().await;
}

/// One item over `limits.max_message_bytes` costs only itself, on each of the
/// three ways in that take several messages: it is stored `rejected`
/// (`message_too_large`) with a bounded summary of its payload, and the
/// others are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_item_is_rejected_alone_on_every_way_in() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_message_bytes = 2_000;
    let srv = Server::start(c).await;
    let big = |user: &str| {
        json!({"type": "track", "userId": user, "event": "Big", "messageId": format!("big-{user}"),
               "context": {"groupId": "acc1"}, "properties": {"blob": "x".repeat(40_000)}})
    };
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": [track("b1", "E"), big("b-big"), track("b2", "E")]}),
        )
        .await;
    assert_success(&r);
    let r = srv
        .post(
            "/v1/import",
            Some(KEY),
            &json!({"batch": [big("i-big"), track("i1", "E")]}),
        )
        .await;
    assert_success(&r);
    let r = srv
        .post(
            "/webhook",
            Some(KEY),
            &json!([track("w1", "E"), big("w-big")]),
        )
        .await;
    // /webhook reports a rejected element with 400 (Segment does not retry it);
    // the other element is kept.
    assert_error(&r, 400, "message_too_large", "[1]");
    assert_eq!(r.json["outcomes"][0]["outcome"], "accepted", "{r:#?}");
    assert_eq!(r.json["outcomes"][1]["outcome"], "rejected", "{r:#?}");

    let deadline = Instant::now() + WAIT;
    while fake.hits().len() < 4 {
        assert!(Instant::now() < deadline, "delivered: {:?}", fake.hits());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.hits().len(), 4, "{:?}", fake.hits());
    for user in ["b1", "b2", "i1", "w1"] {
        assert_eq!(fake.for_user(user).len(), 1, "{user} delivered once");
    }
    for user in ["b-big", "i-big", "w-big"] {
        assert!(fake.for_user(user).is_empty(), "{user} not delivered");
    }
    let rejected = srv
        .storage
        .list(
            totango_destination::storage::MessageFilter {
                state: Some(State::Rejected),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(rejected.len(), 3, "{rejected:#?}");
    for m in &rejected {
        assert_eq!(m.code.as_deref(), Some("message_too_large"), "{m:#?}");
        let reason = m.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("at most 2000 bytes"), "{reason}");
        let user = m.user_id.as_deref().unwrap_or_default();
        assert!(user.ends_with("-big"), "{m:#?}");
        assert_eq!(m.payload["messageId"], format!("big-{user}"));
        assert!(m.payload["truncated"]["bytes"].as_u64().unwrap() > 40_000);
        let kept = m.payload.to_string().len();
        assert!(
            kept < 2_000,
            "the payload is kept as a bounded prefix: {kept} bytes"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_bad_batch_item_is_rejected_alone_and_the_rest_delivered() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let mut items = vec![track("u1", "Good 1")];
    items.push(
        json!({"type": "track", "userId": "u1", "event": "Bad group",
        "context": {"groupId": {"id": "acme"}}}),
    );
    items.push(
        json!({"type": "track", "userId": "u1", "event": "Bad time", "timestamp": 1700000000}),
    );
    items.push(json!({"userId": "u1", "event": "No type"}));
    items.push(json!({"type": "purchase", "userId": "u1"}));
    items.push(json!({"type": "identify", "userId": "u1", "traits": "x"}));
    items.push(json!(7));
    items.push(json!({"type": "delete", "userId": "u1"}));
    items.push(track("u1", "Good 2"));
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": items, "context": {"groupId": "acme"}}),
        )
        .await;
    assert_success(&r);
    let good1 = srv.wait_for(1, State::Delivered).await;
    assert_eq!(good1.state, State::Delivered);
    srv.wait_for(9, State::Delivered).await;
    let expect = [
        (2, "invalid_field", "batch[1].context.groupId"),
        (3, "invalid_field", "batch[2].timestamp"),
        (4, "missing_type", "batch[3].type"),
        (5, "unknown_type", "batch[4].type"),
        (6, "invalid_field", "batch[5].traits"),
        (7, "invalid_message", "batch[6]"),
    ];
    for (id, code, field) in expect {
        let m = srv.get(id).await;
        assert_eq!(m.state, State::Rejected, "{m:#?}");
        assert_eq!(m.code.as_deref(), Some(code), "{m:#?}");
        let reason = m.reason.clone().unwrap_or_default();
        assert!(reason.contains(field), "{reason:?} names {field}");
    }
    let delete = srv.get(8).await;
    assert_eq!(delete.state, State::Unsupported, "{delete:#?}");
    let events: Vec<String> = fake
        .hits()
        .iter()
        .filter_map(|h| h.get("sdr_a").map(str::to_owned))
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.contains(&"Good 1".to_owned()) && events.contains(&"Good 2".to_owned()));

    // /webhook arrays too: the bad element is stored as rejected, reported
    // with 400, and the others are kept.
    let r = srv
        .post(
            "/webhook",
            Some(KEY),
            &json!([track("u2", "Hook good"), {"type": "track", "userId": "u2", "timestamp": 5,
                "event": "Hook bad", "context": {"groupId": "acme"}}]),
        )
        .await;
    assert_error(&r, 400, "invalid_field", "[1].timestamp");
    assert_eq!(r.json["outcomes"][0]["outcome"], "accepted", "{r:#?}");
    assert_eq!(r.json["outcomes"][1]["outcome"], "rejected", "{r:#?}");
    srv.wait_for(10, State::Delivered).await;
    assert_eq!(srv.get(11).await.state, State::Rejected);

    // delete is unsupported: 200 on the Tracking API and /webhook, 501 on /segment.
    let del = json!({"type": "delete", "userId": "u3", "context": {"groupId": "acme"}});
    let r = srv.post("/webhook", Some(KEY), &del).await;
    assert_success(&r);
    assert_eq!(r.json["outcomes"][0]["outcome"], "unsupported", "{r:#?}");
    let r = srv.post("/segment", Some(KEY), &del).await;
    assert_eq!(r.status, 501, "{r:#?}");
    let r = srv.post("/v1/delete", Some(KEY), &del).await;
    assert_eq!(r.status, 404, "{r:#?}");
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 3. /segment (partner destination protocol)
// ---------------------------------------------------------------------------

fn settings_header(v: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_endpoint_follows_the_partner_protocol() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

// ---------------------------------------------------------------------------
// 4. /webhook
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_without_secret_takes_arrays_and_requires_a_key() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let body = json!([track("u1", "W1"), track("u2", "W2")]);
    let r = srv.post("/webhook", None, &body).await;
    assert_error(&r, 401, "unauthorized", "write key");
    let r = srv.post("/webhook", Some(KEY), &body).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;
    assert_eq!(fake.with_activity("W1").len(), 1);
    assert_eq!(fake.with_activity("W2").len(), 1);

    // A single object works too.
    let r = srv.post("/webhook", Some(KEY), &track("u3", "W3")).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(3, State::Delivered).await;

    // A rejected message → 400, but its valid sibling is kept and delivered.
    let body = json!([track("u4", "W4"), {"type": "group", "userId": "u4"}]);
    let r = srv.post("/webhook", Some(KEY), &body).await;
    assert_error(&r, 400, "missing_group_id", "groupId");
    assert!(
        r.json["message"].as_str().unwrap().contains("[1]"),
        "{r:#?}"
    );
    srv.wait_for(4, State::Delivered).await;
    srv.wait_for(5, State::Rejected).await;
    assert_eq!(fake.with_activity("W4").len(), 1);

    // A malformed item names its index.
    let r = srv
        .post(
            "/webhook",
            Some(KEY),
            &json!([track("u5", "W5"), {"type": "track", "traits": 1}]),
        )
        .await;
    assert_error(&r, 400, "invalid_field", "[1].traits");

    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_with_secret_checks_the_signature() {
    const SECRET: &str = "hook-secret";
    let fake = Fake::ok().await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some(SECRET.into());
    let srv = Server::start(c).await;
    let signed = |body: &[u8], sig: Option<String>| {
        let mut req = srv.request("/webhook", None, body.to_vec());
        if let Some(s) = sig {
            req = req.header("X-Signature", s);
        }
        req
    };

    // Signature of the whole body.
    let one = serde_json::to_vec(&track("u1", "S1")).unwrap();
    let r = srv.send(signed(&one, Some(hmac_hex(SECRET, &one)))).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;

    // An array signed by its first element only is refused by default: the
    // rest of the array would be unauthenticated.
    let mut first = track("u2", "S2");
    first["messageId"] = json!("first-2");
    let array = serde_json::to_vec(&json!([first, track("u3", "S3")])).unwrap();
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&first).unwrap());
    let r = srv.send(signed(&array, Some(sig))).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");

    // An array signed whole.
    let array2 = serde_json::to_vec(&json!([track("u4", "S4"), track("u5", "S4b")])).unwrap();
    let r = srv
        .send(signed(&array2, Some(hmac_hex(SECRET, &array2))))
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(2, State::Delivered).await;
    srv.wait_for(3, State::Delivered).await;

    // Wrong, other-secret, missing and non-hex signatures → 401; nothing stored.
    let other = serde_json::to_vec(&track("u5", "S5")).unwrap();
    let r = srv.send(signed(&other, Some(hmac_hex(SECRET, &one)))).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    let r = srv
        .send(signed(&other, Some(hmac_hex("not-the-secret", &other))))
        .await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    let r = srv.send(signed(&other, None)).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    let r = srv.send(signed(&other, Some("zz-not-hex".into()))).await;
    assert_error(&r, 401, "unauthorized", "X-Signature");

    // The signature of the first element does not vouch for a lone object.
    let r = srv
        .send(signed(&other, Some(hmac_hex(SECRET, b"[]"))))
        .await;
    assert_eq!(r.status, 401, "{r:#?}");

    assert_eq!(srv.counts().await, counts(&[("delivered", 3)]));
    assert!(fake.with_activity("S5").is_empty());
    assert!(fake.with_activity("S3").is_empty());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_element_signatures_when_enabled_are_never_accepted_twice() {
    const SECRET: &str = "hook-secret";
    let fake = Fake::ok().await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some(SECRET.into());
    c.auth.webhook_first_element_signature = true;
    let srv = Server::start(c).await;
    let signed = |body: &[u8], sig: String| {
        srv.request("/webhook", None, body.to_vec())
            .header("X-Signature", sig)
    };
    // As Segment's batched Actions sign: the first element, compact.
    let mut first = track("u2", "S2");
    first["messageId"] = json!("first-2");
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&first).unwrap());
    let array = serde_json::to_vec_pretty(&json!([first, track("u3", "S3")])).unwrap();
    let r = srv.send(signed(&array, sig.clone())).await;
    assert_eq!(r.status, 200, "{r:#?}");
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;

    // The same signed element with other messages appended: a replay.
    let forged = serde_json::to_vec(&json!([first, track("u9", "Forged")])).unwrap();
    let r = srv.send(signed(&forged, sig)).await;
    assert_error(&r, 401, "unauthorized", "already accepted");

    // A signed first element without a messageId cannot be recognised again.
    let anonymous = track("u4", "S4");
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&anonymous).unwrap());
    let array = serde_json::to_vec(&json!([anonymous, track("u5", "S5")])).unwrap();
    let r = srv.send(signed(&array, sig)).await;
    assert_error(&r, 401, "unauthorized", "messageId");

    assert_eq!(srv.counts().await, counts(&[("delivered", 2)]));
    assert!(fake.with_activity("Forged").is_empty());
    srv.stop().await;
}

/// Twelve arrays sharing one signed first element, sent at once: exactly one
/// is accepted (recording the element and storing the array are one step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_arrays_sharing_a_signed_element_are_accepted_once() {
    const SECRET: &str = "hook-secret";
    let fake = Fake::ok().await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some(SECRET.into());
    c.auth.webhook_first_element_signature = true;
    let srv = Arc::new(Server::start(c).await);
    let mut first = track("u1", "Signed");
    first["messageId"] = json!("signed-first");
    let sig = hmac_hex(SECRET, &serde_json::to_vec(&first).unwrap());
    let posts: Vec<_> = (0..12)
        .map(|i| {
            let (srv, first, sig) = (srv.clone(), first.clone(), sig.clone());
            tokio::spawn(async move {
                let items: Vec<Value> = std::iter::once(first)
                    .chain((0..50).map(|j| track(&format!("r{i}-{j}"), &format!("Extra{i}"))))
                    .collect();
                let body = serde_json::to_vec(&Value::Array(items)).unwrap();
                let r = srv
                    .send(
                        srv.request("/webhook", None, body)
                            .header("X-Signature", sig),
                    )
                    .await;
                assert!(
                    r.status == 200 || r.status == 401,
                    "unexpected answer: {r:#?}"
                );
                r.status == 200
            })
        })
        .collect();
    let mut accepted = 0;
    for p in posts {
        accepted += usize::from(p.await.unwrap());
    }
    assert_eq!(accepted, 1, "arrays accepted with one signed element");
    let stored: u64 = srv.counts().await.values().sum();
    assert_eq!(stored, 51, "only the accepted array is stored");
    Arc::into_inner(srv).expect("one owner").stop().await;
}

// ---------------------------------------------------------------------------
// 5. Dedupe
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_message_id_is_delivered_once() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let mut m = track("u1", "Once");
    m["messageId"] = json!("m-dup-1");
    assert_success(&srv.post("/v1/track", Some(KEY), &m).await);
    assert_success(&srv.post("/v1/track", Some(KEY), &m).await);
    // The same messageId through the partner protocol is a duplicate too.
    let r = srv.post("/segment", Some(KEY), &m).await;
    assert_eq!(r.status, 200, "{r:#?}");

    srv.wait_for(1, State::Delivered).await;
    let d = srv.wait_for(2, State::Duplicate).await;
    assert_eq!(d.message_id, "m-dup-1");
    srv.wait_for(3, State::Duplicate).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.with_activity("Once").len(), 1, "{:#?}", fake.hits());
    assert_eq!(
        srv.counts().await,
        counts(&[("delivered", 1), ("duplicate", 2)])
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 6. Ordering of attribute updates
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_holds_back_only_its_own_users_attribute_updates() {
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    // 503 (retry after 1 s) to the first request for user A only.
    let fake = Fake::with(move |_, p| {
        if p.get("sdr_u").map(String::as_str) == Some("A") && !f.swap(true, Ordering::SeqCst) {
            (
                503,
                ResponseTemplate::new(503).insert_header("Retry-After", "1"),
            )
        } else {
            reply(200)
        }
    })
    .await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    for (user, n) in [("A", "1"), ("A", "2"), ("A", "3"), ("B", "1")] {
        assert_success(
            &srv.post("/v1/identify", Some(KEY), &identify(user, n))
                .await,
        );
    }
    assert_success(&srv.post("/v1/track", Some(KEY), &track("A", "act")).await);
    for id in 1..=5 {
        srv.wait_for(id, State::Delivered).await;
    }
    assert_eq!(srv.get(1).await.attempts, 2);

    let a: Vec<Hit> = fake
        .for_user("A")
        .into_iter()
        .filter(|h| h.get("sdr_u.n").is_some())
        .collect();
    let seen: Vec<(&str, u16)> = a
        .iter()
        .map(|h| (h.get("sdr_u.n").unwrap(), h.status))
        .collect();
    assert_eq!(
        seen,
        [("1", 503), ("1", 200), ("2", 200), ("3", 200)],
        "A's updates in acceptance order, the failed one first"
    );
    let b = fake.for_user("B");
    assert_eq!(b.len(), 1);
    assert!(
        b[0].at < a[1].at,
        "B was delivered {:?} after A's retry: it waited for A",
        b[0].at.duration_since(a[1].at)
    );
    // A's activity does not wait for A's attribute updates either.
    let act = fake.with_activity("act");
    assert_eq!(act.len(), 1);
    assert!(act[0].at < a[1].at, "A's activity waited for A's retry");
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 7–10. Retries and dead letters
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_success() {
    let fake = Fake::with(|n, _| if n < 2 { reply(500) } else { reply(200) }).await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(&srv.post("/v1/track", Some(KEY), &track("u1", "R")).await);
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(m.attempts, 3, "{m:#?}");
    assert_eq!(
        m.last_response.as_ref().and_then(|l| l.status),
        Some(200),
        "{m:#?}"
    );
    let statuses: Vec<u16> = fake.hits().iter().map(|h| h.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_honours_retry_after() {
    let fake = Fake::with(|n, _| {
        if n == 0 {
            (
                429,
                ResponseTemplate::new(429).insert_header("Retry-After", "1"),
            )
        } else {
            reply(200)
        }
    })
    .await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u1", "Limited"))
            .await,
    );
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(m.attempts, 2, "{m:#?}");
    let hits = fake.hits();
    assert_eq!(
        hits.iter().map(|h| h.status).collect::<Vec<_>>(),
        [429, 200]
    );
    let waited = hits[1].at.duration_since(hits[0].at);
    assert!(
        waited >= Duration::from_millis(950),
        "retried after only {waited:?}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_pauses_the_whole_endpoint() {
    let fake = Fake::with(|n, _| {
        if n == 0 {
            (
                429,
                ResponseTemplate::new(429).insert_header("Retry-After", "1"),
            )
        } else {
            reply(200)
        }
    })
    .await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u1", "First"))
            .await,
    );
    // Once the 429 is recorded, another user's message must wait as well.
    srv.wait_until(1, "the 429 is recorded", |m| m.attempts >= 1)
        .await;
    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u2", "Second"))
            .await,
    );
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;

    let hits = fake.hits();
    assert_eq!(hits[0].status, 429, "{hits:#?}");
    let second = &fake.with_activity("Second");
    assert_eq!(second.len(), 1);
    let waited = second[0].at.duration_since(hits[0].at);
    assert!(
        waited >= Duration::from_millis(950),
        "another user's message went out {waited:?} after the 429"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_error_from_totango_is_dead_without_retry() {
    let fake = Fake::with(|_, _| {
        (
            400,
            ResponseTemplate::new(400).set_body_string("bad service id"),
        )
    })
    .await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    assert_success(&srv.post("/v1/track", Some(KEY), &track("u1", "Bad")).await);
    let m = srv.wait_for(1, State::Dead).await;
    assert_eq!(m.code.as_deref(), Some("rejected_by_totango"), "{m:#?}");
    let last = m.last_response.as_ref().expect("last response kept");
    assert_eq!(last.status, Some(400));
    assert_eq!(last.body.as_deref(), Some("bad service id"));
    assert_eq!(m.attempts, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.hits().len(), 1, "no retry after a 400");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_after_max_retry_age() {
    let fake = Fake::with(|_, _| reply(503)).await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.delivery.max_retry_age_secs = 1;
    let srv = Server::start(c).await;

    assert_success(
        &srv.post("/v1/track", Some(KEY), &track("u1", "Never"))
            .await,
    );
    let m = srv.wait_for(1, State::Dead).await;
    assert_eq!(m.code.as_deref(), Some("retries_exhausted"), "{m:#?}");
    assert!(m.attempts >= 2, "{m:#?}");
    assert_eq!(m.last_response.as_ref().and_then(|l| l.status), Some(503));
    assert_eq!(fake.hits().len() as u32, m.attempts);
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 11. Restart recovery
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_messages_survive_a_restart() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let fake = Fake::with(move |_, _| {
        if h.load(Ordering::SeqCst) {
            reply(200)
        } else {
            reply(503)
        }
    })
    .await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    for n in ["1", "2", "3"] {
        assert_success(
            &srv.post("/v1/identify", Some(KEY), &identify("u1", n))
                .await,
        );
    }
    srv.wait_until(1, "a failed attempt", |m| m.attempts >= 1)
        .await;
    let runtime = srv.stop().await;
    if !dir.is_postgres() {
        assert!(dir.path().join("td.db").exists());
    }

    // Start again on the same file, now with Totango answering.
    let storage = open_storage(&runtime).await.expect("reopen storage");
    let pending: Vec<State> = {
        let mut v = Vec::new();
        for id in 1..=3 {
            v.push(storage.get(id).await.unwrap().expect("kept").state);
        }
        v
    };
    assert_eq!(pending, [State::Pending; 3]);
    healthy.store(true, Ordering::SeqCst);
    let srv = Server::start_with(runtime, storage).await;
    for id in 1..=3 {
        srv.wait_for(id, State::Delivered).await;
    }
    let hits = fake.hits();
    let delivered: Vec<&str> = hits
        .iter()
        .filter(|h| h.status == 200)
        .map(|h| h.get("sdr_u.n").unwrap())
        .collect();
    assert_eq!(
        delivered,
        ["1", "2", "3"],
        "in acceptance order after the restart"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 12. Page category memory
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_uses_the_category_of_the_users_latest_page() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

// ---------------------------------------------------------------------------
// 13. Per-write-key settings
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_key_uses_its_own_settings() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

// ---------------------------------------------------------------------------
// 14–15. Operations and unknown endpoints
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_request_ids() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv.send(srv.http.get(srv.url("/healthz"))).await;
    assert_eq!(r.status, 200, "{r:#?}");
    let r = srv.send(srv.http.get(srv.url("/readyz"))).await;
    assert_eq!(r.status, 200, "{r:#?}");

    let r = srv
        .send(
            srv.http
                .get(srv.url("/healthz"))
                .header("x-request-id", "req-abc-123"),
        )
        .await;
    assert_eq!(
        r.headers.get("x-request-id").map(|v| v.to_str().unwrap()),
        Some("req-abc-123")
    );
    let r = srv.send(srv.http.get(srv.url("/healthz"))).await;
    let generated = r
        .headers
        .get("x-request-id")
        .expect("a generated request id");
    assert!(!generated.is_empty());
    let r2 = srv.send(srv.http.get(srv.url("/healthz"))).await;
    assert_ne!(
        r2.headers.get("x-request-id"),
        Some(generated),
        "ids are unique"
    );

    // Error answers carry the request id too.
    let r = srv
        .send(
            srv.request("/v1/track", Some("bad"), "{}")
                .header("x-request-id", "req-err"),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.headers.get("x-request-id").map(|v| v.to_str().unwrap()),
        Some("req-err")
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoints_are_json_404() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv.send(srv.http.get(srv.url("/nope"))).await;
    assert_error(&r, 404, "not_found", "endpoint");
    let r = srv.post("/v2/track", Some(KEY), &track("u1", "E")).await;
    assert_error(&r, 404, "not_found", "endpoint");
    let r = srv.post("/v1/purchase", Some(KEY), &track("u1", "E")).await;
    assert_error(&r, 404, "not_found", "/v1/purchase");
    assert_eq!(srv.counts().await, counts(&[]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_a_json_error() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let r = srv.send(srv.http.get(srv.url("/v1/track"))).await;
    assert_eq!(r.status, 405, "{r:#?}");
    assert!(
        r.json["message"].is_string() && r.json["code"].is_string(),
        "every 4xx answer is {{\"message\", \"code\"}}: {r:#?}"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// More end-to-end checks
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_sent_at_corrects_skew_and_duplicates_inside_a_batch_are_dropped() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let mut a = track("u1", "Skewed");
    a["timestamp"] = json!("2020-01-01T00:00:00.000Z");
    a["messageId"] = json!("same-id");
    let r = srv
        .post(
            "/v1/batch",
            Some(KEY),
            &json!({"batch": [a, a], "sentAt": "2020-01-01T00:00:03.000Z"}),
        )
        .await;
    assert_success(&r);
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(
        millis_of(&m.payload["receivedAt"]) - millis_of(&m.payload["timestamp"]),
        3000,
        "{:#}",
        m.payload
    );
    assert_eq!(m.payload["originalTimestamp"], "2020-01-01T00:00:00.000Z");
    srv.wait_for(2, State::Duplicate).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.with_activity("Skewed").len(), 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_settings_header_cannot_set_the_endpoint_and_is_validated() {
    let fake = Fake::ok().await;
    let dir = common::place();
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
async fn non_retryable_statuses_are_dead_at_once() {
    let fake = Fake::with(|_, p| match p.get("sdr_u").map(String::as_str) {
        Some("u501") => reply(501),
        Some("u404") => reply(404),
        Some("u201") => reply(201),
        _ => reply(200),
    })
    .await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    for user in ["u501", "u404", "u201"] {
        assert_success(&srv.post("/v1/track", Some(KEY), &track(user, "E")).await);
    }
    for (id, status) in [(1, 501), (2, 404)] {
        let m = srv.wait_for(id, State::Dead).await;
        assert_eq!(m.code.as_deref(), Some("rejected_by_totango"), "{m:#?}");
        assert_eq!(
            m.last_response.as_ref().and_then(|l| l.status),
            Some(status)
        );
        assert_eq!(m.attempts, 1, "{m:#?}");
    }
    srv.wait_for(3, State::Delivered).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.hits().len(), 3, "no retries: {:#?}", fake.hits());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_resends_only_the_requests_totango_has_not_accepted() {
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    // A page sends two activities; the second fails once.
    let fake = Fake::with(move |_, p| {
        if p.get("sdr_a").map(String::as_str) == Some("Viewed Docs Index Page")
            && !f.swap(true, Ordering::SeqCst)
        {
            reply(503)
        } else {
            reply(200)
        }
    })
    .await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let page = json!({"userId": "u1", "context": {"groupId": "acc1"},
                      "category": "Docs", "name": "Index"});
    assert_success(&srv.post("/v1/page", Some(KEY), &page).await);
    let m = srv.wait_for(1, State::Delivered).await;
    assert_eq!(m.sent, 2, "{m:#?}");
    assert_eq!(
        fake.with_activity("Viewed Docs Page").len(),
        1,
        "{:#?}",
        fake.hits()
    );
    let index: Vec<u16> = fake
        .with_activity("Viewed Docs Index Page")
        .iter()
        .map(|h| h.status)
        .collect();
    assert_eq!(index, [503, 200]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_with_flaky_totango_keep_each_users_update_order() {
    // Every third request fails.
    let fake = Fake::with(|n, _| if n % 3 == 0 { reply(503) } else { reply(200) }).await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    let users = 8;
    let per_user = 8;
    let mut batch = Vec::new();
    for e in 0..per_user {
        for u in 0..users {
            batch.push(identify(&format!("user-{u}"), &e.to_string()));
        }
    }
    assert_success(
        &srv.post("/v1/batch", Some(KEY), &json!({"batch": batch}))
            .await,
    );
    for id in 1..=(users * per_user) as i64 {
        srv.wait_for(id, State::Delivered).await;
    }
    for u in 0..users {
        let events: Vec<String> = fake
            .for_user(&format!("user-{u}"))
            .iter()
            .filter(|h| h.status == 200)
            .map(|h| h.get("sdr_u.n").unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..per_user).map(|e| e.to_string()).collect();
        assert_eq!(events, expected, "user-{u}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_without_activity_is_filtered_and_sends_nothing() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

/// Sends a raw HTTP/1.1 request and returns the status line and body.
async fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before it has read everything.
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.limits.max_body_bytes = 4096;
    let srv = Server::start(c).await;

    let mut body = serde_json::to_vec(&track("u1", "Chunked")).unwrap();
    body.truncate(body.len() - 1);
    body.extend_from_slice(b",\"properties\":{\"blob\":\"");
    body.extend(std::iter::repeat_n(b'x', 6000));
    body.extend_from_slice(b"\"}}");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"));
    let mut req = format!(
        "POST /v1/track HTTP/1.1\r\nHost: test\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (status, text) = raw_http(srv.addr, &req).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("body_too_large"), "{text}");
    assert_eq!(srv.counts().await, counts(&[]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_use_the_endpoint_configured_at_restart() {
    let fake = Fake::ok().await;
    let dir = common::place();
    // First run: Totango unreachable (nothing listens on port 9).
    let srv = Server::start(config(&dir, "http://127.0.0.1:9")).await;
    for event in ["1", "2"] {
        assert_success(&srv.post("/v1/track", Some(KEY), &track("u1", event)).await);
    }
    let m = srv
        .wait_until(1, "a failed connection", |m| m.attempts >= 1)
        .await;
    assert!(
        m.last_response
            .as_ref()
            .and_then(|l| l.error.as_ref())
            .is_some(),
        "a connection error is recorded: {m:#?}"
    );
    assert_eq!(m.state, State::Pending, "connection errors are retried");
    srv.stop().await;

    // The operator fixes the endpoint and restarts.
    let srv = Server::start(config(&dir, &fake.uri())).await;
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;
    let mut sent: Vec<String> = fake
        .hits()
        .iter()
        .map(|h| h.get("sdr_a").unwrap().to_owned())
        .collect();
    sent.sort_unstable();
    assert_eq!(sent, ["1", "2"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_write_keys_any_key_is_accepted() {
    let fake = Fake::ok().await;
    let dir = common::place();
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
async fn concurrent_requests_are_all_stored_and_delivered() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Arc::new(Server::start(config(&dir, &fake.uri())).await);

    let n = 60;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let srv = srv.clone();
        tasks.spawn(async move {
            let path = ["/v1/track", "/segment", "/webhook"][i % 3];
            let mut m = track(&format!("c{}", i % 7), &format!("C{i}"));
            m["messageId"] = json!(format!("conc-{i}"));
            srv.post(path, Some(KEY), &m).await.status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    for id in 1..=n as i64 {
        srv.wait_for(id, State::Delivered).await;
    }
    assert_eq!(srv.counts().await, counts(&[("delivered", n as u64)]));
    let mut events: Vec<String> = fake
        .hits()
        .iter()
        .map(|h| h.get("sdr_a").unwrap().to_owned())
        .collect();
    events.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("C{i}")).collect();
    expected.sort();
    assert_eq!(events, expected, "each exactly once");
    Arc::into_inner(srv).expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_accepted_and_limited_after_decompression() {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let gzip = |bytes: &[u8]| {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let send = |body: Vec<u8>| {
        srv.send(
            srv.http
                .post(srv.url("/v1/track"))
                .basic_auth(KEY, Some(""))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(body),
        )
    };
    let r = send(gzip(&serde_json::to_vec(&track("u-gz", "Zipped")).unwrap())).await;
    assert_success(&r);
    srv.wait_for(1, State::Delivered).await;
    assert_eq!(fake.with_activity("Zipped").len(), 1);
    // 2 MB of zeros compresses to a few KB; the limit applies to what it expands to.
    let bomb = gzip(&vec![b' '; 2_000_000]);
    assert!(bomb.len() < 10_000);
    let r = send(bomb).await;
    assert_error(&r, 413, "body_too_large", "body");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_with_secret_authenticates_before_parsing() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let mut c = config(&dir, &fake.uri());
    c.auth.webhook_secret = Some("s3cret".into());
    let srv = Server::start(c).await;
    let r = srv.post_raw("/webhook", None, "{not json").await;
    assert_error(&r, 401, "unauthorized", "X-Signature");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_message_ids_are_filled_not_deduplicated() {
    let fake = Fake::ok().await;
    let dir = common::place();
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
async fn empty_partner_settings_leave_the_configured_ones() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_warnings_are_answered_and_kept() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_content_encoding_is_a_json_415() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let r = srv
        .send(
            srv.request("/v1/track", Some(KEY), b"xx".to_vec())
                .header("content-encoding", "br-unknown"),
        )
        .await;
    assert_error(&r, 415, "unsupported_encoding", "Content-Encoding");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_api_token_is_used_and_not_kept_once_delivered() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_backlog_bound_ingest_answers_503_and_keeps_what_it_had() {
    // Totango unreachable: everything stays queued.
    let dir = common::place();
    let mut c = config(&dir, "http://127.0.0.1:9");
    c.storage.max_backlog_messages = 3;
    let srv = Server::start(c).await;
    for i in 0..3 {
        assert_success(
            &srv.post("/v1/track", Some(KEY), &track("u1", &format!("E{i}")))
                .await,
        );
    }
    // The monitor notices within a second or so; poll until it does.
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        let r = srv.post("/v1/track", Some(KEY), &track("u1", "More")).await;
        if r.status == 503 {
            break r;
        }
        assert_success(&r);
        assert!(Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.json["code"], "backpressure", "{refused:#?}");
    assert!(
        refused.json["message"]
            .as_str()
            .unwrap()
            .contains("max_backlog_messages"),
        "{refused:#?}"
    );
    assert_eq!(refused.headers["retry-after"], "30");
    // Refused at acceptance already; `/readyz` follows the monitor's reading.
    let deadline = Instant::now() + WAIT;
    let ready = loop {
        let ready = srv.send(srv.http.get(srv.url("/readyz"))).await;
        if ready.status == 503 || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json["status"], "backpressure");
    assert!(
        ready.json["reason"].as_str().unwrap().contains("backlog"),
        "{ready:#?}"
    );
    // Nothing accepted before was touched.
    let counts = srv.counts().await;
    let pending = counts.get("pending").copied().unwrap_or(0);
    assert!(pending >= 3, "{counts:?}");
    assert_eq!(counts.len(), 1, "{counts:?}");
    srv.stop().await;
}

/// Bursts from several clients at once cannot overshoot the backlog bound:
/// every request is checked at acceptance against the last reading plus what
/// was admitted since, not only by the once-a-second monitor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bursts_do_not_overshoot_the_backlog_bound() {
    let dir = common::place();
    let mut c = config(&dir, "http://127.0.0.1:9");
    c.storage.max_backlog_messages = 1_000;
    let srv = Arc::new(Server::start(c).await);
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let srv = srv.clone();
            tokio::spawn(async move {
                let mut accepted = 0usize;
                for round in 0..10 {
                    let items: Vec<Value> = (0..100)
                        .map(|i| {
                            json!({"type": "track", "userId": format!("u{client}-{i}"),
                                   "event": format!("E{round}"),
                                   "context": {"groupId": "acme"}})
                        })
                        .collect();
                    let r = srv
                        .post("/v1/batch", Some(KEY), &json!({"batch": items}))
                        .await;
                    match r.status {
                        200 => accepted += 100,
                        503 => assert_eq!(r.json["code"], "backpressure", "{r:#?}"),
                        other => panic!("unexpected answer {other}: {r:#?}"),
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for c in clients {
        accepted += c.await.unwrap();
    }
    let pending = srv.counts().await.get("pending").copied().unwrap_or(0);
    assert_eq!(
        pending as usize, accepted,
        "every accepted message is queued"
    );
    assert!(
        accepted <= 1_000,
        "{accepted} messages queued against a bound of 1,000"
    );
    assert!(accepted >= 500, "only {accepted} accepted below the bound");
    Arc::into_inner(srv).expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_disk_floor_ingest_answers_503() {
    let fake = Fake::ok().await;
    let dir = common::place();
    if dir.is_postgres() {
        eprintln!("skipping: the free disk floor watches a SQLite file's disk");
        return;
    }
    let mut c = config(&dir, &fake.uri());
    // No disk has this much free: the floor is always crossed.
    c.storage.min_free_disk_bytes = u64::MAX;
    let srv = Server::start(c).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = srv.send(srv.http.get(srv.url("/readyz"))).await;
        if ready.status == 503 {
            assert!(
                ready.json["reason"]
                    .as_str()
                    .unwrap()
                    .contains("min_free_disk_bytes")
            );
            break;
        }
        assert!(Instant::now() < deadline, "never not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = srv.post("/v1/track", Some(KEY), &track("u1", "E")).await;
    assert_eq!(r.status, 503, "{r:#?}");
    assert_eq!(r.json["code"], "backpressure");
    assert_eq!(srv.counts().await, counts(&[]));
    srv.stop().await;
}

/// Every stored message (newest first), read back from storage.
async fn all_stored(srv: &Server) -> Vec<StoredMessage> {
    srv.storage
        .list(Default::default(), 10_000)
        .await
        .expect("storage readable")
}

/// Issue 14.13: a `writeKey` in a body is a credential, not data: it is
/// stripped before storage on every way in (it was kept on `/segment` and
/// `/webhook`, and shown by the admin API), rejected messages included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_key_in_a_body_is_never_stored() {
    let fake = Fake::ok().await;
    let dir = common::place();
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

/// Issue 14.3 (ingest side): a batch whose large `context` is merged into
/// many items that are rejected (no `userId`) stored the merged context with
/// each of them: 34 KB sent became ~4 MB of rejected rows. Messages that will
/// never be sent are now stored as their client sent them, so what a request
/// stores stays within a small multiple of its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_batch_items_do_not_store_the_batch_context_each() {
    let fake = Fake::ok().await;
    let dir = common::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;
    let items: Vec<Value> = (0..130)
        .map(|i| json!({"type": "track", "event": format!("e{i}")}))
        .collect();
    let mut body = json!({
        "batch": items,
        "context": {"groupId": "acc1", "blob": "x".repeat(30_000)},
    });
    // One item that will be sent keeps the merged context (delivery needs it).
    body["batch"]
        .as_array_mut()
        .unwrap()
        .push(track("u1", "Sent"));
    let sent = serde_json::to_vec(&body).unwrap();
    let r = srv.post_raw("/v1/batch", Some(KEY), sent.clone()).await;
    assert_success(&r);

    let stored = all_stored(&srv).await;
    assert_eq!(stored.len(), 131);
    let rejected: Vec<&StoredMessage> = stored
        .iter()
        .filter(|m| m.state == State::Rejected)
        .collect();
    assert_eq!(rejected.len(), 130, "{:?}", srv.counts().await);
    for m in &rejected {
        assert_eq!(m.code.as_deref(), Some("missing_user_id"), "{m:#?}");
        assert!(m.payload.get("context").is_none(), "{}", m.payload);
        assert!(m.payload["event"].is_string() && m.payload["messageId"].is_string());
    }
    let kept = stored.iter().find(|m| m.state != State::Rejected).unwrap();
    assert_eq!(
        kept.payload["context"]["blob"].as_str().unwrap().len(),
        30_000
    );
    let total: usize = stored.iter().map(|m| m.payload.to_string().len()).sum();
    assert!(
        total < 3 * sent.len(),
        "{} bytes sent were stored as {total} bytes of payloads",
        sent.len()
    );
    srv.stop().await;
}
