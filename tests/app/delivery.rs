//! Delivery against a fake Totango: attribute updates of one user keep
//! acceptance order while that user's activities go out in parallel, a
//! track's module follows acceptance order whatever the delivery order, and
//! the adaptive concurrency comes down on errors and goes back up, and after
//! a 30 s Totango outage the backlog is delivered within 10 s of its return.
//! Only that last test asserts timing; elsewhere the fake makes the orders
//! deterministic.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;
use totango_destination::config::Config;
use totango_destination::storage::{State, Storage};

use crate::support::TestApp;
use crate::support::totango::{FakeTotango, Params};
use crate::support::wait;

const KEY: &str = "key-1";
const ADMIN: &str = "admin-token-delivery";
const WAIT: Duration = Duration::from_secs(20);

/// A fake Totango whose pixel handler is `handler`; it records every request.
async fn fake<F, Fut>(handler: F) -> FakeTotango
where
    F: Fn(Params) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = StatusCode> + Send + 'static,
{
    FakeTotango::answering(move |_, p| handler(p)).await
}

/// The parameters of every request the fake answered 200, in arrival order.
fn ok(fake: &FakeTotango) -> Vec<Params> {
    fake.answered(200).into_iter().map(|h| h.params).collect()
}

/// The app in this process ([`TestApp`]) with these tests' settings.
struct Server {
    addr: SocketAddr,
    storage: Arc<dyn Storage>,
    shutdown: CancellationToken,
    http: reqwest::Client,
    _app: TestApp,
}

impl Server {
    async fn start(place: &crate::support::TestPlace, endpoint: &str) -> Server {
        Server::start_with(place, endpoint, |_| {}).await
    }

    /// Starts with the test settings, then `adjust`.
    async fn start_with(
        place: &crate::support::TestPlace,
        endpoint: &str,
        adjust: impl FnOnce(&mut Config),
    ) -> Server {
        let mut c = Config::default();
        place.configure(&mut c);
        c.totango.service_id = Some("SP-3126-05".into());
        c.totango.endpoint = Some(endpoint.into());
        c.auth.write_keys = vec![KEY.into()];
        c.admin.token = Some(ADMIN.into());
        c.delivery.retry_base_ms = 20;
        c.delivery.retry_max_ms = 100;
        c.delivery.request_timeout_ms = 5_000;
        adjust(&mut c);
        let app = TestApp::start(c).await;
        Server {
            addr: app.addr,
            storage: app.storage.clone(),
            shutdown: app.shutdown.clone(),
            http: reqwest::Client::new(),
            _app: app,
        }
    }

    async fn post(&self, path: &str, body: &Value) {
        let r = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .basic_auth(KEY, Some(""))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }

    async fn stats(&self) -> Value {
        let body = self
            .http
            .get(format!("http://{}/api/stats", self.addr))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until every stored message is delivered.
    async fn wait_all_delivered(&self, n: u64) {
        wait::until(WAIT, Duration::from_millis(20), async || {
            let counts = self.storage.counts().await.unwrap();
            let delivered = counts
                .iter()
                .find(|(s, _)| *s == State::Delivered)
                .map_or(0, |(_, n)| *n);
            if delivered == n { Ok(()) } else { Err(counts) }
        })
        .await
        .unwrap_or_else(|counts| panic!("not delivered in time: {counts:?}"));
    }

    /// Waits until `check` holds for the `delivery` object of `/api/stats`.
    async fn wait_for_delivery(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait::until(WAIT, Duration::from_millis(10), async || {
            let d = self.stats().await["delivery"].clone();
            if check(&d) { Ok(d) } else { Err(d) }
        })
        .await
        .unwrap_or_else(|d| panic!("{what} did not happen: {d}"))
    }
}

fn identify(user: &str, n: usize) -> Value {
    json!({"type": "identify", "userId": user, "traits": {"n": n},
           "context": {"groupId": "acc1"}})
}

fn group(account: &str, n: usize) -> Value {
    json!({"type": "group", "userId": "u1", "groupId": account, "traits": {"n": n}})
}

fn track(user: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event, "context": {"groupId": "acc1"}})
}

