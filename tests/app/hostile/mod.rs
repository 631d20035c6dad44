//! A hostile-input corpus against the real server (issue 6): every way in ×
//! malformed bodies, wrong types, huge numbers, deep nesting, control
//! characters, bad encodings, oversized bodies, bad credentials, bad paths,
//! methods and headers. Each input is sent as raw bytes over TCP (so invalid
//! UTF-8, NUL bytes and broken framing reach the server as written) and must be
//! answered cleanly: no 5xx except a deliberate 503, a JSON `{message, code}`
//! for every 4xx the server itself writes, the expected status, and `/healthz`
//! still answering afterwards.
//!
//! The answers the fixes for issues 6 and 7 settled are also asserted strictly,
//! with the check of each answer beyond its status, in the small tests at the
//! end.

mod bodies;
mod corpus;
mod fixed;
mod requests;

use bodies::*;
use fixed::*;
use requests::*;

use crate::support::TestApp;
use crate::support::totango::FakeTotango;
use base64::Engine;
use flate2::Compression;
use flate2::write::{GzEncoder, ZlibEncoder};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;
use std::io::Write;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use totango_destination::config::Config;

const WRITE_KEY: &str = "wk-hostile";
const SECRET: &str = "whsec-hostile";
const ADMIN_TOKEN: &str = "admin-hostile-token";
/// The server's body read deadline in these tests (ms): short, so a stalled
/// body is answered quickly.
const BODY_TIMEOUT_MS: u64 = 1500;

const SINGLE_CALLS: [&str; 6] = ["identify", "group", "page", "screen", "track", "alias"];
const ALL_INGEST: [&str; 10] = [
    "/v1/identify",
    "/v1/group",
    "/v1/page",
    "/v1/screen",
    "/v1/track",
    "/v1/alias",
    "/v1/batch",
    "/v1/import",
    "/segment",
    "/webhook",
];

// ---------------------------------------------------------------- the server

struct Env {
    server: TestApp,
    _fake: FakeTotango,
    _place: crate::support::TestPlace,
}

/// The real server with write keys, a webhook secret and an admin token,
/// configured through a TOML file as an operator would (the secret types of
/// the configuration then do not matter here). `open`: no write key, no admin
/// token, no webhook secret (the quick start).
async fn start(open: bool) -> Env {
    start_with(open, "").await
}

/// [`start`], with `extra` TOML appended (tables of their own).
async fn start_with(open: bool, extra: &str) -> Env {
    let fake = FakeTotango::ok().await;
    // SQLite, or PostgreSQL with TEST_BACKEND=postgres (tests/support).
    let place = crate::support::place();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\n\
         [storage]\nurl = \"{}\"\n\
         [totango]\nservice_id = \"SP-1234-01\"\nendpoint = \"{}\"\n\
         [limits]\nbody_read_timeout_ms = {BODY_TIMEOUT_MS}\n",
        place.storage_url(),
        fake.uri()
    );
    if !open {
        toml.push_str(&format!(
            "[auth]\nwrite_keys = [\"{WRITE_KEY}\"]\nwebhook_secret = \"{SECRET}\"\n\
             [admin]\ntoken = \"{ADMIN_TOKEN}\"\n"
        ));
    }
    toml.push_str(extra);
    let path = place.path().join("td.toml");
    std::fs::write(&path, toml).unwrap();
    let mut config = Config::load(Some(&path)).unwrap();
    place.configure(&mut config);
    let server = TestApp::start(config).await;
    Env {
        server,
        _fake: fake,
        _place: place,
    }
}

// ------------------------------------------------------------ raw HTTP client

#[derive(Clone, Debug)]
enum Length {
    /// `Content-Length` of the body as sent.
    Auto,
    /// No `Content-Length` (headers may frame the body themselves).
    Omit,
    /// This value, whatever the body.
    Declared(String),
}

/// What a case must get back.
#[derive(Clone, Debug)]
struct Expect {
    statuses: Vec<u16>,
    /// The `code` of the JSON error body, when the status is a 4xx.
    code: Option<&'static str>,
    /// Text the error message must contain (the field it names).
    mentions: Option<String>,
    /// Answered by the HTTP layer itself (hyper: 400/414/431 with no body) or
    /// a HEAD request: the JSON error shape is not required.
    protocol: bool,
}

