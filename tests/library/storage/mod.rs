//! The storage suite, run against every backend (SQLite; PostgreSQL when
//! `TEST_DATABASE_URL` is set): acceptance and dedupe, per-key ordering,
//! unordered activities, retries, dead letters, leases, persisted delivery
//! progress, page categories decided at acceptance, group commit and closing.
//! SQLite's own cases follow: restart recovery, the upgrade from schema 1,
//! retention, damaged files, one process per file.

mod bulk_index;
mod entity;
mod history;
mod limits;
mod postgres;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::backends::{Backend, Opened};
use serde_json::json;
use totango_destination::storage::{
    Acceptance, ClaimBatch, Claimed, Disposition, LastResponse, NewMessage, Report, SqliteStorage,
    State, Storage, StorageError, StorageOptions, now_millis,
};

const WINDOW: i64 = 24 * 60 * 60 * 1000;
/// A lease short enough for a test to outwait.
const SHORT_LEASE_MS: i64 = 500;

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("data").join("queue.db")
}

/// Storage under test. It remembers the lease of each claim, so a report
/// built with lease 0 carries the lease of the message's latest claim.
struct T {
    inner: Arc<dyn Storage>,
    place: Option<Opened>,
    leases: Mutex<HashMap<i64, i64>>,
}

impl std::ops::Deref for T {
    type Target = dyn Storage;
    fn deref(&self) -> &dyn Storage {
        &*self.inner
    }
}

