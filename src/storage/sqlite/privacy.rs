//! Erasing users, suppressions and the audit trail, run by the writer
//! inside its transaction (reads on the reader connection).

use super::bulk_index::{By, ids};
use super::queue::dequeue;
use super::schema::refused_size_sql;
use crate::storage::privacy::{PAYLOAD_ERASED, USER_DELETED};
use crate::storage::*;
use rusqlite::{Connection, params};

pub(super) fn erase_user(
    c: &Connection,
    erase: &Erase,
    now: Millis,
) -> Result<Erased, StorageError> {
    let user = erase.user_id.as_str();
    // The user's messages: `WHERE id IN ({mine})`, `?1` the user.
    let mine = ids(By::User, "?1");
    let ids: Vec<(i64, String)> = c
        .prepare_cached(&format!(
            "SELECT id, state FROM messages WHERE id IN ({mine})"
        ))?
        .query_map([user], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let counted = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row(
            &format!(
                "SELECT COALESCE(SUM({}), 0) FROM messages WHERE id IN ({mine})",
                refused_size_sql("0")
            ),
            [user],
            |r| r.get(0),
        )
    };
    let before = counted(c)?;
    let mut cancelled = 0;
    for (id, state) in &ids {
        if state == "pending" || state == "dead" {
            dequeue(c, *id)?;
            cancelled += 1;
        }
    }
    c.execute(
        &format!(
            "UPDATE messages SET \
                state = CASE WHEN state IN ('pending', 'dead') THEN 'suppressed' ELSE state END, \
                code = CASE WHEN state IN ('pending', 'dead') THEN ?2 ELSE code END, \
                reason = ?3, payload = '{{}}', settings = '{{}}', requests = NULL, \
                last_body = NULL, last_error = NULL, warnings = NULL, page_category = NULL, \
                ordering_key = NULL, updated_at = ?4 \
             WHERE id IN ({mine})"
        ),
        params![user, USER_DELETED, PAYLOAD_ERASED, now],
    )?;
    let after = counted(c)?;
    // The user's id goes too; the rows keep their outcome and counts.
    // The trigger `messages_unindex_user` takes its `user_messages` entries.
    c.execute(
        &format!("UPDATE messages SET user_id = NULL WHERE id IN ({mine})"),
        [user],
    )?;
    if after != before {
        c.execute(
            "UPDATE usage SET bytes = bytes + ?1 WHERE name = 'refused'",
            [after - before],
        )?;
    }
    c.execute("DELETE FROM page_categories WHERE user_id = ?1", [user])?;
    super::entity::erase_user(c, user)?;
    c.execute(
        "INSERT INTO erasures (user_key, at, reason, messages) VALUES (?1, ?2, ?3, ?4)",
        params![user_key(user), now, erase.reason, ids.len() as i64],
    )?;
    if erase.suppress {
        suppress(c, user, &erase.reason, now)?;
    }
    Ok(Erased {
        messages: ids.len() as u64,
        cancelled,
    })
}

pub(super) fn suppress(
    c: &Connection,
    user_id: &str,
    reason: &str,
    now: Millis,
) -> Result<bool, StorageError> {
    let added = c.execute(
        "INSERT INTO suppressions (user_id, since, reason) VALUES (?1, ?2, ?3) \
         ON CONFLICT (user_id) DO NOTHING",
        params![user_id, now, reason],
    )?;
    Ok(added > 0)
}

pub(super) fn lift(c: &Connection, user_id: &str) -> Result<bool, StorageError> {
    Ok(c.execute("DELETE FROM suppressions WHERE user_id = ?1", [user_id])? > 0)
}

/// Whether any user is suppressed.
pub(super) fn any_suppressed(c: &Connection) -> Result<bool, StorageError> {
    Ok(
        c.prepare_cached("SELECT EXISTS (SELECT 1 FROM suppressions)")?
            .query_row([], |r| r.get(0))?,
    )
}

/// Which of these users are suppressed (none asked when the table is empty).
pub(super) fn suppressed(
    c: &Connection,
    users: &[&str],
) -> Result<std::collections::HashSet<String>, StorageError> {
    let mut out = std::collections::HashSet::new();
    if users.is_empty() || !any_suppressed(c)? {
        return Ok(out);
    }
    let mut stmt = c.prepare_cached("SELECT 1 FROM suppressions WHERE user_id = ?1")?;
    for u in users {
        if stmt.exists([u])? {
            out.insert((*u).to_owned());
        }
    }
    Ok(out)
}

pub(super) fn record_audit(
    c: &Connection,
    entry: &AuditEntry,
    now: Millis,
) -> Result<(), StorageError> {
    c.execute(
        "INSERT INTO audit (at, actor, address, action, detail, count) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            now,
            entry.actor,
            entry.address,
            entry.action,
            entry.detail.to_string(),
            entry.count.map(|n| n as i64)
        ],
    )?;
    Ok(())
}

pub(super) fn suppressions(c: &Connection) -> Result<Vec<Suppression>, StorageError> {
    Ok(
        c.prepare_cached(
            "SELECT user_id, since, reason FROM suppressions ORDER BY since, user_id",
        )?
        .query_map([], |r| {
            Ok(Suppression {
                user_id: r.get(0)?,
                since: r.get(1)?,
                reason: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?,
    )
}

pub(super) fn audit_log(
    c: &Connection,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<AuditRecord>, StorageError> {
    Ok(c.prepare_cached(
        "SELECT id, at, actor, address, action, detail, count FROM audit \
         WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2",
    )?
    .query_map(params![before, limit as i64], |r| {
        let detail: String = r.get(5)?;
        Ok(AuditRecord {
            id: r.get(0)?,
            at: r.get(1)?,
            entry: AuditEntry {
                actor: r.get(2)?,
                address: r.get(3)?,
                action: r.get(4)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                count: r.get::<_, Option<i64>>(6)?.map(|n| n.max(0) as u64),
            },
        })
    })?
    .collect::<Result<_, _>>()?)
}

/// A tombstone's key for a user: SHA-256 of the id, hex (the id itself is
/// not kept).
pub(crate) fn user_key(user_id: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(user_id.as_bytes()))
}
