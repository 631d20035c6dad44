//! Issue 18, storage side: erasing a user leaves none of its payload in any
//! table (nor, on SQLite, in the database file or its WAL), cancels its
//! queued messages, and suppression records later messages without payload
//! until lifted; the audit trail keeps operator actions. Both backends.

use crate::support::backends::Backend;
use crate::support::state_of;
use serde_json::json;
use std::time::Duration;
use totango_destination::storage::{
    AuditEntry, Disposition, Erase, MessageFilter, NewMessage, Report, State, Storage, now_millis,
};

/// A trait value that appears nowhere but in alice's payloads.
const SECRET: &str = "alice-secret-7f3a9c";

fn message(id: &str, call: &str, user: &str, key: bool) -> NewMessage {
    let payload = json!({"type": call, "userId": user, "messageId": id,
        "traits": {"email": format!("{user}@example.com"), "note": if user == "alice" { SECRET } else { "none" }}});
    NewMessage {
        source: "web".to_owned(),
        message_id: id.to_owned(),
        call: call.to_owned(),
        service_id: "svc".to_owned(),
        user_id: Some(user.to_owned()),
        account_id: None,
        ordering_key: key.then(|| format!("svc\u{1f}u:{user}")),
        payload: payload.to_string().into(),
        settings: r#"{"apiToken":"t0k3n"}"#.to_owned().into(),
        state: State::Pending,
        code: None,
        reason: None,
        warnings: Vec::new(),
        received_at: now_millis(),
        set_page_category: (call == "page").then(|| Some(SECRET.to_owned())),
        needs_page_category: false,
    }
}

/// Where the secret still is: every column of every table (SQLite also the
/// file bytes), or every table as text (PostgreSQL).
async fn find_secret(b: Backend, url: Option<&str>, path: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    match b {
        Backend::Sqlite => {
            let c = rusqlite::Connection::open(path).unwrap();
            let tables: Vec<String> = c
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for t in tables {
                let mut stmt = c.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
                let n = stmt.column_count();
                let mut rows = stmt.query([]).unwrap();
                while let Some(row) = rows.next().unwrap() {
                    for i in 0..n {
                        let v: rusqlite::types::Value = row.get(i).unwrap();
                        let text = match v {
                            rusqlite::types::Value::Text(s) => s,
                            rusqlite::types::Value::Blob(b) => String::from_utf8_lossy(&b).into(),
                            _ => continue,
                        };
                        if text.contains(SECRET) {
                            found.push(format!("table {t}"));
                        }
                    }
                }
            }
            drop(c);
            for suffix in ["", "-wal"] {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                if let Ok(bytes) = std::fs::read(&name) {
                    if bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()) {
                        found.push(format!("file {}", std::path::Path::new(&name).display()));
                    }
                }
            }
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(url.unwrap()).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
            )
            .fetch_all(&mut c)
            .await
            .unwrap();
            for t in tables {
                let n: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM \"{t}\" x WHERE x::text LIKE '%' || $1 || '%'"
                ))
                .bind(SECRET)
                .fetch_one(&mut c)
                .await
                .unwrap();
                if n > 0 {
                    found.push(format!("table {t}"));
                }
            }
        }
    }
    found
}