impl T {
    fn new(inner: Arc<dyn Storage>, place: Option<Opened>) -> T {
        T {
            inner,
            place,
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// The claims held so far are lost, as when their holder is lost
    /// (SQLite: the short lease runs out; PostgreSQL: the replica is judged gone).
    async fn lose_claims(&self) {
        let opened = self.place.as_ref().expect("a storage opened on a backend");
        opened.lose_claims(SHORT_LEASE_MS).await;
    }

    async fn claim(&self, limit: usize) -> Result<ClaimBatch, StorageError> {
        let batch = self.inner.claim(limit).await?;
        let mut leases = self.leases.lock().unwrap();
        for m in &batch.messages {
            assert_ne!(m.lease, 0, "a claim hands out a lease");
            leases.insert(m.id, m.lease);
        }
        Ok(batch)
    }

    async fn report(&self, mut reports: Vec<Report>) -> Result<Vec<i64>, StorageError> {
        {
            let leases = self.leases.lock().unwrap();
            for r in &mut reports {
                if r.lease == 0 {
                    r.lease = leases.get(&r.id).copied().unwrap_or(0);
                }
            }
        }
        self.inner.report(reports).await
    }
}

/// Opens a SQLite file, keeping finished messages (fixtures are old; the
/// retention tests set their own options).
fn open(path: &Path) -> T {
    let options = StorageOptions {
        retention_ms: None,
        refused_retention_ms: None,
        ..crate::support::backends::options()
    };
    T::new(
        Arc::new(SqliteStorage::open_with(path, options).expect("open storage")),
        None,
    )
}

async fn open_with(b: Backend, options: StorageOptions) -> Option<T> {
    let opened = b.open(options).await?;
    Some(T::new(opened.storage.clone(), Some(opened)))
}

async fn open_on(b: Backend) -> Option<T> {
    open_with(b, crate::support::backends::options()).await
}

/// A pending track message of user `u1` in service `svc`, ordered by `key`.
fn msg(message_id: &str, key: &str) -> NewMessage {
    NewMessage {
        source: "web".to_owned(),
        message_id: message_id.to_owned(),
        call: "track".to_owned(),
        service_id: "svc".to_owned(),
        user_id: Some("u1".to_owned()),
        account_id: Some("acc1".to_owned()),
        ordering_key: Some(key.to_owned()),
        payload: json!({"type": "track", "messageId": message_id, "event": "Clicked"})
            .to_string()
            .into(),
        settings: "{}".to_owned().into(),
        state: State::Pending,
        code: None,
        reason: None,
        warnings: Vec::new(),
        received_at: now_millis(),
        set_page_category: None,
        needs_page_category: false,
    }
}

/// An activity (no ordering key) of user `user` in service `service`.
fn activity(message_id: &str, service: &str, user: &str) -> NewMessage {
    NewMessage {
        ordering_key: None,
        ..user_msg(message_id, service, user)
    }
}

/// A page of `user` in service `S` that sets (or forgets) the page category.
fn page(message_id: &str, user: &str, category: Option<&str>) -> NewMessage {
    NewMessage {
        call: "page".to_owned(),
        set_page_category: Some(category.map(str::to_owned)),
        ..activity(message_id, "S", user)
    }
}

/// A track of `user` in service `S` that takes the page category.
fn track(message_id: &str, user: &str) -> NewMessage {
    NewMessage {
        needs_page_category: true,
        ..activity(message_id, "S", user)
    }
}

/// A message stored in a final state decided at ingest.
fn final_msg(message_id: &str, key: &str, state: State, code: &str, reason: &str) -> NewMessage {
    NewMessage {
        state,
        code: Some(code.to_owned()),
        reason: Some(reason.to_owned()),
        ..msg(message_id, key)
    }
}

/// A message of user `user` in service `service`, keyed by both.
fn user_msg(message_id: &str, service: &str, user: &str) -> NewMessage {
    NewMessage {
        service_id: service.to_owned(),
        user_id: Some(user.to_owned()),
        ..msg(message_id, &format!("{service}/{user}"))
    }
}

/// A report on `id`'s latest claim (see `T::report`).
fn report(id: i64, disposition: Disposition) -> Report {
    Report {
        id,
        lease: 0,
        requests: None,
        sent: 0,
        attempted: true,
        disposition,
        last: None,
        settings: None,
    }
}

fn stored_id(a: &Acceptance) -> i64 {
    match *a {
        Acceptance::Stored { id } => id,
        Acceptance::Duplicate { id } => panic!("expected Stored, got Duplicate {{ id: {id} }}"),
    }
}

async fn accept_one(s: &T, m: NewMessage) -> Acceptance {
    let out = s.accept(vec![m]).await.expect("accept");
    assert_eq!(out.len(), 1);
    out[0]
}

async fn accept_ids(s: &T, batch: Vec<NewMessage>) -> Vec<i64> {
    let n = batch.len();
    let out = s.accept(batch).await.expect("accept");
    assert_eq!(out.len(), n);
    out.iter().map(stored_id).collect()
}

fn ids(claimed: &[Claimed]) -> Vec<i64> {
    let mut v: Vec<i64> = claimed.iter().map(|c| c.id).collect();
    v.sort_unstable();
    v
}

async fn counts(s: &T) -> HashMap<State, u64> {
    s.counts().await.expect("counts").into_iter().collect()
}

async fn accept_stores_all_and_queues_only_pending(b: Backend) {
    let Some(s) = open_with(
        b,
        StorageOptions {
            lease_ms: SHORT_LEASE_MS,
            ..crate::support::backends::options()
        },
    )
    .await
    else {
        return;
    };

    let mut pending = msg("m-pending", "k1");
    pending.account_id = None;
    let filtered = final_msg(
        "m-filtered",
        "k2",
        State::Filtered,
        "filtered",
        "event filtered",
    );
    let rejected = final_msg("m-rejected", "k3", State::Rejected, "invalid", "no userId");
    let received_at = pending.received_at;
    let [p, f, r] = accept_ids(&s, vec![pending, filtered, rejected]).await[..] else {
        unreachable!()
    };
    assert!(p < f && f < r, "ids follow acceptance order: {p} {f} {r}");

    // Only the pending message is queued.
    let batch = s.claim(10).await.unwrap();
    assert_eq!(ids(&batch.messages), vec![p]);
    assert_eq!(batch.next_due, None);
    let c = &batch.messages[0];
    assert_eq!(c.received_at, received_at);
    assert_eq!(c.settings.as_str(), "{}");
    assert_eq!(c.requests, None);
    assert_eq!((c.sent, c.attempts), (0, 0));
    let payload: serde_json::Value = serde_json::from_str(&c.payload).unwrap();
    assert_eq!(payload["messageId"], "m-pending");

    // After its lease expired the pending message is claimable again, and
    // still nothing else.
    s.lose_claims().await;
    let later = s.claim(10).await.unwrap();
    assert_eq!(ids(&later.messages), vec![p]);

    let got = s.get(p).await.unwrap().expect("pending stored");
    assert_eq!(got.id, p);
    assert_eq!(got.state, State::Pending);
    assert_eq!(got.message_id, "m-pending");
    assert_eq!(got.source, "web");
    assert_eq!(got.call, "track");
    assert_eq!(got.service_id, "svc");
    assert_eq!(got.user_id.as_deref(), Some("u1"));
    assert_eq!(got.account_id, None);
    assert_eq!((got.code, got.reason), (None, None));
    assert_eq!(
        got.payload,
        json!({"type": "track", "messageId": "m-pending", "event": "Clicked"})
    );
    assert_eq!(got.received_at, received_at);
    assert!(got.next_attempt_at.is_some(), "pending message is queued");
    assert_eq!(got.last_response, None);

    let got = s.get(f).await.unwrap().expect("filtered stored");
    assert_eq!(got.state, State::Filtered);
    assert_eq!(got.code.as_deref(), Some("filtered"));
    assert_eq!(got.reason.as_deref(), Some("event filtered"));
    assert_eq!(got.payload["messageId"], "m-filtered");
    assert_eq!(got.next_attempt_at, None, "filtered message is not queued");

    let got = s.get(r).await.unwrap().expect("rejected stored");
    assert_eq!(got.state, State::Rejected);
    assert_eq!(got.code.as_deref(), Some("invalid"));
    assert_eq!(got.reason.as_deref(), Some("no userId"));
    assert_eq!(got.next_attempt_at, None, "rejected message is not queued");

    assert!(s.get(r + 1000).await.unwrap().is_none());

    let c = counts(&s).await;
    assert_eq!(c.get(&State::Pending), Some(&1));
    assert_eq!(c.get(&State::Filtered), Some(&1));
    assert_eq!(c.get(&State::Rejected), Some(&1));
    assert_eq!(c.get(&State::Delivered), None);
    s.close().await;
}

async fn dedupe_by_source_and_message_id(b: Backend) {
    let Some(s) = open_with(
        b,
        StorageOptions {
            lease_ms: SHORT_LEASE_MS,
            ..crate::support::backends::options()
        },
    )
    .await
    else {
        return;
    };

    let first = stored_id(&accept_one(&s, msg("dup-1", "k1")).await);
    let second = accept_one(&s, msg("dup-1", "k1")).await;
    let Acceptance::Duplicate { id: dup } = second else {
        panic!("second accept of the same messageId must be Duplicate, got {second:?}");
    };
    assert_ne!(dup, first, "the duplicate is recorded as its own row");

    let got = s.get(dup).await.unwrap().expect("duplicate recorded");
    assert_eq!(got.state, State::Duplicate);
    assert_eq!(got.message_id, "dup-1");
    assert!(got.code.is_some(), "duplicate carries a code");
    assert_eq!(got.next_attempt_at, None, "duplicate is not queued");

    // Same messageId from another source is a different message.
    let other_source = NewMessage {
        source: "mobile".to_owned(),
        ..msg("dup-1", "k2")
    };
    let other = stored_id(&accept_one(&s, other_source).await);

    // Only the first and the other-source message are queued.
    let batch = s.claim(10).await.unwrap();
    assert_eq!(ids(&batch.messages), vec![first, other]);
    // Even after their leases expired, only those two are ever claimed.
    s.lose_claims().await;
    let again = s.claim(10).await.unwrap();
    assert_eq!(ids(&again.messages), vec![first, other]);

    let c = counts(&s).await;
    assert_eq!(c.get(&State::Pending), Some(&2));
    assert_eq!(c.get(&State::Duplicate), Some(&1));
    s.close().await;
}

async fn dedupe_window_expires(b: Backend) {
    let Some(s) = open_with(
        b,
        StorageOptions {
            dedupe_window_ms: 1,
            ..crate::support::backends::options()
        },
    )
    .await
    else {
        return;
    };

    let first = stored_id(&accept_one(&s, msg("again", "k1")).await);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = accept_one(&s, msg("again", "k1")).await;
    let Acceptance::Stored { id: second } = second else {
        panic!("outside the dedupe window the message is accepted again, got {second:?}");
    };
    assert_ne!(first, second);
    assert_eq!(s.get(second).await.unwrap().unwrap().state, State::Pending);
    s.close().await;
}

async fn duplicate_within_one_batch(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };

    let out = s
        .accept(vec![
            msg("same", "k1"),
            msg("same", "k1"),
            msg("other", "k1"),
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    let first = stored_id(&out[0]);
    let Acceptance::Duplicate { id: dup } = out[1] else {
        panic!("second of the batch must be Duplicate, got {:?}", out[1]);
    };
    let third = stored_id(&out[2]);
    assert_eq!(s.get(dup).await.unwrap().unwrap().state, State::Duplicate);

    // The key holds exactly two queued messages: first, then third.
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![first]);
    s.report(vec![report(first, Disposition::Delivered)])
        .await
        .unwrap();
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![third]);
    s.report(vec![report(third, Disposition::Delivered)])
        .await
        .unwrap();
    let b = s.claim(10).await.unwrap();
    assert!(b.messages.is_empty(), "claimed {:?}", ids(&b.messages));
    s.close().await;
}

async fn claim_one_per_key_in_acceptance_order(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };

