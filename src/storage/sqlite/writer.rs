//! The writer thread: every write runs here, in groups that share one
//! transaction and its fsync; callers are answered after the commit.

use super::bulk_index::{self, Tail};
use super::schema::refused_size_sql;
use super::{privacy, queue};
use crate::storage::*;
use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

/// Operations one transaction groups at most.
const MAX_GROUP: usize = 1024;
/// Most old messages deleted by one prune, to keep each transaction short;
/// while prunes delete full chunks, the next commit group prunes again.
const PRUNE_CHUNK: i64 = 2_000;

pub(super) type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

pub(super) enum Op {
    /// Answers `Ok(Err(id))` when `AcceptOptions::first_unseen` refused it.
    Accept(
        Vec<NewMessage>,
        AcceptOptions,
        Reply<Result<Vec<Acceptance>, String>>,
    ),
    Replay(MessageFilter, Reply<Vec<i64>>),
    Claim(usize, Reply<ClaimBatch>),
    Report(Vec<Report>, Reply<Vec<i64>>),
    Erase(Erase, Reply<Erased>),
    Suppress(String, String, Reply<bool>),
    Lift(String, Reply<bool>),
    Audit(AuditEntry, Reply<()>),
}

/// What an operation produced, kept until the transaction's fate is known.
enum Done {
    Accept(Result<Vec<Acceptance>, String>),
    Ids(Vec<i64>),
    Claim(ClaimBatch),
    Erase(Erased),
    Flag(bool),
    Unit,
}

impl Op {
    /// Whether it may add or remove suppressions.
    fn touches_suppressions(&self) -> bool {
        matches!(self, Op::Erase(..) | Op::Suppress(..) | Op::Lift(..))
    }

    /// Answers the caller: the operation's result, or the commit's error.
    fn answer(self, result: Result<Done, StorageError>, commit_error: Option<&StorageError>) {
        let result = match (result, commit_error) {
            (Ok(_), Some(e)) => Err(e.clone()),
            (r, _) => r,
        };
        fn send<T>(
            r: Reply<T>,
            result: Result<Done, StorageError>,
            f: impl FnOnce(Done) -> Option<T>,
        ) {
            let _ = r.send(result.and_then(|done| {
                f(done).ok_or_else(|| {
                    StorageError::Unavailable("writer answered the wrong kind".into())
                })
            }));
        }
        match self {
            Op::Accept(_, _, r) => send(r, result, |d| match d {
                Done::Accept(v) => Some(v),
                _ => None,
            }),
            Op::Replay(_, r) | Op::Report(_, r) => send(r, result, |d| match d {
                Done::Ids(v) => Some(v),
                _ => None,
            }),
            Op::Claim(_, r) => send(r, result, |d| match d {
                Done::Claim(v) => Some(v),
                _ => None,
            }),
            Op::Erase(_, r) => send(r, result, |d| match d {
                Done::Erase(v) => Some(v),
                _ => None,
            }),
            Op::Suppress(_, _, r) | Op::Lift(_, r) => send(r, result, |d| match d {
                Done::Flag(v) => Some(v),
                _ => None,
            }),
            Op::Audit(_, r) => send(r, result, |d| match d {
                Done::Unit => Some(()),
                _ => None,
            }),
        }
    }
}