async fn erasing_a_user_leaves_no_payload_and_suppresses_it(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let path = s.path.clone().unwrap_or_default();
    let url = s.url.clone();
    // Alice: two identifies (one key), a page, a track; bob: one identify.
    s.accept(vec![
        message("a-t", "track", "alice", false),
        message("a-p", "page", "alice", false),
        message("b-1", "identify", "bob", true),
    ])
    .await
    .unwrap();
    // The track is delivered and the page dies before the erase.
    let claimed = s.claim(10).await.unwrap().messages;
    assert_eq!(claimed.len(), 3);
    let mut reports = Vec::new();
    for m in &claimed {
        let disposition = if m.payload.contains("\"track\"") {
            Disposition::Delivered
        } else if m.payload.contains("\"page\"") {
            Disposition::Dead {
                code: "rejected_by_totango".into(),
                reason: "400".into(),
            }
        } else {
            continue;
        };
        reports.push(Report {
            id: m.id,
            lease: m.lease,
            requests: Some(format!(r#"[{{"note":"{SECRET}"}}]"#)),
            sent: 1,
            attempted: true,
            disposition,
            last: None,
            settings: None,
        });
    }
    s.report(reports).await.unwrap();
    let mut rejected = message("a-r", "identify", "alice", false);
    rejected.state = State::Rejected;
    rejected.code = Some("invalid_field".into());
    rejected.reason = Some(format!("traits.note {SECRET:?} is not allowed"));
    s.accept(vec![
        message("a-1", "identify", "alice", true),
        message("a-2", "identify", "alice", true),
        rejected,
    ])
    .await
    .unwrap();
    assert!(!find_secret(b, url.as_deref(), &path).await.is_empty());

    let erased = s
        .erase_user(Erase {
            user_id: "alice".into(),
            suppress: true,
            reason: "delete message d-1 from web".into(),
        })
        .await
        .unwrap();
    assert_eq!(erased.messages, 5, "{erased:?}");
    assert_eq!(
        erased.cancelled, 3,
        "two queued identifies and the dead page"
    );
    let left = find_secret(b, url.as_deref(), &path).await;
    assert!(left.is_empty(), "the secret is still in {left:?}");

    assert_eq!(state_of(s.as_ref(), "a-1").await, [State::Suppressed]);
    assert_eq!(state_of(s.as_ref(), "a-p").await, [State::Suppressed]);
    assert_eq!(state_of(s.as_ref(), "a-t").await, [State::Delivered]);
    assert_eq!(state_of(s.as_ref(), "a-r").await, [State::Rejected]);
    let track = &s
        .list(
            MessageFilter {
                message_id: Some("a-t".into()),
                ..Default::default()
            },
            1,
        )
        .await
        .unwrap()[0];
    assert_eq!(track.payload, json!({}));
    assert_eq!(track.user_id, None);
    // Nothing of alice's is claimable; bob's key is untouched.
    let claimable = s.claim(10).await.unwrap().messages;
    assert!(claimable.is_empty(), "{claimable:?}");

    // Suppressed: a later message is recorded without payload, not queued.
    s.accept(vec![message("a-3", "identify", "alice", true)])
        .await
        .unwrap();
    assert_eq!(state_of(s.as_ref(), "a-3").await, [State::Suppressed]);
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    assert!(find_secret(b, url.as_deref(), &path).await.is_empty());
    let list = s.suppressions().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].user_id, "alice");

    // Lifted: the next one is queued and delivered again.
    assert!(s.lift_suppression("alice").await.unwrap());
    assert!(!s.lift_suppression("alice").await.unwrap());
    s.accept(vec![message("a-4", "identify", "alice", true)])
        .await
        .unwrap();
    let claimed = s.claim(10).await.unwrap().messages;
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].payload.contains("a-4"));
    s.close().await;
}

async fn the_audit_trail_keeps_actions_newest_first(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    for (i, action) in ["login", "replay", "erase"].iter().enumerate() {
        s.record_audit(AuditEntry {
            actor: "session:0123456789ab".into(),
            address: Some("192.0.2.7".into()),
            action: (*action).into(),
            detail: json!({"outcome": "dead", "n": i}),
            count: (i > 0).then_some(i as u64 * 10),
        })
        .await
        .unwrap();
    }
    let all = s.audit_log(None, 10).await.unwrap();
    let actions: Vec<&str> = all.iter().map(|r| r.entry.action.as_str()).collect();
    assert_eq!(actions, ["erase", "replay", "login"]);
    assert_eq!(all[0].entry.count, Some(20));
    assert_eq!(all[2].entry.count, None);
    assert_eq!(all[1].entry.detail, json!({"outcome": "dead", "n": 1}));
    assert_eq!(all[0].entry.address.as_deref(), Some("192.0.2.7"));
    assert!(all[0].at >= all[2].at);
    let older = s.audit_log(Some(all[0].id), 1).await.unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].entry.action, "replay");
    s.close().await;
}