    // A's messages arrive in separate batches, interleaved with B.
    let a1 = stored_id(&accept_one(&s, msg("a1", "A")).await);
    let b1 = stored_id(&accept_one(&s, msg("b1", "B")).await);
    let [a2, a3] = accept_ids(&s, vec![msg("a2", "A"), msg("a3", "A")]).await[..] else {
        unreachable!()
    };

    let first = s.claim(10).await.unwrap();
    assert_eq!(ids(&first.messages), vec![a1, b1]);

    // The heads are leased: nothing more for A (nor B) until reported.
    let second = s.claim(10).await.unwrap();
    assert!(
        second.messages.is_empty(),
        "claimed {:?} while heads are leased",
        ids(&second.messages)
    );

    s.report(vec![report(a1, Disposition::Delivered)])
        .await
        .unwrap();
    let third = s.claim(10).await.unwrap();
    assert_eq!(ids(&third.messages), vec![a2], "A's next, B still leased");
    assert_eq!(s.get(a1).await.unwrap().unwrap().state, State::Delivered);
    assert_eq!(s.get(a1).await.unwrap().unwrap().next_attempt_at, None);

    // Drain everything: within A, strictly acceptance order.
    s.report(vec![
        report(a2, Disposition::Delivered),
        report(b1, Disposition::Delivered),
    ])
    .await
    .unwrap();
    let mut order_a = vec![a1, a2];
    loop {
        let b = s.claim(10).await.unwrap();
        if b.messages.is_empty() {
            break;
        }
        assert_eq!(b.messages.len(), 1, "only A remains, one at a time");
        order_a.push(b.messages[0].id);
        s.report(vec![report(b.messages[0].id, Disposition::Delivered)])
            .await
            .unwrap();
    }
    assert_eq!(order_a, vec![a1, a2, a3]);
    assert_eq!(counts(&s).await.get(&State::Delivered), Some(&4));
    assert_eq!(counts(&s).await.get(&State::Pending), None);
    s.close().await;
}

async fn claim_respects_limit_oldest_due_first(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    let all = accept_ids(
        &s,
        (0..5)
            .map(|i| msg(&format!("m{i}"), &format!("K{i}")))
            .collect(),
    )
    .await;
    let b = s.claim(2).await.unwrap();
    assert_eq!(ids(&b.messages), all[..2].to_vec());
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), all[2..].to_vec());
    s.close().await;
}

async fn retry_blocks_only_its_key_until_due(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };

    let [a1, a2, b1] =
        accept_ids(&s, vec![msg("a1", "A"), msg("a2", "A"), msg("b1", "B")]).await[..]
    else {
        unreachable!()
    };
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![a1, b1]);

    let due = now_millis() + 1_000;
    s.report(vec![Report {
        last: Some(LastResponse {
            status: Some(503),
            body: Some("unavailable".to_owned()),
            error: None,
        }),
        ..report(
            a1,
            Disposition::Retry {
                next_attempt_at: due,
            },
        )
    }])
    .await
    .unwrap();

    let got = s.get(a1).await.unwrap().unwrap();
    assert_eq!(got.state, State::Pending);
    assert_eq!(got.attempts, 1);
    assert_eq!(got.next_attempt_at, Some(due));
    assert_eq!(got.last_response.and_then(|l| l.status), Some(503));

    // Head-of-line: neither a1 nor a2 while a1 waits.
    let b = s.claim(10).await.unwrap();
    assert!(b.messages.is_empty(), "claimed {:?}", ids(&b.messages));
    assert_eq!(b.next_due, Some(due));

    // Another key is not blocked meanwhile.
    s.report(vec![report(b1, Disposition::Delivered)])
        .await
        .unwrap();
    let b2 = stored_id(&accept_one(&s, msg("b2", "B")).await);
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![b2]);
    assert_eq!(b.next_due, Some(due));

    // Once due, a1 comes back (and still not a2).
    tokio::time::sleep(Duration::from_millis(
        (due + 20 - now_millis()).max(0) as u64
    ))
    .await;
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![a1]);
    assert_eq!(b.messages[0].attempts, 1);

    // An unattempted retry does not count as an attempt.
    s.report(vec![Report {
        attempted: false,
        ..report(
            a1,
            Disposition::Retry {
                next_attempt_at: now_millis(),
            },
        )
    }])
    .await
    .unwrap();
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![a1]);
    assert_eq!(b.messages[0].attempts, 1);
    let got = s.get(a1).await.unwrap().unwrap();
    assert_eq!(
        got.last_response.and_then(|l| l.status),
        Some(503),
        "a report without a response keeps the last one"
    );

    s.report(vec![report(a1, Disposition::Delivered)])
        .await
        .unwrap();
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![a2]);
    s.close().await;
}

