//! Per-entity views (see `storage::entity`): written with delivery reports
//! in their transaction (one statement per table per batch), read by the
//! operator's pages. Rows are keyed by digests (`text_key`) of the entity
//! and attribute, never by the client-chosen text itself.

use super::super::entity::{ACTIVITY_DAYS_KEPT, EntityWrites};
use super::super::{DailyActivity, EntityAttribute, EntityKind, Millis, StorageError, day_of};
use super::queue::CLOCK_MS;
use super::text::{pg_text, text_key};
use sqlx::{PgConnection, PgPool, Row};

/// The digest an entity's rows are found by. JSON keeps the parts apart
/// whatever text they hold.
fn entity_key(kind: EntityKind, id: &str) -> String {
    text_key(&serde_json::json!([kind.as_str(), id]).to_string())
}

fn attribute_key(kind: EntityKind, service: &str, id: &str, name: &str) -> String {
    text_key(&serde_json::json!([kind.as_str(), service, id, name]).to_string())
}

/// Writes what a report batch's accepted requests set (caller's transaction).
pub async fn write(conn: &mut PgConnection, writes: &EntityWrites) -> Result<(), StorageError> {
    if !writes.attributes.is_empty() {
        let n = writes.attributes.len();
        let (mut keys, mut entities, mut kinds, mut ids) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut services, mut names, mut values, mut messages) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for ((kind, service, id, name), (value, message)) in &writes.attributes {
            keys.push(attribute_key(*kind, service, id, name));
            entities.push(entity_key(*kind, id));
            kinds.push(kind.as_str());
            ids.push(pg_text(id));
            services.push(pg_text(service));
            names.push(pg_text(name));
            values.push(pg_text(value));
            messages.push(*message);
        }
        sqlx::query(&format!(
            "INSERT INTO td_entity_attributes (attribute_key, entity_key, kind, entity_id, \
                service_id, name, value, message, sent_at) \
             SELECT a.*, {CLOCK_MS} FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
                $5::text[], $6::text[], $7::text[], $8::bigint[]) \
                AS a(attribute_key, entity_key, kind, entity_id, service_id, name, value, message) \
             ON CONFLICT (attribute_key) DO UPDATE SET value = EXCLUDED.value, \
                sent_at = EXCLUDED.sent_at, message = EXCLUDED.message"
        ))
        .bind(&keys)
        .bind(&entities)
        .bind(&kinds)
        .bind(&ids)
        .bind(&services)
        .bind(&names)
        .bind(&values)
        .bind(&messages)
        .execute(&mut *conn)
        .await?;
    }
    if !writes.activity.is_empty() {
        let (mut entities, mut days, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for ((kind, id, day), n) in &writes.activity {
            entities.push(entity_key(*kind, id));
            days.push(*day);
            counts.push(*n);
        }
        sqlx::query(
            "INSERT INTO td_entity_activity (entity_key, day, activities) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
             ON CONFLICT (entity_key, day) DO UPDATE \
                SET activities = td_entity_activity.activities + EXCLUDED.activities",
        )
        .bind(&entities)
        .bind(&days)
        .bind(&counts)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Forgets a user's rows (erasure, caller's transaction).
pub async fn erase_user(conn: &mut PgConnection, user_id: &str) -> Result<(), StorageError> {
    let key = entity_key(EntityKind::User, user_id);
    sqlx::query(
        "WITH a AS (DELETE FROM td_entity_attributes WHERE entity_key = $1) \
         DELETE FROM td_entity_activity WHERE entity_key = $1",
    )
    .bind(&key)
    .execute(conn)
    .await?;
    Ok(())
}

/// Drops activity days past [`ACTIVITY_DAYS_KEPT`] (the pruning replica).
pub async fn prune(conn: &mut PgConnection, now: Millis) -> Result<(), StorageError> {
    sqlx::query("DELETE FROM td_entity_activity WHERE day < $1")
        .bind(day_of(now) - ACTIVITY_DAYS_KEPT)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn attributes(
    pool: &PgPool,
    kind: EntityKind,
    id: &str,
) -> Result<Vec<EntityAttribute>, StorageError> {
    let rows = sqlx::query(
        "SELECT service_id, name, value, sent_at, message FROM td_entity_attributes \
         WHERE entity_key = $1 ORDER BY service_id COLLATE \"C\", name COLLATE \"C\"",
    )
    .bind(entity_key(kind, id))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(EntityAttribute {
                service_id: r.try_get(0)?,
                name: r.try_get(1)?,
                value: r.try_get(2)?,
                sent_at: r.try_get(3)?,
                message: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

pub async fn activity(
    pool: &PgPool,
    kind: EntityKind,
    id: &str,
    since_day: i64,
) -> Result<Vec<DailyActivity>, StorageError> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT day, activities FROM td_entity_activity \
         WHERE entity_key = $1 AND day >= $2 ORDER BY day",
    )
    .bind(entity_key(kind, id))
    .bind(since_day)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(day, n)| DailyActivity {
            day,
            activities: n.max(0) as u64,
        })
        .collect())
}
