//! Two replicas of the real binary on one PostgreSQL database, each sending
//! to its own fake Totango (so every request shows which replica sent it).
//! Batches go to both replicas in turn; one replica is killed with SIGKILL
//! while it has requests in flight, and the load goes on to the survivor.
//!
//! Then: every acknowledged message reached Totango at least once; each
//! user's identify calls and each account's group calls reached it in
//! acceptance order; no message was in flight from both replicas at once;
//! the messages the killed replica had in flight were sent again by the
//! survivor once it judged the victim gone, all within 30 s of the kill with
//! the default settings; the database holds each message once, delivered.
//! Before the load, one batch goes to both replicas: deduplication is shared,
//! so it is delivered once.
//!
//! The other scenarios: a rolling restart of both replicas under load (no
//! message waits, under 0.1 % sent twice); PostgreSQL cut off for 10 s under
//! load by a TCP proxy in this process (ingest answers 503 + Retry-After,
//! `/readyz` says why, the logs stay quiet, everything acknowledged is
//! delivered once it is back); and a replica that is slow but alive
//! (Totango answering in 20 s, longer than the replica timeout) keeps its
//! messages.
//!
//! Needs TEST_DATABASE_URL (a server where the user may create databases);
//! skipped with a message when it is unset. A database `td_test_<random>` is
//! created for the run and dropped at the end.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use crate::support::binary::{self, Served, Starting};
use crate::support::totango::{FakeTotango, Hit, Params, Reply};
use crate::support::wait;
const KEY: &str = "replica-test-key";
const ADMIN: &str = "replica-test-admin";
/// The default replica timeout: a killed replica's messages are sent again
/// by then (plus a heartbeat and the resend).
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Each fake answers after this long, like a round trip to Totango.
const FAKE_DELAY: Duration = Duration::from_millis(30);
/// Posting tasks; each owns its users and accounts, so the acceptance order
/// of one user's (or account's) messages is the order its task posted them.
const TASKS: usize = 4;
const BATCHES_PER_TASK: usize = 50;
const USERS_PER_TASK: usize = 10;
const ACCOUNTS_PER_TASK: usize = 5;
/// Per batch: identify, group and track calls.
const IDENTIFIES: usize = 8;
const GROUPS: usize = 4;
const TRACKS: usize = 12;
/// The victim is killed once this many batches were acknowledged.
const KILL_AFTER_BATCHES: usize = TASKS * BATCHES_PER_TASK * 2 / 5;
const DRAIN: Duration = Duration::from_secs(90);
/// Messages of the batch sent to both replicas.
const DEDUPE_MESSAGES: usize = 10;

/// A fake Totango in this process answering after FAKE_DELAY; returns its
/// base URL and itself (its record of requests).
async fn fake_totango() -> (String, FakeTotango) {
    fake_totango_answering_in(FAKE_DELAY).await
}

/// A fake Totango that answers after `delay`.
async fn fake_totango_answering_in(delay: Duration) -> (String, FakeTotango) {
    let fake = FakeTotango::replying(move |_, _| Reply::ok().after(delay)).await;
    (fake.uri(), fake)
}

/// A fresh database on TEST_DATABASE_URL's server, dropped by [`TestDb::drop`].
struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDb {
    async fn create(admin_url: &str) -> TestDb {
        let name = format!("td_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("TEST_DATABASE_URL: cannot connect: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        conn.close().await.ok();
        let mut url = url::Url::parse(admin_url).expect("TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        TestDb {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
        }
    }

    async fn drop(self) {
        match sqlx::PgConnection::connect(&self.admin_url).await {
            Ok(mut conn) => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                    eprintln!("could not drop test database {}: {e}", self.name);
                }
                conn.close().await.ok();
            }
            Err(e) => eprintln!("could not drop test database {}: {e}", self.name),
        }
    }
}

/// A server process; killed when dropped. Its output also goes to
/// `<work>/<name>.log`.
struct Replica {
    name: &'static str,
    starting: Option<Starting>,
    served: Option<Served>,
    /// Known once [`Replica::wait_ready`] returned.
    base: String,
    log_path: PathBuf,
}