fn status(s: u16) -> Expect {
    Expect {
        statuses: vec![s],
        code: None,
        mentions: None,
        protocol: false,
    }
}

fn any_of(s: &[u16]) -> Expect {
    Expect {
        statuses: s.to_vec(),
        ..status(0)
    }
}

fn error(s: u16, code: &'static str) -> Expect {
    Expect {
        code: Some(code),
        ..status(s)
    }
}

impl Expect {
    fn naming(mut self, text: impl Into<String>) -> Expect {
        self.mentions = Some(text.into());
        self
    }

    fn protocol(mut self) -> Expect {
        self.protocol = true;
        self
    }
}

#[derive(Clone, Debug)]
struct Case {
    name: String,
    method: String,
    target: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    length: Length,
    expect: Expect,
}

impl Case {
    fn new(name: impl Into<String>, method: &str, target: impl Into<Vec<u8>>) -> Case {
        Case {
            name: name.into(),
            method: method.into(),
            target: target.into(),
            headers: vec![],
            body: vec![],
            length: Length::Auto,
            expect: any_of(&[200]),
        }
    }

    fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Case {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn without(mut self, name: &str) -> Case {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Case {
        self.body = body.into();
        self
    }

    fn length(mut self, length: Length) -> Case {
        self.length = length;
        self
    }

    fn expect(mut self, expect: Expect) -> Case {
        self.expect = expect;
        self
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Sends the case as raw bytes on a new connection and reads the answer.
/// The body is written while the answer is read, so an early answer (413
/// before the body is read) is seen rather than a broken pipe.
async fn send(base: &str, case: &Case) -> Result<Answer, String> {
    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = stream.into_split();
    let mut head = Vec::new();
    head.extend_from_slice(case.method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(&case.target);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !case
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        head.extend_from_slice(format!("Host: {addr}\r\n").as_bytes());
    }
    head.extend_from_slice(b"Connection: close\r\n");
    for (n, v) in &case.headers {
        head.extend_from_slice(n.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v);
        head.extend_from_slice(b"\r\n");
    }
    match &case.length {
        Length::Auto => {
            head.extend_from_slice(format!("Content-Length: {}\r\n", case.body.len()).as_bytes())
        }
        Length::Omit => {}
        Length::Declared(v) => {
            head.extend_from_slice(format!("Content-Length: {v}\r\n").as_bytes())
        }
    }
    head.extend_from_slice(b"\r\n");
    let body = case.body.clone();
    let writer = tokio::spawn(async move {
        // Errors are expected when the server answers before reading the body.
        if wr.write_all(&head).await.is_ok() {
            for chunk in body.chunks(64 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    break;
                }
            }
        }
        // Keep the write side open: a half-close would end the body early.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(wr);
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                // A reset after the answer was read still leaves the answer.
                Err(_) => break,
            }
        }
    })
    .await;
    writer.abort();
    if read.is_err() {
        return Err(format!(
            "no complete answer within 20 s ({} bytes)",
            raw.len()
        ));
    }
    parse_answer(&raw, case.method == "HEAD")
}

fn parse_answer(mut raw: &[u8], head_request: bool) -> Result<Answer, String> {
    // Skip interim answers (`100 Continue`).
    while raw.starts_with(b"HTTP/1.1 1") {
        match raw.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => raw = &raw[end + 4..],
            None => break,
        }
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no answer: {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked && !head_request {
        body = dechunk(&body)?;
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
}

/// Checks one answer against the rules every input must meet, and the case's
/// own expectation. Returns a description of what is wrong.
fn judge(case: &Case, answer: &Result<Answer, String>) -> Option<String> {
    let a = match answer {
        Ok(a) => a,
        Err(e) => return Some(e.clone()),
    };
    let body = String::from_utf8_lossy(&a.body);
    let body: String = body.chars().take(300).collect();
    // 501 is the partner protocol's deliberate answer to an unsupported call.
    let deliberate_501 = a.status == 501 && case.expect.statuses.contains(&501);
    if a.status >= 500 && a.status != 503 && !deliberate_501 {
        return Some(format!("server error {}: {body}", a.status));
    }
    if a.status == 503 && a.header("retry-after").is_none() && a.json().is_none() {
        return Some(format!("503 without Retry-After or explanation: {body}"));
    }
    if !case.expect.statuses.contains(&a.status) {
        return Some(format!(
            "status {} (expected one of {:?}): {body}",
            a.status, case.expect.statuses
        ));
    }
    if (400..500).contains(&a.status) && !case.expect.protocol {
        let Some(v) = a.json() else {
            return Some(format!("{} without a JSON body: {body:?}", a.status));
        };
        let (Some(message), Some(code)) = (v["message"].as_str(), v["code"].as_str()) else {
            return Some(format!("{} body lacks message/code: {body}", a.status));
        };
        if message.is_empty() || code.is_empty() {
            return Some(format!(
                "{} with an empty message or code: {body}",
                a.status
            ));
        }
        if let Some(want) = case.expect.code.filter(|want| code != *want) {
            return Some(format!("code {code:?}, expected {want:?}: {body}"));
        }
        if let Some(want) = case
            .expect
            .mentions
            .as_ref()
            .filter(|w| !message.contains(w.as_str()))
        {
            return Some(format!("message does not name {want:?}: {body}"));
        }
    }
    None
}

/// Runs every case (a few at a time), then checks `/healthz`; panics listing
/// every case that was not answered cleanly. Returns how many ran.
async fn run_corpus(base: &str, cases: Vec<Case>) -> usize {
    let n = cases.len();
    let mut failures = Vec::new();
    for group in cases.chunks(8) {
        let handles: Vec<_> = group
            .iter()
            .cloned()
            .map(|c| {
                let base = base.to_owned();
                tokio::spawn(async move {
                    let answer = send(&base, &c).await;
                    (c, answer)
                })
            })
            .collect();
        for h in handles {
            let (c, a) = h.await.unwrap();
            if let Some(why) = judge(&c, &a) {
                failures.push(format!("{}: {why}", c.name));
            }
        }
    }
    assert_healthy(base).await;
    assert!(
        failures.is_empty(),
        "{} of {n} hostile inputs were not answered as expected:\n{}",
        failures.len(),
        failures.join("\n")
    );
    n
}

async fn assert_healthy(base: &str) {
    let health = send(
        base,
        &Case::new("healthz", "GET", "/healthz").length(Length::Omit),
    )
    .await
    .expect("/healthz answers after the corpus");
    assert_eq!(health.status, 200, "/healthz after the corpus");
}

// ------------------------------------------------------------- case builders

fn hmac_hex(data: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

fn basic(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    // `Content-Encoding: deflate` is the zlib format (RFC 9110).
    let mut e = ZlibEncoder::new(Vec::new(), Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A valid message for a path, with a unique messageId.
fn message(path: &str, tag: &str) -> Value {
    let call = path
        .strip_prefix("/v1/")
        .filter(|c| SINGLE_CALLS.contains(c));
    let m = json!({
        "type": call.unwrap_or("track"),
        "messageId": format!("hostile-{tag}"),
        "userId": "u-hostile",
        "groupId": "acct-hostile",
        "event": "Hostile Input",
        "name": "Page",
        "traits": {"plan": "Paying"},
        "properties": {"category": "Docs"},
        "context": {"groupId": "acct-hostile"},
    });
    m
}

fn is_batch(path: &str) -> bool {
    path == "/v1/batch" || path == "/v1/import"
}

/// The body a path takes for one message.
fn wrap(path: &str, msg: &Value) -> Vec<u8> {
    if is_batch(path) {
        json!({"batch": [msg]}).to_string().into_bytes()
    } else {
        msg.to_string().into_bytes()
    }
}

/// A POST to an ingest path with valid credentials for `plain` (the body as
/// the server will see it after any decompression).
fn ingest(name: impl Into<String>, path: &str, plain: &[u8]) -> Case {
    let c = Case::new(name, "POST", path)
        .header("Content-Type", "application/json")
        .body(plain.to_vec());
    if path == "/webhook" {
        c.header("X-Signature", hmac_hex(plain))
    } else {
        c.header("Authorization", basic(WRITE_KEY))
    }
}
