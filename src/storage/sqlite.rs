//! Embedded storage: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! All writes go through one writer thread that commits in groups: every
//! operation waiting when a transaction starts shares it, and its fsync.
//! Callers are answered only after the commit. Reads use their own connection.

use super::*;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Operations one transaction groups at most.
const MAX_GROUP: usize = 1024;
/// A claimed message's lease; leases are cleared at every start.
const LEASE_MS: Millis = 10 * 60 * 1000;
/// Delete expired dedupe entries and old messages this often.
const PRUNE_EVERY_MS: Millis = 60 * 1000;
/// Most dead messages one replay call queues again (keeps the transaction short).
const REPLAY_MAX: i64 = 10_000;
/// Most old messages deleted by one prune, to keep each transaction short;
/// while prunes delete full chunks, the next commit group prunes again.
const PRUNE_CHUNK: i64 = 2_000;

/// How long things are kept.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// A `messageId` is a duplicate this long after it was accepted.
    pub dedupe_window_ms: Millis,
    /// Finished messages (all but pending and dead) are deleted this long
    /// after their last change; `None` keeps them forever.
    pub retention_ms: Option<Millis>,
    /// How often pruning runs.
    pub prune_every_ms: Millis,
}

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
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_finished ON messages(updated_at)
    WHERE state NOT IN ('pending', 'dead');
CREATE TABLE IF NOT EXISTS queue (
    seq             INTEGER PRIMARY KEY,
    message         INTEGER NOT NULL UNIQUE REFERENCES messages(id),
    ordering_key    TEXT,
    next_attempt_at INTEGER NOT NULL,
    enqueued_at     INTEGER NOT NULL,
    leased_until    INTEGER NOT NULL DEFAULT 0,
    -- 1 for the oldest queued message of its ordering key (the only one that
    -- may be claimed) and for every message without a key. Claims scan heads
    -- only, so a long queue behind a waiting entity costs nothing.
    head            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_key ON queue(ordering_key, seq)
    WHERE ordering_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS queue_heads ON queue(next_attempt_at) WHERE head = 1;
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
"#;

/// The schema version this build writes (`PRAGMA user_version`).
/// 1: every message ordered per user, page categories remembered at delivery.
/// 2: only attribute updates ordered, page categories decided at acceptance.
const SCHEMA_VERSION: i64 = 2;

/// Refuses a damaged database file at start (truncated, overwritten, not a
/// database) with a message that says what to do, instead of failing later
/// in the middle of work. `quick_check` reads every page once.
fn damaged(path: &Path, why: String) -> StorageError {
    StorageError::Backend(format!(
        "{} is damaged ({why}); the server will not use it. Stop the server, move the file \
         (and its -wal and -shm files) aside, and either start afresh or recover what it \
         holds with `sqlite3 OLD.db .recover | sqlite3 NEW.db` (docs/reliability.md, \
         \"Storage damage\")",
        path.display()
    ))
}

fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StorageError> {
    let damaged = |why: String| damaged(path, why);
    let result: Result<Vec<String>, rusqlite::Error> = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    match result {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(()),
        Ok(rows) => Err(damaged(
            rows.into_iter().take(3).collect::<Vec<_>>().join("; "),
        )),
        Err(e) => Err(damaged(e.to_string())),
    }
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StorageError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let has_tables: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages')",
        [],
        |r| r.get(0),
    )?;
    match version {
        0 if has_tables => Err(StorageError::Backend(format!(
            "{} was written by a pre-release build; move it away to start afresh",
            path.display()
        ))),
        0 => {
            conn.execute_batch(SCHEMA)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            Ok(())
        }
        1 => migrate_v1(conn).map_err(|e| {
            StorageError::Backend(format!("{}: upgrading from schema 1: {e}", path.display()))
        }),
        SCHEMA_VERSION => Ok(conn.execute_batch(SCHEMA)?),
        newer => Err(StorageError::Backend(format!(
            "{} has schema version {newer}, newer than this build ({SCHEMA_VERSION}); upgrade the server",
            path.display()
        ))),
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
        let broken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_foreign_key_check)",
            [],
            |r| r.get(0),
        )?;
        if broken {
            return Err(StorageError::Backend(
                "foreign key check failed after the upgrade".into(),
            ));
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(tx.commit()?)
    })();
    conn.pragma_update(None, "foreign_keys", "ON")?;
    result
}

