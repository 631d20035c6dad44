//! The SQLite schema, its versions and upgrades, and the checks at open.

use crate::storage::{Cause, REFUSED_STATES, StorageError};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY,
    message_id    TEXT NOT NULL,
    source        TEXT NOT NULL,
    call          TEXT NOT NULL,
    service_id    TEXT NOT NULL,
    user_id       TEXT,
    account_id    TEXT,
    state         TEXT NOT NULL,
    -- NULL: no ordering (activities); otherwise delivered in acceptance order.
    ordering_key  TEXT,
    -- The user's latest page category at acceptance, for messages that asked.
    page_category TEXT,
    code          TEXT,
    reason        TEXT,
    warnings      TEXT,
    payload       TEXT NOT NULL,
    settings      TEXT NOT NULL,
    requests      TEXT,
    sent          INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_status   INTEGER,
    last_body     TEXT,
    last_error    TEXT,
    received_at   INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_state ON messages(state, id);
CREATE INDEX IF NOT EXISTS messages_finished ON messages(updated_at)
    WHERE state NOT IN ('pending', 'dead');
CREATE TABLE IF NOT EXISTS queue (
    seq             INTEGER PRIMARY KEY,
    message         INTEGER NOT NULL UNIQUE REFERENCES messages(id),
    ordering_key    TEXT,
    next_attempt_at INTEGER NOT NULL,
    enqueued_at     INTEGER NOT NULL,
    leased_until    INTEGER NOT NULL DEFAULT 0,
    -- The token of the claim holding it (0: none); reports must match it.
    lease           INTEGER NOT NULL DEFAULT 0,
    -- 1 for the oldest queued message of its ordering key (the only one that
    -- may be claimed) and for every message without a key. Claims scan heads
    -- only, so a long queue behind a waiting entity costs nothing.
    head            INTEGER NOT NULL DEFAULT 0,
    size            INTEGER NOT NULL DEFAULT 0
);
-- queue.size: the message's stored bytes (QUEUED_SIZE), so the backlog's
-- size is a sum over this table rather than over every queued payload.
CREATE INDEX IF NOT EXISTS queue_key ON queue(ordering_key, seq)
    WHERE ordering_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS queue_heads ON queue(next_attempt_at) WHERE head = 1;
