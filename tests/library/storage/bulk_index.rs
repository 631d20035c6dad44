//! SQLite finds messages by messageId, user and account through tables
//! filled in bulk (`message_ids`, `user_messages`, `account_messages`) up to
//! `bulk_index.upto`, and by the newer tail: every lookup, filter, erasure
//! and deduplication must see both.

use std::path::Path;
use std::time::Duration;

use totango_destination::storage::{
    AcceptError, AcceptOptions, Acceptance, Erase, MessageFilter, NewMessage, SqliteStorage, State,
    Storage, StorageOptions,
};

fn of(message_id: &str, user: &str, account: &str) -> NewMessage {
    NewMessage {
        user_id: Some(user.to_owned()),
        account_id: Some(account.to_owned()),
        ordering_key: None,
        ..super::msg(message_id, "unused")
    }
}

fn stored(out: &[Acceptance]) -> Vec<i64> {
    out.iter().map(super::stored_id).collect()
}

async fn listed(s: &SqliteStorage, filter: MessageFilter) -> Vec<i64> {
    let mut ids: Vec<i64> = s
        .list(filter, 1000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    ids.sort();
    ids
}

async fn erase(s: &SqliteStorage, user: &str) -> totango_destination::storage::Erased {
    s.erase_user(Erase {
        user_id: user.into(),
        suppress: false,
        reason: "test".into(),
    })
    .await
    .unwrap()
}

fn by_user(user: &str) -> MessageFilter {
    MessageFilter {
        user_id: Some(user.to_owned()),
        ..Default::default()
    }
}

fn by_account(account: &str) -> MessageFilter {
    MessageFilter {
        account_id: Some(account.to_owned()),
        ..Default::default()
    }
}

/// Ids in `user_messages` for this user, read from the file.
fn indexed(db: &Path, user: &str) -> Vec<i64> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT id FROM user_messages WHERE user_id = ?1 ORDER BY id")
        .unwrap();
    stmt.query_map([user], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn filters_and_erasure_find_indexed_and_tail_messages() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    // The tail is indexed at the first commit, then not for a minute.
    let s = SqliteStorage::open_with(&db, holding_the_tail()).unwrap();
    let first = stored(
        &s.accept(vec![of("a1", "ann", "acme"), of("b1", "bob", "bolt")])
            .await
            .unwrap(),
    );
    let second = stored(
        &s.accept(vec![of("a2", "ann", "acme"), of("a3", "ann", "bolt")])
            .await
            .unwrap(),
    );
    assert_eq!(
        indexed(&db, "ann"),
        vec![first[0]],
        "a1 indexed, a2 and a3 in the tail"
    );

    let ann = vec![first[0], second[0], second[1]];
    assert_eq!(listed(&s, by_user("ann")).await, ann);
    assert_eq!(listed(&s, by_user("bob")).await, vec![first[1]]);
    assert_eq!(
        listed(&s, by_account("acme")).await,
        vec![first[0], second[0]]
    );
    assert_eq!(
        listed(&s, by_account("bolt")).await,
        vec![first[1], second[1]]
    );
    let both = MessageFilter {
        user_id: Some("ann".into()),
        account_id: Some("bolt".into()),
        before: Some(second[1] + 1),
        ..Default::default()
    };
    assert_eq!(listed(&s, both).await, vec![second[1]]);

    let erased = erase(&s, "ann").await;
    assert_eq!(erased.messages, 3);
    assert_eq!(erased.cancelled, 3);
    assert!(listed(&s, by_user("ann")).await.is_empty());
    assert!(
        indexed(&db, "ann").is_empty(),
        "the user's id left the table"
    );
    let left: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM messages WHERE user_id = 'ann'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    // The account still lists the erased user's messages (without the user).
    assert_eq!(
        listed(&s, by_account("acme")).await,
        vec![first[0], second[0]]
    );
    assert_eq!(listed(&s, by_user("bob")).await, vec![first[1]]);
    s.close().await;
}

fn holding_the_tail() -> StorageOptions {
    StorageOptions {
        index_every_ms: 60_000,
        ..StorageOptions::default()
    }
}

fn by_message_id(message_id: &str) -> MessageFilter {
    MessageFilter {
        message_id: Some(message_id.to_owned()),
        ..Default::default()
    }
}

fn is_duplicate(out: &[Acceptance]) -> bool {
    matches!(out, [Acceptance::Duplicate { .. }])
}

/// Deduplication, the messageId filter and the signed-element check see a
/// messageId in the tables, in the tail, and in the tail of a file opened
/// again (the writer's memory of it is read back from the file).
#[tokio::test]
async fn message_ids_are_found_indexed_in_the_tail_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let s = SqliteStorage::open_with(&db, holding_the_tail()).unwrap();
    let indexed_one = stored(&s.accept(vec![of("m1", "ann", "acme")]).await.unwrap());
    let tail_one = stored(&s.accept(vec![of("m2", "ann", "acme")]).await.unwrap());
    let c = rusqlite::Connection::open(&db).unwrap();
    let in_table = |id: &str| -> i64 {
        c.query_row(
            "SELECT COUNT(*) FROM message_ids WHERE message_id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(
        (in_table("m1"), in_table("m2")),
        (1, 0),
        "m1 indexed, m2 in the tail"
    );

    for id in ["m1", "m2"] {
        let again = s.accept(vec![of(id, "ann", "acme")]).await.unwrap();
        assert!(is_duplicate(&again), "{id}: {again:?}");
        assert_eq!(
            listed(&s, by_message_id(id)).await.len(),
            2,
            "{id} and its duplicate"
        );
        let signed = s
            .accept_with(
                vec![of(id, "ann", "acme")],
                AcceptOptions { first_unseen: true },
            )
            .await;
        assert!(
            matches!(signed, Err(AcceptError::AlreadyStored(_))),
            "{id}: {signed:?}"
        );
    }
    // Another source may send the same messageId.
    let other = NewMessage {
        source: "server".into(),
        ..of("m2", "bob", "acme")
    };
    assert!(!is_duplicate(&s.accept(vec![other]).await.unwrap()));
    let fresh = s
        .accept_with(
            vec![of("m3", "ann", "acme")],
            AcceptOptions { first_unseen: true },
        )
        .await
        .unwrap();
    assert!(matches!(fresh[..], [Acceptance::Stored { .. }]));
    s.close().await;

    // Opened again: the first commit looks m2 and m3 up before it indexes.
    let s = SqliteStorage::open_with(&db, holding_the_tail()).unwrap();
    assert_eq!(in_table("m3"), 0, "m3 still in the tail");
    let again = s
        .accept(vec![of("m3", "ann", "acme"), of("m2", "ann", "acme")])
        .await
        .unwrap();
    assert!(
        again
            .iter()
            .all(|a| matches!(a, Acceptance::Duplicate { .. })),
        "{again:?}"
    );
    assert_eq!(in_table("m3"), 2, "indexed by that commit");
    let m2 = listed(&s, by_message_id("m2")).await;
    assert_eq!(
        m2.len(),
        4,
        "m2, its duplicate, the other source's, the one after: {m2:?}"
    );
    assert!(m2.contains(&tail_one[0]) && !m2.contains(&indexed_one[0]));
    s.close().await;
}

/// When pruning takes the newest messages, SQLite hands their ids out again;
/// a message given such an id is still found by its user.
#[tokio::test]
async fn ids_handed_out_again_after_pruning_are_still_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let s = SqliteStorage::open_with(
        &db,
        StorageOptions {
            retention_ms: Some(50),
            prune_every_ms: 0,
            ..StorageOptions::default()
        },
    )
    .unwrap();
    let finished = |id: &str| NewMessage {
        state: State::Filtered,
        code: Some("integration_disabled".into()),
        reason: Some("off".into()),
        ..of(id, "ann", "acme")
    };
    let old = stored(
        &s.accept(vec![finished("f1"), finished("f2")])
            .await
            .unwrap(),
    );
    assert_eq!(indexed(&db, "ann"), old);
    tokio::time::sleep(Duration::from_millis(120)).await;
    // A commit without accepts prunes both.
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    assert!(listed(&s, by_user("ann")).await.is_empty());
    let new = stored(&s.accept(vec![of("p1", "ann", "acme")]).await.unwrap());
    assert_eq!(new, vec![old[0]], "SQLite gave the pruned id out again");
    assert_eq!(listed(&s, by_user("ann")).await, new);
    assert_eq!(listed(&s, by_account("acme")).await, new);
    let erased = erase(&s, "ann").await;
    assert_eq!(erased.messages, 1);
    s.close().await;
}

