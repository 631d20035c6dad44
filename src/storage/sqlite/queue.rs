//! The queue's operations, run by the writer inside its transaction.

use super::bulk_index::Tail;
use super::reads::where_clause;
use super::schema::QUEUED_SIZE;
use crate::storage::*;
use rusqlite::{Connection, OptionalExtension, params};

/// Most dead messages one replay call queues again (keeps the transaction short).
const REPLAY_MAX: i64 = 10_000;

pub(super) fn replay(
    c: &Connection,
    filter: &MessageFilter,
    now: Millis,
) -> Result<Vec<i64>, StorageError> {
    let dead = MessageFilter {
        state: Some(State::Dead),
        ..filter.clone()
    };
    let (clause, args) = where_clause(&dead);
    let ids: Vec<(i64, Option<String>)> = c
        .prepare(&format!(
            "SELECT m.id, m.ordering_key FROM messages m WHERE {clause} \
             AND m.payload <> '{{}}' ORDER BY m.id LIMIT {REPLAY_MAX}"
        ))?
        .query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut requeue = c.prepare_cached(
        "UPDATE messages SET state = 'pending', code = NULL, reason = NULL, updated_at = ?2 WHERE id = ?1",
    )?;
    for (id, key) in &ids {
        requeue.execute(params![id, now])?;
        enqueue(c, *id, key.as_deref(), now, None)?;
    }
    Ok(ids.into_iter().map(|(id, _)| id).collect())
}

pub(super) fn accept(
    c: &Connection,
    batch: &[NewMessage],
    now: Millis,
    options: &StorageOptions,
    check_suppressions: bool,
    tail: &mut Tail,
) -> Result<Vec<Acceptance>, StorageError> {
    let window = options.dedupe_window_ms;
    let mut refused: Option<RefusedBudget> = None;
    // When this messageId was last accepted from this source: a stored
    // message (by `message_ids`, or the writer's memory of the newer tail; a
    // new id costs one seek) or, once pruned inside the window, its
    // `dedupe` entry.
    let mut seen = c.prepare_cached(
        "SELECT MAX(t) FROM (SELECT MAX(m.received_at) AS t FROM message_ids x \
         JOIN messages m ON m.id = x.id \
         WHERE x.message_id = ?2 AND m.source = ?1 AND m.state <> 'duplicate' \
         UNION ALL SELECT accepted_at FROM dedupe WHERE source = ?1 AND message_id = ?2)",
    )?;
    let mut insert = c.prepare_cached(
        "INSERT INTO messages (message_id, source, call, service_id, user_id, account_id, state, \
         code, reason, payload, settings, received_at, updated_at, ordering_key, warnings, \
         page_category) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14, ?15)",
    )?;
    let suppressed = if check_suppressions {
        let users: Vec<&str> = batch.iter().filter_map(|m| m.user_id.as_deref()).collect();
        super::privacy::suppressed(c, &users)?
    } else {
        Default::default()
    };
    let mut out = Vec::with_capacity(batch.len());
    for m in batch {
        let accepted_at: Option<Millis> = seen
            .query_row(params![m.source, m.message_id], |r| {
                r.get::<_, Option<Millis>>(0)
            })?
            .max(tail.accepted_at(c, &m.source, &m.message_id)?);
        let duplicate = accepted_at.is_some_and(|t| t >= now - window);
        let suppress = !duplicate && m.user_id.as_ref().is_some_and(|u| suppressed.contains(u));
        let no_warnings = Vec::new();
        let (state, code, reason, payload, settings, warnings) = if duplicate {
            (
                State::Duplicate,
                Some("duplicate".to_owned()),
                Some(format!("messageId {:?} was already accepted", m.message_id)),
                m.payload.as_str(),
                m.settings.as_str(),
                &m.warnings,
            )
        } else if suppress {
            // Recorded without payload, never delivered.
            (
                State::Suppressed,
                Some(privacy::SUPPRESSED.to_owned()),
                None,
                EMPTY_JSON,
                EMPTY_JSON,
                &no_warnings,
            )
        } else {
            (
                m.state,
                m.code.clone(),
                m.reason.clone(),
                m.payload.as_str(),
                m.settings.as_str(),
                &m.warnings,
            )
        };
        // Page categories follow acceptance order: read before this
        // message's own update, after the earlier messages of the batch.
        let user = m.user_id.as_deref().filter(|_| !duplicate && !suppress);
        let page_category = match user {
            Some(u) if m.needs_page_category => c
                .prepare_cached(
                    "SELECT category FROM page_categories WHERE service_id = ?1 AND user_id = ?2",
                )?
                .query_row(params![m.service_id, u], |r| r.get::<_, String>(0))
                .optional()?,
            _ => None,
        };
        match (user, &m.set_page_category) {
            (Some(u), Some(Some(category))) => {
                c.prepare_cached(
                    "INSERT INTO page_categories (service_id, user_id, category) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (service_id, user_id) DO UPDATE SET category = excluded.category",
                )?
                .execute(params![m.service_id, u, category])?;
            }
            (Some(u), Some(None)) => {
                c.prepare_cached(
                    "DELETE FROM page_categories WHERE service_id = ?1 AND user_id = ?2",
                )?
                .execute(params![m.service_id, u])?;
            }
            _ => {}
        }
        let mut warnings = std::borrow::Cow::Borrowed(warnings);
        let (payload, settings) = if state.is_refused() {
            if refused.is_none() {
                let used: i64 =
                    c.query_row("SELECT bytes FROM usage WHERE name = 'refused'", [], |r| {
                        r.get(0)
                    })?;
                refused = Some(RefusedBudget::new(used, options.max_refused_bytes));
            }
            let budget = refused.as_mut().expect("just set");
            budget
                .keep(payload, settings, &m.message_id)
                .unwrap_or_else(|| {
                    warnings.to_mut().push(PAYLOAD_NOT_KEPT.to_owned());
                    (EMPTY_JSON, EMPTY_JSON)
                })
        } else {
            (payload, settings)
        };
        insert.execute(params![
            m.message_id,
            m.source,
            m.call,
            m.service_id,
            m.user_id,
            m.account_id,
            state.as_str(),
            code,
            reason,
            payload,
            settings,
            m.received_at,
            m.ordering_key,
            (!warnings.is_empty()).then(|| serde_json::json!(warnings).to_string()),
            page_category,
        ])?;
        let id = c.last_insert_rowid();
        tail.add(&m.message_id, id, duplicate);
        if duplicate {
            out.push(Acceptance::Duplicate { id });
            continue;
        }
        if state == State::Pending {
            // As QUEUED_SIZE counts it (no requests or answer yet).
            let size = payload.len() + settings.len() + m.message_id.len();
            enqueue(
                c,
                id,
                m.ordering_key.as_deref(),
                m.received_at.min(now),
                Some(size as i64),
            )?;
        }
        out.push(Acceptance::Stored { id });
    }
    if let Some(budget) = refused.filter(|b| b.added != 0) {
        c.prepare_cached("UPDATE usage SET bytes = bytes + ?1 WHERE name = 'refused'")?
            .execute([budget.added])?;
    }
    Ok(out)
}

