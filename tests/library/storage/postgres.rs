//! What only the PostgreSQL backend has to show: several replicas on one
//! database (claims never overlap and keep per-key order, dedupe holds
//! across them, stale reports are ignored, pauses and work are shared),
//! versioned migrations, and text PostgreSQL cannot store as is.
//! Each test runs on a fresh database; all skip when TEST_DATABASE_URL is unset.

use crate::support::pg::{self, TestDatabase};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use totango_destination::storage::postgres;
use totango_destination::storage::{
    Acceptance, Disposition, MessageFilter, NewMessage, PostgresStorage, Report, State, Storage,
    StorageError, StorageOptions, now_millis,
};

/// How long a replica may go unheard in these tests before it is judged gone.
const REPLICA_TIMEOUT_MS: i64 = 2_000;

fn options(lease_ms: i64) -> StorageOptions {
    StorageOptions {
        lease_ms,
        pool_size: 4,
        heartbeat_ms: 200,
        replica_timeout_ms: REPLICA_TIMEOUT_MS,
        ..StorageOptions::default()
    }
}

async fn open(db: &TestDatabase, lease_ms: i64) -> PostgresStorage {
    postgres::open(db.url(), options(lease_ms))
        .await
        .expect("open storage")
}

fn msg(message_id: &str, key: Option<&str>) -> NewMessage {
    NewMessage {
        call: "identify".to_owned(),
        account_id: None,
        ordering_key: key.map(str::to_owned),
        payload: json!({"type": "identify", "messageId": message_id})
            .to_string()
            .into(),
        ..super::msg(message_id, "")
    }
}

fn report(id: i64, lease: i64, disposition: Disposition) -> Report {
    Report {
        id,
        lease,
        requests: None,
        sent: 0,
        attempted: true,
        disposition,
        last: None,
        settings: None,
    }
}

fn stored(a: &Acceptance) -> i64 {
    match *a {
        Acceptance::Stored { id } => id,
        Acceptance::Duplicate { id } => panic!("expected Stored, got Duplicate {{ id: {id} }}"),
    }
}

/// Two replicas claiming the same queue at once: no message is held twice,
/// no key has two messages in flight, each key is delivered in acceptance
/// order, and everything is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_claim_without_overlap_and_keep_key_order() {
    let Some(db) = TestDatabase::create("two_replicas_claim") else {
        return;
    };
    let a = Arc::new(open(&db, 60_000).await);
    let b = Arc::new(open(&db, 60_000).await);
    let mut batch = Vec::new();
    for k in 0..30 {
        for i in 0..6 {
            batch.push(msg(&format!("k{k}-{i}"), Some(&format!("key{k}"))));
        }
    }
    for i in 0..120 {
        batch.push(msg(&format!("free{i}"), None));
    }
    let keys: Vec<Option<String>> = batch.iter().map(|m| m.ordering_key.clone()).collect();
    let total = batch.len();
    let ids: Vec<i64> = a.accept(batch).await.unwrap().iter().map(stored).collect();
    let key_of: HashMap<i64, Option<String>> = ids.iter().copied().zip(keys).collect();

    #[derive(Default)]
    struct Seen {
        in_flight: HashSet<i64>,
        keys_in_flight: HashSet<String>,
        delivered: Vec<i64>,
        per_key: HashMap<String, Vec<i64>>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let worker = |s: Arc<PostgresStorage>| {
        let seen = seen.clone();
        let key_of = key_of.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if seen.lock().unwrap().delivered.len() == total {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "not done in time");
                let claimed = s.claim(7).await.unwrap().messages;
                {
                    let mut seen = seen.lock().unwrap();
                    for c in &claimed {
                        assert!(seen.in_flight.insert(c.id), "{} claimed twice", c.id);
                        if let Some(key) = &key_of[&c.id] {
                            assert!(
                                seen.keys_in_flight.insert(key.clone()),
                                "two messages of {key} in flight"
                            );
                            seen.per_key.entry(key.clone()).or_default().push(c.id);
                        }
                    }
                }
                if claimed.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                {
                    // Out of flight before the report commits: from then on
                    // the key's next message may be claimed.
                    let mut seen = seen.lock().unwrap();
                    for c in &claimed {
                        seen.in_flight.remove(&c.id);
                        if let Some(key) = &key_of[&c.id] {
                            seen.keys_in_flight.remove(key);
                        }
                    }
                }
                let reports = claimed
                    .iter()
                    .map(|c| report(c.id, c.lease, Disposition::Delivered))
                    .collect();
                assert_eq!(
                    s.report(reports).await.unwrap(),
                    Vec::<i64>::new(),
                    "no report is stale"
                );
                seen.lock()
                    .unwrap()
                    .delivered
                    .extend(claimed.iter().map(|c| c.id));
            }
        })
    };
    let (ta, tb) = (worker(a.clone()), worker(b.clone()));
    ta.await.unwrap();
    tb.await.unwrap();

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut delivered = seen.delivered.clone();
    delivered.sort_unstable();
    assert_eq!(delivered, ids, "each message delivered exactly once");
    for (key, order) in &seen.per_key {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, &sorted, "{key} delivered in acceptance order");
        assert_eq!(order.len(), 6);
    }
    let counts: HashMap<State, u64> = a.counts().await.unwrap().into_iter().collect();
    assert_eq!(counts.get(&State::Delivered), Some(&(total as u64)));
    assert_eq!(a.queue_stats().await.unwrap().depth, 0);
    a.close().await;
    b.close().await;
}

