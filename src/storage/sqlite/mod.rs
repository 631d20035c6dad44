//! Embedded storage: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! All writes go through one writer thread that commits in groups: every
//! operation waiting when a transaction starts shares it, and its fsync.
//! Callers are answered only after the commit. Reads use their own connection.
//! One process uses a file at a time (a lock file says so), so leases left
//! by an earlier process are released at start without stealing live ones.

mod bulk_index;
mod entity;
mod history;
mod privacy;
mod queue;
mod reads;
mod schema;
mod writer;

use crate::storage::*;
use reads::{SELECT_MESSAGE, stored_message, where_clause};
use rusqlite::{Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
use writer::{Op, Reply, Writer};

pub struct SqliteStorage {
    writer: Mutex<Option<mpsc::Sender<Op>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    notify: Arc<Notify>,
    /// Endpoint → end of its 429 pause (one process per file, so in memory).
    pauses: Mutex<HashMap<String, Millis>>,
    /// Held until closed: a second process on the same file is refused.
    lock: Mutex<Option<std::fs::File>>,
    /// Counts for the history, not yet written.
    counters: HistoryCounters,
    /// The history's own connection (`history.rs`); `None` once closed.
    history_writer: Arc<Mutex<Option<Connection>>>,
    /// Erasures run by this process (the only one on its file).
    erasures: AtomicU64,
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let kind: fn(Cause) -> StorageError = match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::DatabaseCorrupt | C::NotADatabase => StorageError::Corrupt,
                C::ConstraintViolation => StorageError::Conflict,
                _ => StorageError::Unavailable,
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StorageError::Corrupt,
            _ => StorageError::Unavailable,
        };
        kind(Cause::of(e))
    }
}

/// Options that create a file readable and writable by its owner only.
fn private_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Makes the database and its companions (`-wal`, `-shm`, `.lock`) private to
/// the owner: they hold payloads and API tokens. Creates the database file
/// (empty) with mode 0600 when it is missing, since SQLite creates the WAL and
/// shm files with the database file's mode; narrows files that exist.
fn make_private(path: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |p: &Path, e: std::io::Error| {
        StorageError::Unavailable(
            Cause::of(e).context(format_args!("cannot restrict {} to its owner", p.display())),
        )
    };
    if let Err(e) = private_options().create(true).append(true).open(path) {
        return Err(fail(path, e));
    }
    for suffix in ["", "-wal", "-shm", "-journal", ".lock"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        match std::fs::metadata(&file) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                let mode = m.permissions().mode() & 0o700 | 0o600;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| fail(&file, e))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(&file, e)),
        }
    }
    Ok(())
}

/// Takes the file's lock (`<file>.lock`), or says which file is in use.
fn lock(path: &Path) -> Result<std::fs::File, StorageError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = private_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            StorageError::Unavailable(
                Cause::of(e).context(format_args!("cannot open {}", lock_path.display())),
            )
        })?;
    match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
        Ok(true) => Ok(file),
        Ok(false) => Err(StorageError::Unavailable(
            format!(
                "{} is in use by another server process; one process uses a SQLite file \
                 (run several replicas on PostgreSQL)",
                path.display()
            )
            .into(),
        )),
        Err(e) => Err(StorageError::Unavailable(
            Cause::of(e).context(format_args!("cannot lock {}", lock_path.display())),
        )),
    }
}

impl SqliteStorage {
    /// Opens with the given dedupe window and default options otherwise.
    pub fn open(path: &Path, dedupe_window_ms: Millis) -> Result<SqliteStorage, StorageError> {
        Self::open_with(
            path,
            StorageOptions {
                dedupe_window_ms,
                ..StorageOptions::default()
            },
        )
    }