pub(super) struct Writer {
    pub conn: Connection,
    pub options: StorageOptions,
    pub last_prune: Millis,
    /// When `bulk_index::catch_up` last committed.
    pub last_index: Millis,
    /// The messages accepted since, by messageId.
    pub tail: Tail,
    /// The last lease token handed out (tokens only grow).
    pub lease: i64,
    /// Up to where (last change time) payloads were dropped by retention:
    /// delivered, refused. Restarts from 0 after a restart (one pass).
    pub dropped_to: [Millis; 2],
    /// Whether the suppressions table may hold rows (accepts skip the
    /// lookup while it is empty); read again after any change to it.
    pub suppressions: bool,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            while ops.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.commit_group(ops);
        }
    }

    fn commit_group(&mut self, ops: Vec<Op>) {
        let now = now_millis();
        let erases = ops.iter().any(|op| matches!(op, Op::Erase(..)));
        let suppressions_change = ops.iter().any(Op::touches_suppressions);
        let check = Checks {
            now,
            suppressions: self.suppressions || suppressions_change,
        };
        let prune = now - self.last_prune >= self.options.prune_every_ms;
        // First every operation in the one transaction; only when one fails
        // again, each in its own savepoint, so it fails alone. Savepoints
        // cost a copy of every page an operation touches.
        let mut lease = self.lease;
        let options = &self.options;
        let c = &self.conn;
        let tail = &mut self.tail;
        let fast = begin(c).and_then(|()| {
            ops.iter()
                .map(|op| apply(c, op, &check, options, &mut lease, tail))
                .collect::<Result<Vec<Done>, StorageError>>()
        });
        let results = match fast {
            Ok(done) => Ok(done.into_iter().map(Ok).collect::<Vec<_>>()),
            Err(_) => {
                rollback(c);
                begin(c).map(|()| {
                    ops.iter()
                        .map(|op| {
                            in_savepoint(c, |c| apply(c, op, &check, options, &mut lease, tail))
                        })
                        .collect()
                })
            }
        };
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                rollback(c);
                self.forget_rolled_back();
                for op in ops {
                    op.answer(Err(e.clone()), None);
                }
                return;
            }
        };
        let mut caught_up = true;
        // Applied once committed.
        let mut marks = self.dropped_to;
        if prune {
            match prune_old(c, now, options) {
                Ok(more) => caught_up = !more,
                Err(e) => tracing::warn!(error = %e, "pruning old records failed"),
            }
            match drop_payloads(c, now, &options.payload_retention, &mut marks) {
                Ok(more) => caught_up &= !more,
                Err(e) => tracing::warn!(error = %e, "dropping old payloads failed"),
            }
        }
        // Messages by messageId, user and account, in bulk; also after every
        // prune, which may take the newest ids (bulk_index.rs). A failure
        // fails the group: a message left out would escape its user's erasure.
        let index = prune || now - self.last_index >= self.options.index_every_ms;
        let committed = (if index {
            bulk_index::catch_up(c)
        } else {
            Ok(())
        })
        .and_then(|()| c.prepare_cached("COMMIT")?.execute([]).map(|_| ()))
        .map_err(|e| {
            rollback(c);
            StorageError::from(e)
        });
        self.lease = lease;
        if suppressions_change {
            self.suppressions = privacy::any_suppressed(&self.conn).unwrap_or(true);
        }
        match committed {
            Ok(()) => {
                if prune && caught_up {
                    self.last_prune = now;
                }
                if index {
                    self.last_index = now;
                    // The tables hold every message now.
                    self.tail.clear();
                }
                self.dropped_to = marks;
                if erases {
                    // An erase is answered once the old page versions have
                    // left the WAL too (secure_delete zeroes them in the file).
                    let done = self
                        .conn
                        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                            r.get::<_, i64>(0)
                        });
                    if !matches!(done, Ok(0)) {
                        tracing::warn!(?done, "checkpoint after an erase did not complete");
                    }
                }
                for (op, result) in ops.into_iter().zip(results) {
                    op.answer(result, None);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "storage commit failed");
                self.forget_rolled_back();
                for (op, result) in ops.into_iter().zip(results) {
                    op.answer(result, Some(&e));
                }
            }
        }
    }

    /// After a rolled-back group: the tail's memory as the file holds it,
    /// without the ids the group added. Lookups would tell those apart
    /// anyway; this keeps the memory bounded while every commit fails
    /// (a full disk with clients retrying). Kept as it is if the file
    /// cannot be read.
    fn forget_rolled_back(&mut self) {
        if let Ok(tail) = Tail::load(&self.conn) {
            self.tail = tail;
        }
    }
}

fn begin(c: &Connection) -> Result<(), StorageError> {
    c.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

/// Ends the open transaction, if any, keeping nothing of it.
fn rollback(c: &Connection) {
    if !c.is_autocommit() {
        if let Err(e) = c.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "storage rollback failed");
        }
    }
}

/// What every operation of a group reads besides its own input.
struct Checks {
    now: Millis,
    /// Whether accepts must look users up in the suppressions table.
    suppressions: bool,
}

/// A pruned message's source, messageId and acceptance time, kept in
/// `dedupe` while inside the window.
type Remembered = (String, String, Millis);