/// Two replicas queue messages of the same keys while both deliver them:
/// enqueue on one and dequeue on the other never leave a key without its
/// head (nothing is stranded) or with two (nothing overtakes), and each key
/// is delivered in the order its messages were stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_enqueueing_and_dequeueing_one_key_keep_it_whole() {
    let Some(db) = TestDatabase::create("enqueue_dequeue_race") else {
        return;
    };
    let a = Arc::new(open(&db, 60_000).await);
    let b = Arc::new(open(&db, 60_000).await);
    const KEYS: usize = 4;
    const PER_REPLICA: usize = 150;
    let total = 2 * PER_REPLICA;
    let producers: Vec<_> = [("a", a.clone()), ("b", b.clone())]
        .into_iter()
        .map(|(name, s)| {
            tokio::spawn(async move {
                for i in 0..PER_REPLICA {
                    let key = format!("key{}", i % KEYS);
                    s.accept(vec![msg(&format!("{name}{i}"), Some(&key))])
                        .await
                        .expect("accept");
                    if i % 10 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    let delivered = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let in_flight = Arc::new(Mutex::new(HashSet::<String>::new()));
    let consumers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|s| {
            let delivered = delivered.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while delivered.lock().unwrap().len() < total {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "stranded: {} of {total} delivered",
                        delivered.lock().unwrap().len()
                    );
                    let claimed = s.claim(10).await.unwrap().messages;
                    if claimed.is_empty() {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    let mut keys = Vec::new();
                    for c in &claimed {
                        let m = s.get(c.id).await.unwrap().unwrap();
                        let key =
                            format!("key{}", m.message_id[1..].parse::<usize>().unwrap() % KEYS);
                        assert!(
                            in_flight.lock().unwrap().insert(key.clone()),
                            "two messages of {key} in flight"
                        );
                        keys.push(key);
                    }
                    {
                        let mut in_flight = in_flight.lock().unwrap();
                        let mut delivered = delivered.lock().unwrap();
                        for (c, key) in claimed.iter().zip(&keys) {
                            in_flight.remove(key);
                            delivered.push((key.clone(), c.id));
                        }
                    }
                    let reports = claimed
                        .iter()
                        .map(|c| report(c.id, c.lease, Disposition::Delivered))
                        .collect();
                    assert!(s.report(reports).await.unwrap().is_empty());
                }
            })
        })
        .collect();
    for t in producers.into_iter().chain(consumers) {
        t.await.unwrap();
    }
    let delivered = delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), total);
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, id) in delivered {
        per_key.entry(key).or_default().push(id);
    }
    for (key, ids) in per_key {
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "{key} delivered in storage order");
    }
    assert_eq!(a.queue_stats().await.unwrap().depth, 0);
    let keys_left: i64 = sqlx::query_scalar("SELECT count(*) FROM td_keys")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(keys_left, 0, "key rows go with their last message");
    a.close().await;
    b.close().await;
}

/// A claim taken over from a replica judged gone (its heartbeat stopped
/// reaching the database): the first holder's late report is ignored (and
/// counted); the current holder's counts.
#[tokio::test]
async fn a_report_on_a_lease_taken_over_is_ignored() {
    let Some(db) = TestDatabase::create("stale_report") else {
        return;
    };
    let a = open(&db, 300).await;
    let b = open(&db, 300).await;
    let id = stored(&a.accept(vec![msg("m1", Some("K"))]).await.unwrap()[0]);
    let first = a.claim(10).await.unwrap().messages;
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(
        b.claim(10).await.unwrap().messages.is_empty(),
        "a live replica's claim is never taken, even past its lease"
    );
    pg::judge_replicas_gone(db.url(), Some(a.replica_id())).await;
    let second = b.claim(10).await.unwrap().messages;
    assert_eq!(second.len(), 1, "a gone replica's claim is claimable again");
    assert_ne!(first[0].lease, second[0].lease);

    let ignored = a
        .report(vec![report(id, first[0].lease, Disposition::Delivered)])
        .await
        .unwrap();
    assert_eq!(ignored, vec![id]);
    let got = a.get(id).await.unwrap().unwrap();
    assert_eq!(
        got.state,
        State::Pending,
        "the stale report changed nothing"
    );
    assert_eq!(got.attempts, 0);

    let retry_at = now_millis() + 60_000;
    let ignored = b
        .report(vec![
            report(
                id,
                second[0].lease,
                Disposition::Retry {
                    next_attempt_at: retry_at,
                },
            ),
            // The same message twice in one batch: the second is stale.
            report(id, second[0].lease, Disposition::Delivered),
        ])
        .await
        .unwrap();
    assert_eq!(ignored, vec![id]);
    let got = b.get(id).await.unwrap().unwrap();
    assert_eq!(got.state, State::Pending);
    assert_eq!(got.attempts, 1);
    assert_eq!(got.next_attempt_at, Some(retry_at));
    // Released but not due: nobody claims it.
    assert!(a.claim(10).await.unwrap().messages.is_empty());
    a.close().await;
    b.close().await;
}

