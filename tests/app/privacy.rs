//! Issue 18 through HTTP: a Segment `delete` on `/webhook` and `/segment`
//! (and in a `/v1/batch`) erases the user before its answer, its queued
//! messages are never sent, later ones are suppressed until an operator
//! lifts the suppression, and every admin change is in the audit trail.
//! Runs on the backend `TEST_BACKEND` names.

use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use totango_destination::storage::{MessageFilter, State};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const SECRET: &str = "alice-secret-5b1d";
const TOKEN: &str = "privacy-test-admin-token";

/// Totango: refuses (503) until opened, then answers 200; records the
/// query of every request it answered 200.
struct Gate {
    open: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Respond for Gate {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !self.open.load(Ordering::SeqCst) {
            return ResponseTemplate::new(503);
        }
        self.seen
            .lock()
            .unwrap()
            .push(req.url.query().unwrap_or_default().to_owned());
        ResponseTemplate::new(200)
    }
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let check = || {
        let done = f();
        async move { if done.await { Ok(()) } else { Err(()) } }
    };
    crate::support::wait::until(Duration::from_secs(20), Duration::from_millis(50), check)
        .await
        .unwrap_or_else(|()| panic!("timed out waiting for {what}"));
}

/// Deliveries in flight, from the admin API's stats.
async fn in_flight(http: &reqwest::Client, base: &str) -> Value {
    let stats = http
        .get(format!("{base}/api/stats"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str::<Value>(&stats).unwrap()["delivery"]["in_flight"].clone()
}

fn identify(id: &str, user: &str) -> Value {
    json!({"type": "identify", "messageId": id, "userId": user, "context": {"groupId": "acme"},
        "traits": {"note": if user == "alice" { SECRET } else { "none" }, "email": format!("{user}@example.com")}})
}

#[tokio::test]
async fn a_delete_erases_and_suppresses_until_an_operator_lifts_it() {
    let fake = MockServer::start().await;
    let open = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("GET"))
        .respond_with(Gate {
            open: open.clone(),
            seen: seen.clone(),
        })
        .mount(&fake)
        .await;
    let place = crate::support::place();
    let mut c = crate::support::config(&place, &fake.uri());
    c.admin.token = Some(TOKEN.into());
    c.privacy.suppress_on_delete = true;
    c.delivery.retry_base_ms = 50;
    c.delivery.retry_max_ms = 200;
    let server = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    let base = server.base.clone();

    // Alice's identify waits (Totango refuses); bob's too.
    let r = http
        .post(format!("{base}/v1/batch"))
        .header("content-type", "application/json")
        .body(json!({"batch": [identify("a-1", "alice"), identify("b-1", "bob")]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The delete on /webhook: answered once the erase is durable.
    let r = http
        .post(format!("{base}/webhook"))
        .header("content-type", "application/json")
        .body(json!({"type": "delete", "messageId": "d-1", "userId": "alice"}).to_string())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcomes"][0]["outcome"], "erased", "{body}");
    assert_eq!(body["outcomes"][0]["erased"]["cancelled"], 1, "{body}");
    // Nothing of alice's payload is left in what the server can list.
    let all = server
        .storage
        .list(MessageFilter::default(), 100)
        .await
        .unwrap();
    assert!(
        all.iter().all(|m| !m.payload.to_string().contains(SECRET)),
        "{all:?}"
    );
    // Later messages of alice: recorded, never sent.
    let r = http
        .post(format!("{base}/v1/identify"))
        .header("content-type", "application/json")
        .body(identify("a-2", "alice").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A request of alice's already on its way to Totango when the erase was
    // answered may still arrive (docs/privacy.md: it cannot be called back).
    // Once nothing is in flight, any request of alice's the gate lets through
    // would have left after the erase.
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(TOKEN).send();
    wait_until("no delivery in flight", || async {
        in_flight(&http, &base).await == 0
    })
    .await;
    open.store(true, Ordering::SeqCst);
    let sent = |user: &str| {
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|q| q.contains(&format!("sdr_u={user}")))
            .count()
    };
    wait_until("bob's identify is delivered", || async { sent("bob") > 0 }).await;
    // Bob's second message, sent after alice's, is delivered; alice's never.
    http.post(format!("{base}/v1/identify"))
        .header("content-type", "application/json")
        .body(identify("b-2", "bob").to_string())
        .send()
        .await
        .unwrap();
    wait_until("bob's second identify", || async { sent("bob") > 1 }).await;
    assert_eq!(sent("alice"), 0, "{:?}", seen.lock().unwrap());
    assert_eq!(
        crate::support::state_of(server.storage.as_ref(), "a-2").await,
        [State::Suppressed]
    );

    // The operator sees the suppression and lifts it.
    let list: Value = admin(http.get(format!("{base}/api/suppressions")))
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    assert_eq!(list["suppressions"][0]["userId"], "alice", "{list}");
    let r = admin(http.delete(format!("{base}/api/suppressions/alice")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = admin(http.delete(format!("{base}/api/suppressions/alice")))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    http.post(format!("{base}/v1/identify"))
        .header("content-type", "application/json")
        .body(identify("a-3", "alice").to_string())
        .send()
        .await
        .unwrap();
    wait_until("alice's identify after the lift", || async {
        sent("alice") > 0
    })
    .await;

    // An operator suppresses and erases by the admin API too.
    let r = admin(
        http.post(format!("{base}/api/suppressions"))
            .header("content-type", "application/json")
            .body(json!({"userId": "carol"}).to_string()),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = admin(http.delete(format!("{base}/api/users/alice?suppress=false")))
        .await
        .unwrap();
    let erased: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    // a-2 (suppressed) and a-3 (delivered); a-1 no longer names alice.
    assert_eq!(erased["erased"]["messages"], 2, "{erased}");
    // A bulk replay (nothing dead: 0 replayed) is an action too.
    let r = admin(http.post(format!("{base}/api/replay?outcome=dead")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The audit trail has every change, newest first, by the token.
    let audit: Value = admin(http.get(format!("{base}/api/audit")))
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["replay", "erase", "suppress", "unsuppress"],
        "{audit}"
    );
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "token" && e["address"] == "127.0.0.1")
    );
    assert_eq!(audit["entries"][0]["count"], 0);
    assert_eq!(audit["entries"][0]["detail"]["outcome"], "dead");
    assert_eq!(audit["entries"][1]["count"], erased["erased"]["messages"]);
    // The audit trail does not name the erased user.
    assert!(!audit["entries"][1]["detail"].to_string().contains("alice"));
    // A sign-in by the form and a sign-out: kept under the session's name.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = browser
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", base.as_str())
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = browser
        .post(format!("{base}/logout"))
        .header("cookie", &cookie)
        .header("origin", base.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let audit: Value = admin(http.get(format!("{base}/api/audit?limit=2")))
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries[0]["action"], "logout", "{audit}");
    assert_eq!(entries[1]["action"], "login", "{audit}");
    let who = entries[0]["actor"].as_str().unwrap();
    assert!(
        who.starts_with("session:") && who.len() == "session:".len() + 12,
        "{who}"
    );
    assert_eq!(
        entries[1]["actor"], entries[0]["actor"],
        "one session's name"
    );
    // No route changes the trail.
    let r = admin(http.delete(format!("{base}/api/audit")))
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    server.stop().await;
}

/// `/segment` answers a delete with 200 and what was erased; a delete
/// without a userId is a 400 naming the field.
#[tokio::test]
async fn the_partner_api_answers_a_delete_once_erased() {
    let place = crate::support::place();
    let mut c = crate::support::config(&place, "http://127.0.0.1:9");
    // Suppression on delete for this source only (open mode: "default").
    c.privacy.sources.insert(
        "default".into(),
        totango_destination::config::SourceRulesConfig {
            suppress_on_delete: Some(true),
            ..Default::default()
        },
    );
    let server = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    let base = server.base.clone();
    http.post(format!("{base}/segment"))
        .header("content-type", "application/json")
        .body(identify("a-1", "alice").to_string())
        .send()
        .await
        .unwrap();
    let r = http
        .post(format!("{base}/segment"))
        .header("content-type", "application/json")
        .body(json!({"type": "delete", "messageId": "d-1", "userId": "alice"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["outcome"], "erased", "{body}");
    assert_eq!(body["erased"]["messages"], 1, "{body}");
    let suppressed = server.storage.suppressions().await.unwrap();
    assert_eq!(suppressed.len(), 1, "the source suppresses on delete");
    assert_eq!(suppressed[0].user_id, "alice");
    let r = http
        .post(format!("{base}/segment"))
        .header("content-type", "application/json")
        .body(json!({"type": "delete", "messageId": "d-2"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("userId"),
        "{body}"
    );
    server.stop().await;
}

/// A message claimed while the endpoint's probe is in flight waits for the
/// probe's outcome; if its user is erased meanwhile, it is not sent when the
/// endpoint comes back (the erase cancelled its claim).
#[tokio::test]
async fn a_message_waiting_for_a_probe_is_not_sent_after_its_user_is_erased() {
    waiting_for_a_probe(Cancel::Erase).await;
}

/// On PostgreSQL, replicas learn of each other's erasures by announcements,
/// which can be lost: a message that waited for a probe checks its claim
/// before it is sent all the same. Here its queue row goes the way another
/// replica's erase takes it, without an announcement.
#[tokio::test]
async fn a_message_waiting_for_a_probe_checks_its_claim_before_it_is_sent() {
    if std::env::var("TEST_BACKEND").as_deref() != Ok("postgres") {
        eprintln!("skipped: a PostgreSQL case (TEST_BACKEND=postgres)");
        return;
    }
    waiting_for_a_probe(Cancel::Unannounced).await;
}

/// How the waiting message's claim ends.
enum Cancel {
    /// The operator erases its user through this server.
    Erase,
    /// Its queue row is deleted in the database, as an erase on another
    /// replica does, and nothing is announced.
    Unannounced,
}

async fn waiting_for_a_probe(cancel: Cancel) {
    use crate::support::totango::{FakeTotango, Reply};
    use std::sync::atomic::AtomicU8;
    const FAILING: u8 = 0;
    const HOLDING: u8 = 1;
    let phase = Arc::new(AtomicU8::new(FAILING));
    let (release, released) = tokio::sync::watch::channel(false);
    let fake = FakeTotango::answering({
        let phase = phase.clone();
        move |_, _| {
            let phase = phase.load(Ordering::SeqCst);
            let mut released = released.clone();
            async move {
                if phase == FAILING {
                    return Reply::status(503);
                }
                let _ = released.wait_for(|open| *open).await;
                Reply::ok()
            }
        }
    })
    .await;
    let place = crate::support::place();
    let mut c = crate::support::config(&place, &fake.uri());
    c.admin.token = Some(TOKEN.into());
    c.delivery.retry_base_ms = 50;
    c.delivery.retry_max_ms = 200;
    c.delivery.request_timeout_ms = 30_000;
    let server = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let identify_in = |id: &str, user: &str, group: &str| {
        let mut m = identify(id, user);
        m["context"]["groupId"] = json!(group);
        http.post(format!("{base}/v1/identify"))
            .header("content-type", "application/json")
            .body(m.to_string())
            .send()
    };

    // Carol's identify fails until the endpoint is down; her next attempt is
    // the probe, and Totango holds it.
    assert_eq!(
        identify_in("c-1", "carol", "other").await.unwrap().status(),
        200
    );
    wait_until("the endpoint is down", || async {
        fake.answered(503).len() >= 3
    })
    .await;
    phase.store(HOLDING, Ordering::SeqCst);
    wait_until("a probe held by Totango", || async {
        fake.hits().iter().any(|h| h.status == 0)
    })
    .await;
    // Alice's identify is claimed and waits for the probe's outcome.
    assert_eq!(
        identify_in("a-1", "alice", "acme").await.unwrap().status(),
        200
    );
    wait_until("alice's identify is claimed", || async {
        in_flight(&http, &base).await == 2
    })
    .await;
    match cancel {
        Cancel::Erase => {
            let r = http
                .delete(format!("{base}/api/users/alice"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let erased: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(erased["erased"]["cancelled"], 1, "{erased}");
        }
        Cancel::Unannounced => {
            let pool = sqlx::PgPool::connect(&place.storage_url()).await.unwrap();
            let gone = sqlx::query(
                "WITH m AS (UPDATE td_outcomes SET state = 'suppressed' \
                    WHERE id = (SELECT id FROM td_messages WHERE message_id = 'a-1') \
                    RETURNING id) \
                 DELETE FROM td_queue q USING m WHERE q.message = m.id",
            )
            .execute(&pool)
            .await
            .unwrap();
            assert_eq!(gone.rows_affected(), 1);
            pool.close().await;
        }
    }

    // The probe is answered: the endpoint is back and what waited goes on.
    release.send(true).unwrap();
    wait_until("nothing in flight", || async {
        in_flight(&http, &base).await == 0
    })
    .await;
    assert_eq!(fake.for_user("carol").last().map(|h| h.status), Some(200));
    assert!(fake.for_user("alice").is_empty(), "{:?}", fake.hits());
    assert_eq!(
        crate::support::state_of(server.storage.as_ref(), "a-1").await,
        [State::Suppressed]
    );
    server.stop().await;
}
