//! Issue 14, storage side: one operation's bad data fails that operation
//! only (both backends), a signed webhook element is accepted once under
//! concurrency, and the SQLite files are private to their owner.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::backends::Backend;
use totango_destination::storage::{
    AcceptError, AcceptOptions, Acceptance, Disposition, LastResponse, NewMessage, Report,
    SqliteStorage, State, Storage, StorageOptions, now_millis,
};

fn message(message_id: &str, service: &str, user: &str) -> NewMessage {
    NewMessage {
        call: "identify".to_owned(),
        service_id: service.to_owned(),
        user_id: Some(user.to_owned()),
        account_id: None,
        payload: r#"{"type":"identify"}"#.to_owned().into(),
        ..super::msg(message_id, &format!("user:{service}:{user}"))
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("file exists")
        .permissions()
        .mode()
        & 0o777
}

fn companions(db: &Path) -> Vec<std::path::PathBuf> {
    ["", "-wal", "-shm", ".lock"]
        .iter()
        .map(|s| {
            let mut name = db.as_os_str().to_owned();
            name.push(s);
            std::path::PathBuf::from(name)
        })
        .filter(|p| p.exists())
        .collect()
}

#[tokio::test]
async fn sqlite_files_are_private_to_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let storage = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    storage
        .accept(vec![message("m1", "svc", "u1")])
        .await
        .unwrap();
    let files = companions(&db);
    assert!(files.len() >= 3, "database, WAL and lock exist: {files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{} is private", f.display());
    }
    storage.close().await;
}

#[tokio::test]
async fn existing_sqlite_files_are_made_private_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let storage = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    storage.close().await;
    for f in companions(&db) {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let storage = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    storage
        .accept(vec![message("m2", "svc", "u1")])
        .await
        .unwrap();
    for f in &companions(&db) {
        assert_eq!(mode(f), 0o600, "{} is private after reopening", f.display());
    }
    storage.close().await;
}

/// Twelve concurrent batches whose first message has the same `messageId`
/// (a replayed signed webhook element): exactly one is stored.
async fn first_unseen_stores_one_of_concurrent_batches(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..12 {
        let s = s.storage.clone();
        tasks.push(tokio::spawn(async move {
            let batch = vec![
                message("signed-1", "svc", "u1"),
                message(&format!("rider-{i}-a"), "svc", "u2"),
                message(&format!("rider-{i}-b"), "svc", "u3"),
            ];
            s.accept_with(batch, AcceptOptions { first_unseen: true })
                .await
        }));
    }
    let mut stored = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(a) => {
                assert_eq!(a.len(), 3);
                stored += 1;
            }
            Err(AcceptError::AlreadyStored(id)) => {
                assert_eq!(id, "signed-1");
                refused += 1;
            }
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    assert_eq!((stored, refused), (1, 11));
    let counts: u64 = s.counts().await.unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(counts, 3, "only the accepted batch was stored");
    // Without the option, the same first messageId is recorded as a duplicate.
    let again = s
        .accept(vec![message("signed-1", "svc", "u1")])
        .await
        .unwrap();
    assert!(matches!(again[0], Acceptance::Duplicate { .. }));
    // And once stored, a later batch asking for the check is refused.
    let later = s
        .accept_with(
            vec![message("signed-1", "svc", "u1")],
            AcceptOptions { first_unseen: true },
        )
        .await;
    assert!(matches!(later, Err(AcceptError::AlreadyStored(_))));
    s.close().await;
}