/// The same messages accepted at once through two replicas are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_through_two_replicas_are_stored_once() {
    let Some(db) = TestDatabase::create("concurrent_duplicates") else {
        return;
    };
    let a = Arc::new(open(&db, 60_000).await);
    let b = Arc::new(open(&db, 60_000).await);
    let mut tasks = Vec::new();
    for round in 0..8 {
        for s in [a.clone(), b.clone()] {
            tasks.push(tokio::spawn(async move {
                let mut batch: Vec<NewMessage> = (0..40)
                    .map(|i| msg(&format!("d{i}"), Some(&format!("key{}", i % 5))))
                    .collect();
                if round % 2 == 1 {
                    batch.reverse();
                }
                s.accept(batch).await
            }));
        }
    }
    let mut stored_ids = Vec::new();
    for t in tasks {
        let out = t.await.unwrap().expect("accept");
        stored_ids.extend(out.iter().filter_map(|a| match a {
            Acceptance::Stored { id } => Some(*id),
            Acceptance::Duplicate { .. } => None,
        }));
    }
    assert_eq!(stored_ids.len(), 40, "one Stored per messageId");
    for i in 0..40 {
        let rows = a
            .list(
                MessageFilter {
                    message_id: Some(format!("d{i}")),
                    ..MessageFilter::default()
                },
                100,
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 16);
        let pending = rows.iter().filter(|m| m.state == State::Pending).count();
        assert_eq!(pending, 1, "d{i}: {rows:?}");
    }
    // Five keys: five heads, never more.
    assert_eq!(b.claim(100).await.unwrap().messages.len(), 5);
    a.close().await;
    b.close().await;
}

/// A 429 pause taken by one replica is seen by the others; it is only ever
/// extended.
#[tokio::test]
async fn a_pause_is_shared_and_only_extended() {
    let Some(db) = TestDatabase::create("pause") else {
        return;
    };
    let a = open(&db, 60_000).await;
    let b = open(&db, 60_000).await;
    let until = now_millis() + 60_000;
    a.pause_endpoint("https://app.totango.com/pixel.gif/", until)
        .await
        .unwrap();
    a.pause_endpoint("https://app.totango.com/pixel.gif/", until - 30_000)
        .await
        .unwrap();
    a.pause_endpoint("https://other/", now_millis() - 1)
        .await
        .unwrap();
    assert_eq!(
        b.paused_endpoints().await.unwrap(),
        vec![("https://app.totango.com/pixel.gif/".to_owned(), until)]
    );
    b.pause_endpoint("https://app.totango.com/pixel.gif/", until + 5_000)
        .await
        .unwrap();
    assert_eq!(
        a.paused_endpoints().await.unwrap(),
        vec![(
            "https://app.totango.com/pixel.gif/".to_owned(),
            until + 5_000
        )]
    );
    a.close().await;
    b.close().await;
}