-- Accepted messageIds whose message was pruned inside the dedupe window.
CREATE TABLE IF NOT EXISTS dedupe (
    source      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    accepted_at INTEGER NOT NULL,
    PRIMARY KEY (source, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_age ON dedupe(accepted_at);
CREATE TABLE IF NOT EXISTS page_categories (
    service_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    category   TEXT NOT NULL,
    PRIMARY KEY (service_id, user_id)
) WITHOUT ROWID;
-- Users whose later messages are recorded without payload, never delivered.
CREATE TABLE IF NOT EXISTS suppressions (
    user_id TEXT PRIMARY KEY,
    since   INTEGER NOT NULL,
    reason  TEXT NOT NULL
) WITHOUT ROWID;
-- Tombstones of erased users: a digest of the id, when, why, how many.
CREATE TABLE IF NOT EXISTS erasures (
    id       INTEGER PRIMARY KEY,
    user_key TEXT NOT NULL,
    at       INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    messages INTEGER NOT NULL
);
-- Operator actions; the admin API cannot erase them.
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    address TEXT,
    action  TEXT NOT NULL,
    detail  TEXT NOT NULL,
    count   INTEGER
);
-- Stored bytes by kind ('refused': see RefusedBudget), kept as they change.
CREATE TABLE IF NOT EXISTS usage (
    name  TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
-- Per-entity views (storage/entity.rs), written with delivery reports: the
-- last value sent of each account or user attribute, activities per UTC day.
CREATE TABLE IF NOT EXISTS entity_attributes (
    kind       TEXT NOT NULL,
    entity_id  TEXT NOT NULL,
    service_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      TEXT NOT NULL,
    sent_at    INTEGER NOT NULL,
    message    INTEGER NOT NULL,
    PRIMARY KEY (kind, entity_id, service_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entity_activity (
    kind       TEXT NOT NULL,
    entity_id  TEXT NOT NULL,
    day        INTEGER NOT NULL,
    activities INTEGER NOT NULL,
    PRIMARY KEY (kind, entity_id, day)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entity_activity_day ON entity_activity(day);
-- Messages by messageId (deduplication, lookups), by user (erasure, the
-- per-user view) and by account (its page), indexed in bulk up to
-- `bulk_index.upto` (bulk_index.rs); newer messages are found by a scan
-- of that short tail, or by the writer's memory of it. Indexes on the
-- columns cost each accepted message a page written at a random place per
-- index.
CREATE TABLE IF NOT EXISTS message_ids (
    message_id TEXT NOT NULL,
    id         INTEGER NOT NULL,
    PRIMARY KEY (message_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_messages (
    user_id TEXT NOT NULL,
    id      INTEGER NOT NULL,
    PRIMARY KEY (user_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_messages (
    account_id TEXT NOT NULL,
    id         INTEGER NOT NULL,
    PRIMARY KEY (account_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bulk_index (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    upto INTEGER NOT NULL
);
INSERT OR IGNORE INTO bulk_index (one, upto) VALUES (1, 0);
-- Entries leave with their message or its ids (pruning, erasure).
CREATE TRIGGER IF NOT EXISTS messages_unindex AFTER DELETE ON messages BEGIN
    DELETE FROM message_ids WHERE message_id = OLD.message_id AND id = OLD.id;
    DELETE FROM user_messages WHERE user_id = OLD.user_id AND id = OLD.id;
    DELETE FROM account_messages WHERE account_id = OLD.account_id AND id = OLD.id;
END;
CREATE TRIGGER IF NOT EXISTS messages_unindex_user AFTER UPDATE OF user_id ON messages
    WHEN OLD.user_id IS NOT NEW.user_id BEGIN
    DELETE FROM user_messages WHERE user_id = OLD.user_id AND id = OLD.id;
END;
CREATE TRIGGER IF NOT EXISTS messages_unindex_account AFTER UPDATE OF account_id ON messages
    WHEN OLD.account_id IS NOT NEW.account_id BEGIN
    DELETE FROM account_messages WHERE account_id = OLD.account_id AND id = OLD.id;
END;
-- The per-minute history behind the operator page's charts (history.rs):
-- counts added up, gauges the highest value sampled in the minute.
CREATE TABLE IF NOT EXISTS history (
    minute            INTEGER PRIMARY KEY,
    accepted          INTEGER NOT NULL DEFAULT 0,
    delivered         INTEGER NOT NULL DEFAULT 0,
    attempts          INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0,
    rejected          INTEGER NOT NULL DEFAULT 0,
    duplicate         INTEGER NOT NULL DEFAULT 0,
    dead              INTEGER NOT NULL DEFAULT 0,
    filtered          INTEGER NOT NULL DEFAULT 0,
    unsupported       INTEGER NOT NULL DEFAULT 0,
    suppressed        INTEGER NOT NULL DEFAULT 0,
    queue_depth       INTEGER,
    oldest_pending_ms INTEGER,
    concurrency_limit INTEGER
);
-- Totango round trips per minute, by log bucket (RttHistogram).
CREATE TABLE IF NOT EXISTS history_rtt (
    minute INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (minute, bucket)
) WITHOUT ROWID;
"#;

/// What a message's row stores of its own, bytes: payload, settings and
/// messageId in UTF-8 (as `storage::refused_size` counts them).
macro_rules! own_size {
    () => {
        "length(CAST(payload AS BLOB)) + length(CAST(settings AS BLOB)) \
         + length(CAST(message_id AS BLOB))"
    };
}

/// What a queued message's row stores, bytes (`queue.size`): its own bytes,
/// translated requests and last answer.
pub(super) const QUEUED_SIZE: &str = concat!(
    own_size!(),
    " + COALESCE(length(CAST(requests AS BLOB)), 0) + COALESCE(length(CAST(last_body AS BLOB)), 0)"
);

/// SQL: what a message's row counts in `usage` (see RefusedBudget) when it
/// is refused, else `otherwise`.
pub(super) fn refused_size_sql(otherwise: &str) -> String {
    format!(
        "CASE WHEN state IN {REFUSED_STATES} THEN {} ELSE {otherwise} END",
        own_size!()
    )
}

/// Counts what the refused messages already stored take (once, when the
/// `usage` table is new).
fn count_refused(c: &Connection) -> rusqlite::Result<()> {
    c.execute_batch(&format!(
        "INSERT OR IGNORE INTO usage (name, bytes) \
         SELECT 'refused', COALESCE(SUM({}), 0) FROM messages",
        refused_size_sql("0")
    ))
}

/// Fills `queue.size` of the queued messages (once, by the upgrade to 7).
fn fill_queue_sizes(c: &Connection) -> rusqlite::Result<()> {
    c.execute_batch(&format!(
        "UPDATE queue SET size = (SELECT {QUEUED_SIZE} FROM messages WHERE id = queue.message)"
    ))
}

/// The schema version this build writes (`PRAGMA user_version`).
/// 1: every message ordered per user, page categories remembered at delivery.
/// 2: only attribute updates ordered, page categories decided at acceptance.
/// 3: claims carry a lease token that reports must match.
/// 4: the stored bytes of refused messages are counted (`usage`); user
///    erasures, suppressions and the audit trail; messages indexed by user.
/// 5: per-entity views (`entity_attributes`, `entity_activity`); messages
///    indexed by account.
/// 6: the per-minute history (`history`, `history_rtt`).
/// 7: dedupe looks messages up by messageId; `dedupe` keeps only the ids
///    of messages pruned inside the window (fewer writes per message);
///    `queue.size`.
/// 8: messages by messageId, user and account in tables filled in bulk
///    (`message_ids`, `user_messages`, `account_messages`) instead of
///    indexes.
pub(super) const SCHEMA_VERSION: i64 = 8;

/// Refuses a damaged database file at start (truncated, overwritten, not a
/// database) with a message that says what to do, instead of failing later
/// in the middle of work. `quick_check` reads every page once.
pub(super) fn damaged(path: &Path, why: Cause) -> StorageError {
    StorageError::Corrupt(why.reworded(|why| {
        format!(
            "{} is damaged ({why}); the server will not use it. Stop the server, move the file \
             (and its -wal and -shm files) aside, and either start afresh or recover what it \
             holds with `sqlite3 OLD.db .recover | sqlite3 NEW.db` (docs/reliability.md, \
             \"Storage damage\")",
            path.display()
        )
    }))
}

pub(super) fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StorageError> {
    let damaged = |why: Cause| damaged(path, why);
    let result: Result<Vec<String>, rusqlite::Error> = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    match result {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(()),
        Ok(rows) => Err(damaged(
            rows.into_iter()
                .take(3)
                .collect::<Vec<_>>()
                .join("; ")
                .into(),
        )),
        Err(e) => Err(damaged(Cause::of(e))),
    }
}

pub(super) fn migrate(conn: &Connection, path: &Path) -> Result<(), StorageError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let has_tables: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages')",
        [],
        |r| r.get(0),
    )?;
    match version {
        0 if has_tables => Err(StorageError::Corrupt(
            format!(
                "{} was written by a pre-release build; move it away to start afresh",
                path.display()
            )
            .into(),
        )),
        0 => {
            conn.execute_batch(SCHEMA)?;
            count_refused(conn)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            Ok(())
        }
        1 => migrate_v1(conn).map_err(|e| {
            StorageError::Corrupt(
                Cause::of(e).context(format_args!("{}: upgrading from schema 1", path.display())),
            )
        }),
        // Later versions only add tables (`SCHEMA` creates what is missing).
        2..=7 => {
            let tx = conn.unchecked_transaction()?;
            if version == 2 {
                tx.execute_batch("ALTER TABLE queue ADD COLUMN lease INTEGER NOT NULL DEFAULT 0;")?;
            }
            let sized: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('queue') WHERE name = 'size')",
                [],
                |r| r.get(0),
            )?;
            if !sized {
                tx.execute_batch("ALTER TABLE queue ADD COLUMN size INTEGER NOT NULL DEFAULT 0;")?;
                fill_queue_sizes(&tx)?;
            }
            tx.execute_batch(SCHEMA)?;
            count_refused(&tx)?;
            // Version 8: the tables replace three indexes.
            tx.execute_batch(
                "DROP INDEX IF EXISTS messages_user; DROP INDEX IF EXISTS messages_account; \
                 DROP INDEX IF EXISTS messages_message_id;",
            )?;
            super::bulk_index::catch_up(&tx)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            Ok(tx.commit()?)
        }
        SCHEMA_VERSION => Ok(conn.execute_batch(SCHEMA)?),
        newer => Err(StorageError::Corrupt(
            format!(
                "{} has schema version {newer}, newer than this build ({SCHEMA_VERSION}); \
                 upgrade the server",
                path.display()
            )
            .into(),
        )),
    }
}

/// The `page_category` SQL of a v1 page payload (`category`, else
/// `properties.category`; strings and numbers), used once by the upgrade.
const V1_PAGE_CATEGORY: &str = "COALESCE(\
    NULLIF(CASE WHEN json_type(m.payload, '$.category') IN ('text', 'integer', 'real') \
        THEN CAST(json_extract(m.payload, '$.category') AS TEXT) END, ''), \
    NULLIF(CASE WHEN json_type(m.payload, '$.properties.category') IN ('text', 'integer', 'real') \
        THEN CAST(json_extract(m.payload, '$.properties.category') AS TEXT) END, ''))";

/// Upgrades a schema 1 file in one transaction. Queued messages keep working:
/// identify keeps its per-user key, group gets its account key, activities
/// lose theirs; a queued track gets the page category schema 1 would have
/// used at delivery (the last page queued before it, else the remembered one),
/// and the memory becomes what delivering the queued pages would have left.
fn migrate_v1(conn: &Connection) -> Result<(), StorageError> {
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let result = (|| {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(
            "DROP INDEX IF EXISTS messages_state; DROP INDEX IF EXISTS messages_message_id; \
             DROP INDEX IF EXISTS messages_finished; DROP INDEX IF EXISTS queue_key; \
             DROP INDEX IF EXISTS queue_heads; \
             ALTER TABLE messages RENAME TO messages_v1; ALTER TABLE queue RENAME TO queue_v1;",
        )?;
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(
            "INSERT INTO messages (id, message_id, source, call, service_id, user_id, account_id, \
                state, ordering_key, page_category, code, reason, warnings, payload, settings, \
                requests, sent, attempts, last_status, last_body, last_error, received_at, updated_at) \
             SELECT id, message_id, source, call, service_id, user_id, account_id, state, \
                CASE call WHEN 'identify' THEN ordering_key \
                    WHEN 'group' THEN CASE WHEN account_id IS NOT NULL \
                        THEN service_id || char(31) || 'o:' || account_id END END, \
                NULL, code, reason, warnings, payload, settings, requests, sent, attempts, \
                last_status, last_body, last_error, received_at, updated_at FROM messages_v1;",
        )?;
        // Page categories of the queued backlog, in acceptance order.
        let mut memory: std::collections::HashMap<(String, String), Option<String>> =
            std::collections::HashMap::new();
        let rows: Vec<(i64, String, String, String, Option<String>)> = tx
            .prepare(&format!(
                "SELECT m.id, m.call, m.service_id, m.user_id, {V1_PAGE_CATEGORY} \
                 FROM queue_v1 q JOIN messages m ON m.id = q.message \
                 WHERE m.call IN ('page', 'track') AND m.user_id IS NOT NULL ORDER BY q.seq"
            ))?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut remembered = tx.prepare(
            "SELECT category FROM page_categories WHERE service_id = ?1 AND user_id = ?2",
        )?;
        let mut set_track = tx.prepare("UPDATE messages SET page_category = ?2 WHERE id = ?1")?;
        for (id, call, service, user, category) in rows {
            let key = (service, user);
            if !memory.contains_key(&key) {
                let now: Option<String> = remembered
                    .query_row(params![key.0, key.1], |r| r.get(0))
                    .optional()?;
                memory.insert(key.clone(), now);
            }
            if call == "page" {
                memory.insert(key, category);
            } else {
                set_track.execute(params![id, memory[&key]])?;
            }
        }
        let mut remember = tx.prepare(
            "INSERT INTO page_categories (service_id, user_id, category) VALUES (?1, ?2, ?3) \
             ON CONFLICT (service_id, user_id) DO UPDATE SET category = excluded.category",
        )?;
        let mut forget =
            tx.prepare("DELETE FROM page_categories WHERE service_id = ?1 AND user_id = ?2")?;
        for ((service, user), category) in memory {
            match category {
                Some(c) => remember.execute(params![service, user, c])?,
                None => forget.execute(params![service, user])?,
            };
        }
        drop((remembered, set_track, remember, forget));
        tx.execute_batch(
            "INSERT INTO queue (seq, message, ordering_key, next_attempt_at, enqueued_at, head) \
             SELECT q.seq, q.message, m.ordering_key, q.next_attempt_at, q.enqueued_at, 0 \
             FROM queue_v1 q JOIN messages m ON m.id = q.message; \
             UPDATE queue SET head = 1 WHERE ordering_key IS NULL OR seq = \
                (SELECT MIN(seq) FROM queue k WHERE k.ordering_key = queue.ordering_key); \
             DROP TABLE queue_v1; DROP TABLE messages_v1;",
        )?;
        fill_queue_sizes(&tx)?;
        super::bulk_index::catch_up(&tx)?;
        let broken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_foreign_key_check)",
            [],
            |r| r.get(0),
        )?;
        if broken {
            return Err(StorageError::Corrupt(
                "foreign key check failed after the upgrade".into(),
            ));
        }
        count_refused(&tx)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(tx.commit()?)
    })();
    conn.pragma_update(None, "foreign_keys", "ON")?;
    result
}

/// Opens a connection with the settings every connection uses.
pub(super) fn open(path: &Path) -> Result<Connection, StorageError> {
    // Damage is told by SQLite's error code (see `From<rusqlite::Error>`).
    let conn = Connection::open(path).map_err(|e| match StorageError::from(e) {
        e @ StorageError::Unavailable(_) => {
            e.context(format_args!("cannot open {}", path.display()))
        }
        other => other,
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsync'd at every commit, so a 2xx survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Plans do not depend on bound values (the query planner stability
    // guarantee): otherwise a statement whose table has partial indexes is
    // prepared again whenever a parameter changes (the claim query was, at
    // every claim).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // Statement journals (the writer's savepoints) in memory, not temp files.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Deleted and overwritten content is zeroed, so an erased payload does
    // not linger in free space (docs/privacy.md).
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}
