//! Issue 14, storage side: one operation's bad data fails that operation
//! only (both backends), a signed webhook element is accepted once under
//! concurrency, and the SQLite files are private to their owner.

mod backends;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use totango_destination::storage::{NewMessage, SqliteStorage, State, Storage, StorageOptions};

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