/// Work queued through one replica wakes the others (LISTEN/NOTIFY).
#[tokio::test]
async fn work_queued_elsewhere_wakes_this_replica() {
    let Some(db) = TestDatabase::create("notify") else {
        return;
    };
    let a = open(&db, 60_000).await;
    let b = open(&db, 60_000).await;
    let wake = b.notifier();
    // The listener signals once connected; wait for that first.
    tokio::time::timeout(Duration::from_secs(10), wake.notified())
        .await
        .expect("listener connected");
    a.accept(vec![msg("m1", None)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("woken by the other replica's accept");
    let claimed = b.claim(10).await.unwrap().messages;
    assert_eq!(claimed.len(), 1);
    a.close().await;
    b.close().await;
}

/// A replica that stops gives its claims back at once; one that is killed
/// (dropped without closing: no more heartbeats) keeps them only until the
/// others judge it gone, one replica timeout later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_gives_claims_back_and_a_killed_ones_return_after_the_timeout() {
    let Some(db) = TestDatabase::create("claims_back") else {
        return;
    };
    let a = open(&db, 600_000).await;
    let id = stored(&a.accept(vec![msg("m1", None)]).await.unwrap()[0]);
    assert_eq!(a.claim(10).await.unwrap().messages.len(), 1);
    a.close().await;
    let b = open(&db, 600_000).await;
    let again = b.claim(10).await.unwrap().messages;
    assert_eq!(
        again.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![id],
        "a closed replica's claim is claimable at once"
    );
    let b_id = b.replica_id();
    drop(b);
    let killed = std::time::Instant::now();
    let c = open(&db, 600_000).await;
    assert!(
        c.claim(10).await.unwrap().messages.is_empty(),
        "a replica just killed still holds its claim"
    );
    let taken = loop {
        let got = c.claim(10).await.unwrap().messages;
        if !got.is_empty() {
            break got;
        }
        assert!(
            killed.elapsed() < Duration::from_millis(REPLICA_TIMEOUT_MS as u64 * 4),
            "a killed replica's claim is not back after four timeouts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let waited = killed.elapsed();
    assert_eq!(taken.iter().map(|c| c.id).collect::<Vec<_>>(), vec![id]);
    assert!(
        waited >= Duration::from_millis(REPLICA_TIMEOUT_MS as u64 / 2),
        "taken over after {waited:?}, before the replica could be judged gone"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM td_replicas WHERE id = $1")
        .bind(b_id)
        .fetch_one(c.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "the killed replica was judged gone and removed");
    c.close().await;
}

/// A live replica keeps its claims for as long as it lives, however slow
/// its work: many replica timeouts and past its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_replica_keeps_its_claims_however_long_it_takes() {
    let Some(db) = TestDatabase::create("live_keeps") else {
        return;
    };
    let a = open(&db, 300).await;
    let b = open(&db, 300).await;
    let id = stored(&a.accept(vec![msg("m1", Some("K"))]).await.unwrap()[0]);
    let first = a.claim(10).await.unwrap().messages;
    assert_eq!(first.len(), 1);
    let until = std::time::Instant::now() + Duration::from_millis(REPLICA_TIMEOUT_MS as u64 * 3);
    while std::time::Instant::now() < until {
        assert!(
            b.claim(10).await.unwrap().messages.is_empty(),
            "another replica took a live replica's claim"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.holds_claims(), "the live replica still holds its claims");
    let stale = a
        .report(vec![report(id, first[0].lease, Disposition::Delivered)])
        .await
        .unwrap();
    assert!(stale.is_empty(), "its report still counts");
    assert_eq!(a.get(id).await.unwrap().unwrap().state, State::Delivered);
    a.close().await;
    b.close().await;
}

/// Migrating is idempotent and safe to race; a database from a newer build
/// is refused with a message that says to upgrade.
#[tokio::test]
async fn migrations_are_versioned_idempotent_and_refuse_newer_schemas() {
    let Some(db) = TestDatabase::create("migrations") else {
        return;
    };
    let (x, y) = tokio::join!(postgres::migrate(db.url()), postgres::migrate(db.url()));
    assert_eq!(x.unwrap(), postgres::SCHEMA_VERSION);
    assert_eq!(y.unwrap(), postgres::SCHEMA_VERSION);
    assert_eq!(
        postgres::migrate(db.url()).await.unwrap(),
        postgres::SCHEMA_VERSION
    );
    let s = open(&db, 60_000).await;
    let versions: Vec<i32> = sqlx::query_scalar("SELECT version FROM td_schema ORDER BY version")
        .fetch_all(s.pool())
        .await
        .unwrap();
    let expected: Vec<i32> = (1..=postgres::SCHEMA_VERSION as i32).collect();
    assert_eq!(versions, expected, "each version applied once");
    // Session settings of the pool's connections.
    let mut conn = s.pool().acquire().await.unwrap();
    let plans: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(plans, "force_custom_plan");
    drop(conn);
    sqlx::query("INSERT INTO td_schema (version) VALUES (999)")
        .execute(s.pool())
        .await
        .unwrap();
    s.close().await;

    let e = match postgres::open(db.url(), options(60_000)).await {
        Ok(_) => panic!("a newer schema was accepted"),
        Err(e) => e,
    };
    assert!(matches!(e, StorageError::Corrupt(_)), "{e:?}");
    assert!(
        e.to_string().contains("999") && e.to_string().contains("upgrade"),
        "{e}"
    );
    assert!(matches!(
        postgres::migrate(db.url()).await,
        Err(StorageError::Corrupt(_))
    ));
}

/// A schema 2 database with a backlog upgrades to indexes of digests and
/// keeps working: the queued ordering keys, dedupe entries and page
/// categories written as text before are found by the digests the new code
/// computes, and the refused bytes already stored are counted.
#[tokio::test]
async fn upgrading_from_schema_2_keeps_keys_dedupe_and_page_categories() {
    let Some(db) = TestDatabase::create("upgrade from schema 2") else {
        return;
    };
    assert_eq!(postgres::migrate_to(db.url(), 2).await.unwrap(), 2);
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(db.url()).await.unwrap();
        let key = "svc\u{1f}u:alice";
        let now = now_millis();
        for (i, id) in ["a-1", "a-2"].iter().enumerate() {
            let message: i64 = sqlx::query_scalar(
                "INSERT INTO td_messages (message_id, source, call, service_id, user_id, state, \
                 ordering_key, payload, settings, received_at, updated_at) \
                 VALUES ($1, 'web', 'identify', 'svc', 'alice', 'pending', $2, $3, '{}', $4, $4) \
                 RETURNING id",
            )
            .bind(id)
            .bind(key)
            .bind(json!({"type": "identify", "messageId": id}).to_string())
            .bind(now)
            .fetch_one(&mut c)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO td_queue (message, ordering_key, next_attempt_at, enqueued_at, head) \
                 VALUES ($1, $2, $3, $3, $4)",
            )
            .bind(message)
            .bind(key)
            .bind(now)
            .bind(i == 0)
            .execute(&mut c)
            .await
            .unwrap();
        }
        sqlx::query("INSERT INTO td_keys (ordering_key) VALUES ($1)")
            .bind(key)
            .execute(&mut c)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO td_dedupe (source, message_id, accepted_at) VALUES ('web', 'seen', $1)",
        )
        .bind(now)
        .execute(&mut c)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO td_page_categories (service_id, user_id, category) \
             VALUES ('svc', 'alice', 'Reports')",
        )
        .execute(&mut c)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO td_messages (message_id, source, call, service_id, state, payload, \
             settings, received_at, updated_at) \
             VALUES ('junk', 'web', 'track', 'svc', 'rejected', '{\"pad\":\"xxxx\"}', '{}', $1, $1)",
        )
        .bind(now)
        .execute(&mut c)
        .await
        .unwrap();
    }
    let s = open(&db, 60_000).await;
    assert_eq!(
        s.queue_stats().await.unwrap().refused_bytes,
        (r#"{"pad":"xxxx"}"#.len() + 2 + "junk".len()) as u64
    );
    // Dedupe: the id remembered as text is a duplicate now.
    let again = s.accept(vec![msg("seen", None)]).await.unwrap();
    assert!(
        matches!(again[0], Acceptance::Duplicate { .. }),
        "{again:?}"
    );
    // A new identify of alice queues behind the two from before the upgrade.
    let mut third = msg("a-3", Some("svc\u{1f}u:alice"));
    third.user_id = Some("alice".to_owned());
    let mut track = msg("t-1", None);
    track.call = "track".to_owned();
    track.user_id = Some("alice".to_owned());
    track.needs_page_category = true;
    track.payload = json!({"type": "track", "messageId": "t-1"})
        .to_string()
        .into();
    s.accept(vec![third, track]).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        let claimed = s.claim(10).await.unwrap().messages;
        let identifies = claimed.iter().filter(|m| m.payload.contains("identify"));
        assert!(identifies.count() <= 1, "one of alice's at a time");
        for m in &claimed {
            let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
            let id = v["messageId"].as_str().unwrap().to_owned();
            if id == "t-1" {
                assert_eq!(m.latest_page_category.as_deref(), Some("Reports"));
            } else {
                order.push(id);
            }
        }
        s.report(
            claimed
                .iter()
                .map(|m| report(m.id, m.lease, Disposition::Delivered))
                .collect(),
        )
        .await
        .unwrap();
    }
    assert_eq!(order, ["a-1", "a-2", "a-3"], "one key across the upgrade");
    s.close().await;
}