/// A schema 7 file (indexes on the columns) upgrades: the tables hold every
/// message, the indexes are gone, deduplication finds the old messages.
#[tokio::test]
async fn a_schema_7_file_gets_its_messages_by_user_and_account() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let s = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    let ids = stored(
        &s.accept(vec![
            of("a1", "ann", "acme"),
            of("b1", "bob", "acme"),
            of("a2", "ann", "bolt"),
        ])
        .await
        .unwrap(),
    );
    s.close().await;
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "DROP TRIGGER messages_unindex; DROP TRIGGER messages_unindex_user; \
             DROP TRIGGER messages_unindex_account; DROP TABLE user_messages; \
             DROP TABLE account_messages; DROP TABLE message_ids; DROP TABLE bulk_index; \
             CREATE INDEX messages_message_id ON messages(message_id); \
             CREATE INDEX messages_user ON messages(user_id) WHERE user_id IS NOT NULL; \
             CREATE INDEX messages_account ON messages(account_id) WHERE account_id IS NOT NULL; \
             PRAGMA user_version = 7;",
        )
        .unwrap();
    }
    let s = SqliteStorage::open_with(&db, StorageOptions::default()).unwrap();
    assert_eq!(indexed(&db, "ann"), vec![ids[0], ids[2]]);
    let c = rusqlite::Connection::open(&db).unwrap();
    let old: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master \
             WHERE name IN ('messages_message_id', 'messages_user', 'messages_account')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0);
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 8);
    assert_eq!(listed(&s, by_account("acme")).await, vec![ids[0], ids[1]]);
    assert_eq!(listed(&s, by_user("ann")).await, vec![ids[0], ids[2]]);
    assert_eq!(listed(&s, by_message_id("b1")).await, vec![ids[1]]);
    let again = s.accept(vec![of("a2", "ann", "bolt")]).await.unwrap();
    assert!(is_duplicate(&again), "{again:?}");
    s.close().await;
}
