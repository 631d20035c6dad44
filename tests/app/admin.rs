//! The admin JSON API: bearer auth, filters, pagination, replay of dead
//! messages (one and all matching), stats.

use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::TestApp;
use crate::support::totango::{FakeTotango, Reply};
use crate::support::wait;
use totango_destination::storage::{State, Storage};

struct Srv {
    base: String,
    http: reqwest::Client,
    storage: Arc<dyn Storage>,
    fake: FakeTotango,
    /// What the fake Totango answers.
    answer: Arc<Mutex<Reply>>,
    server: TestApp,
    /// The admin token: configured, or generated at first start.
    token: String,
    dir: crate::support::TestPlace,
    /// `storage.url`, to look at the sessions table.
    storage_url: String,
}

impl Srv {
    async fn start(token: Option<&str>, totango_status: u16) -> Srv {
        let answer = Arc::new(Mutex::new(Reply::status(totango_status).body("answer")));
        let fake = {
            let answer = answer.clone();
            FakeTotango::replying(move |_, _| answer.lock().unwrap().clone()).await
        };
        let dir = crate::support::place();
        let mut c = crate::support::config(&dir, &fake.uri());
        c.totango.api_token = Some("sdr-secret".into());
        c.admin.token = token.map(Into::into);
        let storage_url = c.storage.url.clone();
        let server = TestApp::start(c).await;
        let token = match token {
            Some(t) => t.to_owned(),
            None => {
                // The server writes it while starting; wait for its first answer.
                let _ = reqwest::get(format!("{}/healthz", server.base)).await;
                std::fs::read_to_string(dir.path().join("admin-token"))
                    .expect("a token was generated beside the database")
                    .trim()
                    .to_owned()
            }
        };
        Srv {
            base: server.base.clone(),
            http: reqwest::Client::new(),
            storage: server.storage.clone(),
            fake,
            answer,
            server,
            token,
            dir,
            storage_url,
        }
    }