type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

enum Op {
    Accept(Vec<NewMessage>, Reply<Vec<Acceptance>>),
    Replay(MessageFilter, Millis, Reply<Vec<i64>>),
    Claim(usize, Millis, Reply<ClaimBatch>),
    Report(Vec<Report>, Reply<()>),
}

pub struct SqliteStorage {
    writer: Mutex<Option<mpsc::Sender<Op>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
}

fn open(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open(path)
        .map_err(|e| StorageError::Backend(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsync'd at every commit, so a 2xx survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl SqliteStorage {
    /// Opens with the given dedupe window and the default retention (7 days).
    pub fn open(path: &Path, dedupe_window_ms: Millis) -> Result<SqliteStorage, StorageError> {
        Self::open_with(
            path,
            SqliteOptions {
                dedupe_window_ms,
                retention_ms: Some(7 * 24 * 3600 * 1000),
                prune_every_ms: PRUNE_EVERY_MS,
            },
        )
    }

    /// Opens (creating when needed) the database file and starts the writer.
    pub fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteStorage, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StorageError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = open(path).and_then(|c| {
            check_integrity(&c, path)?;
            Ok(c)
        });
        let conn = conn.map_err(|e| match e {
            StorageError::Backend(why)
                if why.contains("malformed") || why.contains("not a database") =>
            {
                damaged(path, why)
            }
            e => e,
        })?;
        migrate(&conn, path)?;
        // Leases belong to the process that took them; this one owns the file now.
        conn.execute(
            "UPDATE queue SET leased_until = 0 WHERE leased_until <> 0",
            [],
        )?;
        let reader = open(path)?;
        let (tx, rx) = mpsc::channel(4096);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    options,
                    last_prune: 0,
                }
                .run(rx)
            })
            .map_err(|e| StorageError::Backend(format!("cannot start writer: {e}")))?;
        Ok(SqliteStorage {
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, StorageError> {
        let sender = self.writer.lock().expect("writer lock").clone();
        let Some(sender) = sender else {
            return Err(StorageError::Closed);
        };
        let (tx, rx) = oneshot::channel();
        sender
            .send(make(tx))
            .await
            .map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        if self.writer.lock().expect("writer lock").is_none() {
            return Err(StorageError::Closed);
        }
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader.lock().expect("reader lock")))
            .await
            .map_err(|e| StorageError::Backend(format!("reader task: {e}")))?
    }
}

#[async_trait]
impl Storage for SqliteStorage {
    async fn accept(&self, batch: Vec<NewMessage>) -> Result<Vec<Acceptance>, StorageError> {
        self.call(|r| Op::Accept(batch, r)).await
    }

    async fn claim(&self, limit: usize, now: Millis) -> Result<ClaimBatch, StorageError> {
        self.call(|r| Op::Claim(limit, now, r)).await
    }