/// Queues a message behind what its key already has; it is the head when the
/// key has nothing queued, and always when it has no key. `size`: its stored
/// bytes when the caller knows them, else read from its row.
fn enqueue(
    c: &Connection,
    id: i64,
    key: Option<&str>,
    due: Millis,
    size: Option<i64>,
) -> Result<(), StorageError> {
    // Keyless messages are heads; a keyed one when its key has none queued.
    let head = match key {
        None => "1",
        Some(_) => "NOT EXISTS (SELECT 1 FROM queue WHERE ordering_key = ?2)",
    };
    let insert =
        "INSERT INTO queue (message, ordering_key, next_attempt_at, enqueued_at, head, size)";
    match size {
        Some(size) => c
            .prepare_cached(&format!("{insert} VALUES (?1, ?2, ?3, ?3, {head}, ?4)"))?
            .execute(params![id, key, due, size])?,
        None => c
            .prepare_cached(&format!(
                "{insert} SELECT ?1, ?2, ?3, ?3, {head}, {QUEUED_SIZE} FROM messages WHERE id = ?1"
            ))?
            .execute(params![id, key, due])?,
    };
    Ok(())
}

/// Takes a message out of the queue; when it was its key's head, the next
/// message of that key becomes the head.
pub(super) fn dequeue(c: &Connection, id: i64) -> Result<(), StorageError> {
    let removed: Option<(Option<String>, bool)> = c
        .prepare_cached("DELETE FROM queue WHERE message = ?1 RETURNING ordering_key, head")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((Some(key), true)) = removed {
        c.prepare_cached(
            "UPDATE queue SET head = 1 WHERE seq = \
             (SELECT MIN(seq) FROM queue WHERE ordering_key = ?1)",
        )?
        .execute([key])?;
    }
    Ok(())
}