fn page(user: &str, category: &str) -> Value {
    json!({"type": "page", "userId": user, "category": category, "context": {"groupId": "acc1"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_updates_keep_order_while_activities_go_in_parallel() {
    // Each activity is answered only once all four are in flight at the same
    // time: delivered one after another they would never be answered.
    let activities = Arc::new(Barrier::new(4));
    let endpoint = {
        let activities = activities.clone();
        fake(move |p: Params| {
            let activities = activities.clone();
            async move {
                if p.contains_key("sdr_a") {
                    activities.wait().await;
                }
                StatusCode::OK
            }
        })
        .await
    };
    let dir = crate::support::place();
    let srv = Server::start(&dir, &endpoint.uri()).await;
    let batch = vec![
        identify("u1", 1),
        group("g1", 1),
        track("u1", "a"),
        track("u1", "b"),
        identify("u1", 2),
        group("g1", 2),
        track("u1", "c"),
        track("u1", "d"),
        identify("u1", 3),
        group("g1", 3),
    ];
    srv.post("/v1/batch", &json!({"batch": batch})).await;
    srv.wait_all_delivered(10).await;

    let ok = ok(&endpoint);
    let user_updates: Vec<&str> = ok
        .iter()
        .filter_map(|p| p.get("sdr_u.n").map(String::as_str))
        .collect();
    assert_eq!(
        user_updates,
        ["1", "2", "3"],
        "identify in acceptance order"
    );
    let account_updates: Vec<&str> = ok
        .iter()
        .filter_map(|p| p.get("sdr_o.n").map(String::as_str))
        .collect();
    assert_eq!(
        account_updates,
        ["1", "2", "3"],
        "group in acceptance order"
    );
    let mut activities: Vec<&str> = ok
        .iter()
        .filter_map(|p| p.get("sdr_a").map(String::as_str))
        .collect();
    activities.sort_unstable();
    assert_eq!(activities, ["a", "b", "c", "d"]);
    srv.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_module_follows_acceptance_order_whatever_the_delivery_order() {
    // Per user: the first track and the second page fail until the second
    // track is delivered, so the second track goes out before both of them.
    let delivered: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    let endpoint = {
        let delivered = delivered.clone();
        fake(move |p: Params| {
            let delivered = delivered.clone();
            async move {
                let user = p.get("sdr_u").cloned().unwrap_or_default();
                let activity = p.get("sdr_a").cloned().unwrap_or_default();
                let mut done = delivered.lock().unwrap();
                let held = (activity == "T1" || activity == "Viewed B Page")
                    && !done.contains(&(user.clone(), "T2".to_owned()));
                let status = if held { 503 } else { 200 };
                if !held {
                    done.insert((user, activity));
                }
                StatusCode::from_u16(status).unwrap()
            }
        })
        .await
    };
    let dir = crate::support::place();
    let srv = Server::start(&dir, &endpoint.uri()).await;
    // u1: all in one batch; u2: one request each.
    let calls = |user: &str| {
        vec![
            page(user, "A"),
            track(user, "T1"),
            page(user, "B"),
            track(user, "T2"),
        ]
    };
    srv.post("/v1/batch", &json!({"batch": calls("u1")})).await;
    for call in calls("u2") {
        let kind = call["type"].as_str().unwrap().to_owned();
        srv.post(&format!("/v1/{kind}"), &call).await;
    }
    srv.wait_all_delivered(8).await;

    let ok = ok(&endpoint);
    for user in ["u1", "u2"] {
        let sent: Vec<(&str, &str)> = ok
            .iter()
            .filter(|p| p.get("sdr_u").map(String::as_str) == Some(user))
            .map(|p| (p["sdr_a"].as_str(), p["sdr_m"].as_str()))
            .collect();
        let pos = |a: &str| sent.iter().position(|(x, _)| *x == a).unwrap();
        assert!(pos("T2") < pos("T1"), "{user}: T2 went first: {sent:?}");
        assert!(pos("T2") < pos("Viewed B Page"), "{user}: {sent:?}");
        assert!(sent.contains(&("T1", "A")), "{user}: T1 gets A: {sent:?}");
        assert!(sent.contains(&("T2", "B")), "{user}: T2 gets B: {sent:?}");
    }
    srv.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_comes_down_on_errors_and_goes_back_up() {
    let healthy = Arc::new(AtomicBool::new(false));
    let endpoint = {
        let healthy = healthy.clone();
        fake(move |_p: Params| {
            let healthy = healthy.clone();
            async move {
                if healthy.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }
        })
        .await
    };
    let dir = crate::support::place();
    let srv = Server::start(&dir, &endpoint.uri()).await;
    let start = srv.stats().await["delivery"]["concurrency_limit"]
        .as_u64()
        .unwrap();
    assert_eq!(start, 64, "starts at delivery.concurrency");
    for chunk in 0..2 {
        let batch: Vec<Value> = (0..2_000)
            .map(|i| track(&format!("u{}", i % 500), &format!("e{chunk}-{i}")))
            .collect();
        srv.post("/v1/batch", &json!({"batch": batch})).await;
    }
    // 503s: the limit comes down, to the minimum at worst.
    let down = srv
        .wait_for_delivery("backing off", |d| {
            d["concurrency_limit"].as_u64().unwrap() <= 8
        })
        .await;
    let low = down["concurrency_limit"].as_u64().unwrap();
    assert!(low >= 4, "never below delivery.min_concurrency: {down}");
    // Totango recovers: the limit grows again while the backlog drains.
    healthy.store(true, Ordering::SeqCst);
    let up = srv
        .wait_for_delivery("growing again", |d| {
            d["concurrency_limit"].as_u64().unwrap() > low && d["rtt_ms"].is_number()
        })
        .await;
    assert!(up["in_flight"].is_u64(), "{up}");
    srv.wait_all_delivered(4_000).await;
    srv.shutdown.cancel();
}

/// A TCP front for the fake Totango that the test can take down (listener
/// closed, open connections cut: connections are refused) and bring back on
/// the same port.
struct Outage {
    addr: SocketAddr,
    backend: SocketAddr,
    front: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Outage {
    async fn start(backend: SocketAddr) -> Arc<Outage> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let outage = Arc::new(Outage {
            addr,
            backend,
            front: Mutex::new(None),
        });
        outage.serve(listener);
        outage
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let backend = self.backend;
        let task = tokio::spawn(async move {
            // Dropping this (the task is aborted) cuts every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        conns.spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        *self.front.lock().unwrap() = Some(task);
    }

    async fn down(&self) {
        let task = self.front.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    async fn up(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

/// Totango refuses connections for 30 s while traffic keeps coming (thousands
/// of messages over hundreds of users, default retry settings): once it is
/// back, the whole backlog is delivered within 10 s, in per-user and
/// per-account order, and the outage cost few attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_totango_outage_the_backlog_drains_at_once() {
    const OUTAGE: Duration = Duration::from_secs(30);
    const USERS: usize = 300;
    const ACCOUNTS: usize = 60;
    let ok_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let backend = {
        let ok_at = ok_at.clone();
        fake(move |_: Params| {
            let ok_at = ok_at.clone();
            async move {
                ok_at.lock().unwrap().push(Instant::now());
                StatusCode::OK
            }
        })
        .await
    };
    let backend_addr: SocketAddr = backend.uri().trim_start_matches("http://").parse().unwrap();
    let front = Outage::start(backend_addr).await;
    let dir = crate::support::place();
    let srv = Server::start_with(&dir, &format!("http://{}", front.addr), |c| {
        // The documented defaults: the first retry within 1 s, doubling.
        c.delivery.retry_base_ms = 1_000;
        c.delivery.retry_max_ms = 300_000;
    })
    .await;

    // Load: a batch of 50 every 200 ms, over 300 users and 60 accounts;
    // every user's identify and every account's group carry a rising `n`.
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = CancellationToken::new();
    let load = {
        let (sent, stop) = (sent.clone(), stop.clone());
        let (addr, http) = (srv.addr, srv.http.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let batch: Vec<Value> = (0..50)
                    .map(|_| {
                        i += 1;
                        // Every fourth message starts a round of the four
                        // calls; rounds go round all users and accounts.
                        let round = i / 4;
                        let user = format!("u{}", round % USERS);
                        let account = format!("a{}", round % ACCOUNTS);
                        match i % 4 {
                            0 => json!({"type": "identify", "userId": user, "traits": {"n": i},
                                        "context": {"groupId": account}}),
                            1 => json!({"type": "group", "userId": user, "groupId": account,
                                        "traits": {"n": i}}),
                            2 => json!({"type": "track", "userId": user, "event": format!("e{i}"),
                                        "context": {"groupId": account}}),
                            _ => json!({"type": "page", "userId": user, "category": "C",
                                        "context": {"groupId": account}}),
                        }
                    })
                    .collect();
                let r = http
                    .post(format!("http://{addr}/v1/batch"))
                    .basic_auth(KEY, Some(""))
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&json!({"batch": batch})).unwrap())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                sent.fetch_add(50, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    front.down().await;
    let down_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    stop.cancel();
    load.await.unwrap();
    let total = sent.load(Ordering::SeqCst);
    let backlog = total - ok(&backend).len() as u64;
    front.up().await;
    let up_at = Instant::now();
    println!(
        "outage of {:?}: {total} messages accepted, {backlog} waiting at recovery",
        up_at - down_at
    );
    assert!(backlog >= 2_000, "a backlog of thousands: {backlog}");

    let deadline = up_at + Duration::from_secs(10);
    loop {
        let counts = srv.storage.counts().await.unwrap();
        let delivered = counts
            .iter()
            .find(|(s, _)| *s == State::Delivered)
            .map_or(0, |(_, n)| *n);
        if delivered == total {
            break;
        }
        if Instant::now() >= deadline {
            let waiting = srv
                .storage
                .list(
                    totango_destination::storage::MessageFilter {
                        state: Some(State::Pending),
                        ..Default::default()
                    },
                    10,
                )
                .await
                .unwrap();
            let now = totango_destination::storage::now_millis();
            let waiting: Vec<String> = waiting
                .iter()
                .map(|m| {
                    format!(
                        "{} {:?} attempts {} due in {:?} ms",
                        m.call,
                        m.user_id,
                        m.attempts,
                        m.next_attempt_at.map(|t| t - now)
                    )
                })
                .collect();
            panic!(
                "not delivered within 10 s of Totango's return: {counts:?}; waiting: {waiting:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = up_at.elapsed();
    let first = ok_at
        .lock()
        .unwrap()
        .iter()
        .find(|t| **t > up_at)
        .map(|t| *t - up_at);
    println!(
        "after recovery: first delivery {first:?}, all {total} delivered {drained:?}; {}",
        srv.stats().await["delivery"]
    );
    assert!(
        first.is_some_and(|f| f < Duration::from_secs(5)),
        "draining started {first:?} after recovery"
    );

    // Attribute updates in acceptance order per user and per account.
    let ok = ok(&backend);
    for (key, what) in [("sdr_u.n", "sdr_u"), ("sdr_o.n", "sdr_o")] {
        let mut last: std::collections::HashMap<String, u64> = Default::default();
        for p in ok.iter().filter(|p| p.contains_key(key)) {
            let n: u64 = p[key].parse().unwrap();
            let entity = p.get(what).cloned().unwrap_or_default();
            let prev = last.insert(entity.clone(), n).unwrap_or(0);
            assert!(n >= prev, "{what} {entity}: {n} after {prev}");
        }
    }
    // What the outage cost in attempts (printed, for the record).
    let all = srv
        .storage
        .list(Default::default(), total as usize)
        .await
        .unwrap();
    let failed = all.iter().filter(|m| m.attempts > 1).count();
    let extra: u32 = all.iter().map(|m| m.attempts.saturating_sub(1)).sum();
    let most = all.iter().map(|m| m.attempts).max().unwrap_or(0);
    println!(
        "{failed} messages needed more than one attempt; {extra} failed attempts, at most {most} for one message"
    );
    srv.shutdown.cancel();
}