/// Deletes expired dedupe entries and, in chunks, finished messages past
/// retention. True when a full chunk went (there may be more).
fn prune_old(c: &Connection, now: Millis, options: &StorageOptions) -> rusqlite::Result<bool> {
    c.execute("SAVEPOINT prune", [])?;
    let result = (|| {
        c.execute(
            "DELETE FROM dedupe WHERE accepted_at < ?1",
            [now - options.dedupe_window_ms],
        )?;
        super::entity::prune(c, now)?;
        let mut more = false;
        // Each delete answers the bytes its refused rows counted (`usage`).
        // Accepted messages pruned inside the dedupe window leave their
        // messageId in `dedupe` (accepts look there after `messages`).
        let delete = |condition: &str, before: Millis| -> rusqlite::Result<bool> {
            let window_start = now - options.dedupe_window_ms;
            let pruned: Vec<(i64, Option<Remembered>)> = c
                .prepare_cached(&format!(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
                     WHERE state NOT IN ('pending', 'dead') {condition} \
                     AND updated_at < ?1 LIMIT ?2) \
                     RETURNING {}, \
                     state <> 'duplicate' AND received_at >= ?3, source, message_id, received_at",
                    refused_size_sql("0")
                ))?
                .query_map(params![before, PRUNE_CHUNK, window_start], |r| {
                    let remember: bool = r.get(1)?;
                    Ok((
                        r.get(0)?,
                        if remember {
                            Some((r.get(2)?, r.get(3)?, r.get(4)?))
                        } else {
                            None
                        },
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut remember = c.prepare_cached(
                "INSERT INTO dedupe (source, message_id, accepted_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (source, message_id) DO UPDATE \
                 SET accepted_at = MAX(accepted_at, excluded.accepted_at)",
            )?;
            for (source, message_id, at) in pruned.iter().filter_map(|(_, r)| r.as_ref()) {
                remember.execute(params![source, message_id, at])?;
            }
            let sizes: Vec<i64> = pruned.iter().map(|(size, _)| *size).collect();
            let freed: i64 = sizes.iter().sum();
            if freed != 0 {
                c.execute(
                    "UPDATE usage SET bytes = bytes - ?1 WHERE name = 'refused'",
                    [freed],
                )?;
            }
            Ok(sizes.len() as i64 == PRUNE_CHUNK)
        };
        if let Some(refused) = options.refused_retention_ms.or(options.retention_ms) {
            more |= delete(&format!("AND state IN {REFUSED_STATES}"), now - refused)?;
        }
        let Some(retention) = options.retention_ms else {
            return Ok(more);
        };
        // The state condition matches the partial index messages_finished.
        Ok(delete("", now - retention)? || more)
    })();
    match result {
        Ok(more) => c.execute("RELEASE prune", []).map(|_| more),
        Err(e) => {
            c.execute_batch("ROLLBACK TO prune; RELEASE prune")?;
            Err(e)
        }
    }
}

/// Drops, in chunks, the payloads of messages past their outcome's payload
/// retention (`PayloadRetention`), oldest change first; delivered and
/// refused ones from where the last pass stopped. True when a full chunk
/// went (there may be more).
fn drop_payloads(
    c: &Connection,
    now: Millis,
    retention: &PayloadRetention,
    dropped_to: &mut [Millis; 2],
) -> rusqlite::Result<bool> {
    c.execute("SAVEPOINT drop_payloads", [])?;
    let result = (|| {
        let mut more = false;
        let groups = retention.groups();
        let empty = refused_size(EMPTY_JSON, EMPTY_JSON, "");
        let mut drop = c.prepare_cached(
            "UPDATE messages SET payload = '{}', settings = '{}', requests = NULL, \
             last_body = NULL, warnings = ?2 WHERE id = ?1",
        )?;
        let note = serde_json::json!([PAYLOAD_DROPPED]).to_string();
        let mut freed = 0;
        for (keep, condition, mark) in groups {
            let Some(keep) = keep else { continue };
            let from = mark.map_or(0, |i| dropped_to[i]);
            // The finished index (updated_at) serves all but dead ones.
            let finished = if mark.is_some() {
                "state NOT IN ('pending', 'dead') AND"
            } else {
                ""
            };
            let rows: Vec<(i64, Millis, i64, i64)> = c
                .prepare_cached(&format!(
                    "SELECT id, updated_at, length(CAST(message_id AS BLOB)), {} FROM messages \
                     WHERE {finished} {condition} AND updated_at >= ?1 AND updated_at < ?2 \
                     AND payload <> '{{}}' ORDER BY updated_at LIMIT ?3",
                    refused_size_sql("-1")
                ))?
                .query_map(params![from, now - keep, PRUNE_CHUNK], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            for (id, _, id_len, counted) in &rows {
                drop.execute(params![id, note])?;
                if *counted >= 0 {
                    freed += counted - (empty + id_len);
                }
            }
            let full = rows.len() as i64 == PRUNE_CHUNK;
            if let Some(i) = mark {
                dropped_to[i] = match rows.last() {
                    Some((_, at, _, _)) if full => *at,
                    _ => now - keep,
                };
            }
            more |= full;
        }
        if freed != 0 {
            c.execute(
                "UPDATE usage SET bytes = bytes - ?1 WHERE name = 'refused'",
                [freed],
            )?;
        }
        Ok(more)
    })();
    match result {
        Ok(more) => c.execute("RELEASE drop_payloads", []).map(|_| more),
        Err(e) => {
            c.execute_batch("ROLLBACK TO drop_payloads; RELEASE drop_payloads")?;
            Err(e)
        }
    }
}

/// Runs `f` in a savepoint, so that a failing operation leaves the others intact.
fn in_savepoint<T>(
    c: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    // Cached statements: parsing these per operation showed in profiles.
    c.prepare_cached("SAVEPOINT op")?.execute([])?;
    match f(c) {
        Ok(v) => {
            c.prepare_cached("RELEASE op")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            c.execute_batch("ROLLBACK TO op; RELEASE op")?;
            Err(e)
        }
    }
}

fn apply(
    c: &Connection,
    op: &Op,
    check: &Checks,
    options: &StorageOptions,
    lease: &mut i64,
    tail: &mut Tail,
) -> Result<Done, StorageError> {
    let now = check.now;
    Ok(match op {
        Op::Accept(batch, accept, _) => {
            if accept.first_unseen {
                // One writer: nothing can slip in between check and insert.
                if let Some(first) = batch.first() {
                    if queue::message_id_stored(c, &first.message_id, tail)? {
                        return Ok(Done::Accept(Err(first.message_id.clone())));
                    }
                }
            }
            Done::Accept(Ok(queue::accept(
                c,
                batch,
                now,
                options,
                check.suppressions,
                tail,
            )?))
        }
        Op::Replay(filter, _) => Done::Ids(queue::replay(c, filter, now)?),
        Op::Claim(limit, _) => Done::Claim(queue::claim(c, *limit, now, options.lease_ms, lease)?),
        Op::Report(reports, _) => Done::Ids(queue::report(c, reports, now)?),
        Op::Erase(erase, _) => Done::Erase(privacy::erase_user(c, erase, now)?),
        Op::Suppress(user, reason, _) => Done::Flag(privacy::suppress(c, user, reason, now)?),
        Op::Lift(user, _) => Done::Flag(privacy::lift(c, user)?),
        Op::Audit(entry, _) => {
            privacy::record_audit(c, entry, now)?;
            Done::Unit
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(message_id: &str) -> NewMessage {
        NewMessage {
            source: "web".into(),
            message_id: message_id.into(),
            call: "track".into(),
            service_id: "svc".into(),
            user_id: Some("ann".into()),
            account_id: None,
            ordering_key: None,
            payload: r#"{"type":"track"}"#.to_owned().into(),
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

    /// Runs one commit group of one accept; whether it was stored.
    fn accept(w: &mut Writer, message_id: &str) -> bool {
        let (tx, mut rx) = oneshot::channel();
        w.commit_group(vec![Op::Accept(
            vec![track(message_id)],
            AcceptOptions::default(),
            tx,
        )]);
        matches!(rx.try_recv(), Ok(Ok(Ok(v))) if matches!(v[..], [Acceptance::Stored { .. }]))
    }

    #[test]
    fn failed_groups_leave_no_ids_in_the_tail_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("td.db");
        let conn = super::super::schema::open(&path).unwrap();
        super::super::schema::migrate(&conn, &path).unwrap();
        let mut w = Writer {
            conn,
            options: StorageOptions {
                index_every_ms: 0,
                ..StorageOptions::default()
            },
            last_prune: now_millis(),
            last_index: 0,
            tail: Tail::default(),
            lease: 0,
            dropped_to: [0; 2],
            suppressions: false,
        };
        // Every indexing pass fails, so every group rolls back.
        w.conn
            .execute_batch(
                "CREATE TRIGGER test_fail BEFORE UPDATE ON bulk_index \
                 BEGIN SELECT RAISE(ABORT, 'failing'); END;",
            )
            .unwrap();
        for i in 0..5 {
            assert!(!accept(&mut w, &format!("m{i}")), "the group failed");
            assert_eq!(w.tail.len(), 0, "rolled-back ids forgotten");
        }
        w.conn.execute_batch("DROP TRIGGER test_fail").unwrap();
        // Held in the tail: the next group does not index.
        w.options.index_every_ms = i64::MAX;
        assert!(
            accept(&mut w, "m0"),
            "not a duplicate of a rolled-back message"
        );
        assert_eq!(w.tail.len(), 1);
    }
}