async fn dead_is_recorded_and_unblocks_key(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };

    let [a1, a2] = accept_ids(&s, vec![msg("a1", "A"), msg("a2", "A")]).await[..] else {
        unreachable!()
    };
    assert_eq!(ids(&s.claim(10).await.unwrap().messages), vec![a1]);

    s.report(vec![Report {
        last: Some(LastResponse {
            status: Some(400),
            body: Some("bad request: no such field".to_owned()),
            error: None,
        }),
        ..report(
            a1,
            Disposition::Dead {
                code: "totango_rejected".to_owned(),
                reason: "Totango answered 400".to_owned(),
            },
        )
    }])
    .await
    .unwrap();

    let got = s.get(a1).await.unwrap().unwrap();
    assert_eq!(got.state, State::Dead);
    assert_eq!(got.code.as_deref(), Some("totango_rejected"));
    assert_eq!(got.reason.as_deref(), Some("Totango answered 400"));
    assert_eq!(
        got.last_response,
        Some(LastResponse {
            status: Some(400),
            body: Some("bad request: no such field".to_owned()),
            error: None,
        })
    );
    assert_eq!(got.attempts, 1);
    assert_eq!(got.next_attempt_at, None, "dead message is dequeued");
    assert!(got.updated_at >= got.received_at);

    let b = s.claim(10).await.unwrap();
    assert_eq!(
        ids(&b.messages),
        vec![a2],
        "the key's next message is claimable"
    );
    let c = counts(&s).await;
    assert_eq!(c.get(&State::Dead), Some(&1));
    assert_eq!(c.get(&State::Pending), Some(&1));
    s.close().await;
}

async fn final_disposition_records_state(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    let [a1, a2] = accept_ids(&s, vec![msg("a1", "A"), msg("a2", "A")]).await[..] else {
        unreachable!()
    };
    assert_eq!(ids(&s.claim(10).await.unwrap().messages), vec![a1]);
    s.report(vec![Report {
        attempted: false,
        ..report(
            a1,
            Disposition::Final {
                state: State::Unsupported,
                code: Some("unsupported_call".to_owned()),
                reason: Some("screen is not supported".to_owned()),
            },
        )
    }])
    .await
    .unwrap();
    let got = s.get(a1).await.unwrap().unwrap();
    assert_eq!(got.state, State::Unsupported);
    assert_eq!(got.code.as_deref(), Some("unsupported_call"));
    assert_eq!(got.reason.as_deref(), Some("screen is not supported"));
    assert_eq!(got.attempts, 0);
    assert_eq!(got.next_attempt_at, None);
    assert_eq!(ids(&s.claim(10).await.unwrap().messages), vec![a2]);
    s.close().await;
}

async fn requests_and_sent_persist_across_attempts(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    let id = stored_id(&accept_one(&s, msg("m1", "A")).await);
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![id]);
    assert_eq!(
        (b.messages[0].requests.clone(), b.messages[0].sent),
        (None, 0)
    );

    let requests = json!([{"url": "/a", "body": "x=1"}, {"url": "/b", "body": "y=2"}]).to_string();
    s.report(vec![Report {
        requests: Some(requests.clone()),
        sent: 1,
        ..report(
            id,
            Disposition::Retry {
                next_attempt_at: now_millis(),
            },
        )
    }])
    .await
    .unwrap();

    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![id]);
    assert_eq!(b.messages[0].requests.as_deref(), Some(requests.as_str()));
    assert_eq!(b.messages[0].sent, 1);
    assert_eq!(b.messages[0].attempts, 1);

    // A later report without requests keeps the stored ones.
    s.report(vec![Report {
        requests: None,
        sent: 1,
        ..report(
            id,
            Disposition::Retry {
                next_attempt_at: now_millis(),
            },
        )
    }])
    .await
    .unwrap();
    let b = s.claim(10).await.unwrap();
    assert_eq!(b.messages[0].requests.as_deref(), Some(requests.as_str()));
    assert_eq!(b.messages[0].attempts, 2);

    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.requests, Some(serde_json::from_str(&requests).unwrap()));
    assert_eq!(got.sent, 1);
    s.close().await;
}

async fn activities_are_claimed_in_parallel_attribute_updates_in_order(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    // One busy user: identify, three activities, identify, one more activity.
    let all = accept_ids(
        &s,
        vec![
            user_msg("i1", "S", "U"),
            activity("t1", "S", "U"),
            activity("t2", "S", "U"),
            activity("t3", "S", "U"),
            user_msg("i2", "S", "U"),
            activity("t4", "S", "U"),
        ],
    )
    .await;
    let [i1, t1, t2, t3, i2, t4] = all[..] else {
        unreachable!()
    };
    let first = s.claim(10).await.unwrap();
    // Every activity goes at once; of the attribute updates only the first.
    assert_eq!(ids(&first.messages), vec![i1, t1, t2, t3, t4]);
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    // A retried activity holds nothing back.
    s.report(vec![
        report(
            t1,
            Disposition::Retry {
                next_attempt_at: now_millis() + 60_000,
            },
        ),
        report(t2, Disposition::Delivered),
    ])
    .await
    .unwrap();
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    // The second identify waits for the first, whatever the activities do.
    s.report(vec![report(i1, Disposition::Delivered)])
        .await
        .unwrap();
    assert_eq!(ids(&s.claim(10).await.unwrap().messages), vec![i2]);
    s.close().await;
}

