//! Issue 14, storage side: one operation's bad data fails that operation
//! only (both backends), a signed webhook element is accepted once under
//! concurrency, and the SQLite files are private to their owner.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::backends::Backend;
use totango_destination::storage::{
    AcceptError, AcceptOptions, Acceptance, NewMessage, SqliteStorage, State, Storage,
    StorageOptions,
};

fn message(message_id: &str, service: &str, user: &str) -> NewMessage {
    NewMessage {
        source: "web".to_owned(),
        message_id: message_id.to_owned(),
        call: "identify".to_owned(),
        service_id: service.to_owned(),
        user_id: Some(user.to_owned()),
        account_id: None,
        ordering_key: Some(format!("user:{service}:{user}")),
        payload: r#"{"type":"identify"}"#.to_owned(),
        settings: "{}".to_owned(),
        state: State::Pending,
        code: None,
        reason: None,
        warnings: Vec::new(),
        received_at: totango_destination::storage::now_millis(),
        set_page_category: None,
        needs_page_category: false,
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

/// While some operations carry ids too long for an index (PostgreSQL refuses
/// B-tree entries over ~2.7 KB: SQLSTATE 54000), every concurrent honest
/// batch is still stored: a failure caused by one operation's data fails
/// that operation only, not its group commit.
async fn one_poisoned_operation_fails_alone(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let mut honest = Vec::new();
    let mut poisoned = Vec::new();
    for round in 0..5 {
        for i in 0..20 {
            let st = s.storage.clone();
            honest.push(tokio::spawn(async move {
                st.accept(vec![
                    message(&format!("h-{round}-{i}-1"), "svc", &format!("u{i}")),
                    message(&format!("h-{round}-{i}-2"), "svc", &format!("u{i}")),
                ])
                .await
            }));
            if i % 5 == 0 {
                let st = s.storage.clone();
                poisoned.push(tokio::spawn(async move {
                    st.accept(vec![message(&long_id(20_000), &long_id(20_000), "u1")])
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
        match (b, t.await.unwrap()) {
            // SQLite has no such limit: stored.
            (Backend::Sqlite, r) => assert!(r.is_ok(), "{r:?}"),
            // Not worth retrying: its own data is the cause.
            (Backend::Postgres, Err(e)) => assert!(!e.is_transient(), "{e:?}"),
            (Backend::Postgres, Ok(_)) => panic!("PostgreSQL stored a 20 KB index entry"),
        }
    }
    assert_eq!(
        s.counts()
            .await
            .unwrap()
            .into_iter()
            .find(|(st, _)| *st == State::Pending)
            .map(|(_, n)| n),
        Some(if b == Backend::Sqlite { 220 } else { 200 })
    );
    s.close().await;
}

crate::on_backends!(
    first_unseen_stores_one_of_concurrent_batches,
    one_poisoned_operation_fails_alone,
);

/// The backlog's bytes count what a queued message stores besides its
/// payload: a request's 300 KB of settings counts too.
async fn backlog_bytes_count_settings(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let mut m = message("big-settings", "svc", "u1");
    m.settings = format!(r#"{{"service_id":"svc","pad":"{}"}}"#, "x".repeat(300_000));
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
