//! Messages by messageId, by user and by account (`message_ids`,
//! `user_messages`, `account_messages`), filled in bulk by the writer
//! instead of kept as indexes of `messages`.
//!
//! An index on a column whose values arrive in any order (messageIds,
//! users, accounts) cost every accepted message a page written at a random
//! place of each index: three of the four WAL frames an accepted track
//! wrote. A bulk insert in key order writes each page once for all the
//! messages it gains. Messages after `bulk_index.upto` (the tail: about
//! `StorageOptions::index_every_ms` of traffic, 500 ms) are found by a scan
//! of that id range, and by the writer through [`Tail`].
//!
//! Invariant: every message with `id <= upto` has its entries; triggers
//! remove entries with their message or its user or account id.

use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;

/// Which column's table.
#[derive(Clone, Copy)]
pub(super) enum By {
    MessageId,
    User,
    Account,
}

impl By {
    const ALL: [By; 3] = [By::MessageId, By::User, By::Account];

    /// The table and the column of `messages` it holds.
    fn table_column(self) -> (&'static str, &'static str) {
        match self {
            By::MessageId => ("message_ids", "message_id"),
            By::User => ("user_messages", "user_id"),
            By::Account => ("account_messages", "account_id"),
        }
    }
}

/// SQL selecting the ids of the messages whose column equals `param`
/// (indexed and tail), for `id IN (…)`; `param` is written twice (bind it
/// twice when it is an anonymous `?`).
pub(super) fn ids(by: By, param: &str) -> String {
    let (table, column) = by.table_column();
    format!(
        "SELECT id FROM {table} WHERE {column} = {param} UNION ALL \
         SELECT id FROM messages WHERE id > (SELECT upto FROM bulk_index) \
         AND {column} = {param}"
    )
}

/// Indexes the messages after `upto`, in key order, and moves `upto` to the
/// newest message. When pruning took the newest messages, `upto` comes down
/// to the newest left, so ids SQLite hands out again count as the tail.
pub(super) fn catch_up(c: &Connection) -> rusqlite::Result<()> {
    let upto: i64 = c
        .prepare_cached("SELECT upto FROM bulk_index")?
        .query_row([], |r| r.get(0))?;
    let newest: i64 = c
        .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM messages")?
        .query_row([], |r| r.get(0))?;
    if newest > upto {
        for (table, column) in By::ALL.map(By::table_column) {
            c.prepare_cached(&format!(
                "INSERT OR IGNORE INTO {table} ({column}, id) SELECT {column}, id FROM messages \
                 WHERE id > ?1 AND id <= ?2 AND {column} IS NOT NULL ORDER BY {column}, id"
            ))?
            .execute(params![upto, newest])?;
        }
    }
    if newest != upto {
        c.prepare_cached("UPDATE bulk_index SET upto = ?1")?
            .execute([newest])?;
    }
    Ok(())
}

/// The writer's memory of the tail by messageId: deduplication looks every
/// accepted message up, and a scan of the tail each time would cost more
/// than the index did. Ids are added as rows are inserted, before their
/// commit, so a rolled-back group may leave ids of rows that are gone or
/// hold another message: every lookup reads the row by id and compares, so
/// an extra id costs a seek, never a wrong answer. Emptied when a commit
/// moved `upto` past everything (then the tables hold it all).
#[derive(Default)]
pub(super) struct Tail {
    ids: HashMap<String, Ids>,
}

/// A messageId's tail rows: kept apart, the duplicates (of which a flood
/// may hold many) are never read by deduplication.
#[derive(Default)]
struct Ids {
    kept: Vec<i64>,
    duplicates: Vec<i64>,
}

impl Tail {
    /// The tail of a file as it is opened.
    pub fn load(c: &Connection) -> rusqlite::Result<Tail> {
        let mut tail = Tail::default();
        let mut stmt = c.prepare(
            "SELECT id, message_id, state = 'duplicate' FROM messages \
             WHERE id > (SELECT upto FROM bulk_index)",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        for row in rows {
            let (id, message_id, duplicate) = row?;
            tail.add(&message_id, id, duplicate);
        }
        Ok(tail)
    }

    pub fn add(&mut self, message_id: &str, id: i64, duplicate: bool) {
        let ids = match self.ids.get_mut(message_id) {
            Some(ids) => ids,
            None => self.ids.entry(message_id.to_owned()).or_default(),
        };
        if duplicate {
            ids.duplicates.push(id);
        } else {
            ids.kept.push(id);
        }
    }

    /// How many ids it holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids
            .values()
            .map(|i| i.kept.len() + i.duplicates.len())
            .sum()
    }

    pub fn clear(&mut self) {
        // Shrinks after a burst instead of keeping its capacity.
        self.ids = HashMap::new();
    }

    /// When the newest non-duplicate tail message with this messageId from
    /// this source was received.
    pub fn accepted_at(
        &self,
        c: &Connection,
        source: &str,
        message_id: &str,
    ) -> rusqlite::Result<Option<i64>> {
        let Some(ids) = self.ids.get(message_id) else {
            return Ok(None);
        };
        let mut stmt = c.prepare_cached(
            "SELECT received_at FROM messages WHERE id = ?1 AND message_id = ?2 \
             AND source = ?3 AND state <> 'duplicate'",
        )?;
        let mut newest = None;
        for id in &ids.kept {
            let t: Option<i64> = stmt
                .query_row(params![id, message_id, source], |r| r.get(0))
                .optional()?;
            newest = newest.max(t);
        }
        Ok(newest)
    }

    /// Whether a tail message (any source, any state) has this messageId.
    /// Newest first: without a rolled-back group the first id answers.
    pub fn holds(&self, c: &Connection, message_id: &str) -> rusqlite::Result<bool> {
        let Some(ids) = self.ids.get(message_id) else {
            return Ok(false);
        };
        let mut stmt = c.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE id = ?1 AND message_id = ?2)",
        )?;
        for id in ids.kept.iter().rev().chain(ids.duplicates.iter().rev()) {
            if stmt.query_row(params![id, message_id], |r| r.get::<_, bool>(0))? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
