//! Issue 19 item 4: the operator's page per account and per user. Messages
//! go in through the Segment API to a fake Totango; `/api/accounts/{id}` and
//! `/api/users/{id}` then show the entity's messages, the last value of each
//! attribute as Totango received it, activities per day and failures; the
//! HTML pages are served to a signed-in operator only, under the page's CSP.

use serde_json::{Value, json};
use std::time::Duration;

use crate::support::TestApp;
use crate::support::totango::{FakeTotango, Reply};
use crate::support::wait;

const TOKEN: &str = "entity-admin-token";
/// Ids with a slash, spaces and non-ASCII text.
const ACCOUNT: &str = "acme/west team";
const USER: &str = "ann ü/1";

struct Srv {
    app: TestApp,
    fake: FakeTotango,
    http: reqwest::Client,
    _place: crate::support::TestPlace,
}

/// Percent-encodes a path segment (as the page's `encodeURIComponent`).
fn enc(id: &str) -> String {
    let mut out = String::new();
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Srv {
    async fn start() -> Srv {
        Srv::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut totango_destination::config::Config)) -> Srv {
        // Totango refuses the activity "Broken" (the message dies at once)
        // and is busy for "Flaky" (retried).
        let fake = FakeTotango::replying(|_, p| match p.get("sdr_a").map(String::as_str) {
            Some("Broken") => Reply::status(400).body("bad activity"),
            Some("Flaky") => Reply::status(503).body("busy"),
            _ => Reply::ok(),
        })
        .await;
        let place = crate::support::place();
        let mut c = crate::support::config(&place, &fake.uri());
        c.admin.token = Some(TOKEN.into());
        tweak(&mut c);
        let app = TestApp::start(c).await;
        Srv {
            app,
            fake,
            http: reqwest::Client::new(),
            _place: place,
        }
    }

    async fn batch(&self, batch: Value) {
        let r = self
            .http
            .post(self.app.url("/v1/batch"))
            .header("content-type", "application/json")
            .body(json!({ "batch": batch }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(self.app.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    async fn json(&self, path: &str) -> (u16, Value) {
        let r = self.get(path, Some(TOKEN)).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// The attributes of an entity's JSON as (name, value).
fn attributes(v: &Value) -> Vec<(String, String)> {
    v["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_owned(),
                a["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The value Totango received last for `param` among requests that it
/// accepted for `account`.
fn last_received(fake: &FakeTotango, account: &str, param: &str) -> Option<String> {
    fake.answered(200)
        .into_iter()
        .rev()
        .filter(|h| h.get("sdr_o") == Some(account))
        .find_map(|h| h.get(param).map(str::to_owned))
}

async fn send_load(s: &Srv) {
    let context = json!({ "groupId": ACCOUNT });
    s.batch(json!([
        {"type": "group", "messageId": "g1", "userId": USER, "groupId": ACCOUNT,
         "traits": {"name": "Acme", "plan": "Trial", "employees": 10}},
        {"type": "group", "messageId": "g2", "userId": USER, "groupId": ACCOUNT,
         "traits": {"plan": "Paying"}},
        {"type": "identify", "messageId": "i1", "userId": USER,
         "traits": {"email": "ann@acme.example"}, "context": context},
        {"type": "track", "messageId": "t1", "userId": USER, "event": "Created Report", "context": context},
        {"type": "track", "messageId": "t2", "userId": USER, "event": "Created Report", "context": context},
        {"type": "track", "messageId": "t3", "userId": USER, "event": "Broken", "context": context},
        {"type": "track", "messageId": "o1", "userId": "someone else", "event": "Created Report",
         "context": {"groupId": "other"}},
    ]))
    .await;
    // Everything settled: delivered or dead.
    let path = format!("/api/accounts/{}", enc(ACCOUNT));
    wait::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let (_, v) = s.json(&path).await;
            let settled = v["messages"]
                .as_array()
                .is_some_and(|m| m.len() == 6 && m.iter().all(|m| m["outcome"] != "pending"));
            if settled { Ok(()) } else { Err(v) }
        },
    )
    .await
    .expect("the account's messages are settled");
}

#[tokio::test]
async fn account_and_user_pages_show_what_was_sent() {
    let s = Srv::start().await;
    send_load(&s).await;

    let (status, account) = s.json(&format!("/api/accounts/{}", enc(ACCOUNT))).await;
    assert_eq!(status, 200, "{account}");
    assert_eq!(account["kind"], "account");
    assert_eq!(account["id"], ACCOUNT);
    assert_eq!(account["found"], true);
    // Its messages, latest first, with outcomes; not the other account's.
    let messages = account["messages"].as_array().unwrap();
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["t3", "t2", "t1", "i1", "g2", "g1"]);
    assert_eq!(messages[0]["outcome"], "dead");
    assert!(messages[1..].iter().all(|m| m["outcome"] == "delivered"));
    assert!(messages.iter().all(|m| m.get("payload").is_none()));

    // The last value of each account attribute, as Totango received it.
    let got = attributes(&account);
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["sdr_o.Status", "sdr_o.employees", "sdr_odn"],
        "{got:?}"
    );
    for (name, value) in &got {
        assert_eq!(
            Some(value.clone()),
            last_received(&s.fake, ACCOUNT, name),
            "{name}"
        );
    }
    assert!(got.contains(&("sdr_o.Status".into(), "Paying".into())));
    assert!(got.contains(&("sdr_odn".into(), "Acme".into())));
    assert!(got.contains(&("sdr_o.employees".into(), "10".into())));
    let a = &account["attributes"][0];
    assert_eq!(a["service_id"], "SP-1234-01");
    assert!(a["sent_at"].as_i64().unwrap() > 0);
    let g2 = messages.iter().find(|m| m["message_id"] == "g2").unwrap();
    assert_eq!(a["message"], g2["id"], "Status came last from g2");

    // Activities per day: the two delivered tracks (the dead one sent none).
    let activity = &account["activity"];
    assert_eq!(activity["days"], 30);
    assert_eq!(activity["total"], 2);
    let per_day = activity["per_day"].as_array().unwrap();
    assert_eq!(per_day.len(), 30);
    assert_eq!(per_day.last().unwrap()["activities"], 2, "{per_day:?}");
    let today = chrono::Utc::now().date_naive().to_string();
    assert_eq!(per_day.last().unwrap()["day"], today);

    // Failures: the dead track, with Totango's answer.
    let dead = account["failures"]["dead"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["message_id"], "t3");
    assert_eq!(dead[0]["code"], "rejected_by_totango");
    assert_eq!(dead[0]["last_response"]["status"], 400);
    assert_eq!(dead[0]["last_response"]["body"], "bad activity");
    assert_eq!(account["failures"]["failing"], json!([]));

    // The user: its attributes (identify), activities, messages.
    let (status, user) = s.json(&format!("/api/users/{}", enc(USER))).await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["kind"], "user");
    assert_eq!(user["id"], USER);
    assert_eq!(
        attributes(&user),
        [("sdr_u.email".to_owned(), "ann@acme.example".to_owned())]
    );
    let received = s
        .fake
        .for_user(USER)
        .into_iter()
        .rev()
        .find_map(|h| h.get("sdr_u.email").map(str::to_owned));
    assert_eq!(received.as_deref(), Some("ann@acme.example"));
    assert_eq!(user["activity"]["total"], 2);
    assert_eq!(user["messages"].as_array().unwrap().len(), 6);
    assert_eq!(user["failures"]["dead"].as_array().unwrap().len(), 1);

    // Paging: latest first, `next` to the older ones.
    let (_, first) = s
        .json(&format!("/api/accounts/{}?limit=4", enc(ACCOUNT)))
        .await;
    assert_eq!(first["messages"].as_array().unwrap().len(), 4);
    let next = first["next"].as_i64().expect("a next page");
    let (_, rest) = s
        .json(&format!(
            "/api/accounts/{}?limit=4&before={next}",
            enc(ACCOUNT)
        ))
        .await;
    let rest: Vec<&str> = rest["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(rest, ["g2", "g1"]);

    // Nothing received for an unknown id (or a prefix of a known one).
    for path in [
        "/api/accounts/nobody",
        "/api/accounts/acme",
        "/api/users/ann",
    ] {
        let (status, v) = s.json(path).await;
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(v["found"], false, "{path}: {v}");
        assert_eq!(v["messages"], json!([]));
        assert_eq!(v["attributes"], json!([]));
        assert_eq!(v["activity"]["total"], 0);
    }

    // Erasing the user erases its attributes and activities too.
    let r = s
        .http
        .delete(s.app.url(&format!("/api/users/{}", enc(USER))))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let (_, user) = s.json(&format!("/api/users/{}", enc(USER))).await;
    assert_eq!(user["attributes"], json!([]));
    assert_eq!(user["activity"]["total"], 0);
    assert_eq!(user["found"], false, "{user}");
    // The account keeps its own.
    let (_, account) = s.json(&format!("/api/accounts/{}", enc(ACCOUNT))).await;
    assert_eq!(attributes(&account).len(), 3);
}

#[tokio::test]
async fn bad_parameters_are_refused_by_name() {
    let s = Srv::start().await;
    for (query, field) in [
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("days=0", "days"),
        ("days=91", "days"),
        ("before=-1", "before"),
        ("colour=red", "colour"),
    ] {
        for kind in ["accounts", "users"] {
            let (status, v) = s.json(&format!("/api/{kind}/acme?{query}")).await;
            assert_eq!(status, 400, "{kind}?{query}: {v}");
            assert_eq!(v["code"], "invalid_field", "{v}");
            let message = v["message"].as_str().unwrap();
            assert!(message.starts_with(&format!("{field}:")), "{message}");
        }
    }
    let (status, v) = s.json("/api/accounts/acme?days=7&limit=200").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["activity"]["per_day"].as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn pages_need_a_signed_in_operator_and_keep_the_csp() {
    let s = Srv::start().await;
    let csp = totango_destination::admin::PAGE_CSP;
    for path in [
        format!("/accounts/{}", enc(ACCOUNT)),
        format!("/users/{}", enc(USER)),
        "/accounts/nobody".to_owned(),
    ] {
        let r = s.get(&path, Some(TOKEN)).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-security-policy"], csp);
        assert_eq!(r.headers()["cache-control"], "no-store");
        let body = r.text().await.unwrap();
        assert!(
            body.contains(r#"<script src="/assets/entity.js">"#),
            "{body}"
        );
        assert!(body.contains(r#"id="attributes""#));
        assert!(!body.contains("<script>"), "no inline script");
        assert!(!body.contains("style="), "no inline style");

        for token in [None, Some("wrong")] {
            let r = s.get(&path, token).await;
            assert_eq!(r.status(), 401, "{path} {token:?}");
            assert_eq!(r.headers()["content-security-policy"], csp);
            let body = r.text().await.unwrap();
            assert!(body.contains("/login"), "the sign-in form: {body}");
            assert!(!body.contains("entity.js"));
        }
    }
    // The JSON needs the token too.
    for path in ["/api/accounts/acme", "/api/users/ann"] {
        let r = s.get(path, None).await;
        assert_eq!(r.status(), 401, "{path}");
    }
    // The script is served by the binary; the operator page links here.
    let r = s.get("/assets/entity.js", None).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let js = r.text().await.unwrap();
    assert!(js.contains("encodeURIComponent") && !js.contains("innerHTML"));
    let page = s.get("/", Some(TOKEN)).await.text().await.unwrap();
    assert!(page.contains(r#"id="entity-search""#));
    let script = s
        .get("/assets/operator.js", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(script.contains(r#"entityLink("accounts", m.account_id)"#));
    assert!(!script.contains("innerHTML"));
}

#[tokio::test]
async fn a_failed_attempt_is_listed_with_its_last_answer() {
    // Retried much later: the message stays queued after its first attempt.
    let s = Srv::start_with(|c| {
        c.delivery.retry_base_ms = 600_000;
        c.delivery.retry_max_ms = 600_000;
    })
    .await;
    s.batch(json!([
        {"type": "track", "messageId": "f1", "userId": USER, "event": "Flaky",
         "context": {"groupId": ACCOUNT}},
    ]))
    .await;
    let path = format!("/api/accounts/{}", enc(ACCOUNT));
    let account = wait::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let (_, v) = s.json(&path).await;
            if v["failures"]["failing"]
                .as_array()
                .is_some_and(|f| !f.is_empty())
            {
                Ok(v)
            } else {
                Err(v)
            }
        },
    )
    .await
    .expect("the failed attempt is listed");
    let failing = &account["failures"]["failing"][0];
    assert_eq!(failing["message_id"], "f1");
    assert_eq!(failing["outcome"], "pending");
    assert!(failing["attempts"].as_u64().unwrap() >= 1, "{failing}");
    assert_eq!(failing["last_response"]["status"], 503);
    assert_eq!(failing["last_response"]["body"], "busy");
    assert_eq!(account["failures"]["dead"], json!([]));
    assert_eq!(account["activity"]["total"], 0, "nothing was accepted");
    assert_eq!(account["found"], true);
}