    /// Opens (creating when needed) the database file and starts the writer.
    pub fn open_with(path: &Path, options: StorageOptions) -> Result<SqliteStorage, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StorageError::Unavailable(
                    Cause::of(e).context(format_args!("cannot create {}", dir.display())),
                )
            })?;
        }
        let file_lock = lock(path)?;
        make_private(path)?;
        let conn = schema::open(path).and_then(|c| {
            schema::check_integrity(&c, path)?;
            Ok(c)
        });
        let conn = conn.map_err(|e| match e {
            StorageError::Corrupt(why) => schema::damaged(path, why),
            e => e,
        })?;
        schema::migrate(&conn, path)?;
        // The lock proves no other process holds a lease on this file: what
        // an earlier process leased and never reported is due again.
        conn.execute(
            "UPDATE queue SET leased_until = 0, lease = 0 WHERE lease <> 0 OR leased_until <> 0",
            [],
        )?;
        let suppressions = privacy::any_suppressed(&conn)?;
        let tail = bulk_index::Tail::load(&conn)?;
        let reader = schema::open(path)?;
        let history_writer = schema::open(path)?;
        let (tx, rx) = mpsc::channel(4096);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    options,
                    last_prune: 0,
                    last_index: 0,
                    tail,
                    lease: 0,
                    dropped_to: [0; 2],
                    suppressions,
                }
                .run(rx)
            })
            .map_err(|e| StorageError::Unavailable(Cause::of(e).context("cannot start writer")))?;
        Ok(SqliteStorage {
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Arc::new(Mutex::new(reader)),
            notify: Arc::new(Notify::new()),
            pauses: Mutex::new(HashMap::new()),
            lock: Mutex::new(Some(file_lock)),
            counters: HistoryCounters::default(),
            history_writer: Arc::new(Mutex::new(Some(history_writer))),
            erasures: AtomicU64::new(0),
        })
    }

    /// Upgrades the file's schema and says which version it has.
    pub fn migrate(path: &Path) -> Result<i64, StorageError> {
        let _lock = lock(path)?;
        make_private(path)?;
        let conn = schema::open(path)?;
        schema::check_integrity(&conn, path)?;
        schema::migrate(&conn, path)?;
        Ok(schema::SCHEMA_VERSION)
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

    /// Runs `f` on the history's connection.
    async fn write_history<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let conn = self.history_writer.clone();
        tokio::task::spawn_blocking(move || match &mut *conn.lock().expect("history lock") {
            Some(c) => f(c),
            None => Err(StorageError::Closed),
        })
        .await
        .map_err(|e| StorageError::Unavailable(Cause::of(e).context("history task")))?
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
            .map_err(|e| StorageError::Unavailable(Cause::of(e).context("reader task")))?
    }
}

#[async_trait]
impl Storage for SqliteStorage {
    async fn accept_with(
        &self,
        batch: Vec<NewMessage>,
        options: AcceptOptions,
    ) -> Result<Vec<Acceptance>, AcceptError> {
        let queues = batch.iter().any(|m| m.state == State::Pending);
        let states: Vec<State> = batch.iter().map(|m| m.state).collect();
        let out = self
            .call(|r| Op::Accept(batch, options, r))
            .await?
            .map_err(AcceptError::AlreadyStored)?;
        if queues {
            self.notify.notify_one();
        }
        self.counters.accepted(
            states
                .into_iter()
                .zip(&out)
                .map(|(s, a)| (s, matches!(a, Acceptance::Duplicate { .. }))),
        );
        Ok(out)
    }

    async fn claim(&self, limit: usize) -> Result<ClaimBatch, StorageError> {
        self.call(|r| Op::Claim(limit, r)).await
    }

    async fn report(&self, reports: Vec<Report>) -> Result<Vec<i64>, StorageError> {
        let outcomes: Vec<(i64, State)> = reports
            .iter()
            .map(|r| (r.id, r.disposition.outcome().0))
            .collect();
        let stale = self.call(|r| Op::Report(reports, r)).await?;
        // What waited behind these messages may be claimable now.
        self.notify.notify_one();
        for (id, state) in outcomes {
            if let Some(c) =
                crate::storage::history::Count::of_state(state).filter(|_| !stale.contains(&id))
            {
                self.counters.add(c, 1);
            }
        }
        Ok(stale)
    }