    async fn report(&self, reports: Vec<Report>) -> Result<(), StorageError> {
        self.call(|r| Op::Report(reports, r)).await
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    async fn get(&self, id: i64) -> Result<Option<StoredMessage>, StorageError> {
        self.read(move |c| {
            Ok(c.query_row(
                &format!("{SELECT_MESSAGE} WHERE m.id = ?1"),
                [id],
                stored_message,
            )
            .optional()?)
        })
        .await
    }

    async fn queue_stats(&self) -> Result<QueueStats, StorageError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT (SELECT COUNT(*) FROM queue), (SELECT m.received_at FROM queue q \
                 JOIN messages m ON m.id = q.message ORDER BY q.seq LIMIT 1), \
                 (SELECT COALESCE(SUM(length(m.payload)), 0) FROM queue q \
                 JOIN messages m ON m.id = q.message)",
                [],
                |r| {
                    Ok(QueueStats {
                        depth: r.get::<_, i64>(0)? as u64,
                        oldest_received_at: r.get(1)?,
                        bytes: r.get::<_, i64>(2)? as u64,
                    })
                },
            )?)
        })
        .await
    }

    async fn list(
        &self,
        filter: MessageFilter,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        self.read(move |c| {
            let (clause, mut args) = where_clause(&filter);
            args.push(Box::new(limit as i64));
            let sql = format!("{SELECT_MESSAGE} WHERE {clause} ORDER BY m.id DESC LIMIT ?");
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), stored_message)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn replay(&self, filter: MessageFilter, now: Millis) -> Result<Vec<i64>, StorageError> {
        self.call(|r| Op::Replay(filter, now, r)).await
    }

    async fn counts(&self) -> Result<Vec<(State, u64)>, StorageError> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT state, COUNT(*) FROM messages GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (state, n) = row?;
                if let Some(s) = State::parse(&state) {
                    out.push((s, n as u64));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn close(&self) {
        // Dropping the sender ends the writer after it has drained its queue.
        self.writer.lock().expect("writer lock").take();
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

const SELECT_MESSAGE: &str = "SELECT m.id, m.message_id, m.source, m.call, m.service_id, m.user_id, \
    m.account_id, m.state, m.code, m.reason, m.payload, m.requests, m.sent, m.attempts, \
    m.last_status, m.last_body, m.last_error, m.received_at, m.updated_at, q.next_attempt_at, \
    m.warnings \
    FROM messages m LEFT JOIN queue q ON q.message = m.id";

fn stored_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let json = |i: usize| -> rusqlite::Result<Option<serde_json::Value>> {
        Ok(r.get::<_, Option<String>>(i)?
            .and_then(|s| serde_json::from_str(&s).ok()))
    };
    let last_status: Option<i64> = r.get(14)?;
    let last_body: Option<String> = r.get(15)?;
    let last_error: Option<String> = r.get(16)?;
    let last_response = (last_status.is_some() || last_body.is_some() || last_error.is_some())
        .then(|| LastResponse {
            status: last_status.map(|s| s as u16),
            body: last_body,
            error: last_error,
        });
    let state: String = r.get(7)?;
    Ok(StoredMessage {
        id: r.get(0)?,
        message_id: r.get(1)?,
        source: r.get(2)?,
        call: r.get(3)?,
        service_id: r.get(4)?,
        user_id: r.get(5)?,
        account_id: r.get(6)?,
        state: State::parse(&state).unwrap_or(State::Pending),
        code: r.get(8)?,
        reason: r.get(9)?,
        payload: json(10)?.unwrap_or_default(),
        requests: json(11)?,
        sent: r.get(12)?,
        attempts: r.get(13)?,
        last_response,
        received_at: r.get(17)?,
        updated_at: r.get(18)?,
        next_attempt_at: r.get(19)?,
        warnings: json(20)?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
    })
}

/// SQL conditions (on `messages m`) and their parameters for a filter.
fn where_clause(f: &MessageFilter) -> (String, Vec<Box<dyn rusqlite::ToSql + Send>>) {
    let mut conds = vec!["1 = 1".to_owned()];
    let mut args: Vec<Box<dyn rusqlite::ToSql + Send>> = Vec::new();
    let mut add = |cond: &str, arg: Box<dyn rusqlite::ToSql + Send>| {
        conds.push(cond.to_owned());
        args.push(arg);
    };
    if let Some(id) = f.id {
        add("m.id = ?", Box::new(id));
    }
    if let Some(s) = f.state {
        add("m.state = ?", Box::new(s.as_str()));
    }
    if let Some(v) = &f.message_id {
        add("m.message_id = ?", Box::new(v.clone()));
    }
    if let Some(v) = &f.user_id {
        add("m.user_id = ?", Box::new(v.clone()));
    }
    if let Some(v) = &f.account_id {
        add("m.account_id = ?", Box::new(v.clone()));
    }
    if let Some(before) = f.before {
        add("m.id < ?", Box::new(before));
    }
    (conds.join(" AND "), args)
}

fn replay(c: &Connection, filter: &MessageFilter, now: Millis) -> Result<Vec<i64>, StorageError> {
    let dead = MessageFilter {
        state: Some(State::Dead),
        ..filter.clone()
    };
    let (clause, args) = where_clause(&dead);
    let ids: Vec<(i64, Option<String>)> = c
        .prepare(&format!(
            "SELECT m.id, m.ordering_key FROM messages m WHERE {clause} \
             ORDER BY m.id LIMIT {REPLAY_MAX}"
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
        enqueue(c, *id, key.as_deref(), now)?;
    }
    Ok(ids.into_iter().map(|(id, _)| id).collect())
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

struct Writer {
    conn: Connection,
    options: SqliteOptions,
    last_prune: Millis,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
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
        let prune = now - self.last_prune >= self.options.prune_every_ms;
        let window = self.options.dedupe_window_ms;
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
            replies.push(apply_in_savepoint(&tx, op, now, window));
        }
        let mut caught_up = true;
        if prune {
            match prune_old(&tx, now, &self.options) {
                Ok(more) => caught_up = !more,
                Err(e) => tracing::warn!(error = %e, "pruning old records failed"),
            }
        }
        match tx.commit() {
            Ok(()) => {
                if prune && caught_up {
                    self.last_prune = now;
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
fn prune_old(c: &Connection, now: Millis, options: &SqliteOptions) -> rusqlite::Result<bool> {
    c.execute("SAVEPOINT prune", [])?;
    let result = (|| {
        c.execute(
            "DELETE FROM dedupe WHERE accepted_at < ?1",
            [now - options.dedupe_window_ms],
        )?;
        let Some(retention) = options.retention_ms else {
            return Ok(false);
        };
        // The state condition matches the partial index messages_finished.
        let deleted = c.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
             WHERE state NOT IN ('pending', 'dead') AND updated_at < ?1 LIMIT ?2)",
            params![now - retention, PRUNE_CHUNK],
        )?;
        Ok(deleted as i64 == PRUNE_CHUNK)
    })();
    match result {
        Ok(more) => c.execute("RELEASE prune", []).map(|_| more),
        Err(e) => {
            c.execute_batch("ROLLBACK TO prune; RELEASE prune")?;
            Err(e)
        }
    }
}

fn fail(op: Op, e: &StorageError) {
    match op {
        Op::Accept(_, r) => drop(r.send(Err(e.clone()))),
        Op::Replay(_, _, r) => drop(r.send(Err(e.clone()))),
        Op::Claim(_, _, r) => drop(r.send(Err(e.clone()))),
        Op::Report(_, r) => drop(r.send(Err(e.clone()))),
    }
}

/// Runs one operation in a savepoint, so a failing one leaves the others intact.
fn apply_in_savepoint(tx: &Transaction<'_>, op: Op, now: Millis, window: Millis) -> Deferred {
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
    match op {
        Op::Accept(batch, r) => run(tx, r, |c| accept(c, batch, now, window)),
        Op::Replay(filter, at, r) => run(tx, r, |c| replay(c, &filter, at)),
        Op::Claim(limit, at, r) => run(tx, r, |c| claim(c, limit, at)),
        Op::Report(reports, r) => run(tx, r, |c| report(c, reports, now)),
    }
}

fn accept(
    c: &Connection,
    batch: Vec<NewMessage>,
    now: Millis,
    window: Millis,
) -> Result<Vec<Acceptance>, StorageError> {
    let mut seen =
        c.prepare_cached("SELECT accepted_at FROM dedupe WHERE source = ?1 AND message_id = ?2")?;
    let mut remember = c.prepare_cached(
        "INSERT INTO dedupe (source, message_id, accepted_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (source, message_id) DO UPDATE SET accepted_at = excluded.accepted_at",
    )?;
    let mut insert = c.prepare_cached(
        "INSERT INTO messages (message_id, source, call, service_id, user_id, account_id, state, \
         code, reason, payload, settings, received_at, updated_at, ordering_key, warnings, \
         page_category) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14, ?15)",
    )?;
    let mut out = Vec::with_capacity(batch.len());
    for m in batch {
        let accepted_at: Option<Millis> = seen
            .query_row(params![m.source, m.message_id], |r| r.get(0))
            .optional()?;
        let duplicate = accepted_at.is_some_and(|t| t >= now - window);
        let (state, code, reason) = if duplicate {
            (
                State::Duplicate,
                Some("duplicate".to_owned()),
                Some(format!("messageId {:?} was already accepted", m.message_id)),
            )
        } else {
            (m.state, m.code, m.reason)
        };
        // Page categories follow acceptance order: read before this
        // message's own update, after the earlier messages of the batch.
        let user = m.user_id.as_deref().filter(|_| !duplicate);
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
            m.payload,
            m.settings,
            m.received_at,
            m.ordering_key,
            (!m.warnings.is_empty()).then(|| serde_json::json!(m.warnings).to_string()),
            page_category,
        ])?;
        let id = c.last_insert_rowid();
        if duplicate {
            out.push(Acceptance::Duplicate { id });
            continue;
        }
        remember.execute(params![m.source, m.message_id, now])?;
        if state == State::Pending {
            enqueue(c, id, m.ordering_key.as_deref(), m.received_at.min(now))?;
        }
        out.push(Acceptance::Stored { id });
    }
    Ok(out)
}

/// Queues a message behind what its key already has; it is the head when the
/// key has nothing queued, and always when it has no key.
fn enqueue(c: &Connection, id: i64, key: Option<&str>, due: Millis) -> Result<(), StorageError> {
    match key {
        Some(key) => c
            .prepare_cached(
                "INSERT INTO queue (message, ordering_key, next_attempt_at, enqueued_at, head) \
                 VALUES (?1, ?2, ?3, ?3, NOT EXISTS (SELECT 1 FROM queue WHERE ordering_key = ?2))",
            )?
            .execute(params![id, key, due])?,
        None => c
            .prepare_cached(
                "INSERT INTO queue (message, ordering_key, next_attempt_at, enqueued_at, head) \
                 VALUES (?1, NULL, ?2, ?2, 1)",
            )?
            .execute(params![id, due])?,
    };
    Ok(())
}

/// Takes a message out of the queue; when it was its key's head, the next
/// message of that key becomes the head.
fn dequeue(c: &Connection, id: i64) -> Result<(), StorageError> {
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

fn claim(c: &Connection, limit: usize, now: Millis) -> Result<ClaimBatch, StorageError> {
    let mut due = c.prepare_cached(
        "SELECT seq FROM queue WHERE head = 1 AND next_attempt_at <= ?1 AND leased_until <= ?1 \
         ORDER BY next_attempt_at, seq LIMIT ?2",
    )?;
    let seqs: Vec<i64> = due
        .query_map(params![now, limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut lease = c.prepare_cached("UPDATE queue SET leased_until = ?2 WHERE seq = ?1")?;
    let mut load = c.prepare_cached(
        "SELECT m.id, m.payload, m.settings, m.requests, m.sent, m.attempts, m.received_at, \
                m.page_category, m.source, q.enqueued_at \
         FROM queue q JOIN messages m ON m.id = q.message WHERE q.seq = ?1",
    )?;
    let mut messages = Vec::with_capacity(seqs.len());
    for seq in seqs {
        lease.execute(params![seq, now + LEASE_MS])?;
        messages.push(load.query_row([seq], |r| {
            Ok(Claimed {
                id: r.get(0)?,
                payload: r.get(1)?,
                settings: r.get(2)?,
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

fn report(c: &Connection, reports: Vec<Report>, now: Millis) -> Result<(), StorageError> {
    let mut update = c.prepare_cached(
        "UPDATE messages SET requests = COALESCE(?2, requests), sent = ?3, \
         attempts = attempts + ?4, state = ?5, code = ?6, reason = ?7, \
         last_status = CASE WHEN ?12 THEN ?8 ELSE last_status END, \
         last_body = CASE WHEN ?12 THEN ?9 ELSE last_body END, \
         last_error = CASE WHEN ?12 THEN ?10 ELSE last_error END, \
         updated_at = ?11, settings = COALESCE(?13, settings) WHERE id = ?1",
    )?;
    let mut reschedule = c.prepare_cached(
        "UPDATE queue SET next_attempt_at = ?2, leased_until = 0 WHERE message = ?1",
    )?;
    let mut queued = c.prepare_cached("SELECT 1 FROM queue WHERE message = ?1")?;
    for r in reports {
        // A report for a message no longer queued is stale (its lease ran out
        // and another attempt finished it): it must not overwrite that result.
        if !queued.exists([r.id])? {
            tracing::warn!(id = r.id, "ignoring a stale delivery report");
            continue;
        }
        let (state, code, reason) = match &r.disposition {
            Disposition::Delivered => (State::Delivered, None, None),
            Disposition::Retry { .. } => (State::Pending, None, None),
            Disposition::Dead { code, reason } => {
                (State::Dead, Some(code.clone()), Some(reason.clone()))
            }
            Disposition::Final {
                state,
                code,
                reason,
            } => (*state, code.clone(), reason.clone()),
        };
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
    Ok(())
}
