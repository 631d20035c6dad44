//! Property test: the queue (SQLite, and PostgreSQL when `TEST_DATABASE_URL`
//! is set) against a simple model. Random sequences of accept / claim /
//! report (delivered, retry, dead) and short waits keep these invariants:
//! - a claim returns only the oldest unfinished message of each ordering key,
//!   never one whose key already has a leased message, any due message
//!   without a key, and every such due message up to the limit;
//! - a message that asked for the page category gets the one its user's
//!   pages set before it, in acceptance order, whatever was delivered;
//! - nothing is lost: at the end every accepted message is finished exactly
//!   once, and each key's messages finished in acceptance order.

use crate::support::backends::Backend;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use totango_destination::storage::{Disposition, NewMessage, Report, State, now_millis};

#[derive(Debug, Clone)]
enum Step {
    /// `key: None` is an activity (no ordering); `page` sets (`Some(Some)`)
    /// or forgets (`Some(None)`) the user's page category; `needs` asks for it.
    Accept {
        key: Option<u8>,
        user: u8,
        page: Option<Option<u8>>,
        needs: bool,
    },
    Claim {
        limit: usize,
    },
    /// Report on the n-th currently leased message (modulo their count).
    Report {
        pick: usize,
        how: How,
    },
    /// Let time pass (storage uses its own clock).
    Wait {
        ms: u16,
    },
}

#[derive(Debug, Clone, Copy)]
enum How {
    Delivered,
    Retry { in_ms: u16 },
    Dead,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (
            prop::option::weighted(0.5, 0u8..4),
            0u8..2,
            prop::option::weighted(0.3, prop::option::of(0u8..3)),
            any::<bool>(),
        )
            .prop_map(|(key, user, page, needs)| Step::Accept { key, user, page, needs }),
        3 => (1usize..5).prop_map(|limit| Step::Claim { limit }),
        3 => (any::<usize>(), prop_oneof![
                3 => Just(How::Delivered),
                2 => (0u16..3).prop_map(|k| How::Retry { in_ms: k * 150 }),
                1 => Just(How::Dead),
            ]).prop_map(|(pick, how)| Step::Report { pick, how }),
        1 => (1u16..3).prop_map(|k| Step::Wait { ms: k * 100 }),
    ]
}

#[derive(Default)]
struct Model {
    /// key → unfinished ids in acceptance order.
    queues: BTreeMap<String, Vec<i64>>,
    /// Unfinished messages without a key.
    unordered: BTreeSet<i64>,
    /// user → latest page category.
    memory: HashMap<String, Option<String>>,
    /// id → the page category it must be claimed with.
    category: HashMap<i64, Option<String>>,
    next_attempt: HashMap<i64, i64>,
    /// Leased id → its lease token.
    leased: BTreeMap<i64, i64>,
    finished: Vec<(String, i64)>,
    key_of: HashMap<i64, Option<String>>,
}

impl Model {
    fn due_heads(&self, now: i64) -> BTreeSet<i64> {
        self.queues
            .values()
            .filter_map(|q| q.first())
            .chain(self.unordered.iter())
            .filter(|id| !self.leased.contains_key(id) && self.next_attempt[id] <= now)
            .copied()
            .collect()
    }

    /// Takes a finished message out; a keyed one must be its key's head.
    fn finish(&mut self, id: i64) -> Result<(), TestCaseError> {
        match self.key_of[&id].clone() {
            Some(key) => {
                let q = self.queues.get_mut(&key).unwrap();
                prop_assert_eq!(q.remove(0), id, "only heads are ever leased");
                self.finished.push((key, id));
            }
            None => {
                prop_assert!(self.unordered.remove(&id));
                self.finished.push((String::new(), id));
            }
        }
        Ok(())
    }
}

