//! End-to-end tests of the real server: HTTP in (Tracking API, `/segment`,
//! `/webhook`), storage, delivery to a fake Totango, and restart
//! recovery. Every test starts its own server on an ephemeral port with its
//! own database: a SQLite file, or a PostgreSQL database with
//! `TEST_BACKEND=postgres`.

mod backlog;
mod batch;
mod bodies;
mod operations;
mod ordering;
mod restart;
mod retries;
mod secrets;
mod segment;
mod settings;
mod tracking;
mod webhook;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;
use totango_destination::config::{Config, Runtime, SourceConfig};
use totango_destination::mapping::SettingsPatch;
use totango_destination::server::open_storage;
use totango_destination::storage::{State, Storage, StoredMessage};

use crate::support::TestApp;
use crate::support::totango::{FakeTotango, Hit, Params, Reply};
use crate::support::wait;

const KEY: &str = "key-1";
const SERVICE: &str = "SP-3126-05";
const WAIT: Duration = Duration::from_secs(10);

/// The fake Totango of these tests: support's, answering `decide(n, params)`.
struct Fake;

impl Fake {
    async fn with(decide: impl Fn(usize, &Params) -> Reply + Send + Sync + 'static) -> FakeTotango {
        FakeTotango::replying(decide).await
    }

    /// Answers 200 to everything.
    async fn ok() -> FakeTotango {
        FakeTotango::ok().await
    }
}

fn reply(status: u16) -> Reply {
    Reply::status(status)
}

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

/// A configuration for a test: storage in `place`, default service, one write
/// key, fast retries.
fn config(place: &crate::support::TestPlace, endpoint: &str) -> Config {
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
async fn stored_settings(place: &crate::support::TestPlace, id: i64) -> String {
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

/// The app in this process ([`TestApp`]) with a client and these tests' ways
/// to call it and read its storage.
struct Server {
    app: TestApp,
    addr: SocketAddr,
    storage: Arc<dyn Storage>,
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
        Server::of(TestApp::start(config).await)
    }

    async fn start_with(runtime: Runtime, storage: Arc<dyn Storage>) -> Server {
        Server::of(TestApp::start_with(runtime, storage).await)
    }

    fn of(app: TestApp) -> Server {
        Server {
            addr: app.addr,
            storage: app.storage.clone(),
            app,
            http: reqwest::Client::new(),
        }
    }

    /// Stops the server (as on SIGTERM) and waits until it has returned.
    /// Returns the runtime, to start again on the same database.
    async fn stop(self) -> Runtime {
        tokio::time::timeout(WAIT, self.app.stop())
            .await
            .expect("server stops in time")
    }

    fn url(&self, path: &str) -> String {
        self.app.url(path)
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
        wait::until(WAIT, Duration::from_millis(20), async || {
            let seen = self.storage.get(id).await.expect("storage readable");
            if let Some(m) = &seen {
                if m.state == state {
                    return Ok(m.clone());
                }
                if m.state != State::Pending {
                    panic!("message {id} ended {:?}, not {state:?}: {m:#?}", m.state);
                }
            }
            Err(seen)
        })
        .await
        .unwrap_or_else(|seen| panic!("message {id} did not become {state:?} in time: {seen:#?}"))
    }

    /// Waits until `check` holds for message `id`.
    async fn wait_until(
        &self,
        id: i64,
        what: &str,
        check: impl Fn(&StoredMessage) -> bool,
    ) -> StoredMessage {
        wait::until(WAIT, Duration::from_millis(20), async || {
            let seen = self.storage.get(id).await.expect("storage readable");
            match seen.as_ref().filter(|m| check(m)) {
                Some(m) => Ok(m.clone()),
                None => Err(seen),
            }
        })
        .await
        .unwrap_or_else(|seen| panic!("message {id}: {what} did not happen in time: {seen:#?}"))
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

fn settings_header(v: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).unwrap())
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

/// Every stored message (newest first), read back from storage.
async fn all_stored(srv: &Server) -> Vec<StoredMessage> {
    srv.storage
        .list(Default::default(), 10_000)
        .await
        .expect("storage readable")
}