async fn page_category_decided_at_acceptance_in_order(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    // Page A, track, page B, track, in one batch; then the same across batches.
    let batch = accept_ids(
        &s,
        vec![
            page("pa", "U", Some("A")),
            track("t1", "U"),
            page("pb", "U", Some("B")),
            track("t2", "U"),
            track("other", "U2"),
        ],
    )
    .await;
    let t3 = stored_id(&accept_one(&s, track("t3", "U")).await);
    stored_id(&accept_one(&s, page("pc", "U", None)).await);
    let t4 = stored_id(&accept_one(&s, track("t4", "U")).await);
    stored_id(&accept_one(&s, page("pd", "U", Some("D"))).await);
    // A track that does not ask gets nothing stored, a duplicate changes nothing.
    let own = stored_id(&accept_one(&s, activity("own", "S", "U")).await);
    let dup = s.accept(vec![page("pa", "U", Some("X"))]).await.unwrap();
    assert!(matches!(dup[0], Acceptance::Duplicate { .. }));
    let t5 = stored_id(&accept_one(&s, track("t5", "U")).await);
    // Another service's memory is its own.
    let other_service = stored_id(
        &accept_one(
            &s,
            NewMessage {
                needs_page_category: true,
                ..activity("t-s2", "S2", "U")
            },
        )
        .await,
    );

    let claimed = s.claim(100).await.unwrap().messages;
    let by_id: HashMap<i64, Option<String>> = claimed
        .iter()
        .map(|c| (c.id, c.latest_page_category.clone()))
        .collect();
    assert_eq!(by_id[&batch[1]].as_deref(), Some("A"));
    assert_eq!(by_id[&batch[3]].as_deref(), Some("B"));
    assert_eq!(by_id[&batch[4]], None, "another user");
    assert_eq!(by_id[&t3].as_deref(), Some("B"));
    assert_eq!(by_id[&t4], None, "a page without category forgets");
    assert_eq!(by_id[&own], None);
    assert_eq!(by_id[&t5].as_deref(), Some("D"));
    assert_eq!(by_id[&other_service], None);
    s.close().await;
}

async fn page_category_applies_for_pages_in_a_final_state(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    let filtered = NewMessage {
        state: State::Filtered,
        code: Some("no_page_activity".to_owned()),
        ..page("p", "U", Some("Reports"))
    };
    accept_one(&s, filtered).await;
    assert_eq!(counts(&s).await.get(&State::Filtered), Some(&1));
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    let t = stored_id(&accept_one(&s, track("t", "U")).await);
    let b = s.claim(10).await.unwrap();
    assert_eq!(ids(&b.messages), vec![t]);
    assert_eq!(
        b.messages[0].latest_page_category.as_deref(),
        Some("Reports")
    );
    s.close().await;
}

#[tokio::test]
async fn page_category_survives_retries_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let s = open(&path);
    accept_ids(&s, vec![page("p", "U", Some("A")), track("t", "U")]).await;
    let claimed = s.claim(10).await.unwrap().messages;
    let t = claimed
        .iter()
        .find(|c| c.latest_page_category.is_some())
        .unwrap()
        .id;
    s.report(vec![report(
        t,
        Disposition::Dead {
            code: "x".into(),
            reason: "y".into(),
        },
    )])
    .await
    .unwrap();
    accept_one(&s, page("p2", "U", Some("B"))).await;
    s.close().await;
    let s = open(&path);
    assert_eq!(s.replay(Default::default()).await.unwrap(), vec![t]);
    let claimed = s.claim(10).await.unwrap().messages;
    let again = claimed.iter().find(|c| c.id == t).unwrap();
    assert_eq!(again.latest_page_category.as_deref(), Some("A"));
    s.close().await;
}

/// A file written by the previous release (schema 1), with a backlog queued
/// while Totango was unreachable: per user u1 identify, page A, track,
/// identify, page B, track, group g1 (twice, two users), a track with its own
/// category; u3 has a remembered category Z and a queued track.
#[tokio::test]
async fn upgrades_a_schema_1_file_and_keeps_its_backlog_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-v1.db"),
        &path,
    )
    .unwrap();
    // As if the fixture's retries (set in the future) had fallen due.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE queue SET next_attempt_at = 0", [])
        .unwrap();
    let s = open(&path);
    let list = s.list(Default::default(), 100).await.unwrap();
    let id = |message_id: &str| list.iter().find(|m| m.message_id == message_id).unwrap().id;
    assert_eq!(list.len(), 11);
    assert_eq!(counts(&s).await.get(&State::Pending), Some(&10));

    // Everything is due.
    let claimed = s.claim(100).await.unwrap().messages;
    let mut expected: Vec<i64> = ["t-u3", "i-1", "p-a", "t-1", "p-b", "t-2", "g-1", "t-3"]
        .iter()
        .map(|m| id(m))
        .collect();
    expected.sort_unstable();
    assert_eq!(
        ids(&claimed),
        expected,
        "i-2 and g-2 wait behind their entity"
    );
    let category = |m: &str| {
        claimed
            .iter()
            .find(|c| c.id == id(m))
            .unwrap()
            .latest_page_category
            .clone()
    };
    assert_eq!(category("t-1").as_deref(), Some("A"));
    assert_eq!(category("t-2").as_deref(), Some("B"));
    assert_eq!(category("t-u3").as_deref(), Some("Z"));
    // Progress and payload carried over.
    let t_u3 = s.get(id("t-u3")).await.unwrap().unwrap();
    assert_eq!(t_u3.attempts, 1);
    assert_eq!(t_u3.payload["event"], "E3");

    // Attribute updates keep their order: i-2 after i-1, g-2 after g-1.
    s.report(vec![
        report(id("i-1"), Disposition::Delivered),
        report(id("g-1"), Disposition::Delivered),
    ])
    .await
    .unwrap();
    let next = s.claim(100).await.unwrap().messages;
    let mut want = vec![id("i-2"), id("g-2")];
    want.sort_unstable();
    assert_eq!(ids(&next), want);

    // The memory is what delivering the queued pages would have left.
    let fresh = NewMessage {
        service_id: "SP-1234-01".into(),
        ..track("new-u1", "u1")
    };
    let fresh_u3 = NewMessage {
        service_id: "SP-1234-01".into(),
        ..track("new-u3", "u3")
    };
    let [a, b] = accept_ids(&s, vec![fresh, fresh_u3]).await[..] else {
        unreachable!()
    };
    let claimed = s.claim(100).await.unwrap().messages;
    let category = |id: i64| {
        claimed
            .iter()
            .find(|c| c.id == id)
            .unwrap()
            .latest_page_category
            .clone()
    };
    assert_eq!(category(a).as_deref(), Some("B"));
    assert_eq!(category(b).as_deref(), Some("Z"));
    s.close().await;

    // Reopening does not upgrade again.
    let s = open(&path);
    assert_eq!(s.list(Default::default(), 100).await.unwrap().len(), 13);
    s.close().await;
}