/// An erase cancels its user's claimed messages: their claims no longer
/// hold, and every process sharing the storage counts the erasure (so its
/// delivery re-checks claims before sending).
async fn an_erase_ends_the_claims_of_its_user(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    // Another replica on the same database (PostgreSQL only).
    let other = match &s.url {
        Some(url) => {
            let o = totango_destination::storage::PostgresStorage::open(
                url,
                crate::support::backends::options(),
            )
            .await
            .unwrap();
            // Its listener counts one when it connects (one may be missed).
            crate::support::wait::until(
                Duration::from_secs(10),
                Duration::from_millis(20),
                || async {
                    (o.erasures() > 0)
                        .then_some(())
                        .ok_or("the other replica does not listen")
                },
            )
            .await
            .unwrap();
            Some(o)
        }
        None => None,
    };
    let other_before = other.as_ref().map(|o| o.erasures());
    s.accept(vec![
        message("a-1", "identify", "alice", true),
        message("b-1", "identify", "bob", true),
    ])
    .await
    .unwrap();
    let before = s.erasures();
    let claimed = s.claim(10).await.unwrap().messages;
    assert_eq!(claimed.len(), 2);
    let (alice, bob) = if claimed[0].payload.contains("alice") {
        (&claimed[0], &claimed[1])
    } else {
        (&claimed[1], &claimed[0])
    };
    assert!(s.holds_claim(alice.id, alice.lease).await.unwrap());
    assert!(!s.holds_claim(alice.id, alice.lease + 1).await.unwrap());
    assert_eq!(s.erasures(), before, "no erase yet");

    let erased = s
        .erase_user(Erase {
            user_id: "alice".into(),
            suppress: false,
            reason: "test".into(),
        })
        .await
        .unwrap();
    assert_eq!(erased.cancelled, 1);
    assert!(s.erasures() > before);
    assert!(!s.holds_claim(alice.id, alice.lease).await.unwrap());
    assert!(s.holds_claim(bob.id, bob.lease).await.unwrap());
    if let (Some(o), Some(o_before)) = (&other, other_before) {
        crate::support::wait::until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                (o.erasures() > o_before)
                    .then_some(())
                    .ok_or("the other replica did not hear of the erase")
            },
        )
        .await
        .unwrap();
        assert!(!o.holds_claim(alice.id, alice.lease).await.unwrap());
    }
    // Reported: the claim is over.
    s.report(vec![Report {
        id: bob.id,
        lease: bob.lease,
        requests: None,
        sent: 1,
        attempted: true,
        disposition: Disposition::Delivered,
        last: None,
        settings: None,
    }])
    .await
    .unwrap();
    assert!(!s.holds_claim(bob.id, bob.lease).await.unwrap());
    if let Some(o) = other {
        o.close().await;
    }
    s.close().await;
}

crate::on_backends!(
    erasing_a_user_leaves_no_payload_and_suppresses_it,
    the_audit_trail_keeps_actions_newest_first,
    an_erase_ends_the_claims_of_its_user,
);

/// Payloads are dropped by outcome after their payload retention: the row,
/// its outcome and counts stay; a dead message without its payload is not
/// replayed.
async fn payloads_are_dropped_after_their_retention(b: Backend) {
    let options = totango_destination::storage::StorageOptions {
        prune_every_ms: 0,
        payload_retention: totango_destination::storage::PayloadRetention {
            delivered_ms: Some(100),
            refused_ms: Some(100),
            dead_ms: Some(100),
        },
        ..crate::support::backends::options()
    };
    let Some(s) = b.open(options).await else {
        return;
    };
    let mut rejected = message("r-1", "identify", "bob", false);
    rejected.state = State::Rejected;
    s.accept(vec![
        message("d-1", "track", "bob", false),
        message("x-1", "page", "bob", false),
        rejected,
    ])
    .await
    .unwrap();
    let claimed = s.claim(10).await.unwrap().messages;
    let reports = claimed
        .iter()
        .map(|m| Report {
            id: m.id,
            lease: m.lease,
            requests: Some("[]".into()),
            sent: 1,
            attempted: true,
            disposition: if m.payload.contains("\"track\"") {
                Disposition::Delivered
            } else {
                Disposition::Dead {
                    code: "rejected_by_totango".into(),
                    reason: "400".into(),
                }
            },
            last: None,
            settings: None,
        })
        .collect();
    s.report(reports).await.unwrap();
    // Pruning runs with writes; within a few, every payload is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        n += 1;
        let mut pending = message(&format!("p-{n}"), "track", "carol", false);
        pending.ordering_key = None;
        s.accept(vec![pending]).await.unwrap();
        let kept: Vec<String> = s
            .list(MessageFilter::default(), 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|m| m.state != State::Pending && m.payload != json!({}))
            .map(|m| m.message_id)
            .collect();
        if kept.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "payloads still kept: {kept:?}"
        );
    }
    let all = s.list(MessageFilter::default(), 100).await.unwrap();
    for id in ["d-1", "x-1", "r-1"] {
        let m = all
            .iter()
            .find(|m| m.message_id == id)
            .expect("the row stays");
        assert!(
            m.warnings.iter().any(|w| w.contains("retention")),
            "{id}: {:?}",
            m.warnings
        );
        assert_eq!(m.user_id.as_deref(), Some("bob"), "counts and ids stay");
    }
    // The pending ones keep theirs; the dead one is not replayed any more.
    assert!(
        all.iter()
            .filter(|m| m.state == State::Pending)
            .all(|m| m.payload != json!({}))
    );
    let replayed = s
        .replay(MessageFilter {
            state: Some(State::Dead),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(replayed.is_empty(), "{replayed:?}");
    s.close().await;
}

crate::on_backends!(payloads_are_dropped_after_their_retention);