    fn notifier(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    fn holds_claims(&self) -> bool {
        true
    }

    fn erasures(&self) -> u64 {
        self.erasures.load(Ordering::Acquire)
    }

    fn erasures_are_exact(&self) -> bool {
        true
    }

    async fn holds_claim(&self, id: i64, lease: i64) -> Result<bool, StorageError> {
        self.read(move |c| queue::holds_claim(c, id, lease)).await
    }

    async fn pause_endpoint(&self, endpoint: &str, until: Millis) -> Result<(), StorageError> {
        let mut pauses = self.pauses.lock().expect("pause lock");
        let entry = pauses.entry(endpoint.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
        Ok(())
    }

    async fn paused_endpoints(&self) -> Result<Vec<(String, Millis)>, StorageError> {
        let now = now_millis();
        let mut pauses = self.pauses.lock().expect("pause lock");
        pauses.retain(|_, until| *until > now);
        Ok(pauses.iter().map(|(e, u)| (e.clone(), *u)).collect())
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
                "SELECT COUNT(*), (SELECT m.received_at FROM queue q \
                 JOIN messages m ON m.id = q.message ORDER BY q.seq LIMIT 1), \
                 COALESCE(SUM(size), 0), (SELECT bytes FROM usage WHERE name = 'refused') \
                 FROM queue",
                [],
                |r| {
                    Ok(QueueStats {
                        depth: r.get::<_, i64>(0)? as u64,
                        oldest_received_at: r.get(1)?,
                        bytes: r.get::<_, i64>(2)? as u64,
                        refused_bytes: r.get::<_, Option<i64>>(3)?.unwrap_or(0).max(0) as u64,
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

    async fn replay(&self, filter: MessageFilter) -> Result<Vec<i64>, StorageError> {
        let ids = self.call(|r| Op::Replay(filter, r)).await?;
        if !ids.is_empty() {
            self.notify.notify_one();
        }
        Ok(ids)
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

    async fn erase_user(&self, erase: Erase) -> Result<Erased, StorageError> {
        let erased = self.call(|r| Op::Erase(erase, r)).await;
        // Counted even when the answer is an error: it may have committed.
        self.erasures.fetch_add(1, Ordering::AcqRel);
        let erased = erased?;
        // What waited behind cancelled messages may be claimable now.
        self.notify.notify_one();
        Ok(erased)
    }

    async fn suppress(&self, user_id: &str, reason: &str) -> Result<bool, StorageError> {
        let (user, reason) = (user_id.to_owned(), reason.to_owned());
        self.call(|r| Op::Suppress(user, reason, r)).await
    }

    async fn lift_suppression(&self, user_id: &str) -> Result<bool, StorageError> {
        let user = user_id.to_owned();
        self.call(|r| Op::Lift(user, r)).await
    }

    async fn suppressions(&self) -> Result<Vec<Suppression>, StorageError> {
        self.read(privacy::suppressions).await
    }

    async fn record_audit(&self, entry: AuditEntry) -> Result<(), StorageError> {
        self.call(|r| Op::Audit(entry, r)).await
    }

    async fn audit_log(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        self.read(move |c| privacy::audit_log(c, before, limit))
            .await
    }

    async fn entity_attributes(
        &self,
        kind: EntityKind,
        id: &str,
    ) -> Result<Vec<EntityAttribute>, StorageError> {
        let id = id.to_owned();
        self.read(move |c| entity::attributes(c, kind, &id)).await
    }

    async fn entity_activity(
        &self,
        kind: EntityKind,
        id: &str,
        since_day: i64,
    ) -> Result<Vec<DailyActivity>, StorageError> {
        let id = id.to_owned();
        self.read(move |c| entity::activity(c, kind, &id, since_day))
            .await
    }

    async fn close(&self) {
        // Dropping the sender ends the writer after it has drained its queue.
        self.writer.lock().expect("writer lock").take();
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.history_writer.lock().expect("history lock").take();
        // Written and closed: another process may have the file now.
        self.lock.lock().expect("lock lock").take();
    }

    fn history_counters(&self) -> &HistoryCounters {
        &self.counters
    }

    async fn add_history(&self, rows: Vec<HistoryRow>) -> Result<(), StorageError> {
        crate::storage::history::check_rows(&rows)?;
        self.write_history(move |c| history::add(c, &rows)).await
    }

    async fn history(&self, query: HistoryQuery) -> Result<Vec<HistoryRow>, StorageError> {
        self.read(move |c| history::read(c, query)).await
    }

    async fn prune_history(&self, before: Millis) -> Result<u64, StorageError> {
        self.write_history(move |c| history::prune(c, before)).await
    }
}