#[tokio::test]
async fn reopen_clears_leases_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let s = open(&path);
    let [a1, a2, b1, done] = accept_ids(
        &s,
        vec![
            msg("a1", "A"),
            msg("a2", "A"),
            msg("b1", "B"),
            msg("d", "D"),
        ],
    )
    .await[..] else {
        unreachable!()
    };
    assert_eq!(
        ids(&s.claim(10).await.unwrap().messages),
        vec![a1, b1, done]
    );
    s.report(vec![report(done, Disposition::Delivered)])
        .await
        .unwrap();
    // Leased: not claimable again in this process.
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    s.close().await;
    drop(s);

    let s = open(&path);
    let b = s.claim(10).await.unwrap();
    assert_eq!(
        ids(&b.messages),
        vec![a1, b1],
        "leases are cleared at start"
    );
    assert_eq!(s.get(done).await.unwrap().unwrap().state, State::Delivered);
    assert_eq!(s.get(a2).await.unwrap().unwrap().state, State::Pending);
    let c = counts(&s).await;
    assert_eq!(c.get(&State::Pending), Some(&3));
    assert_eq!(c.get(&State::Delivered), Some(&1));

    // The dedupe memory survives the restart too.
    let again = accept_one(&s, msg("a1", "A")).await;
    assert!(
        matches!(again, Acceptance::Duplicate { .. }),
        "got {again:?}"
    );
    s.close().await;
}

async fn concurrent_accepts_all_commit(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = s.inner.clone();
            tokio::spawn(async move {
                let out = s
                    .accept(vec![msg(&format!("c{i}"), &format!("key{}", i % 7))])
                    .await
                    .expect("accept");
                assert_eq!(out.len(), 1);
                stored_id(&out[0])
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(tasks.len());
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "distinct ids");

    let c = counts(&s).await;
    assert_eq!(c.get(&State::Pending), Some(&200));
    assert_eq!(c.len(), 1, "only pending: {c:?}");
    let b = s.claim(1000).await.unwrap();
    assert_eq!(b.messages.len(), 7, "one head per key");
    s.close().await;
}

async fn closed_storage_refuses_work(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    s.ping().await.expect("ping while open");
    let id = stored_id(&accept_one(&s, msg("m1", "A")).await);
    s.close().await;

    assert_eq!(
        s.accept(vec![msg("m2", "A")]).await,
        Err(StorageError::Closed)
    );
    assert_eq!(
        s.claim(10).await.map(|b| b.messages.len()),
        Err(StorageError::Closed)
    );
    assert_eq!(
        s.report(vec![report(id, Disposition::Delivered)]).await,
        Err(StorageError::Closed)
    );
    assert!(s.ping().await.is_err(), "ping after close");
    // Closing twice is harmless.
    s.close().await;
    assert!(s.ping().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_keeps_every_acknowledged_accept() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let s = Arc::new(open(&path));
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.accept(vec![msg(&format!("c{i}"), "K")]).await })
        })
        .collect();
    tokio::task::yield_now().await;
    s.close().await;
    let mut ok = 0u64;
    for t in tasks {
        match t.await.expect("task") {
            Ok(out) => {
                stored_id(&out[0]);
                ok += 1;
            }
            Err(e) => assert_eq!(e, StorageError::Closed),
        }
    }
    drop(s);

    let s = open(&path);
    let pending = counts(&s).await.get(&State::Pending).copied().unwrap_or(0);
    assert_eq!(pending, ok, "every Ok accept is on disk, nothing else is");
    s.close().await;
}

#[tokio::test]
async fn reopen_after_drop_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let s = open(&path);
    let id = stored_id(&accept_one(&s, msg("m1", "A")).await);
    assert_eq!(ids(&s.claim(10).await.unwrap().messages), vec![id]);
    drop(s);

    let s = open(&path);
    assert_eq!(ids(&s.claim(10).await.unwrap().messages), vec![id]);
    s.close().await;
}

async fn reads_fail_after_close(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    let id = stored_id(&accept_one(&s, msg("m1", "A")).await);
    s.close().await;
    assert_eq!(
        s.get(id).await.map(|m| m.map(|m| m.state)),
        Err(StorageError::Closed)
    );
    assert_eq!(s.counts().await, Err(StorageError::Closed));
}

