//! The writer thread: every write runs here, in groups that share one
//! transaction and its fsync; callers are answered after the commit.

use super::{privacy, queue};
use crate::storage::*;
use rusqlite::{Connection, Transaction, params};
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

/// Sends a reply once the transaction's fate is known.
type Deferred = Box<dyn FnOnce(Option<&StorageError>) + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StorageError>) -> Deferred {
    Box::new(move |commit_error| {
        let _ = reply.send(match (result, commit_error) {
            (Ok(_), Some(e)) => Err(e.clone()),
            (r, _) => r,
        });
    })
}

pub(super) struct Writer {
    pub conn: Connection,
    pub options: StorageOptions,
    pub last_prune: Millis,
    /// The last lease token handed out (tokens only grow).
    pub lease: i64,
    /// Up to where (last change time) payloads were dropped by retention:
    /// delivered, refused. Restarts from 0 after a restart (one pass).
    pub dropped_to: [Millis; 2],
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
        let prune = now - self.last_prune >= self.options.prune_every_ms;
        let tx = match self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                let e = StorageError::from(e);
                for op in ops {
                    fail(op, &e);
                }
                return;
            }
        };
        let mut replies: Vec<Deferred> = Vec::with_capacity(ops.len());
        for op in ops {
            replies.push(apply_in_savepoint(
                &tx,
                op,
                now,
                &self.options,
                &mut self.lease,
            ));
        }
        let mut caught_up = true;
        // Applied once committed.
        let mut marks = self.dropped_to;
        if prune {
            match prune_old(&tx, now, &self.options) {
                Ok(more) => caught_up = !more,
                Err(e) => tracing::warn!(error = %e, "pruning old records failed"),
            }
            match drop_payloads(&tx, now, &self.options.payload_retention, &mut marks) {
                Ok(more) => caught_up &= !more,
                Err(e) => tracing::warn!(error = %e, "dropping old payloads failed"),
            }
        }
        match tx.commit() {
            Ok(()) => {
                if prune && caught_up {
                    self.last_prune = now;
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
                replies.into_iter().for_each(|r| r(None));
            }
            Err(e) => {
                let e = StorageError::from(e);
                tracing::error!(error = %e, "storage commit failed");
                replies.into_iter().for_each(|r| r(Some(&e)));
            }
        }
    }
}

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
        let delete = |condition: &str, before: Millis| -> rusqlite::Result<bool> {
            let sizes: Vec<i64> = c
                .prepare_cached(&format!(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
                     WHERE state NOT IN ('pending', 'dead') {condition} \
                     AND updated_at < ?1 LIMIT ?2) \
                     RETURNING CASE WHEN state IN {REFUSED_STATES} \
                     THEN length(CAST(payload AS BLOB)) + length(CAST(settings AS BLOB)) \
                     + length(CAST(message_id AS BLOB)) ELSE 0 END"
                ))?
                .query_map(params![before, PRUNE_CHUNK], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
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
                    "SELECT id, updated_at, length(CAST(message_id AS BLOB)), \
                     CASE WHEN state IN {REFUSED_STATES} THEN length(CAST(payload AS BLOB)) \
                     + length(CAST(settings AS BLOB)) + length(CAST(message_id AS BLOB)) \
                     ELSE -1 END FROM messages \
                     WHERE {finished} {condition} AND updated_at >= ?1 AND updated_at < ?2 \
                     AND payload <> '{{}}' ORDER BY updated_at LIMIT ?3"
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

fn fail(op: Op, e: &StorageError) {
    match op {
        Op::Accept(_, _, r) => drop(r.send(Err(e.clone()))),
        Op::Replay(_, r) => drop(r.send(Err(e.clone()))),
        Op::Claim(_, r) => drop(r.send(Err(e.clone()))),
        Op::Report(_, r) => drop(r.send(Err(e.clone()))),
        Op::Erase(_, r) => drop(r.send(Err(e.clone()))),
        Op::Suppress(_, _, r) | Op::Lift(_, r) => drop(r.send(Err(e.clone()))),
        Op::Audit(_, r) => drop(r.send(Err(e.clone()))),
    }
}

/// Runs `f` in a savepoint and defers its reply until the commit.
fn run<T: Send + 'static>(
    tx: &Transaction<'_>,
    reply: Reply<T>,
    f: impl FnOnce(&Connection) -> Result<T, StorageError>,
) -> Deferred {
    let result = (|| {
        // Cached statements: parsing these per operation showed in profiles.
        tx.prepare_cached("SAVEPOINT op")?.execute([])?;
        match f(tx) {
            Ok(v) => {
                tx.prepare_cached("RELEASE op")?.execute([])?;
                Ok(v)
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO op; RELEASE op")?;
                Err(e)
            }
        }
    })();
    defer(reply, result)
}

/// Runs one operation in a savepoint, so a failing one leaves the others intact.
fn apply_in_savepoint(
    tx: &Transaction<'_>,
    op: Op,
    now: Millis,
    options: &StorageOptions,
    lease: &mut i64,
) -> Deferred {
    match op {
        Op::Accept(batch, accept, r) => run(tx, r, |c| {
            if accept.first_unseen {
                // One writer: nothing can slip in between check and insert.
                if let Some(first) = batch.first() {
                    if queue::message_id_stored(c, &first.message_id)? {
                        return Ok(Err(first.message_id.clone()));
                    }
                }
            }
            queue::accept(c, batch, now, options).map(Ok)
        }),
        Op::Replay(filter, r) => run(tx, r, |c| queue::replay(c, &filter, now)),
        Op::Claim(limit, r) => run(tx, r, |c| {
            queue::claim(c, limit, now, options.lease_ms, lease)
        }),
        Op::Report(reports, r) => run(tx, r, |c| queue::report(c, reports, now)),
        Op::Erase(erase, r) => run(tx, r, |c| privacy::erase_user(c, &erase, now)),
        Op::Suppress(user, reason, r) => run(tx, r, |c| privacy::suppress(c, &user, &reason, now)),
        Op::Lift(user, r) => run(tx, r, |c| privacy::lift(c, &user)),
        Op::Audit(entry, r) => run(tx, r, |c| privacy::record_audit(c, &entry, now)),
    }
}