/// Leases up to `limit` due heads; each claim gets a new token.
pub(super) fn claim(
    c: &Connection,
    limit: usize,
    now: Millis,
    lease_ms: Millis,
    token: &mut i64,
) -> Result<ClaimBatch, StorageError> {
    let mut due = c.prepare_cached(
        "SELECT seq FROM queue WHERE head = 1 AND next_attempt_at <= ?1 AND leased_until <= ?1 \
         ORDER BY next_attempt_at, seq LIMIT ?2",
    )?;
    let seqs: Vec<i64> = due
        .query_map(params![now, limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut lease =
        c.prepare_cached("UPDATE queue SET leased_until = ?2, lease = ?3 WHERE seq = ?1")?;
    let mut load = c.prepare_cached(
        "SELECT m.id, m.payload, m.settings, m.requests, m.sent, m.attempts, m.received_at, \
                m.page_category, m.source, q.enqueued_at \
         FROM queue q JOIN messages m ON m.id = q.message WHERE q.seq = ?1",
    )?;
    let mut messages = Vec::with_capacity(seqs.len());
    for seq in seqs {
        *token += 1;
        lease.execute(params![seq, now.saturating_add(lease_ms), *token])?;
        messages.push(load.query_row([seq], |r| {
            Ok(Claimed {
                id: r.get(0)?,
                lease: *token,
                payload: r.get::<_, String>(1)?.into(),
                settings: r.get::<_, String>(2)?.into(),
                requests: r.get(3)?,
                sent: r.get(4)?,
                attempts: r.get(5)?,
                received_at: r.get(6)?,
                latest_page_category: r.get(7)?,
                source: r.get(8)?,
                retry_from: r.get(9)?,
            })
        })?);
    }
    let next_due = c
        .prepare_cached(
            "SELECT MIN(next_attempt_at) FROM queue \
             WHERE head = 1 AND next_attempt_at > ?1 AND leased_until <= ?1",
        )?
        .query_row([now], |r| r.get(0))?;
    Ok(ClaimBatch { messages, next_due })
}

/// Whether `lease` is still message `id`'s claim (what a report checks).
pub(super) fn holds_claim(c: &Connection, id: i64, lease: i64) -> Result<bool, StorageError> {
    Ok(
        c.prepare_cached("SELECT 1 FROM queue WHERE message = ?1 AND lease = ?2 AND lease != 0")?
            .exists(params![id, lease])?,
    )
}

/// Records results whose lease is current; returns the ids of stale ones.
pub(super) fn report(
    c: &Connection,
    reports: &[Report],
    now: Millis,
) -> Result<Vec<i64>, StorageError> {
    let mut update = c.prepare_cached(
        "UPDATE messages SET requests = COALESCE(?2, requests), sent = ?3, \
         attempts = attempts + ?4, state = ?5, code = ?6, reason = ?7, \
         last_status = CASE WHEN ?12 THEN ?8 ELSE last_status END, \
         last_body = CASE WHEN ?12 THEN ?9 ELSE last_body END, \
         last_error = CASE WHEN ?12 THEN ?10 ELSE last_error END, \
         updated_at = ?11, settings = COALESCE(?13, settings) WHERE id = ?1",
    )?;
    let mut reschedule = c.prepare_cached(&format!(
        "UPDATE queue SET next_attempt_at = ?2, leased_until = 0, lease = 0, \
         size = (SELECT {QUEUED_SIZE} FROM messages WHERE id = ?1) WHERE message = ?1"
    ))?;
    // The lease, and what was sent before (with the stored requests when
    // this report accepted more of them and does not carry them itself).
    let mut current = c.prepare_cached(
        "SELECT q.lease, m.sent, CASE WHEN ?2 > m.sent AND ?3 THEN m.requests END \
         FROM queue q JOIN messages m ON m.id = q.message WHERE q.message = ?1",
    )?;
    let mut stale = Vec::new();
    let mut entities = super::super::entity::EntityWrites::default();
    let today = day_of(now);
    for r in reports {
        // A report whose lease is not the message's current one is stale (the
        // lease ran out and another claim took the message, or finished it):
        // it must not overwrite that result.
        let found: Option<(i64, u32, Option<String>)> = current
            .query_row(params![r.id, r.sent, r.requests.is_none()], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()?;
        let Some((_, before, stored)) = found.filter(|f| f.0 == r.lease && r.lease != 0) else {
            tracing::warn!(id = r.id, "ignoring a stale delivery report");
            stale.push(r.id);
            continue;
        };
        if let Some(requests) = r.requests.as_deref().or(stored.as_deref()) {
            entities.add(r.id, requests, before, r.sent, today);
        }
        let (state, code, reason) = r.disposition.outcome();
        let last = r.last.clone().unwrap_or_default();
        update.execute(params![
            r.id,
            r.requests,
            r.sent,
            r.attempted as i64,
            state.as_str(),
            code,
            reason,
            last.status,
            last.body,
            last.error,
            now,
            r.last.is_some(),
            r.settings,
        ])?;
        match r.disposition {
            Disposition::Retry { next_attempt_at } => {
                reschedule.execute(params![r.id, next_attempt_at])?;
            }
            _ => dequeue(c, r.id)?,
        }
    }
    if !entities.is_empty() {
        super::entity::write(c, &entities, now)?;
    }
    Ok(stale)
}

/// Whether any message with this `messageId` is stored (any source, any state).
pub(super) fn message_id_stored(
    c: &Connection,
    message_id: &str,
    tail: &Tail,
) -> Result<bool, StorageError> {
    let indexed: bool = c
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM message_ids WHERE message_id = ?1)")?
        .query_row([message_id], |r| r.get(0))?;
    Ok(indexed || tail.holds(c, message_id)?)
}