/// A random, incompressible id of `len` hex characters.
fn long_id(len: usize) -> String {
    let mut id = String::new();
    while id.len() < len {
        id.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    id.truncate(len);
    id
}

/// Makes storing a message whose messageId starts with "poison" fail with a
/// data error, as an operation's own data can fail it (on PostgreSQL
/// SQLSTATE 54000, what an over-long index entry raised before indexes held
/// digests; on SQLite an abort).
async fn poison(b: Backend, pg: Option<&str>, sqlite: &Path) {
    match b {
        Backend::Postgres => {
            use sqlx::Connection;
            let url = pg.expect("a PostgreSQL url");
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(
                "CREATE FUNCTION td_test_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.message_id LIKE 'poison%' THEN \
                 RAISE EXCEPTION 'poisoned' USING ERRCODE = '54000'; END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER td_test_poison BEFORE INSERT ON td_messages \
                 FOR EACH ROW EXECUTE FUNCTION td_test_poison();",
            )
            .execute(&mut c)
            .await
            .unwrap();
        }
        Backend::Sqlite => {
            let c = rusqlite::Connection::open(sqlite).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
            c.execute_batch(
                "CREATE TRIGGER test_poison BEFORE INSERT ON messages \
                 WHEN NEW.message_id LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
            )
            .unwrap();
        }
    }
}

/// While some operations fail on their own data, every concurrent honest
/// batch is still stored: a failure caused by one operation's data fails
/// that operation only, not its group commit.
async fn one_poisoned_operation_fails_alone(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let path = s.path.clone().unwrap_or_default();
    poison(b, s.url.as_deref(), &path).await;
    let mut honest = Vec::new();
    let mut poisoned = Vec::new();
    for round in 0..5 {
        for i in 0..20 {
            let st = s.clone();
            honest.push(tokio::spawn(async move {
                st.accept(vec![
                    message(&format!("h-{round}-{i}-1"), "svc", &format!("u{i}")),
                    message(&format!("h-{round}-{i}-2"), "svc", &format!("u{i}")),
                ])
                .await
            }));
            if i % 5 == 0 {
                let st = s.clone();
                poisoned.push(tokio::spawn(async move {
                    st.accept(vec![message(&format!("poison-{round}-{i}"), "svc", "u1")])
                        .await
                }));
            }
        }
    }
    let total = honest.len();
    let mut failed = Vec::new();
    for t in honest {
        if let Err(e) = t.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {total} honest batches failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    for t in poisoned {
        match t.await.unwrap() {
            // PostgreSQL: not worth retrying, its own data is the cause.
            // (SQLite reports a trigger's abort as a constraint conflict.)
            Err(e) => assert!(b == Backend::Sqlite || !e.is_transient(), "{e:?}"),
            Ok(_) => panic!("a poisoned message was stored"),
        }
    }
    assert_eq!(
        s.counts()
            .await
            .unwrap()
            .into_iter()
            .find(|(st, _)| *st == State::Pending)
            .map(|(_, n)| n),
        Some(200)
    );
    s.close().await;
}

/// Ids far longer than the ingest bounds (20 KB messageId, service and
/// userId) are stored on both backends, and everything keyed by them works:
/// dedupe, lookup by messageId, per-user order and the page category. On
/// PostgreSQL this needs indexes of digests (a B-tree entry over ~2.7 KB
/// failed the statement).
async fn long_ids_are_stored_and_keyed_by_digests(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let (service, user) = (long_id(20_000), long_id(20_000));
    let first_id = long_id(20_000);
    let mut first = message(&first_id, &service, &user);
    first.ordering_key = Some(format!("{service}\u{1f}u:{user}"));
    first.payload = r#"{"type":"identify","n":1}"#.to_owned().into();
    let mut second = first.clone();
    second.message_id = long_id(20_000);
    second.payload = r#"{"type":"identify","n":2}"#.to_owned().into();
    let mut page = message(&long_id(20_000), &service, &user);
    page.call = "page".to_owned();
    page.payload = r#"{"type":"page"}"#.to_owned().into();
    page.ordering_key = None;
    page.set_page_category = Some(Some("Reports".to_owned()));
    let mut track = message(&long_id(20_000), &service, &user);
    track.call = "track".to_owned();
    track.payload = r#"{"type":"track"}"#.to_owned().into();
    track.ordering_key = None;
    track.needs_page_category = true;
    let out = s
        .accept(vec![first.clone(), second, page, track])
        .await
        .expect("long ids are stored");
    assert!(out.iter().all(|a| matches!(a, Acceptance::Stored { .. })));
    // Dedupe keyed by the long messageId.
    let again = s.accept(vec![first]).await.unwrap();
    assert!(
        matches!(again[0], Acceptance::Duplicate { .. }),
        "{again:?}"
    );
    // Found by its messageId.
    let found = s
        .list(
            totango_destination::storage::MessageFilter {
                message_id: Some(first_id.clone()),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 2, "the message and its duplicate");
    assert!(found.iter().all(|m| m.message_id == first_id));
    // One key: the second identify waits behind the first; the track read
    // the page category the page set for this long user.
    let claimed = s.claim(10).await.unwrap().messages;
    let payloads: Vec<&str> = claimed.iter().map(|m| m.payload.as_str()).collect();
    assert_eq!(claimed.len(), 3, "{payloads:?}");
    assert!(
        payloads.contains(&r#"{"type":"identify","n":1}"#),
        "{payloads:?}"
    );
    let track = claimed
        .iter()
        .find(|m| m.payload.contains("track"))
        .expect("the track is claimable");
    assert_eq!(track.latest_page_category.as_deref(), Some("Reports"));
    s.close().await;
}

crate::on_backends!(
    first_unseen_stores_one_of_concurrent_batches,
    one_poisoned_operation_fails_alone,
    long_ids_are_stored_and_keyed_by_digests,
);

/// The backlog's bytes count what a queued message stores besides its
/// payload: a request's 300 KB of settings counts too.
async fn backlog_bytes_count_settings(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let mut m = message("big-settings", "svc", "u1");
    m.settings = format!(r#"{{"service_id":"svc","pad":"{}"}}"#, "x".repeat(300_000)).into();
    let stored = (m.payload.len() + m.settings.len() + m.message_id.len()) as u64;
    s.accept(vec![m]).await.unwrap();
    let stats = s.queue_stats().await.unwrap();
    assert_eq!(stats.depth, 1);
    assert!(
        stats.bytes >= stored,
        "backlog bytes {} < stored {stored}",
        stats.bytes
    );
    s.close().await;
}

crate::on_backends!(backlog_bytes_count_settings);

fn refused(message_id: &str, pad: usize) -> NewMessage {
    let mut m = message(message_id, "svc", "u1");
    m.state = State::Rejected;
    m.code = Some("missing_user_id".to_owned());
    m.ordering_key = None;
    m.payload = format!(r#"{{"type":"identify","pad":"{}"}}"#, "x".repeat(pad)).into();
    m
}

fn size(m: &NewMessage) -> u64 {
    (m.payload.len() + m.settings.len() + m.message_id.len()) as u64
}

/// Refused messages keep their payloads up to `storage.max_refused_bytes`;
/// past it they are stored without payload and settings (outcome, reason
/// and ids kept, a warning saying why), and the count of stored bytes
/// follows exactly what was stored, duplicates included.
async fn refused_messages_keep_payloads_within_their_bound(b: Backend) {
    let options = StorageOptions {
        max_refused_bytes: 10_000,
        ..crate::support::backends::options()
    };
    let Some(s) = b.open(options).await else {
        return;
    };
    let batch: Vec<NewMessage> = (0..5).map(|i| refused(&format!("r{i}"), 3_000)).collect();
    let kept: u64 = batch[..3].iter().map(size).sum();
    assert!(kept <= 10_000 && kept + size(&batch[3]) > 10_000);
    s.accept(batch).await.unwrap();
    // A pending message is outside the bound; its duplicate is refused.
    let mut pending = message("p1", "svc", "u2");
    pending.payload = format!(r#"{{"type":"identify","pad":"{}"}}"#, "y".repeat(3_000)).into();
    s.accept(vec![pending.clone()]).await.unwrap();
    let dup = s.accept(vec![pending]).await.unwrap();
    assert!(matches!(dup[0], Acceptance::Duplicate { .. }));

    let all = s
        .list(totango_destination::storage::MessageFilter::default(), 100)
        .await
        .unwrap();
    let stripped: Vec<_> = all
        .iter()
        .filter(|m| m.payload == serde_json::json!({}))
        .collect();
    let mut stripped_ids: Vec<&str> = stripped.iter().map(|m| m.message_id.as_str()).collect();
    stripped_ids.sort_unstable();
    assert_eq!(
        stripped_ids,
        ["p1", "r3", "r4"],
        "the refused past the bound"
    );
    for m in &stripped {
        assert!(m.state == State::Rejected || m.state == State::Duplicate);
        assert!(
            m.warnings.iter().any(|w| w.contains("max_refused_bytes")),
            "{:?}",
            m.warnings
        );
    }
    for m in all.iter().filter(|m| m.message_id.starts_with('r')) {
        assert_eq!(m.code.as_deref(), Some("missing_user_id"), "reason kept");
    }
    let pending = all
        .iter()
        .find(|m| m.message_id == "p1" && m.state == State::Pending)
        .expect("the pending one is whole");
    assert!(pending.payload["pad"].as_str().unwrap().len() == 3_000);
    let empty = |id: &str| (2 + 2 + id.len()) as u64;
    let stats = s.queue_stats().await.unwrap();
    assert_eq!(
        stats.refused_bytes,
        kept + empty("r3") + empty("r4") + empty("p1")
    );
    s.close().await;
}

/// Pruning refused messages takes their bytes off the count.
async fn pruning_refused_messages_frees_their_bytes(b: Backend) {
    let options = StorageOptions {
        refused_retention_ms: Some(100),
        prune_every_ms: 0,
        ..crate::support::backends::options()
    };
    let Some(s) = b.open(options).await else {
        return;
    };
    s.accept((0..3).map(|i| refused(&format!("r{i}"), 1_000)).collect())
        .await
        .unwrap();
    assert!(s.queue_stats().await.unwrap().refused_bytes > 3_000);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // Pruning runs with writes.
        n += 1;
        s.accept(vec![message(&format!("p{n}"), "svc", "u2")])
            .await
            .unwrap();
        let stats = s.queue_stats().await.unwrap();
        if stats.refused_bytes == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still counted: {}",
            stats.refused_bytes
        );
    }
    let left = s
        .list(
            totango_destination::storage::MessageFilter {
                state: Some(State::Rejected),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert!(left.is_empty(), "pruned: {left:?}");
    s.close().await;
}

/// The backlog's bytes are what its rows store: payload, settings and
/// messageId at first, plus the translated requests and the last answer once
/// a retry wrote them; a dead message takes its bytes along, and brings them
/// back when replayed.
async fn the_backlog_counts_the_bytes_its_rows_store(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let (m1, m2) = (message("b-1", "svc", "ann"), message("b-2", "svc", "bob"));
    let own = |m: &NewMessage| (m.payload.len() + m.settings.len() + m.message_id.len()) as u64;
    let (own1, own2) = (own(&m1), own(&m2));
    let ids: Vec<i64> = s
        .accept(vec![m1, m2])
        .await
        .unwrap()
        .into_iter()
        .map(|a| match a {
            Acceptance::Stored { id } => id,
            other => panic!("{other:?}"),
        })
        .collect();
    let stats = s.queue_stats().await.unwrap();
    assert_eq!((stats.depth, stats.bytes), (2, own1 + own2));
    let claimed = s.claim(10).await.unwrap().messages;
    let lease = |id: i64| claimed.iter().find(|c| c.id == id).expect("claimed").lease;
    let requests = r#"[{"path":"/pixel.gif/","params":{"sdr_s":"SP-1"}}]"#;
    let report = |id: i64, disposition: Disposition, last: Option<LastResponse>| Report {
        id,
        lease: lease(id),
        requests: Some(requests.to_owned()),
        sent: 0,
        attempted: true,
        disposition,
        last,
        settings: None,
    };
    s.report(vec![
        report(
            ids[0],
            Disposition::Retry {
                next_attempt_at: now_millis() + 60_000,
            },
            Some(LastResponse {
                status: Some(503),
                body: Some("busy".to_owned()),
                error: None,
            }),
        ),
        report(
            ids[1],
            Disposition::Dead {
                code: "x".to_owned(),
                reason: "y".to_owned(),
            },
            None,
        ),
    ])
    .await
    .unwrap();
    let first = own1 + requests.len() as u64 + "busy".len() as u64;
    let stats = s.queue_stats().await.unwrap();
    assert_eq!((stats.depth, stats.bytes), (1, first));
    // Replayed, the dead one is queued again with what it stores now.
    assert_eq!(s.replay(Default::default()).await.unwrap(), vec![ids[1]]);
    let stats = s.queue_stats().await.unwrap();
    assert_eq!(
        (stats.depth, stats.bytes),
        (2, first + own2 + requests.len() as u64)
    );
    s.close().await;
}

crate::on_backends!(
    refused_messages_keep_payloads_within_their_bound,
    pruning_refused_messages_frees_their_bytes,
    the_backlog_counts_the_bytes_its_rows_store,
);

/// A schema 3 file (before refused bytes were counted) upgrades with the
/// refused messages it holds counted.
#[tokio::test]
async fn a_schema_3_file_counts_its_refused_bytes_on_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let storage = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    let junk = refused("junk", 500);
    storage.accept(vec![junk.clone()]).await.unwrap();
    storage.close().await;
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("DROP TABLE usage; PRAGMA user_version = 3;")
            .unwrap();
    }
    let storage = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    assert_eq!(
        storage.queue_stats().await.unwrap().refused_bytes,
        size(&junk)
    );
    storage.close().await;
}

/// A schema 6 file (before queued messages carried their size) upgrades with
/// the backlog's bytes as they were: the sum is then read from the queue.
#[tokio::test]
async fn a_schema_6_file_keeps_its_backlog_bytes_on_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let storage = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    storage
        .accept(vec![
            message("q-1", "SP-1", "ann"),
            message("q-2", "SP-1", "bob"),
        ])
        .await
        .unwrap();
    let before = storage.queue_stats().await.unwrap();
    storage.close().await;
    assert_eq!(before.depth, 2);
    assert!(before.bytes > 0);
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("ALTER TABLE queue DROP COLUMN size; PRAGMA user_version = 6;")
            .unwrap();
    }
    let storage = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    let after = storage.queue_stats().await.unwrap();
    assert_eq!((after.depth, after.bytes), (before.depth, before.bytes));
    storage.close().await;
}