impl Replica {
    /// Starts the binary with the test's settings plus `extra` variables.
    fn start(
        name: &'static str,
        work: &Path,
        db_url: &str,
        totango: &str,
        extra: &[(&str, &str)],
    ) -> Replica {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = work.join(format!("{name}.log"));
        let mut cmd = binary::serve();
        cmd.current_dir(&dir)
            .env("TD_STORAGE__URL", db_url)
            .env("TD_STORAGE__POOL_SIZE", "4")
            .env("TD_TOTANGO__SERVICE_ID", "SP-1234-01")
            .env("TD_TOTANGO__ENDPOINT", totango)
            .env("TD_AUTH__WRITE_KEYS", KEY)
            .env("TD_ADMIN__TOKEN", ADMIN)
            .env("TD_DELIVERY__REQUEST_TIMEOUT_MS", "1000")
            .env("TD_DELIVERY__RETRY_BASE_MS", "50")
            .env("TD_DELIVERY__RETRY_MAX_MS", "500")
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied());
        Replica {
            name,
            starting: Some(Served::spawn(cmd, Some(&log_path))),
            served: None,
            base: String::new(),
            log_path,
        }
    }

    fn served(&self) -> &Served {
        self.served.as_ref().expect("running")
    }

    fn pid(&self) -> u32 {
        self.served.as_ref().expect("running").pid()
    }

    /// Waits until it listens and `/readyz` answers 200.
    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let starting = self.starting.take().expect("started");
        let served = tokio::task::block_in_place(|| starting.listening());
        self.base = served.base.clone();
        self.served = Some(served);
        wait::until(
            Duration::from_secs(60),
            Duration::from_millis(100),
            async || {
                if let Some(status) = self.served().try_wait() {
                    panic!(
                        "replica {} exited at start ({status}):\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
                let ready = http
                    .get(format!("{}/readyz", self.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if ready { Ok(()) } else { Err(()) }
            },
        )
        .await
        .unwrap_or_else(|()| {
            panic!(
                "replica {} not ready in 60 s:\n{}",
                self.name,
                self.log_tail()
            )
        });
    }

    /// SIGKILL: no shutdown, no last commit.
    fn kill(&mut self) {
        self.served().kill();
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(&mut self) -> std::process::ExitStatus {
        self.served().terminate();
        let exited = wait::until(
            Duration::from_secs(60),
            Duration::from_millis(50),
            async || self.served().try_wait().ok_or(()),
        )
        .await;
        match exited {
            Ok(status) => {
                self.served = None;
                status
            }
            Err(()) => {
                self.served = None;
                panic!("replica {} did not stop within 60 s of SIGTERM", self.name);
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// What the test sent, to check the fakes' records against.
#[derive(Debug, Clone)]
struct Sent {
    message_id: String,
    /// `u:<user>` (identify) or `a:<account>` (group): the entity whose
    /// updates must keep acceptance order. `None` for track calls.
    ordering: Option<String>,
    /// Position in its entity's acceptance order.
    seq: usize,
}

/// The batches of one posting task, in posting order.
fn task_batches(task: usize) -> Vec<(Value, Vec<Sent>)> {
    let mut seqs: HashMap<String, usize> = HashMap::new();
    let mut next_seq = |key: &str| {
        let n = seqs.entry(key.to_owned()).or_insert(0);
        *n += 1;
        *n
    };
    let user = |i: usize| format!("u-{task}-{}", i % USERS_PER_TASK);
    let account = |i: usize| format!("a-{task}-{}", i % ACCOUNTS_PER_TASK);
    let mut out = Vec::new();
    let mut n = 0;
    for b in 0..BATCHES_PER_TASK {
        let mut items = Vec::new();
        let mut sent = Vec::new();
        for i in 0..IDENTIFIES + GROUPS + TRACKS {
            n += 1;
            let message_id = format!("m-{task}-{b}-{i}");
            let (item, ordering, seq) = if i < IDENTIFIES {
                let u = user(n);
                let key = format!("u:{u}");
                let seq = next_seq(&key);
                let item = json!({"type": "identify", "messageId": message_id, "userId": u,
                    "traits": {"mid": message_id, "seq": seq}, "context": {"groupId": account(n)}});
                (item, Some(key), seq)
            } else if i < IDENTIFIES + GROUPS {
                let a = account(n);
                let key = format!("a:{a}");
                let seq = next_seq(&key);
                let item = json!({"type": "group", "messageId": message_id, "groupId": a,
                    "traits": {"mid": message_id, "seq": seq}});
                (item, Some(key), seq)
            } else {
                let item = json!({"type": "track", "messageId": message_id, "userId": user(n),
                    "event": format!("T {message_id}"), "context": {"groupId": account(n)}});
                (item, None, 0)
            };
            items.push(item);
            sent.push(Sent {
                message_id,
                ordering,
                seq,
            });
        }
        out.push((json!({"batch": items}), sent));
    }
    out
}

/// What a fake's request was: (messageId, ordering key, seq).
fn identify_hit(p: &Params) -> Option<(String, Option<String>, usize)> {
    let seq = |k: &str| p.get(k).and_then(|s| s.parse().ok()).unwrap_or(0);
    if let Some(mid) = p.get("sdr_u.mid") {
        return Some((
            mid.clone(),
            Some(format!("u:{}", p.get("sdr_u")?)),
            seq("sdr_u.seq"),
        ));
    }
    if let Some(mid) = p.get("sdr_o.mid") {
        return Some((
            mid.clone(),
            Some(format!("a:{}", p.get("sdr_o")?)),
            seq("sdr_o.seq"),
        ));
    }
    let mid = p.get("sdr_a")?.strip_prefix("T ")?;
    Some((mid.to_owned(), None, 0))
}

/// Requests for `ids` that Totango answered, counting repeats.
fn count_completed(logs: &[&FakeTotango], ids: &[String]) -> usize {
    logs.iter()
        .flat_map(|log| log.hits())
        .filter(|hit| hit.completed)
        .filter_map(|hit| identify_hit(&hit.params).map(|(mid, _, _)| mid))
        .filter(|mid| ids.contains(mid))
        .count()
}

struct Replicas {
    /// Base URLs: 0 is the victim, 1 the survivor.
    bases: [String; 2],
    victim_alive: AtomicBool,
    acked_batches: AtomicUsize,
    /// Batches that failed on the victim (killed mid-request) and were
    /// posted again to the survivor.
    reposted: AtomicUsize,
}

/// Posts one task's batches, alternating replicas while both live; a batch
/// that fails is posted again (same messageIds) to the survivor, as
/// Segment's libraries retry. Returns the messages, all acknowledged.
async fn post_task(task: usize, shared: Arc<Replicas>) -> Vec<Sent> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut acked = Vec::new();
    for (b, (body, sent)) in task_batches(task).into_iter().enumerate() {
        let body = serde_json::to_vec(&body).unwrap();
        let mut tries = 0;
        loop {
            tries += 1;
            // Replica 0 is the victim; after its death everything goes to 1.
            let target = if shared.victim_alive.load(Ordering::SeqCst) {
                (task + b + tries - 1) % 2
            } else {
                1
            };
            let answer = http
                .post(format!("{}/v1/batch", shared.bases[target]))
                .basic_auth(KEY, Some(""))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    // 503 (backpressure, shutting down, storage busy) is retried.
                    assert!(
                        status == reqwest::StatusCode::SERVICE_UNAVAILABLE && tries < 50,
                        "batch {b} of task {task} to replica {target}: {status} {text}"
                    );
                }
                Err(e) => {
                    assert!(
                        target == 0 && tries < 50,
                        "batch {b} of task {task} to replica {target}: {e}"
                    );
                }
            }
            if target == 0 {
                shared.reposted.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shared.acked_batches.fetch_add(1, Ordering::SeqCst);
        acked.extend(sent);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_queue_and_survive_a_kill() {
    let Ok(admin_url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!(
            "SKIPPED two_replicas_share_the_queue_and_survive_a_kill: TEST_DATABASE_URL is not set \
             (e.g. postgres://postgres@127.0.0.1:5432/test)"
        );
        return;
    };
    let db = TestDb::create(&admin_url).await;
    let work = tempfile::tempdir().unwrap();
    let outcome = tokio::spawn(scenario(db.url.clone(), work.path().to_owned())).await;
    if outcome.is_err() {
        for name in ["victim", "survivor"] {
            let text = std::fs::read_to_string(work.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- {name} log (last 40 lines) ---\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    db.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(db_url: String, work: PathBuf) {
    let http = reqwest::Client::new();
    let (victim_totango, victim_log) = fake_totango().await;
    let (survivor_totango, survivor_log) = fake_totango().await;
    // Both start at once on an empty database: migrations run under a lock.
    let mut victim = Replica::start("victim", &work, &db_url, &victim_totango, &[]);
    let mut survivor = Replica::start("survivor", &work, &db_url, &survivor_totango, &[]);
    victim.wait_ready(&http).await;
    survivor.wait_ready(&http).await;

    // Deduplication is shared: a batch sent to one replica and then again to
    // the other (a client retrying elsewhere) is stored and delivered once.
    let dedupe_ids: Vec<String> = (0..DEDUPE_MESSAGES).map(|i| format!("dup-{i}")).collect();
    let dedupe_batch = json!({"batch": dedupe_ids.iter().map(|m| json!({
        "type": "track", "messageId": m, "userId": "dup-user", "event": format!("T {m}"),
        "context": {"groupId": "dup-account"}})).collect::<Vec<_>>()});
    for base in [&victim.base, &survivor.base] {
        let r = http
            .post(format!("{base}/v1/batch"))
            .basic_auth(KEY, Some(""))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&dedupe_batch).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    wait::until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            let done = count_completed(&[&victim_log, &survivor_log], &dedupe_ids);
            if done < DEDUPE_MESSAGES {
                Err(())
            } else {
                Ok(())
            }
        },
    )
    .await
    .expect("the deduplicated batch was not delivered");

    let shared = Arc::new(Replicas {
        bases: [victim.base.clone(), survivor.base.clone()],
        victim_alive: AtomicBool::new(true),
        acked_batches: AtomicUsize::new(0),
        reposted: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(post_task(t, shared.clone())))
        .collect();

    // Kill the victim mid-load, while it has a request to Totango that
    // arrived just now (so it cannot have its answer yet).
    while shared.acked_batches.load(Ordering::SeqCst) < KILL_AFTER_BATCHES {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "posting stalled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait::until(
        Duration::from_secs(30),
        Duration::from_millis(1),
        async || {
            let fresh = victim_log
                .hits()
                .iter()
                .any(|h| h.answered.is_none() && h.at.elapsed() < FAKE_DELAY / 3);
            if fresh { Ok(()) } else { Err(()) }
        },
    )
    .await
    .expect("the victim never had a request in flight");
    shared.victim_alive.store(false, Ordering::SeqCst);
    let killed_at = Instant::now();
    let victim_pid = victim.pid();
    victim.kill();
    eprintln!(
        "killed the victim (pid {victim_pid}) after {} acknowledged batches",
        shared.acked_batches.load(Ordering::SeqCst)
    );

    let mut sent: Vec<Sent> = Vec::new();
    for t in tasks {
        sent.extend(t.await.expect("posting task"));
    }
    let posted_in = started.elapsed();
    let total = TASKS * BATCHES_PER_TASK * (IDENTIFIES + GROUPS + TRACKS);
    assert_eq!(sent.len(), total, "every batch acknowledged");

    // Wait until every acknowledged message reached a fake.
    let wanted: HashSet<&str> = sent.iter().map(|s| s.message_id.as_str()).collect();
    let within = (killed_at + TAKEOVER_LIMIT).saturating_duration_since(Instant::now());
    let missing = wait::until(within, Duration::from_millis(100), async || {
        let mut delivered: HashSet<String> = HashSet::new();
        for hit in victim_log.hits().iter().chain(survivor_log.hits().iter()) {
            if hit.completed {
                if let Some((mid, _, _)) = identify_hit(&hit.params) {
                    delivered.insert(mid);
                }
            }
        }
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|m| !delivered.contains(**m))
            .copied()
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    })
    .await
    .err()
    .unwrap_or_default();
    let drained_in = started.elapsed();
    let mut sample = missing.clone();
    sample.sort_unstable();
    sample.truncate(20);
    assert!(
        missing.is_empty(),
        "{} of {total} acknowledged messages had not reached Totango {TAKEOVER_LIMIT:?} \
         after the kill (first: {sample:?})",
        missing.len()
    );
    // Late duplicates, if any, show up here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim_hits = victim_log.hits();
    let survivor_hits = survivor_log.hits();

    // Acceptance order per user (identify) and per account (group): the
    // requests of both replicas together, by arrival at Totango, never go
    // back to an earlier update. A repeat (a takeover resending the
    // victim's last one) is allowed.
    let mut by_entity: HashMap<String, Vec<(Instant, usize, &'static str)>> = HashMap::new();
    for (who, hits) in [("victim", &victim_hits), ("survivor", &survivor_hits)] {
        for hit in hits {
            if let Some((_, Some(key), seq)) = identify_hit(&hit.params) {
                by_entity.entry(key).or_default().push((hit.at, seq, who));
            }
        }
    }
    let mut out_of_order = Vec::new();
    for (key, hits) in &mut by_entity {
        hits.sort_by_key(|(at, _, _)| *at);
        for pair in hits.windows(2) {
            if pair[1].1 < pair[0].1 {
                out_of_order.push(format!(
                    "{key}: update {} ({}) after update {} ({})",
                    pair[1].1, pair[1].2, pair[0].1, pair[0].2
                ));
            }
        }
    }
    let expected_entities: HashSet<&str> =
        sent.iter().filter_map(|s| s.ordering.as_deref()).collect();
    assert_eq!(
        by_entity.len(),
        expected_entities.len(),
        "every user and account had updates delivered"
    );
    assert!(
        out_of_order.is_empty(),
        "{} updates out of acceptance order, e.g. {:?}",
        out_of_order.len(),
        &out_of_order[..out_of_order.len().min(10)]
    );
    // The seq numbers sent per entity were 1, 2, 3, … in posting order.
    let mut last_seq: HashMap<&str, usize> = HashMap::new();
    for s in &sent {
        if let Some(key) = &s.ordering {
            let last = last_seq.entry(key).or_insert(0);
            assert_eq!(s.seq, *last + 1, "test bookkeeping for {key}");
            *last = s.seq;
        }
    }

    // No message was in flight from both replicas at the same time.
    let mut intervals: HashMap<String, [Vec<(Instant, Instant)>; 2]> = HashMap::new();
    let end = Instant::now();
    for (side, hits) in [(0, &victim_hits), (1, &survivor_hits)] {
        for hit in hits {
            if let Some((mid, _, _)) = identify_hit(&hit.params) {
                intervals.entry(mid).or_default()[side].push((hit.at, hit.answered.unwrap_or(end)));
            }
        }
    }
    let mut overlapping = Vec::new();
    let mut both = 0;
    for (mid, [v, s]) in &intervals {
        if v.is_empty() || s.is_empty() {
            continue;
        }
        both += 1;
        for a in v {
            for b in s {
                if a.0 < b.1 && b.0 < a.1 {
                    overlapping.push(mid.clone());
                }
            }
        }
    }
    assert!(
        overlapping.is_empty(),
        "{} messages were in flight from both replicas at once, e.g. {:?}",
        overlapping.len(),
        &overlapping[..overlapping.len().min(10)]
    );

    // What the victim had in flight when it died was sent again by the
    // survivor, after the kill (its leases ran out).
    let in_flight_at_kill: Vec<String> = victim_hits
        .iter()
        .filter(|h| h.at < killed_at && h.answered.is_none_or(|a| a > killed_at))
        .filter_map(|h| identify_hit(&h.params).map(|(mid, _, _)| mid))
        .collect();
    assert!(
        !in_flight_at_kill.is_empty(),
        "the victim had nothing in flight at the kill: the takeover was not exercised"
    );
    let mut takeover_delay = Duration::ZERO;
    for mid in &in_flight_at_kill {
        let resent = survivor_hits
            .iter()
            .filter(|h| h.completed && h.at > killed_at)
            .filter(|h| identify_hit(&h.params).is_some_and(|(m, _, _)| &m == mid))
            .map(|h| h.at - killed_at)
            .min();
        let Some(after) = resent else {
            panic!("{mid} was in flight at the victim's death and never sent by the survivor");
        };
        takeover_delay = takeover_delay.max(after);
    }

    // The database holds each message once, delivered (batches posted again
    // after the kill were either stored then or recorded as duplicates).
    let stats: Value = {
        let r = http
            .get(format!("{}/api/stats", survivor.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
    };
    let outcome = |name: &str| stats["outcomes"][name].as_u64().unwrap_or(0);
    assert_eq!(
        outcome("delivered"),
        (total + DEDUPE_MESSAGES) as u64,
        "stats: {stats}"
    );
    assert!(
        outcome("duplicate") >= DEDUPE_MESSAGES as u64,
        "stats: {stats}"
    );
    assert_eq!(
        count_completed(&[&victim_log, &survivor_log], &dedupe_ids),
        DEDUPE_MESSAGES,
        "a batch sent to both replicas was delivered once"
    );
    assert_eq!(outcome("pending"), 0, "stats: {stats}");
    assert_eq!(outcome("dead"), 0, "stats: {stats}");
    assert_eq!(stats["queue"]["depth"], 0, "stats: {stats}");

    let survivor_status = survivor.stop().await;
    assert!(
        survivor_status.success(),
        "the survivor did not stop cleanly on SIGTERM: {survivor_status}\n{}",
        survivor.log_tail()
    );

    // Migrations ran at start; `migrate` now finds nothing to do.
    let migrate = binary::command()
        .arg("migrate")
        .current_dir(&work)
        .env("TD_STORAGE__URL", &db_url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&migrate.stdout);
    assert!(
        migrate.status.success() && stdout.chars().any(|c| c.is_ascii_digit()),
        "migrate: {} {stdout} {}",
        migrate.status,
        String::from_utf8_lossy(&migrate.stderr)
    );

    // Sent by both: how long before the kill the victim had its answer (its
    // result was not committed yet), and how long after the victim the
    // survivor sent it (the lease had to run out first).
    let mut unrecorded_before_kill = Duration::ZERO;
    let mut resend_gap_min: Option<Duration> = None;
    for [v, s] in intervals.values() {
        if let (Some(first_v), Some(first_s)) = (v.iter().min(), s.iter().min()) {
            if first_v.1 < killed_at {
                unrecorded_before_kill = unrecorded_before_kill.max(killed_at - first_v.1);
            }
            let gap = first_s.0.saturating_duration_since(first_v.0);
            resend_gap_min = Some(resend_gap_min.map_or(gap, |m| m.min(gap)));
        }
    }
    eprintln!(
        "sent by both replicas: the survivor sent each at least {:.1?} after the victim; the \
         victim had Totango's answer up to {unrecorded_before_kill:.1?} before its death \
         without having recorded it",
        resend_gap_min.unwrap_or_default()
    );

    let redelivered = intervals
        .values()
        .filter(|[v, s]| v.len() + s.len() > 1)
        .count();
    eprintln!(
        "{total} messages, {} batches posted again after failing on the victim; posted in \
         {posted_in:.1?}, all delivered after {drained_in:.1?}; requests: victim {}, survivor {}; \
         {redelivered} messages sent more than once ({both} by both replicas); {} in flight at the \
         kill, all resent by the survivor within {takeover_delay:.1?} of it (default settings)",
        shared.reposted.load(Ordering::SeqCst),
        victim_hits.len(),
        survivor_hits.len(),
        in_flight_at_kill.len(),
    );
}

/// What the posting tasks of a scenario saw.
#[derive(Default)]
struct Load {
    /// Replicas taking traffic (a load balancer's view); posts go round them.
    bases: Mutex<Vec<String>>,
    acked_batches: AtomicUsize,
    /// 503 answers, and those without `Retry-After`.
    unavailable: AtomicUsize,
    unavailable_without_retry_after: AtomicUsize,
    /// Posts that failed without an answer (a replica stopping).
    no_answer: AtomicUsize,
    /// Other answers that were not 2xx, for the failure message.
    unexpected: Mutex<Vec<String>>,
}

/// Posts one task's batches in order to the replicas taking traffic, with a
/// pause between batches so the load lasts; a batch that fails (503, or no
/// answer from a replica that stopped) is posted again, as Segment's
/// libraries retry. Returns the messages, all acknowledged.
async fn post_anywhere(task: usize, load: Arc<Load>, pace: Duration) -> Vec<Sent> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut acked = Vec::new();
    for (b, (body, sent)) in task_batches(task).into_iter().enumerate() {
        let body = serde_json::to_vec(&body).unwrap();
        let started = Instant::now();
        let mut tries = 0usize;
        loop {
            tries += 1;
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "batch {b} of task {task} not acknowledged in 120 s"
            );
            let base = {
                let bases = load.bases.lock().unwrap();
                if bases.is_empty() {
                    None
                } else {
                    Some(bases[(task + b + tries) % bases.len()].clone())
                }
            };
            let Some(base) = base else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let answer = http
                .post(format!("{base}/v1/batch"))
                .basic_auth(KEY, Some(""))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    load.unavailable.fetch_add(1, Ordering::SeqCst);
                    if !r.headers().contains_key("retry-after") {
                        load.unavailable_without_retry_after
                            .fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    load.unexpected
                        .lock()
                        .unwrap()
                        .push(format!("{status} {text}"));
                }
                Err(_) => {
                    load.no_answer.fetch_add(1, Ordering::SeqCst);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        load.acked_batches.fetch_add(1, Ordering::SeqCst);
        acked.extend(sent);
        tokio::time::sleep(pace).await;
    }
    acked
}

/// Waits until `acked_batches` reaches `n`.
async fn wait_acked(load: &Load, n: usize) {
    wait::until(
        Duration::from_secs(120),
        Duration::from_millis(10),
        async || {
            if load.acked_batches.load(Ordering::SeqCst) < n {
                Err(())
            } else {
                Ok(())
            }
        },
    )
    .await
    .expect("posting stalled");
}

/// The messageIds the fakes completed, with how many times each.
fn completed_counts(logs: &[&FakeTotango]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for log in logs {
        for hit in log.hits() {
            if hit.completed {
                if let Some((mid, _, _)) = identify_hit(&hit.params) {
                    *counts.entry(mid).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

/// Waits until every message of `sent` was completed by a fake, or `until`.
/// Returns the ones still missing.
async fn wait_delivered(logs: &[&FakeTotango], sent: &[Sent], until: Instant) -> Vec<String> {
    let within = until.saturating_duration_since(Instant::now());
    wait::until(within, Duration::from_millis(50), async || {
        let done = completed_counts(logs);
        let missing: Vec<String> = sent
            .iter()
            .filter(|s| !done.contains_key(&s.message_id))
            .map(|s| s.message_id.clone())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    })
    .await
    .err()
    .unwrap_or_default()
}

/// Per user (identify) and per account (group): the fakes' requests, by
/// arrival, never go back to an earlier update. Returns the violations.
fn order_violations(logs: &[&FakeTotango]) -> Vec<String> {
    let mut by_entity: HashMap<String, Vec<(Instant, usize)>> = HashMap::new();
    for log in logs {
        for hit in log.hits() {
            if let Some((_, Some(key), seq)) = identify_hit(&hit.params) {
                by_entity.entry(key).or_default().push((hit.at, seq));
            }
        }
    }
    let mut out = Vec::new();
    for (key, hits) in &mut by_entity {
        hits.sort_by_key(|(at, _)| *at);
        for pair in hits.windows(2) {
            if pair[1].1 < pair[0].1 {
                out.push(format!("{key}: update {} after {}", pair[1].1, pair[0].1));
            }
        }
    }
    out
}

/// Runs `scenario` on a fresh database, printing the replicas' logs if it fails.
async fn on_fresh_database<F, Fut>(test: &str, logs: &[&str], scenario: F)
where
    F: FnOnce(String, PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Ok(admin_url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!(
            "SKIPPED {test}: TEST_DATABASE_URL is not set \
             (e.g. postgres://postgres@127.0.0.1:5432/test)"
        );
        return;
    };
    let db = TestDb::create(&admin_url).await;
    let work = tempfile::tempdir().unwrap();
    let outcome = tokio::spawn(scenario(db.url.clone(), work.path().to_owned())).await;
    if outcome.is_err() {
        for name in logs {
            let text = std::fs::read_to_string(work.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- {name} log (last 40 lines) ---\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    db.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A rolling update of both replicas under load, with the default settings:
/// each in turn leaves the load balancer, gets SIGTERM, and a new process
/// takes its place. Nothing waits for a replica timeout (everything is
/// delivered soon after the load ends) and under 0.1 % is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing_and_resends_almost_nothing() {
    on_fresh_database(
        "a_rolling_restart_under_load_loses_nothing_and_resends_almost_nothing",
        &["a", "b", "a2", "b2"],
        rolling_restart,
    )
    .await;
}

async fn rolling_restart(db_url: String, work: PathBuf) {
    let http = reqwest::Client::new();
    let (totango, log) = fake_totango().await;
    let mut a = Replica::start("a", &work, &db_url, &totango, &[]);
    let mut b = Replica::start("b", &work, &db_url, &totango, &[]);
    a.wait_ready(&http).await;
    b.wait_ready(&http).await;
    let load = Arc::new(Load::default());
    *load.bases.lock().unwrap() = vec![a.base.clone(), b.base.clone()];
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(post_anywhere(t, load.clone(), Duration::from_millis(40))))
        .collect();
    let batches = TASKS * BATCHES_PER_TASK;

    let mut replaced = Vec::new();
    for (old, name, at) in [(&mut a, "a2", batches / 4), (&mut b, "b2", batches / 2)] {
        wait_acked(&load, at).await;
        load.bases.lock().unwrap().retain(|base| *base != old.base);
        let status = old.stop().await;
        assert!(
            status.success(),
            "replica {} did not stop cleanly on SIGTERM: {status}\n{}",
            old.name,
            old.log_tail()
        );
        let mut new = Replica::start(name, &work, &db_url, &totango, &[]);
        new.wait_ready(&http).await;
        load.bases.lock().unwrap().push(new.base.clone());
        replaced.push(new);
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.expect("posting task"));
    }
    let load_ended = Instant::now();
    let total = TASKS * BATCHES_PER_TASK * (IDENTIFIES + GROUPS + TRACKS);
    assert_eq!(sent.len(), total, "every batch acknowledged");
    assert!(
        load.unexpected.lock().unwrap().is_empty(),
        "answers other than 2xx and 503: {:?}",
        load.unexpected.lock().unwrap()
    );

    // Nothing waits for a timeout: what was queued goes within seconds.
    let missing = wait_delivered(&[&log], &sent, load_ended + Duration::from_secs(10)).await;
    assert!(
        missing.is_empty(),
        "{} of {total} messages not delivered 10 s after the load (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = completed_counts(&[&log]);
    let twice = counts.values().filter(|n| **n > 1).count();
    assert!(
        twice * 1000 < total,
        "{twice} of {total} messages were sent more than once (limit 0.1 %)"
    );
    let violations = order_violations(&[&log]);
    assert!(
        violations.is_empty(),
        "{} updates out of order, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    eprintln!(
        "rolling restart: {total} messages, all delivered {:.1?} after the load; {twice} sent \
         twice; {} answers 503, {} posts without an answer",
        load_ended.elapsed(),
        load.unavailable.load(Ordering::SeqCst),
        load.no_answer.load(Ordering::SeqCst),
    );
    for mut r in replaced {
        assert!(r.stop().await.success());
    }
}

/// A TCP proxy in front of PostgreSQL that the test can cut (every open
/// connection closed, new ones refused) and restore, or freeze: from then on
/// nothing is forwarded either way while every connection stays open, as in
/// a network partition that leaves connections half-open.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// Forwards `from` to `to` until either ends; once `frozen`, holds both open
/// and forwards nothing more.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (flag, freeze, open) = (cut.clone(), frozen.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let (upstream, freeze) = (upstream.clone(), freeze.clone());
                let task = tokio::spawn(async move {
                    if freeze.load(Ordering::SeqCst) {
                        // Connected, and never answered.
                        let _held = &client;
                        std::future::pending::<()>().await;
                    }
                    if let Ok(server) = tokio::net::TcpStream::connect(&upstream).await {
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(
                            forward(cr, sw, freeze.clone()),
                            forward(sr, cw, freeze.clone())
                        );
                    }
                });
                let mut open = open.lock().unwrap();
                open.retain(|t| !t.is_finished());
                open.push(task);
            }
        });
        Proxy {
            port,
            cut,
            frozen,
            connections,
        }
    }

    /// A URL like `db_url` that goes through this proxy.
    fn url_for(&self, db_url: &str) -> String {
        let mut url = url::Url::parse(db_url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Upstream `host:port` of a PostgreSQL URL.
fn upstream_of(db_url: &str) -> String {
    let url = url::Url::parse(db_url).unwrap();
    format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    )
}

/// PostgreSQL unreachable for 10 s under load, through both replicas: ingest
/// answers 503 with `Retry-After` (never a 2xx it did not commit), `/readyz`
/// says storage is unavailable, the logs stay quiet, and once the database
/// is back both replicas resume by themselves and every acknowledged message
/// is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_load_is_survived() {
    on_fresh_database(
        "a_database_outage_under_load_is_survived",
        &["a", "b"],
        database_outage,
    )
    .await;
}

async fn database_outage(db_url: String, work: PathBuf) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let proxy = Proxy::start(upstream_of(&db_url)).await;
    let proxied = proxy.url_for(&db_url);

    let (totango, log) = fake_totango().await;
    let mut a = Replica::start("a", &work, &proxied, &totango, &[]);
    let mut b = Replica::start("b", &work, &proxied, &totango, &[]);
    a.wait_ready(&http).await;
    b.wait_ready(&http).await;
    let load = Arc::new(Load::default());
    *load.bases.lock().unwrap() = vec![a.base.clone(), b.base.clone()];
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(post_anywhere(t, load.clone(), Duration::from_millis(60))))
        .collect();
    let batches = TASKS * BATCHES_PER_TASK;

    wait_acked(&load, batches / 4).await;
    let log_lines = |r: &Replica| {
        std::fs::read_to_string(&r.log_path)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let lines_before = [log_lines(&a), log_lines(&b)];
    let acked_before = load.acked_batches.load(Ordering::SeqCst);
    proxy.cut();
    let cut_at = Instant::now();
    // While it is cut: not ready, saying why.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in [&a, &b] {
        let answer = http.get(format!("{}/readyz", r.base)).send().await.unwrap();
        assert_eq!(
            answer.status(),
            503,
            "replica {} ready without its database",
            r.name
        );
        let body = answer.text().await.unwrap();
        assert!(body.contains("storage"), "/readyz of {}: {body}", r.name);
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed())).await;
    let acked_during = load.acked_batches.load(Ordering::SeqCst) - acked_before;
    let lines_during = [
        log_lines(&a) - lines_before[0],
        log_lines(&b) - lines_before[1],
    ];
    proxy.restore();
    let restored_at = Instant::now();

    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.expect("posting task"));
    }
    let total = TASKS * BATCHES_PER_TASK * (IDENTIFIES + GROUPS + TRACKS);
    assert_eq!(sent.len(), total, "every batch acknowledged in the end");
    assert!(
        load.unexpected.lock().unwrap().is_empty(),
        "answers other than 2xx and 503: {:?}",
        load.unexpected.lock().unwrap()
    );
    let unavailable = load.unavailable.load(Ordering::SeqCst);
    assert!(unavailable > 0, "no 503 during the outage");
    assert_eq!(
        load.unavailable_without_retry_after.load(Ordering::SeqCst),
        0,
        "every 503 carries Retry-After"
    );
    // Posts in flight at the cut may have committed; after that, none can.
    assert!(
        acked_during <= TASKS,
        "{acked_during} batches acknowledged while the database was unreachable"
    );
    for (r, lines) in [(&a, lines_during[0]), (&b, lines_during[1])] {
        assert!(
            lines <= 40,
            "replica {} wrote {lines} log lines during the 10 s outage:\n{}",
            r.name,
            r.log_tail()
        );
    }
    let missing = wait_delivered(&[&log], &sent, Instant::now() + DRAIN).await;
    assert!(
        missing.is_empty(),
        "{} of {total} acknowledged messages never delivered (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let violations = order_violations(&[&log]);
    assert!(
        violations.is_empty(),
        "{} updates out of order, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    for r in [&a, &b] {
        let answer = http.get(format!("{}/readyz", r.base)).send().await.unwrap();
        assert_eq!(answer.status(), 200, "replica {} not ready again", r.name);
    }
    eprintln!(
        "database outage: {unavailable} answers 503 (all with Retry-After); log lines during \
         the 10 s: {lines_during:?}; everything delivered {:.1?} after the database came back",
        restored_at.elapsed()
    );
    assert!(a.stop().await.success());
    assert!(b.stop().await.success());
}

/// Totango answering in 20 s, longer than the replica timeout (15 s): the
/// replica waiting for those answers is alive, so nobody else sends its
/// messages. Every message is sent exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_alive_replica_keeps_its_messages() {
    on_fresh_database(
        "a_slow_but_alive_replica_keeps_its_messages",
        &["slow-a", "slow-b"],
        slow_replica,
    )
    .await;
}

async fn slow_replica(db_url: String, work: PathBuf) {
    let http = reqwest::Client::new();
    let (totango, log) = fake_totango_answering_in(Duration::from_secs(20)).await;
    let slow = [("TD_DELIVERY__REQUEST_TIMEOUT_MS", "30000")];
    let mut a = Replica::start("slow-a", &work, &db_url, &totango, &slow);
    let mut b = Replica::start("slow-b", &work, &db_url, &totango, &slow);
    a.wait_ready(&http).await;
    b.wait_ready(&http).await;
    // Only `a` receives the messages; both claim from the shared queue.
    let ids: Vec<String> = (0..8).map(|i| format!("slow-{i}")).collect();
    let batch = json!({"batch": ids.iter().map(|m| json!({
        "type": "track", "messageId": m, "userId": format!("user-{m}"),
        "event": format!("T {m}"), "context": {"groupId": "slow-account"}}))
        .collect::<Vec<_>>()});
    let r = http
        .post(format!("{}/v1/batch", a.base))
        .basic_auth(KEY, Some(""))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&batch).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait::until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        async || {
            if count_completed(&[&log], &ids) < ids.len() {
                Err(())
            } else {
                Ok(())
            }
        },
    )
    .await
    .expect("not delivered in 60 s");
    // Longer than a replica timeout after the answers: nobody resends.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hits = log.hits();
    let mut per_message: HashMap<String, usize> = HashMap::new();
    for hit in &hits {
        if let Some((mid, _, _)) = identify_hit(&hit.params) {
            *per_message.entry(mid).or_insert(0) += 1;
        }
    }
    let twice: Vec<_> = per_message.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "messages of a live, slow replica were sent again: {twice:?}"
    );
    assert_eq!(per_message.len(), ids.len());
    assert!(a.stop().await.success());
    assert!(b.stop().await.success());
}

/// A replica partitioned from the database with its connections left
/// half-open (the proxy forwards nothing more, closes nothing) while it holds
/// claims: the other replica judges it gone and delivers everything within
/// 30 s; the partitioned one fences itself and sends nothing it had not
/// started before the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_half_open_partition_loses_its_work_to_the_others() {
    on_fresh_database(
        "a_replica_behind_a_half_open_partition_loses_its_work_to_the_others",
        &["cut-off", "other"],
        half_open_partition,
    )
    .await;
}

async fn half_open_partition(db_url: String, work: PathBuf) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let proxy = Proxy::start(upstream_of(&db_url)).await;
    // Totango answers in 1 s, so the replica holds claims when it is cut off.
    let (totango_a, log_a) = fake_totango_answering_in(Duration::from_secs(1)).await;
    let (totango_b, log_b) = fake_totango_answering_in(Duration::from_secs(1)).await;
    let slow = [("TD_DELIVERY__REQUEST_TIMEOUT_MS", "5000")];
    let mut a = Replica::start("cut-off", &work, &proxy.url_for(&db_url), &totango_a, &slow);
    let mut b = Replica::start("other", &work, &db_url, &totango_b, &slow);
    a.wait_ready(&http).await;
    b.wait_ready(&http).await;
    let ids: Vec<String> = (0..400).map(|i| format!("p-{i}")).collect();
    for chunk in ids.chunks(100) {
        let batch = json!({"batch": chunk.iter().map(|m| json!({
            "type": "track", "messageId": m, "userId": format!("user-{m}"),
            "event": format!("T {m}"), "context": {"groupId": "p-account"}}))
            .collect::<Vec<_>>()});
        let r = http
            .post(format!("{}/v1/batch", b.base))
            .basic_auth(KEY, Some(""))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&batch).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Partition `a` while it has requests to Totango in flight.
    wait::until(
        Duration::from_secs(30),
        Duration::from_millis(5),
        async || {
            if log_a.hits().iter().any(|h| h.answered.is_none()) {
                Ok(())
            } else {
                Err(())
            }
        },
    )
    .await
    .expect("replica a never claimed anything");
    proxy.freeze();
    let frozen_at = Instant::now();
    let within = (frozen_at + TAKEOVER_LIMIT).saturating_duration_since(Instant::now());
    wait::until(within, Duration::from_millis(50), async || {
        let done = count_completed(&[&log_a, &log_b], &ids);
        if done < ids.len() { Err(done) } else { Ok(()) }
    })
    .await
    .unwrap_or_else(|done| {
        panic!(
            "{done} of {} messages delivered 30 s after replica a was partitioned",
            ids.len()
        )
    });
    let took = frozen_at.elapsed();
    // `a` can claim nothing once partitioned; what it sends after the
    // partition are only requests it had claimed before it.
    let after: Vec<Hit> = log_a
        .hits()
        .into_iter()
        .filter(|h| h.at > frozen_at + Duration::from_secs(2))
        .collect();
    assert!(
        after.is_empty(),
        "the partitioned replica kept sending: {} requests more than 2 s after the partition",
        after.len()
    );
    let mut both = 0;
    let hits_b = log_b.hits();
    for hit in log_a.hits() {
        let Some((mid, _, _)) = identify_hit(&hit.params) else {
            continue;
        };
        let answered = hit.answered.unwrap_or_else(Instant::now);
        for other in &hits_b {
            if identify_hit(&other.params).is_some_and(|(m, _, _)| m == mid) {
                both += 1;
                assert!(
                    other.at >= answered,
                    "{mid} in flight from both replicas at once"
                );
            }
        }
    }
    eprintln!(
        "half-open partition: all {} messages delivered {took:.1?} after it; {both} sent by both",
        ids.len()
    );
    assert!(b.stop().await.success());
    drop(a);
}