async fn stale_report_after_lease_expiry_does_not_resurrect(b: Backend) {
    let Some(s) = open_with(
        b,
        StorageOptions {
            lease_ms: SHORT_LEASE_MS,
            ..crate::support::backends::options()
        },
    )
    .await
    else {
        return;
    };
    let id = stored_id(&accept_one(&s, msg("m1", "A")).await);
    let first = s.claim(10).await.unwrap().messages;
    assert_eq!(ids(&first), vec![id]);
    // The first lease expires; a second claim takes the message.
    s.lose_claims().await;
    let second = s.claim(10).await.unwrap().messages;
    assert_eq!(ids(&second), vec![id]);
    assert_ne!(
        first[0].lease, second[0].lease,
        "each claim has its own lease"
    );
    // While the second lease lives, the message is not handed out again.
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    // The first holder's late report is ignored and said to be stale.
    let stale = s
        .report(vec![Report {
            lease: first[0].lease,
            ..report(
                id,
                Disposition::Retry {
                    next_attempt_at: now_millis(),
                },
            )
        }])
        .await
        .unwrap();
    assert_eq!(stale, vec![id]);
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!((got.state, got.attempts), (State::Pending, 0));
    // The current holder's report counts.
    let stale = s
        .report(vec![Report {
            lease: second[0].lease,
            ..report(id, Disposition::Delivered)
        }])
        .await
        .unwrap();
    assert!(stale.is_empty());
    assert_eq!(s.get(id).await.unwrap().unwrap().state, State::Delivered);
    // A report after the message finished is stale as well.
    let stale = s
        .report(vec![Report {
            lease: second[0].lease,
            ..report(id, Disposition::Delivered)
        }])
        .await
        .unwrap();
    assert_eq!(stale, vec![id]);
    assert!(s.claim(10).await.unwrap().messages.is_empty());
    s.close().await;
}

#[tokio::test]
async fn retention_prunes_finished_messages_but_keeps_pending_and_dead() {
    let dir = tempfile::tempdir().unwrap();
    let storage = T::new(
        Arc::new(
            SqliteStorage::open_with(
                &db_path(&dir),
                StorageOptions {
                    dedupe_window_ms: WINDOW,
                    retention_ms: Some(50),
                    prune_every_ms: 0,
                    ..crate::support::backends::options()
                },
            )
            .unwrap(),
        ),
        None,
    );
    let ids: Vec<i64> = storage
        .accept(vec![
            final_msg(
                "filtered",
                "k0",
                State::Filtered,
                "integration_disabled",
                "off",
            ),
            msg("delivered", "k1"),
            msg("dead", "k2"),
            msg("waiting", "k3"),
        ])
        .await
        .unwrap()
        .iter()
        .map(stored_id)
        .collect();
    let claimed = storage.claim(10).await.unwrap().messages;
    assert_eq!(claimed.len(), 3);
    storage
        .report(vec![
            report(ids[1], Disposition::Delivered),
            report(
                ids[2],
                Disposition::Dead {
                    code: "rejected_by_totango".into(),
                    reason: "HTTP 400".into(),
                },
            ),
            report(
                ids[3],
                Disposition::Retry {
                    next_attempt_at: now_millis() + 60_000,
                },
            ),
        ])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    // Any commit runs the prune (every commit here, prune_every_ms = 0).
    let again = storage.accept(vec![msg("filtered", "k9")]).await.unwrap();
    assert!(
        matches!(again[0], Acceptance::Duplicate { .. }),
        "dedupe memory outlives the pruned message"
    );
    assert!(
        storage.get(ids[0]).await.unwrap().is_none(),
        "filtered pruned"
    );
    assert!(
        storage.get(ids[1]).await.unwrap().is_none(),
        "delivered pruned"
    );
    assert_eq!(
        storage.get(ids[2]).await.unwrap().unwrap().state,
        State::Dead,
        "dead letters stay"
    );
    assert_eq!(
        storage.get(ids[3]).await.unwrap().unwrap().state,
        State::Pending,
        "queued work stays"
    );
    storage.close().await;
}

#[tokio::test]
async fn retention_catches_up_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let storage = T::new(
        Arc::new(
            SqliteStorage::open_with(
                &db_path(&dir),
                StorageOptions {
                    dedupe_window_ms: WINDOW,
                    retention_ms: Some(50),
                    // Once a minute: only the catch-up rule can prune twice in a row.
                    prune_every_ms: 60_000,
                    ..crate::support::backends::options()
                },
            )
            .unwrap(),
        ),
        None,
    );
    // Messages already past retention: the commit that stores them prunes one
    // chunk, and the following commits keep pruning until none is left.
    let old = now_millis() - 10_000;
    let batch: Vec<NewMessage> = (0..5_000)
        .map(|i| NewMessage {
            received_at: old,
            ..final_msg(
                &format!("f{i}"),
                "k",
                State::Filtered,
                "integration_disabled",
                "off",
            )
        })
        .collect();
    storage.accept(batch).await.unwrap();
    let filtered = |counts: Vec<(State, u64)>| {
        counts
            .into_iter()
            .find(|(s, _)| *s == State::Filtered)
            .map_or(0, |(_, n)| n)
    };
    let mut seen = vec![filtered(storage.counts().await.unwrap())];
    for _ in 0..3 {
        // Commits only: claims that find nothing.
        storage.claim(1).await.unwrap();
        seen.push(filtered(storage.counts().await.unwrap()));
    }
    assert_eq!(
        seen,
        [3_000, 1_000, 0, 0],
        "2,000 per commit until caught up"
    );
    storage.close().await;
}