    async fn track(&self, user: &str, event: &str) {
        let body = format!(
            r#"{{"userId":"{user}","event":"{event}","context":{{"groupId":"acct-{user}"}}}}"#
        );
        let r = self
            .http
            .post(format!("{}/v1/track", self.base))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    /// Calls with `token`, or with the server's own admin token when `None`.
    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
        let req = self.http.request(method, format!("{}{path}", self.base));
        self.send(req.bearer_auth(token.unwrap_or(&self.token)))
            .await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
        )
    }

    async fn wait_all(&self, state: State, n: usize) {
        wait::until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            async || {
                let counts = self.storage.counts().await.unwrap();
                if counts.iter().any(|(s, c)| *s == state && *c as usize == n) {
                    Ok(())
                } else {
                    Err(counts)
                }
            },
        )
        .await
        .unwrap_or_else(|counts| panic!("never {n} {state:?}: {counts:?}"));
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_when_configured() {
    let srv = Srv::start(Some("admin-secret"), 200).await;
    for (token, want) in [("wrong", 401), ("admin-secret", 200), ("admin-secre", 401)] {
        let (status, body) = srv
            .call(reqwest::Method::GET, "/api/stats", Some(token))
            .await;
        assert_eq!(status, want, "{token:?}: {body}");
    }
    // Without any credential: 401 asking for Bearer (not Basic).
    let r = srv
        .http
        .post(format!("{}/api/replay", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    // The scheme is case-insensitive.
    let r = srv
        .http
        .get(format!("{}/api/stats", srv.base))
        .header("authorization", "bEaReR admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The page is served to a signed-in operator only; others get the sign-in form.
    let page = srv.http.get(format!("{}/", srv.base)).send().await.unwrap();
    assert_eq!(page.status(), 401);
    let text = page.text().await.unwrap();
    assert!(
        text.contains("Sign in") && !text.contains("id=\"rows\""),
        "{text}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_one_is_generated_and_required_even_locally() {
    let srv = Srv::start(None, 200).await;
    assert_eq!(srv.token.len(), 64, "a 256-bit token, hex");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(srv.dir.path().join("admin-token")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    // A plain reverse proxy makes every request look local: no exception.
    for path in ["/api/stats", "/api/messages", "/"] {
        let r = srv
            .http
            .get(format!("{}{path}", srv.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let (status, _) = srv.call(reqwest::Method::GET, "/api/stats", None).await;
    assert_eq!(status, 200);

    // Signing in (the token in a POST body) sets a random session cookie.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = sign_in(&http, &srv.base, &srv.token).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains(&srv.token), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(format!("{}/", srv.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(page.text().await.unwrap().contains("id=\"rows\""));
    let wrong = sign_in(&http, &srv.base, "nope").await;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    // The token is never taken from the address (history, proxy logs).
    let r = http
        .get(format!("{}/login?token={}", srv.base, srv.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the sign-in form");
    assert!(r.headers().get("set-cookie").is_none());

    // With the cookie, changes must come from the page's own origin.
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = http
            .post(format!("{}/api/replay", srv.base))
            .header("cookie", &session)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
    }
    let same = http
        .post(format!("{}/api/replay", srv.base))
        .header("cookie", &session)
        .header("origin", srv.base.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), 200);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filters_and_pages_newest_first() {
    let srv = Srv::start(None, 200).await;
    for i in 0..5 {
        srv.track(&format!("u{i}"), "Listed").await;
    }
    srv.wait_all(State::Delivered, 5).await;
    let (status, page1) = srv
        .call(reqwest::Method::GET, "/api/messages?limit=2", None)
        .await;
    assert_eq!(status, 200, "{page1}");
    let ids = |v: &Value| {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&page1), [5, 4]);
    assert_eq!(page1["next"], 4);
    let (_, page3) = srv
        .call(reqwest::Method::GET, "/api/messages?limit=2&before=2", None)
        .await;
    assert_eq!(ids(&page3), [1]);
    assert_eq!(page3["next"], Value::Null);

    let m = &page1["messages"][0];
    assert_eq!(m["outcome"], "delivered");
    assert_eq!(m["payload"]["event"], "Listed");
    assert_eq!(m["last_response"]["status"], 200);
    let url = m["requests"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&srv.fake.uri()) && url.contains("sdr_a=Listed"),
        "{url}"
    );
    assert!(
        !m.to_string().contains("sdr-secret"),
        "the SDR token is never shown: {m}"
    );

    let (_, by_user) = srv
        .call(reqwest::Method::GET, "/api/messages?userId=u3", None)
        .await;
    assert_eq!(ids(&by_user), [4]);
    let (_, by_group) = srv
        .call(
            reqwest::Method::GET,
            "/api/messages?groupId=acct-u0&outcome=delivered",
            None,
        )
        .await;
    assert_eq!(ids(&by_group), [1]);
    let message_id = m["message_id"].as_str().unwrap().to_owned();
    let (_, by_mid) = srv
        .call(
            reqwest::Method::GET,
            &format!("/api/messages?messageId={message_id}"),
            None,
        )
        .await;
    assert_eq!(ids(&by_mid), [5]);
    let (status, err) = srv
        .call(reqwest::Method::GET, "/api/messages?outcome=lost", None)
        .await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_field")));
    assert!(err["message"].as_str().unwrap().starts_with("outcome"));
    let (status, one) = srv
        .call(reqwest::Method::GET, "/api/messages/3", None)
        .await;
    assert_eq!((status, one["id"].as_i64()), (200, Some(3)));
    let (status, _) = srv
        .call(reqwest::Method::GET, "/api/messages/99", None)
        .await;
    assert_eq!(status, 404);

    let (_, stats) = srv.call(reqwest::Method::GET, "/api/stats", None).await;
    assert_eq!(stats["outcomes"]["delivered"], 5);
    assert_eq!(stats["outcomes"]["dead"], 0);
    assert_eq!(stats["queue"]["depth"], 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_messages_are_replayed_one_or_all() {
    let srv = Srv::start(None, 400).await;
    for i in 0..3 {
        srv.track(&format!("u{i}"), "Refused").await;
    }
    srv.wait_all(State::Dead, 3).await;
    assert_eq!(srv.fake.hits().len(), 3);

    // Totango accepts from now on.
    srv.fake.clear();
    *srv.answer.lock().unwrap() = Reply::status(200);

    let (status, body) = srv
        .call(reqwest::Method::POST, "/api/messages/1/replay", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ids"], serde_json::json!([1]));
    srv.wait_all(State::Delivered, 1).await;
    let (status, body) = srv
        .call(reqwest::Method::POST, "/api/messages/1/replay", None)
        .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("not_dead")));

    let (status, body) = srv
        .call(reqwest::Method::POST, "/api/replay?outcome=delivered", None)
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = srv
        .call(reqwest::Method::POST, "/api/replay?userId=u2", None)
        .await;
    assert_eq!((status, body["replayed"].as_u64()), (200, Some(1)));
    srv.wait_all(State::Delivered, 2).await;
    let (_, body) = srv.call(reqwest::Method::POST, "/api/replay", None).await;
    assert_eq!(body["ids"], serde_json::json!([2]));
    srv.wait_all(State::Delivered, 3).await;
    let m = srv.storage.get(2).await.unwrap().unwrap();
    assert_eq!(m.attempts, 2, "one refused attempt, one after replay");
    assert_eq!(srv.fake.hits().len(), 3, "each replayed once");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_answers_stay_bounded_for_large_messages() {
    let srv = Srv::start(Some("admin-secret"), 200).await;
    // 200 messages of ~30 KB each: 6 MB in all, more than one answer carries.
    let blob = "x".repeat(30_000);
    for chunk in 0..20 {
        let batch: Vec<Value> = (0..10)
            .map(|i| {
                serde_json::json!({"type": "track", "userId": format!("u{chunk}-{i}"), "event": "Big",
                    "context": {"groupId": "acme"}, "properties": {"blob": blob}})
            })
            .collect();
        let r = srv
            .http
            .post(format!("{}/v1/batch", srv.base))
            .header("content-type", "application/json")
            .body(serde_json::json!({"batch": batch}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = srv
        .http
        .get(format!("{}/api/messages?limit=500", srv.base))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.unwrap();
    assert!(
        bytes.len() <= 4 * 1024 * 1024 + 64 * 1024,
        "{} bytes",
        bytes.len()
    );
    let page: Value = serde_json::from_slice(&bytes).unwrap();
    let n = page["messages"].as_array().unwrap().len();
    assert!(n > 0 && n < 200, "{n} messages in one answer");
    // The rest is on the next page.
    let next = page["next"].as_i64().expect("a next page");
    let (status, rest) = srv
        .call(
            reqwest::Method::GET,
            &format!("/api/messages?limit=500&before={next}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let m = rest["messages"].as_array().unwrap().len();
    assert!(n + m <= 200 && m > 0, "{n} + {m}");
    srv.stop().await;
}

async fn sign_in(http: &reqwest::Client, base: &str, token: &str) -> reqwest::Response {
    http.post(format!("{base}/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// One column of a query on the storage backend (SQLite file or PostgreSQL).
async fn db_strings(url: &str, sql: &str) -> Vec<String> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let c = rusqlite::Connection::open(path).unwrap();
        let mut stmt = c.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
        rows.into_iter().map(|(s,)| s).collect()
    }
}

async fn db_exec(url: &str, sql: &str) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
}

fn cookie_of(r: &reqwest::Response) -> String {
    r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_random_stored_as_digests_expire_and_end_at_logout() {
    let srv = Srv::start(Some("admin-secret-0123"), 200).await;
    let http = no_redirects();
    let a = cookie_of(&sign_in(&http, &srv.base, "admin-secret-0123").await);
    let b = cookie_of(&sign_in(&http, &srv.base, "admin-secret-0123").await);
    assert_ne!(a, b, "every sign-in gets its own random session");
    let id = a.strip_prefix("td_session=").unwrap().to_owned();
    assert_eq!(id.len(), 64, "256 bits, hex: {a}");
    let stats = |cookie: String| {
        let http = http.clone();
        let base = srv.base.clone();
        async move {
            http.get(format!("{base}/api/stats"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(stats(a.clone()).await, 200);
    assert_eq!(stats(b.clone()).await, 200);
    // Only the SHA-256 digest of the id is stored.
    let stored = db_strings(&srv.storage_url, "SELECT digest FROM admin_sessions").await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(!stored.contains(&id));
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(id.as_bytes()));
    assert!(stored.contains(&digest), "{stored:?}");

    // Logout revokes the session on the server: the old cookie is refused.
    let r = http
        .post(format!("{}/logout", srv.base))
        .header("cookie", &a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        stats(a.clone()).await,
        401,
        "a logged-out cookie never works again"
    );
    assert_eq!(stats(b.clone()).await, 200, "other sessions stay");

    // A session idle for 12 hours has expired.
    db_exec(
        &srv.storage_url,
        "UPDATE admin_sessions SET last_seen_at = last_seen_at - 43200001",
    )
    .await;
    assert_eq!(stats(b).await, 401);
    // A made-up cookie is no session.
    assert_eq!(stats(format!("td_session={}", "0".repeat(64))).await, 401);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_live_in_the_storage_backend_shared_by_every_server() {
    // Answers nothing but 404.
    let fake = FakeTotango::replying(|_, _| Reply::status(404)).await;
    let dir = crate::support::place();
    let mut c = crate::support::config(&dir, &fake.uri());
    c.admin.token = Some("shared-admin-token".into());
    let first = TestApp::start(c.clone()).await;
    let http = no_redirects();
    let cookie = cookie_of(&sign_in(&http, &first.base, "shared-admin-token").await);
    // PostgreSQL: a second replica at the same time. SQLite (one process
    // per file): the next process on the same file.
    let first = if dir.is_postgres() {
        Some(first)
    } else {
        first.stop().await;
        None
    };
    let second = TestApp::start(c.clone()).await;
    let get = |base: String, cookie: String| {
        let http = http.clone();
        async move {
            http.get(format!("{base}/api/stats"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get(second.base.clone(), cookie.clone()).await, 200);
    let r = http
        .post(format!("{}/logout", second.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(get(second.base.clone(), cookie.clone()).await, 401);
    if let Some(first) = first {
        assert_eq!(
            get(first.base.clone(), cookie.clone()).await,
            401,
            "logged out on one replica, out on all"
        );
        first.stop().await;
    }
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_link_carries_a_one_time_code_not_the_token() {
    // Answers nothing but 404.
    let fake = FakeTotango::replying(|_, _| Reply::status(404)).await;
    let dir = crate::support::place();
    let mut c = crate::support::config(&dir, &fake.uri());
    c.admin.token = Some("link-admin-token".into());
    let srv = TestApp::start(c.clone()).await;
    let runtime = c.clone().validate().unwrap();
    let (auth, _) = totango_destination::web::auth::AdminAuth::load(&runtime).unwrap();
    let link = auth.login_link(&srv.base);
    assert!(!link.contains("link-admin-token"), "{link}");
    let code = link
        .strip_prefix(&format!("{}/login?code=", srv.base))
        .unwrap_or_else(|| panic!("{link}"));
    assert_eq!(code.len(), 64);
    let stored = db_strings(&c.storage.url, "SELECT digest FROM admin_sessions").await;
    assert!(!stored.iter().any(|d| d == code), "codes are stored hashed");
    let http = no_redirects();
    let r = http.get(&link).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = cookie_of(&r);
    let r = http
        .get(format!("{}/api/stats", srv.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Used once: the same link now opens only the sign-in form.
    let again = http.get(&link).send().await.unwrap();
    assert_eq!(again.status(), 401);
    assert!(again.headers().get("set-cookie").is_none());
    // An expired code is refused too.
    let link = auth.login_link(&srv.base);
    db_exec(
        &c.storage.url,
        "UPDATE admin_sessions SET expires_at = 0 WHERE kind = 'code'",
    )
    .await;
    assert_eq!(http.get(&link).send().await.unwrap().status(), 401);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_throttled_per_address() {
    let srv = Srv::start(Some("admin-secret-0123"), 200).await;
    let http = no_redirects();
    // A burst of 30 wrong tokens (form or Bearer) is forgiven, then the
    // address is locked out: ~6k guesses a second become ~2.
    for i in 0..30 {
        let r = sign_in(&http, &srv.base, &format!("guess-{i}")).await;
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let (status, _) = srv
        .call(reqwest::Method::GET, "/api/stats", Some("guess-bearer"))
        .await;
    assert_eq!(status, 401, "the 31st wrong token");
    // Locked out: every attempt, the right token too, gets 429 + Retry-After.
    let r = sign_in(&http, &srv.base, "admin-secret-0123").await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let (status, body) = srv.call(reqwest::Method::GET, "/api/stats", None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_attempts");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_takes_a_small_uncompressed_form_only() {
    let srv = Srv::start(Some("admin-secret-0123"), 200).await;
    let http = no_redirects();
    // More than 4 KB: refused before it is read whole.
    let big = format!("token={}", "a".repeat(5000));
    let r = http
        .post(format!("{}/login", srv.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // A small gzip body inflating to 1 MB is cut at 4 KB as well.
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(b"token=").unwrap();
    gz.write_all(&vec![b'a'; 1 << 20]).unwrap();
    let r = http
        .post(format!("{}/login", srv.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert!(matches!(r.status().as_u16(), 413 | 415), "{}", r.status());
    // The hook for the server's layers answers 415 to any encoded login.
    let req = axum::http::Request::post("/login")
        .header("content-encoding", "gzip")
        .body(axum::body::Body::empty())
        .unwrap();
    let refused = totango_destination::admin::refuse_encoded_login(req)
        .await
        .unwrap_err();
    assert_eq!(refused.status(), 415);
    srv.stop().await;
}

#[test]
fn short_admin_tokens_are_refused_naming_the_setting() {
    let dir = crate::support::place();
    let mut c = crate::support::config(&dir, "http://127.0.0.1:9");
    for short in ["a", "12345678901"] {
        c.admin.token = Some(short.into());
        let e = c.clone().validate().expect_err("refused").to_string();
        assert!(e.contains("admin.token") && e.contains("12"), "{e}");
    }
    c.admin.token = Some("123456789012".into());
    assert!(c.validate().is_ok());
}