/// An unreachable server is a passing failure (the server keeps retrying).
#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let e = match postgres::open("postgres://postgres@127.0.0.1:9/none", options(1_000)).await {
        Ok(_) => panic!("opened a server that does not exist"),
        Err(e) => e,
    };
    assert!(e.is_transient(), "{e:?}");
    let e = match postgres::open("postgres://[bad", options(1_000)).await {
        Ok(_) => panic!("opened a malformed URL"),
        Err(e) => e,
    };
    assert!(!e.is_transient(), "{e:?}");
}

/// PostgreSQL text cannot hold NUL: such messages are still accepted (NUL
/// stored as U+FFFD) and deduplicated.
#[tokio::test]
async fn text_with_nul_is_stored() {
    let Some(db) = TestDatabase::create("nul_text") else {
        return;
    };
    let s = open(&db, 60_000).await;
    let mut m = msg("a\0b", Some("k\0"));
    m.user_id = Some("u\0".into());
    m.warnings = vec!["odd\0warning".into()];
    let id = stored(&s.accept(vec![m.clone()]).await.unwrap()[0]);
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.message_id, "a\u{FFFD}b");
    // The payload is JSON, where NUL is an escape: kept as it came.
    assert_eq!(got.payload["messageId"], "a\0b");
    assert_eq!(got.user_id.as_deref(), Some("u\u{FFFD}"));
    assert_eq!(got.warnings, vec!["odd\0warning".to_owned()]);
    assert!(matches!(
        s.accept(vec![m]).await.unwrap()[0],
        Acceptance::Duplicate { .. }
    ));
    let found = s
        .list(
            MessageFilter {
                message_id: Some("a\0b".into()),
                ..MessageFilter::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 2);
    s.close().await;
}