fn message(n: usize, key: Option<&str>, user: &str, received_at: i64) -> NewMessage {
    NewMessage {
        source: "model".into(),
        message_id: format!("m{n}"),
        call: "track".into(),
        service_id: "svc".into(),
        user_id: Some(user.into()),
        account_id: Some("acct".into()),
        ordering_key: key.map(str::to_owned),
        payload: "{}".into(),
        settings: "{}".into(),
        state: State::Pending,
        code: None,
        reason: None,
        warnings: Vec::new(),
        received_at,
        set_page_category: None,
        needs_page_category: false,
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

async fn run(backend: Backend, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let Some(storage) = backend.open(crate::support::backends::options()).await else {
        return Ok(());
    };
    let mut m = Model::default();
    let mut accepted = 0usize;
    for s in steps {
        match s {
            Step::Accept {
                key,
                user,
                page,
                needs,
            } => {
                let key = key.map(|k| format!("k{k}"));
                let user = format!("u{user}");
                let set = page.map(|c| c.map(|c| format!("c{c}")));
                // Due at once: received_at is in the past.
                let due = now_millis() - 1;
                let new = NewMessage {
                    set_page_category: set.clone(),
                    needs_page_category: needs,
                    ..message(accepted, key.as_deref(), &user, due)
                };
                let got = storage.accept(vec![new]).await.unwrap();
                accepted += 1;
                let id = match got[0] {
                    totango_destination::storage::Acceptance::Stored { id } => id,
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                };
                match &key {
                    Some(k) => m.queues.entry(k.clone()).or_default().push(id),
                    None => {
                        m.unordered.insert(id);
                    }
                }
                let remembered = m.memory.get(&user).cloned().flatten();
                m.category.insert(id, remembered.filter(|_| needs));
                if let Some(c) = set {
                    m.memory.insert(user, c);
                }
                m.next_attempt.insert(id, due);
                m.key_of.insert(id, key);
            }
            Step::Claim { limit } => {
                // Storage reads its own clock in between: what was due
                // before must be offered, what is due after may be.
                let must = m.due_heads(now_millis() - 1);
                let claimed = storage.claim(limit).await.unwrap().messages;
                let may = m.due_heads(now_millis() + 1);
                for c in &claimed {
                    prop_assert_eq!(&c.latest_page_category, &m.category[&c.id]);
                }
                let got: BTreeSet<i64> = claimed.iter().map(|c| c.id).collect();
                prop_assert_eq!(got.len(), claimed.len(), "one message claimed twice");
                prop_assert!(got.is_subset(&may), "claimed {got:?}, due heads {may:?}");
                prop_assert!(
                    got.len() >= limit.min(must.len()) && got.len() <= limit,
                    "claimed {:?} with limit {} of {:?}",
                    got,
                    limit,
                    must
                );
                m.leased.extend(claimed.iter().map(|c| (c.id, c.lease)));
            }
            Step::Report { pick, how } => {
                if m.leased.is_empty() {
                    continue;
                }
                let (id, lease) = m
                    .leased
                    .iter()
                    .nth(pick % m.leased.len())
                    .map(|(i, l)| (*i, *l))
                    .unwrap();
                m.leased.remove(&id);
                let disposition = match how {
                    How::Delivered => Disposition::Delivered,
                    How::Dead => Disposition::Dead {
                        code: "x".into(),
                        reason: "x".into(),
                    },
                    How::Retry { in_ms } => {
                        let at = now_millis() + i64::from(in_ms);
                        m.next_attempt.insert(id, at);
                        Disposition::Retry {
                            next_attempt_at: at,
                        }
                    }
                };
                let stale = storage
                    .report(vec![report(id, lease, disposition.clone())])
                    .await
                    .unwrap();
                prop_assert!(stale.is_empty(), "a current lease reported stale");
                if !matches!(disposition, Disposition::Retry { .. }) {
                    m.finish(id)?;
                }
            }
            Step::Wait { ms } => tokio::time::sleep(Duration::from_millis(ms.into())).await,
        }
    }
    // Drain: release what is leased, then deliver everything as it falls due.
    for (id, lease) in std::mem::take(&mut m.leased) {
        storage
            .report(vec![report(
                id,
                lease,
                Disposition::Retry {
                    next_attempt_at: now_millis(),
                },
            )])
            .await
            .unwrap();
    }
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < give_up {
        let batch = storage.claim(100).await.unwrap().messages;
        if batch.is_empty() {
            if m.queues.values().all(Vec::is_empty) && m.unordered.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        for c in batch {
            prop_assert_eq!(&c.latest_page_category, &m.category[&c.id]);
            m.finish(c.id)?;
            storage
                .report(vec![report(c.id, c.lease, Disposition::Delivered)])
                .await
                .unwrap();
        }
    }
    prop_assert!(
        m.queues.values().all(Vec::is_empty) && m.unordered.is_empty(),
        "left over: {:?}",
        m.queues
    );
    prop_assert_eq!(
        m.finished.len(),
        accepted,
        "every message finished exactly once"
    );
    let mut by_key: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (k, id) in m.finished.iter().filter(|(k, _)| !k.is_empty()) {
        by_key.entry(k).or_default().push(*id);
    }
    for ids in by_key.values() {
        prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order: {ids:?}");
    }
    let pending = storage
        .counts()
        .await
        .unwrap()
        .into_iter()
        .find(|(s, _)| *s == State::Pending);
    prop_assert!(
        pending.is_none_or(|(_, n)| n == 0),
        "still pending: {pending:?}"
    );
    storage.close().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn sqlite_queue_keeps_order_and_loses_nothing(steps in prop::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(Backend::Sqlite, steps))?;
    }

    #[test]
    fn postgres_queue_keeps_order_and_loses_nothing(steps in prop::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(Backend::Postgres, steps))?;
    }
}
