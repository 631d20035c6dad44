//! Property test: the SQLite queue against a simple model. Random sequences of
//! accept / claim / report (delivered, retry, dead) on a logical clock keep
//! these invariants:
//! - a claim returns only the oldest unfinished message of each ordering key,
//!   never one whose key already has a leased message, any due message
//!   without a key, and every such due message up to the limit;
//! - a message that asked for the page category gets the one its user's
//!   pages set before it, in acceptance order, whatever was delivered;
//! - nothing is lost: at the end every accepted message is finished exactly
//!   once, and each key's messages finished in acceptance order.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use totango_destination::storage::{
    Disposition, NewMessage, Report, SqliteStorage, State, Storage, now_millis,
};

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
    /// Move the logical clock forward, in seconds.
    Wait {
        secs: u8,
    },
}

#[derive(Debug, Clone, Copy)]
enum How {
    Delivered,
    Retry { in_secs: u8 },
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
                2 => (0u8..5).prop_map(|in_secs| How::Retry { in_secs }),
                1 => Just(How::Dead),
            ]).prop_map(|(pick, how)| Step::Report { pick, how }),
        1 => (0u8..6).prop_map(|secs| Step::Wait { secs }),
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
    leased: BTreeSet<i64>,
    finished: Vec<(String, i64)>,
    key_of: HashMap<i64, Option<String>>,
}

impl Model {
    fn due_heads(&self, now: i64) -> BTreeSet<i64> {
        self.queues
            .values()
            .filter_map(|q| q.first())
            .chain(self.unordered.iter())
            .filter(|id| !self.leased.contains(id) && self.next_attempt[id] <= now)
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

fn report(id: i64, disposition: Disposition) -> Report {
    Report {
        id,
        requests: None,
        sent: 0,
        attempted: true,
        disposition,
        last: None,
        settings: None,
    }
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteStorage::open(&dir.path().join("q.db"), 86_400_000).unwrap();
    let mut m = Model::default();
    // Accepted messages are due at once (received_at is in the past); the
    // logical clock only moves forward from there.
    let mut now = now_millis();
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
                let new = NewMessage {
                    set_page_category: set.clone(),
                    needs_page_category: needs,
                    ..message(accepted, key.as_deref(), &user, now - 1)
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
                m.next_attempt.insert(id, now - 1);
                m.key_of.insert(id, key);
            }
            Step::Claim { limit } => {
                let want = m.due_heads(now);
                let claimed = storage.claim(limit, now).await.unwrap().messages;
                for c in &claimed {
                    prop_assert_eq!(&c.latest_page_category, &m.category[&c.id]);
                }
                let got: BTreeSet<i64> = claimed.iter().map(|c| c.id).collect();
                prop_assert!(got.is_subset(&want), "claimed {got:?}, due heads {want:?}");
                prop_assert_eq!(
                    got.len(),
                    limit.min(want.len()),
                    "claimed {:?} of {:?}",
                    got,
                    want
                );
                m.leased.extend(got);
            }
            Step::Report { pick, how } => {
                if m.leased.is_empty() {
                    continue;
                }
                let id = *m.leased.iter().nth(pick % m.leased.len()).unwrap();
                m.leased.remove(&id);
                let disposition = match how {
                    How::Delivered => Disposition::Delivered,
                    How::Dead => Disposition::Dead {
                        code: "x".into(),
                        reason: "x".into(),
                    },
                    How::Retry { in_secs } => {
                        let at = now + i64::from(in_secs) * 1000;
                        m.next_attempt.insert(id, at);
                        Disposition::Retry {
                            next_attempt_at: at,
                        }
                    }
                };
                storage
                    .report(vec![report(id, disposition.clone())])
                    .await
                    .unwrap();
                if !matches!(disposition, Disposition::Retry { .. }) {
                    m.finish(id)?;
                }
            }
            Step::Wait { secs } => now += i64::from(secs) * 1000,
        }
    }
    // Drain: release what is leased, then deliver everything, far in the future.
    for id in std::mem::take(&mut m.leased) {
        storage
            .report(vec![report(
                id,
                Disposition::Retry {
                    next_attempt_at: now,
                },
            )])
            .await
            .unwrap();
    }
    let end = now + 3_600_000;
    loop {
        let batch = storage.claim(100, end).await.unwrap().messages;
        if batch.is_empty() {
            break;
        }
        for c in batch {
            prop_assert_eq!(&c.latest_page_category, &m.category[&c.id]);
            m.finish(c.id)?;
            storage
                .report(vec![report(c.id, Disposition::Delivered)])
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
    fn queue_keeps_order_and_loses_nothing(steps in prop::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(steps))?;
    }
}