/// A truncated or overwritten database file is refused at start with a
/// clear error naming the file and the way to recover, never used.
#[tokio::test]
async fn a_damaged_database_is_refused_at_start_with_a_recovery_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let s = open(&path);
        let batch: Vec<_> = (0..2_000)
            .map(|i| {
                let mut m = msg(&format!("m{i}"), &format!("u{i}"));
                m.payload = "x".repeat(500).into();
                m
            })
            .collect();
        s.accept(batch).await.unwrap();
        s.close().await;
    }
    // Truncated: the second half of the file is gone.
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // Overwritten: pages in the middle are garbage.
    let mut garbage = bytes.clone();
    for b in &mut garbage[8192..40960] {
        *b = 0x5a;
    }
    let corrupted = dir.path().join("corrupted.db");
    std::fs::write(&corrupted, &garbage).unwrap();
    // Not a database at all.
    let other = dir.path().join("other.db");
    std::fs::write(
        &other,
        b"this is not a database file, just text ".repeat(200),
    )
    .unwrap();
    for bad in [&truncated, &corrupted, &other] {
        let e = match SqliteStorage::open(bad, 86_400_000) {
            Ok(_) => panic!("{} was accepted", bad.display()),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&bad.display().to_string()), "{e}");
        assert!(e.contains("damaged") && e.contains(".recover"), "{e}");
    }
    // The intact file still opens.
    let s = open(&path);
    assert_eq!(s.queue_stats().await.unwrap().depth, 2_000);
    s.close().await;
}

async fn pauses_are_shared_extended_and_expire(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    assert!(s.paused_endpoints().await.unwrap().is_empty());
    let now = now_millis();
    s.pause_endpoint("https://a.example", now + 60_000)
        .await
        .unwrap();
    // A shorter pause does not shorten it; a longer one extends it.
    s.pause_endpoint("https://a.example", now + 1_000)
        .await
        .unwrap();
    s.pause_endpoint("https://b.example", now + 300)
        .await
        .unwrap();
    let mut got = s.paused_endpoints().await.unwrap();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("https://a.example".to_owned(), now + 60_000),
            ("https://b.example".to_owned(), now + 300)
        ]
    );
    s.pause_endpoint("https://a.example", now + 90_000)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        s.paused_endpoints().await.unwrap(),
        vec![("https://a.example".to_owned(), now + 90_000)],
        "an ended pause is gone"
    );
    s.close().await;
}

async fn queued_work_signals_the_notifier(b: Backend) {
    let Some(s) = open_on(b).await else {
        return;
    };
    let notifier = s.notifier();
    let waiting = notifier.notified();
    accept_one(&s, msg("m1", "A")).await;
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("accepting a pending message signals the notifier");
    s.close().await;
}

#[tokio::test]
async fn a_second_process_cannot_use_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let s = open(&path);
    // Another open of the file (as another server process would) is refused
    // while the first holds it, and works once it is closed.
    let e = match SqliteStorage::open(&path, WINDOW) {
        Ok(_) => panic!("a second open of one file must be refused"),
        Err(e) => e,
    };
    assert!(e.is_transient(), "{e:?}");
    assert!(e.to_string().contains("in use by another"), "{e}");
    s.close().await;
    drop(s);
    let again = open(&path);
    again.close().await;
}

/// Messages that were never to be sent (rejected, duplicate, filtered,
/// unsupported) have their own, shorter retention: they go while delivered
/// ones of the same age stay.
async fn refused_messages_have_their_own_shorter_retention(b: Backend) {
    let Some(s) = open_with(
        b,
        StorageOptions {
            dedupe_window_ms: WINDOW,
            retention_ms: Some(60_000),
            refused_retention_ms: Some(50),
            prune_every_ms: 0,
            ..crate::support::backends::options()
        },
    )
    .await
    else {
        return;
    };
    let ids: Vec<i64> = s
        .accept(vec![
            final_msg("rejected", "k0", State::Rejected, "invalid", "no userId"),
            final_msg("filtered", "k1", State::Filtered, "filtered", "off"),
            final_msg(
                "unsupported",
                "k2",
                State::Unsupported,
                "unsupported",
                "alias",
            ),
            msg("delivered", "k3"),
            msg("dead", "k4"),
        ])
        .await
        .unwrap()
        .iter()
        .map(stored_id)
        .collect();
    let duplicate = match s.accept(vec![msg("delivered", "k3")]).await.unwrap()[0] {
        Acceptance::Duplicate { id } => id,
        ref other => panic!("expected a duplicate, got {other:?}"),
    };
    assert_eq!(s.claim(10).await.unwrap().messages.len(), 2);
    s.report(vec![
        report(ids[3], Disposition::Delivered),
        report(
            ids[4],
            Disposition::Dead {
                code: "rejected_by_totango".into(),
                reason: "HTTP 400".into(),
            },
        ),
    ])
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Any commit may prune (prune_every_ms = 0); PostgreSQL prunes at claims too.
    s.accept(vec![msg("later", "k9")]).await.unwrap();
    let _ = s.claim(10).await.unwrap();
    for (id, what) in [
        (ids[0], "rejected"),
        (ids[1], "filtered"),
        (ids[2], "unsupported"),
        (duplicate, "duplicate"),
    ] {
        assert!(
            s.get(id).await.unwrap().is_none(),
            "{what} kept past its retention"
        );
    }
    assert_eq!(
        s.get(ids[3]).await.unwrap().map(|m| m.state),
        Some(State::Delivered),
        "delivered messages keep the longer retention"
    );
    assert_eq!(
        s.get(ids[4]).await.unwrap().map(|m| m.state),
        Some(State::Dead),
        "dead letters stay"
    );
    s.close().await;
}

crate::on_backends!(
    refused_messages_have_their_own_shorter_retention,
    accept_stores_all_and_queues_only_pending,
    dedupe_by_source_and_message_id,
    dedupe_window_expires,
    duplicate_within_one_batch,
    claim_one_per_key_in_acceptance_order,
    claim_respects_limit_oldest_due_first,
    retry_blocks_only_its_key_until_due,
    dead_is_recorded_and_unblocks_key,
    final_disposition_records_state,
    requests_and_sent_persist_across_attempts,
    activities_are_claimed_in_parallel_attribute_updates_in_order,
    page_category_decided_at_acceptance_in_order,
    page_category_applies_for_pages_in_a_final_state,
    concurrent_accepts_all_commit,
    closed_storage_refuses_work,
    reads_fail_after_close,
    stale_report_after_lease_expiry_does_not_resurrect,
    pauses_are_shared_extended_and_expire,
    queued_work_signals_the_notifier,
);
