//! Erasing users, suppressions and the audit trail (see `storage::privacy`).

use super::super::privacy::{PAYLOAD_ERASED, USER_DELETED};
use super::super::{AuditEntry, AuditRecord, Erase, Erased, NewMessage, StorageError, Suppression};
use super::queue::{CLOCK_MS, lock_keys, promote, refused_size_sql};
use super::text::{pg_text, text_key};
use sqlx::{PgConnection, PgPool, Row};
use std::collections::HashSet;

/// Erases one user's stored data in the caller's transaction; the second
/// value says whether queued work moved (wake delivery).
pub async fn erase_user(
    conn: &mut PgConnection,
    erase: &Erase,
) -> Result<(Erased, bool), StorageError> {
    let user = pg_text(&erase.user_id);
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT q.ordering_key FROM td_queue q JOIN td_messages m ON m.id = q.message \
         WHERE md5(m.user_id) = md5($1) AND m.user_id = $1 AND q.ordering_key IS NOT NULL",
    )
    .bind(user.as_ref())
    .fetch_all(&mut *conn)
    .await?;
    lock_keys(conn, keys).await?;
    let refused = refused_size_sql("m.", "m.", "0");
    let after = refused_size_sql("o.", "m.", "0");
    let row = sqlx::query(&format!(
        "WITH target AS ( \
            SELECT m.id, m.state, {refused} AS before FROM td_message_view m \
            WHERE md5(m.user_id) = md5($1) AND m.user_id = $1 FOR UPDATE), \
         dequeued AS ( \
            DELETE FROM td_queue q USING target t WHERE q.message = t.id \
            RETURNING q.ordering_key), \
         outcomes AS ( \
            UPDATE td_outcomes o SET \
                state = CASE WHEN t.state IN ('pending', 'dead') THEN 'suppressed' ELSE t.state END, \
                code = CASE WHEN t.state IN ('pending', 'dead') THEN $2 ELSE o.code END, \
                reason = $3, requests = NULL, last_body = NULL, last_error = NULL, \
                updated_at = {CLOCK_MS} \
            FROM target t WHERE o.id = t.id \
            RETURNING o.id, o.state), \
         updated AS ( \
            UPDATE td_messages m SET payload = '{{}}', settings = '{{}}', warnings = NULL, \
                page_category = NULL, ordering_key = NULL, user_id = NULL \
            FROM target t JOIN outcomes o ON o.id = t.id WHERE m.id = t.id \
            RETURNING t.state AS old, t.before, {after} AS after) \
         SELECT (SELECT count(*) FROM updated), \
            (SELECT count(*) FROM updated WHERE old IN ('pending', 'dead')), \
            (SELECT COALESCE(sum(after - before), 0) FROM updated)::bigint, \
            ARRAY(SELECT DISTINCT ordering_key FROM dequeued WHERE ordering_key IS NOT NULL)"
    ))
    .bind(user.as_ref())
    .bind(USER_DELETED)
    .bind(PAYLOAD_ERASED)
    .fetch_one(&mut *conn)
    .await?;
    let messages: i64 = row.try_get(0)?;
    let cancelled: i64 = row.try_get(1)?;
    let delta: i64 = row.try_get(2)?;
    let dequeued: Vec<String> = row.try_get(3)?;
    let promoted = if dequeued.is_empty() {
        false
    } else {
        promote(conn, &dequeued).await?
    };
    if delta != 0 {
        sqlx::query("UPDATE td_usage SET bytes = bytes + $1 WHERE name = 'refused'")
            .bind(delta)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("DELETE FROM td_page_categories WHERE user_id = $1")
        .bind(user.as_ref())
        .execute(&mut *conn)
        .await?;
    super::entity::erase_user(conn, &erase.user_id).await?;
    sqlx::query(&format!(
        "INSERT INTO td_erasures (user_key, at, reason, messages) VALUES ($1, {CLOCK_MS}, $2, $3)"
    ))
    .bind(text_key(&erase.user_id))
    .bind(pg_text(&erase.reason).as_ref())
    .bind(messages)
    .execute(&mut *conn)
    .await?;
    if erase.suppress {
        suppress(conn, &erase.user_id, &erase.reason).await?;
    }
    Ok((
        Erased {
            messages: messages.max(0) as u64,
            cancelled: cancelled.max(0) as u64,
        },
        promoted,
    ))
}

pub async fn suppress(
    conn: &mut PgConnection,
    user_id: &str,
    reason: &str,
) -> Result<bool, StorageError> {
    let added = sqlx::query(&format!(
        "INSERT INTO td_suppressions (user_key, user_id, since, reason) \
         VALUES ($1, $2, {CLOCK_MS}, $3) ON CONFLICT (user_key) DO NOTHING"
    ))
    .bind(text_key(user_id))
    .bind(pg_text(user_id).as_ref())
    .bind(pg_text(reason).as_ref())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(added > 0)
}

pub async fn lift(pool: &PgPool, user_id: &str) -> Result<bool, StorageError> {
    let removed = sqlx::query("DELETE FROM td_suppressions WHERE user_key = $1")
        .bind(text_key(user_id))
        .execute(pool)
        .await?
        .rows_affected();
    Ok(removed > 0)
}

/// The keys of this batch's users, to look up in `td_suppressions`
/// (`user_key`); the accept's dedupe statement reads which are suppressed.
pub fn user_keys(batch: &[&NewMessage]) -> Vec<String> {
    batch
        .iter()
        .filter_map(|m| m.user_id.as_deref())
        .map(text_key)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect()
}

pub async fn suppressions(pool: &PgPool) -> Result<Vec<Suppression>, StorageError> {
    let rows =
        sqlx::query("SELECT user_id, since, reason FROM td_suppressions ORDER BY since, user_id")
            .fetch_all(pool)
            .await?;
    rows.iter()
        .map(|r| {
            Ok(Suppression {
                user_id: r.try_get(0)?,
                since: r.try_get(1)?,
                reason: r.try_get(2)?,
            })
        })
        .collect()
}

pub async fn record_audit(pool: &PgPool, entry: &AuditEntry) -> Result<(), StorageError> {
    sqlx::query(&format!(
        "INSERT INTO td_audit (at, actor, address, action, detail, count) \
         VALUES ({CLOCK_MS}, $1, $2, $3, $4, $5)"
    ))
    .bind(pg_text(&entry.actor).as_ref())
    .bind(entry.address.as_deref().map(pg_text).as_deref())
    .bind(pg_text(&entry.action).as_ref())
    .bind(pg_text(&entry.detail.to_string()).as_ref())
    .bind(entry.count.map(|n| n as i64))
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn audit_log(
    pool: &PgPool,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<AuditRecord>, StorageError> {
    let rows = sqlx::query(
        "SELECT id, at, actor, address, action, detail, count FROM td_audit \
         WHERE $1::bigint IS NULL OR id < $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(before)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let detail: String = r.try_get(5)?;
            Ok(AuditRecord {
                id: r.try_get(0)?,
                at: r.try_get(1)?,
                entry: AuditEntry {
                    actor: r.try_get(2)?,
                    address: r.try_get(3)?,
                    action: r.try_get(4)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                    count: r.try_get::<Option<i64>, _>(6)?.map(|n| n.max(0) as u64),
                },
            })
        })
        .collect()
}