/// One failing call of a commit group does not fail the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_accept_does_not_fail_its_group() {
    let Some(db) = TestDatabase::create("group_failure") else {
        return;
    };
    let s = Arc::new(open(&db, 60_000).await);
    // A trigger that refuses one payload, standing in for any per-call failure.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
            IF NEW.message_id = 'poison' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '23514'; \
            END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT ON td_messages FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(s.pool())
    .await
    .unwrap();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let id = if i % 10 == 3 {
                    "poison".to_owned()
                } else {
                    format!("ok{i}")
                };
                (id.clone(), s.accept(vec![msg(&id, Some("K"))]).await)
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (id, result) = t.await.unwrap();
        match (id.as_str(), result) {
            ("poison", Err(e)) => assert!(matches!(e, StorageError::Corrupt(_)), "{e:?}"),
            ("poison", Ok(out)) => panic!("poison accepted: {out:?}"),
            (_, Ok(out)) => {
                stored(&out[0]);
                ok += 1;
            }
            (id, Err(e)) => panic!("{id} failed with its group: {e:?}"),
        }
    }
    assert_eq!(ok, 54);
    assert_eq!(s.queue_stats().await.unwrap().depth, 54);
    // The key's queue is intact: exactly one head.
    assert_eq!(s.claim(100).await.unwrap().messages.len(), 1);
    s.close().await;
}

/// Finished messages past retention are pruned in chunks by whichever
/// replica holds the prune lock; pending and dead ones stay, and so does the
/// dedupe memory of a pruned message.
#[tokio::test]
async fn retention_prunes_finished_messages_only() {
    let Some(db) = TestDatabase::create("retention") else {
        return;
    };
    let s = postgres::open(
        db.url(),
        StorageOptions {
            retention_ms: Some(50),
            prune_every_ms: 0,
            ..options(60_000)
        },
    )
    .await
    .unwrap();
    let ids: Vec<i64> = s
        .accept(vec![
            msg("delivered", Some("k1")),
            msg("dead", Some("k2")),
            msg("waiting", Some("k3")),
        ])
        .await
        .unwrap()
        .iter()
        .map(stored)
        .collect();
    let claimed = s.claim(10).await.unwrap().messages;
    let lease = |id: i64| claimed.iter().find(|c| c.id == id).unwrap().lease;
    s.report(vec![
        report(ids[0], lease(ids[0]), Disposition::Delivered),
        report(
            ids[1],
            lease(ids[1]),
            Disposition::Dead {
                code: "rejected_by_totango".into(),
                reason: "HTTP 400".into(),
            },
        ),
        report(
            ids[2],
            lease(ids[2]),
            Disposition::Retry {
                next_attempt_at: now_millis() + 60_000,
            },
        ),
    ])
    .await
    .unwrap();
    // Old finished messages: more than one chunk of them.
    let old = now_millis() - 10_000;
    let filtered: Vec<NewMessage> = (0..2_500)
        .map(|i| NewMessage {
            received_at: old,
            state: State::Filtered,
            code: Some("integration_disabled".into()),
            ..msg(&format!("f{i}"), None)
        })
        .collect();
    s.accept(filtered).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    // Every accept and claim prunes here (prune_every_ms = 0).
    let again = s.accept(vec![msg("delivered", Some("k9"))]).await.unwrap();
    assert!(
        matches!(again[0], Acceptance::Duplicate { .. }),
        "dedupe memory outlives the pruned message"
    );
    s.claim(1).await.unwrap();
    s.claim(1).await.unwrap();
    assert!(s.get(ids[0]).await.unwrap().is_none(), "delivered pruned");
    assert_eq!(s.get(ids[1]).await.unwrap().unwrap().state, State::Dead);
    assert_eq!(s.get(ids[2]).await.unwrap().unwrap().state, State::Pending);
    let counts: HashMap<State, u64> = s.counts().await.unwrap().into_iter().collect();
    assert_eq!(counts.get(&State::Filtered), None, "{counts:?}");
    // A message and its outcome go together: no half of one is left.
    let ids_of = |table: &str| format!("SELECT id FROM {table} ORDER BY id");
    let messages: Vec<i64> = sqlx::query_scalar(&ids_of("td_messages"))
        .fetch_all(s.pool())
        .await
        .unwrap();
    let outcomes: Vec<i64> = sqlx::query_scalar(&ids_of("td_outcomes"))
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!(messages, outcomes);
    assert!(messages.contains(&ids[1]) && messages.contains(&ids[2]));
    assert!(!messages.contains(&ids[0]), "{messages:?}");
    s.close().await;
}

