//! Per-entity views (see `storage::entity`): written by the writer with
//! delivery reports, read on the reader connection.

use crate::storage::entity::{ACTIVITY_DAYS_KEPT, EntityWrites};
use crate::storage::*;
use rusqlite::{Connection, params};

/// Writes what a report batch's accepted requests set (in its transaction).
pub(super) fn write(
    c: &Connection,
    writes: &EntityWrites,
    now: Millis,
) -> Result<(), StorageError> {
    let mut attribute = c.prepare_cached(
        "INSERT INTO entity_attributes (kind, entity_id, service_id, name, value, sent_at, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
         ON CONFLICT (kind, entity_id, service_id, name) DO UPDATE SET value = excluded.value, \
            sent_at = excluded.sent_at, message = excluded.message",
    )?;
    for ((kind, service, id, name), (value, message)) in &writes.attributes {
        attribute.execute(params![
            kind.as_str(),
            id,
            service,
            name,
            value,
            now,
            message
        ])?;
    }
    let mut activity = c.prepare_cached(
        "INSERT INTO entity_activity (kind, entity_id, day, activities) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (kind, entity_id, day) DO UPDATE \
            SET activities = activities + excluded.activities",
    )?;
    for ((kind, id, day), n) in &writes.activity {
        activity.execute(params![kind.as_str(), id, day, n])?;
    }
    Ok(())
}

/// Forgets a user's rows (erasure).
pub(super) fn erase_user(c: &Connection, user_id: &str) -> Result<(), StorageError> {
    let user = EntityKind::User.as_str();
    c.prepare_cached("DELETE FROM entity_attributes WHERE kind = ?1 AND entity_id = ?2")?
        .execute(params![user, user_id])?;
    c.prepare_cached("DELETE FROM entity_activity WHERE kind = ?1 AND entity_id = ?2")?
        .execute(params![user, user_id])?;
    Ok(())
}

/// Drops activity days past [`ACTIVITY_DAYS_KEPT`].
pub(super) fn prune(c: &Connection, now: Millis) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM entity_activity WHERE day < ?1")?
        .execute([day_of(now) - ACTIVITY_DAYS_KEPT])?;
    Ok(())
}

pub(super) fn attributes(
    c: &Connection,
    kind: EntityKind,
    id: &str,
) -> Result<Vec<EntityAttribute>, StorageError> {
    let rows = c
        .prepare_cached(
            "SELECT service_id, name, value, sent_at, message FROM entity_attributes \
             WHERE kind = ?1 AND entity_id = ?2 ORDER BY service_id, name",
        )?
        .query_map(params![kind.as_str(), id], |r| {
            Ok(EntityAttribute {
                service_id: r.get(0)?,
                name: r.get(1)?,
                value: r.get(2)?,
                sent_at: r.get(3)?,
                message: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn activity(
    c: &Connection,
    kind: EntityKind,
    id: &str,
    since_day: i64,
) -> Result<Vec<DailyActivity>, StorageError> {
    let rows = c
        .prepare_cached(
            "SELECT day, activities FROM entity_activity \
             WHERE kind = ?1 AND entity_id = ?2 AND day >= ?3 ORDER BY day",
        )?
        .query_map(params![kind.as_str(), id, since_day], |r| {
            Ok(DailyActivity {
                day: r.get(0)?,
                activities: r.get::<_, i64>(1)?.max(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}