/// The LISTEN connection comes back after the server drops it, and the
/// pool's connections after they are cut: storage keeps working.
#[tokio::test]
async fn lost_connections_are_restored() {
    let Some(db) = TestDatabase::create("lost_connections") else {
        return;
    };
    let a = open(&db, 60_000).await;
    let b = open(&db, 60_000).await;
    let wake = b.notifier();
    tokio::time::timeout(Duration::from_secs(10), wake.notified())
        .await
        .expect("listener connected");
    let admin = sqlx::PgPool::connect(db.url()).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
            AND application_name = 'totango-destination'",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(cut.len() >= 3, "the pools and the listeners: {cut:?}");
    // The listener signals when it is back (a notification may have been lost).
    tokio::time::timeout(Duration::from_secs(10), wake.notified())
        .await
        .expect("listener reconnected");
    let mut accepted = false;
    for _ in 0..5 {
        match a.accept(vec![msg("after", None)]).await {
            Ok(_) => {
                accepted = true;
                break;
            }
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
    }
    assert!(accepted, "the pool reconnects");
    tokio::time::timeout(Duration::from_secs(10), wake.notified())
        .await
        .expect("woken through the restored listener");
    assert_eq!(b.claim(10).await.unwrap().messages.len(), 1);
    admin.close().await;
    a.close().await;
    b.close().await;
}

/// In one batch, a stale report ahead of the current one does not hide it.
#[tokio::test]
async fn a_stale_report_does_not_hide_the_current_one_behind_it() {
    let Some(db) = TestDatabase::create("stale_then_current") else {
        return;
    };
    let s = open(&db, 300).await;
    let id = stored(&s.accept(vec![msg("m1", Some("K"))]).await.unwrap()[0]);
    let first = s.claim(10).await.unwrap().messages[0].lease;
    // Judged gone and back under a new id: the claim is taken afresh.
    pg::judge_replicas_gone(db.url(), None).await;
    let second = s.claim(10).await.unwrap().messages[0].lease;
    let stale = s
        .report(vec![
            report(id, first, Disposition::Delivered),
            report(id, second, Disposition::Delivered),
        ])
        .await
        .unwrap();
    assert_eq!(stale, vec![id]);
    assert_eq!(s.get(id).await.unwrap().unwrap().state, State::Delivered);
    s.close().await;
}

/// A claim finds the heads it may take through `td_queue_claimable`, which
/// leaves out the messages a live replica holds (through the index of all
/// heads, dropped in version 7, it read past every message in flight at each
/// claim), by an index scan in the
/// index's order: a bitmap scan, what the planner picks for a table it
/// expects to be small, read every entry of a claimed or delivered message
/// left until a vacuum at each claim.
#[tokio::test]
async fn a_claim_reads_only_claimable_heads() {
    let Some(db) = TestDatabase::create("claim_plan") else {
        return;
    };
    let s = open(&db, 60_000).await;
    // A queue under load: messages accepted, most of them claimed and
    // delivered since the last vacuum (none runs here).
    for batch in 0..10 {
        let messages = (0..200)
            .map(|i| msg(&format!("m-{batch}-{i}"), None))
            .collect();
        s.accept(messages).await.unwrap();
        let claimed = s.claim(150).await.unwrap().messages;
        let reports = claimed
            .iter()
            .map(|m| report(m.id, m.lease, Disposition::Delivered))
            .collect();
        s.report(reports).await.unwrap();
    }
    let mut conn = s.pool().acquire().await.unwrap();
    // Planned in a transaction set as the claim's is.
    sqlx::raw_sql(postgres::BEGIN_HOT)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(&format!(
        "PREPARE claim (bigint, bigint, bigint) AS {}",
        postgres::claim_sql()
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE claim (100, 60000, 1)")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    // The scan under the row locks is the one that picks the heads.
    let picked = plan
        .iter()
        .skip_while(|line| !line.contains("LockRows"))
        .find(|line| line.contains(" Scan "))
        .unwrap_or_else(|| panic!("no scan under LockRows:\n{}", plan.join("\n")));
    assert!(
        picked.contains("Index Scan using td_queue_claimable"),
        "{picked}\n{}",
        plan.join("\n")
    );
}

/// The busy statements (accept, claim, report) keep one plan per connection
/// (`BEGIN_HOT`), so a plan made on empty tables must stay right on large
/// ones: made on a fresh database, each reads the tables only by index, in
/// nested loops, without bitmap scans.
#[tokio::test]
async fn busy_statements_planned_on_empty_tables_read_only_by_index() {
    let Some(db) = TestDatabase::create("hot_plans") else {
        return;
    };
    let s = open(&db, 60_000).await;
    let mut conn = s.pool().acquire().await.unwrap();
    sqlx::raw_sql(postgres::BEGIN_HOT)
        .execute(&mut *conn)
        .await
        .unwrap();
    let text = |n: usize| vec!["'{}'::text[]"; n].join(", ");
    let statements = [
        (
            "accept",
            postgres::accept_sql(),
            format!("{}, '{{}}'::bigint[], {}", text(11), text(3)),
        ),
        ("claim", postgres::claim_sql(), "100, 60000, 1".to_owned()),
        (
            "report",
            postgres::report_sql(),
            "'{}'::bigint[], '{}'::bigint[], '{}'::text[], '{}'::bigint[], '{}'::bigint[], \
             '{}'::text[], '{}'::text[], '{}'::text[], '{}'::bool[], '{}'::int[], \
             '{}'::text[], '{}'::text[], '{}'::text[], '{}'::bigint[]"
                .to_owned(),
        ),
    ];
    for (name, sql, args) in statements {
        sqlx::raw_sql(&format!("PREPARE {name} AS {sql}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name} ({args})"))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains(" Scan using td_"), "{name}:\n{plan}");
        for shape in ["Seq Scan on td_", "Bitmap", "Hash Join", "Merge Join"] {
            assert!(!plan.contains(shape), "{name} plans a {shape}:\n{plan}");
        }
    }
}

/// A schema 5 database upgrades with the bytes of its queued messages counted
/// (`td_queue.size`, schema 6) and every message's outcome where it was
/// (`td_outcomes`, schema 7): state, counts, requests, last answer, times.
#[tokio::test]
async fn a_schema_5_database_keeps_its_backlog_bytes_and_outcomes_on_upgrade() {
    let Some(db) = TestDatabase::create("upgrade from schema 5") else {
        return;
    };
    assert_eq!(postgres::migrate_to(db.url(), 5).await.unwrap(), 5);
    let now = now_millis();
    let (queued_payload, delivered_payload) = (
        json!({"type": "identify", "messageId": "q-1"}).to_string(),
        json!({"type": "track", "messageId": "d-1"}).to_string(),
    );
    let requests = r#"[{"method":"GET","params":{"sdr_s":"SP-1"}}]"#;
    let (queued, delivered) = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(db.url()).await.unwrap();
        let mut insert = async |id: &str, state: &str, payload: &str, done: bool| -> i64 {
            sqlx::query_scalar(
                "INSERT INTO td_messages (message_id, source, call, service_id, user_id, state, \
                 code, reason, payload, settings, requests, sent, attempts, last_status, \
                 last_body, received_at, updated_at) \
                 VALUES ($1, 'web', 'identify', 'svc', 'alice', $2, NULL, NULL, $3, '{}', \
                    CASE WHEN $4 THEN $5 END, $4::int, 1 + $4::int, \
                    CASE WHEN $4 THEN 200 ELSE 503 END, 'answer', $6, $6 + 5) RETURNING id",
            )
            .bind(id)
            .bind(state)
            .bind(payload)
            .bind(done)
            .bind(requests)
            .bind(now)
            .fetch_one(&mut c)
            .await
            .unwrap()
        };
        let queued = insert("q-1", "pending", &queued_payload, false).await;
        let delivered = insert("d-1", "delivered", &delivered_payload, true).await;
        sqlx::query(
            "INSERT INTO td_queue (message, ordering_key, next_attempt_at, enqueued_at, head) \
             VALUES ($1, NULL, $2, $2, true)",
        )
        .bind(queued)
        .bind(now)
        .execute(&mut c)
        .await
        .unwrap();
        (queued, delivered)
    };
    let s = open(&db, 60_000).await;
    let stats = s.queue_stats().await.unwrap();
    // payload, settings `{}`, messageId and the last answer's body.
    let expected = queued_payload.len() + 2 + "q-1".len() + "answer".len();
    assert_eq!((stats.depth, stats.bytes), (1, expected as u64));
    let q = s.get(queued).await.unwrap().expect("queued message");
    assert_eq!((q.state, q.sent, q.attempts), (State::Pending, 0, 1));
    assert_eq!(q.last_response.as_ref().unwrap().status, Some(503));
    assert_eq!(q.requests, None);
    assert_eq!(q.next_attempt_at, Some(now));
    let d = s.get(delivered).await.unwrap().expect("delivered message");
    assert_eq!((d.state, d.sent, d.attempts), (State::Delivered, 1, 2));
    assert_eq!(d.requests, Some(serde_json::from_str(requests).unwrap()));
    assert_eq!(
        d.last_response.as_ref().unwrap().body.as_deref(),
        Some("answer")
    );
    assert_eq!((d.received_at, d.updated_at), (now, now + 5));
    assert_eq!(
        d.payload,
        serde_json::from_str::<serde_json::Value>(&delivered_payload).unwrap()
    );
    let mut counts = s.counts().await.unwrap();
    counts.sort_by_key(|c| c.0.as_str());
    assert_eq!(counts, vec![(State::Delivered, 1), (State::Pending, 1)]);
    s.close().await;
}
