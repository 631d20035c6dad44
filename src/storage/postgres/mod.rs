//! Shared storage: PostgreSQL, so several replicas can serve one queue.
//!
//! Accepts are gathered by one writer task into group transactions (like the
//! SQLite writer) and answered after the commit. Claims, reports and replays
//! run on the pool, each in one short transaction; leases are timed by the
//! database clock. Work queued or released is announced to this process by a
//! `Notify` and to the others by `NOTIFY td_work`.
//!
//! The rooms, as in `sqlite/`: `writer.rs` (group commits of accepts, and
//! pruning), `queue.rs` (the queue's SQL), `reads.rs` (rows for the operator
//! and filters), `replica.rs` (liveness and heartbeats), `listen.rs` (the
//! work signal), `schema.rs` (versioned migrations), `text.rs` (text as
//! PostgreSQL stores and indexes it), `history.rs` (the per-minute history).
//!
//! PostgreSQL text cannot hold NUL characters: they are stored as U+FFFD.

mod entity;
mod history;
mod listen;
mod privacy;
mod queue;
mod reads;
mod replica;
mod schema;
mod text;
mod writer;

use listen::notify_others;
use reads::{Arg, SELECT_MESSAGE, bind_args, stored_message, where_clause};
use replica::{heartbeat, log_beat};
use text::pg_text;
use writer::{AcceptCall, PruneClock, write_loop};

pub use queue::{BEGIN_HOT, accept_sql, claim_sql, report_sql};
pub use schema::SCHEMA_VERSION;

use super::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgConnection, PgPool, Postgres, Row};
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long a call waits for a pooled connection before `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Statements slower than this are logged as warnings.
const SLOW_STATEMENT: Duration = Duration::from_secs(1);

/// PostgreSQL storage; see the module documentation.
pub struct PostgresStorage {
    inner: Arc<Inner>,
    writer: Mutex<Option<mpsc::Sender<AcceptCall>>>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    listener_task: Mutex<Option<JoinHandle<()>>>,
    heartbeat_task: Mutex<Option<JoinHandle<()>>>,
    /// Counts for the history, not yet written.
    counters: HistoryCounters,
}

struct Inner {
    pool: PgPool,
    options: StorageOptions,
    notify: Arc<Notify>,
    closed: AtomicBool,
    prune: Mutex<PruneClock>,
    /// This process's id in `td_replicas` (see `replica.rs`).
    replica: AtomicI64,
    /// When the last heartbeat that reached the database was sent.
    heard: Mutex<Instant>,
    /// The claims this process holds, by lease; held while claiming, so a
    /// clean-up never races a claim.
    held: tokio::sync::Mutex<HeldClaims>,
    /// Erasures this process ran or heard announced (`listen.rs`).
    erasures: Arc<AtomicU64>,
}

/// Leases handed out and not yet reported, and whether a claim failed in a
/// way that may have committed (its answer lost with the connection): then
/// rows may be claimed by this replica that nobody here knows of, and the
/// next heartbeat gives back every claim of this replica not in `leases`.
#[derive(Default)]
struct HeldClaims {
    leases: HashSet<i64>,
    uncertain: bool,
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StorageError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StorageError::Corrupt(Cause::of(e).context("storage.url is not usable")))?;
    Ok(options
        .application_name("totango-destination")
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Warn, SLOW_STATEMENT))
}

/// Opens the database at `url`: connects a pool of `options.pool_size`,
/// brings the schema up to date and starts listening for work other
/// replicas queue.
pub async fn open(url: &str, options: StorageOptions) -> Result<PostgresStorage, StorageError> {
    PostgresStorage::open(url, options).await
}

/// Brings the database at `url` to this build's schema; returns its version.
pub async fn migrate(url: &str) -> Result<u32, StorageError> {
    migrate_to(url, SCHEMA_VERSION).await
}

/// Brings the database at `url` to schema `version` at most (upgrade tests
/// build an older database this way); returns the version it has.
pub async fn migrate_to(url: &str, version: u32) -> Result<u32, StorageError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(connect_options(url)?)
        .await?;
    let version = schema::migrate_to(&pool, version).await;
    pool.close().await;
    version
}

impl PostgresStorage {
    /// See [`open`].
    pub async fn open(url: &str, options: StorageOptions) -> Result<PostgresStorage, StorageError> {
        // A transaction left idle this long has lost its client (a
        // partition): the server ends it and frees its row locks before the
        // others judge the replica gone.
        let idle_in_transaction_ms = options.replica_timeout_ms.max(1000);
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    // Plans fit the tables as they are now: a statement
                    // prepared while the queue was empty must not keep
                    // scanning it whole once it is long (generic plans are
                    // only replanned after an ANALYZE). The busy
                    // transactions set their own (`queue::BEGIN_HOT`:
                    // kept plans of a shape right at any size). JIT only slows down
                    // statements this short. Set here rather than as startup
                    // options, which poolers such as PgBouncer refuse.
                    // The server drops a connection whose client vanished
                    // (a partition leaves it half-open) within seconds, with
                    // the locks of any transaction it had open.
                    conn.execute(
                        format!(
                            "SET plan_cache_mode = force_custom_plan; SET jit = off; \
                             SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                             SET tcp_keepalives_count = 3; \
                             SET idle_in_transaction_session_timeout = {idle_in_transaction_ms}"
                        )
                        .as_str(),
                    )
                    .await
                    .map(|_| ())
                })
            })
            .connect_with(connect_options(url)?)
            .await?;
        schema::migrate(&pool).await?;
        let heard = Instant::now();
        let id = replica::register(&pool, options.replica_timeout_ms).await?;
        // Claims left by replicas that are gone (killed while none was
        // running) are claimable from now on.
        let first = replica::beat(&pool, id, options.replica_timeout_ms, true, true).await?;
        log_beat(&first, id);
        let inner = Arc::new(Inner {
            pool,
            options,
            notify: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            prune: Mutex::new(PruneClock::default()),
            replica: AtomicI64::new(first.id),
            heard: Mutex::new(heard),
            held: tokio::sync::Mutex::new(HeldClaims::default()),
            erasures: Arc::new(AtomicU64::new(0)),
        });
        let (tx, rx) = mpsc::channel(4096);
        let writer_task = tokio::spawn(write_loop(inner.clone(), rx));
        let listener_task = tokio::spawn(listen::listen(
            inner.pool.clone(),
            inner.notify.clone(),
            inner.erasures.clone(),
        ));
        let heartbeat_task = tokio::spawn(heartbeat(inner.clone()));
        Ok(PostgresStorage {
            inner,
            writer: Mutex::new(Some(tx)),
            writer_task: Mutex::new(Some(writer_task)),
            listener_task: Mutex::new(Some(listener_task)),
            heartbeat_task: Mutex::new(Some(heartbeat_task)),
            counters: HistoryCounters::default(),
        })
    }

    /// This process's replica id (it changes if the process was judged gone
    /// and rejoined).
    pub fn replica_id(&self) -> i64 {
        self.inner.replica.load(Ordering::Acquire)
    }

    /// The pool, for tests and tools that inspect the database.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }
}

impl Inner {
    fn check_open(&self) -> Result<(), StorageError> {
        if self.closed.load(Ordering::Acquire) {
            Err(StorageError::Closed)
        } else {
            Ok(())
        }
    }

    /// Failures of calls that raced `close` report `Closed`.
    fn finish<T>(&self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        match result {
            Err(_) if self.closed.load(Ordering::Acquire) => Err(StorageError::Closed),
            r => r,
        }
    }

    /// Whether this replica may hold claims: its last heartbeat reached the
    /// database recently enough that no other replica can have judged it
    /// gone (one heartbeat of margin before the timeout).
    fn holds_claims(&self) -> bool {
        let margin = self
            .options
            .replica_timeout_ms
            .saturating_sub(self.options.heartbeat_ms)
            .max(0) as u64;
        self.heard.lock().expect("heard lock").elapsed() < Duration::from_millis(margin)
    }

    async fn claim(&self, limit: usize) -> Result<ClaimBatch, StorageError> {
        if !self.holds_claims() {
            return Err(StorageError::Unavailable(
                "this replica's heartbeat has not reached the database lately; \
                 not claiming until it does"
                    .into(),
            ));
        }
        let batch = {
            let mut held = self.held.lock().await;
            let claimed = async {
                let mut tx = queue::begin_hot(&self.pool).await?;
                let me = self.replica.load(Ordering::Acquire);
                let batch = queue::claim(&mut tx, limit, self.options.lease_ms, me).await?;
                tx.commit().await?;
                Ok::<_, StorageError>(batch)
            }
            .await;
            match claimed {
                Ok(batch) => {
                    held.leases.extend(batch.messages.iter().map(|m| m.lease));
                    batch
                }
                Err(e) => {
                    held.uncertain = true;
                    return Err(e);
                }
            }
        };
        self.maybe_prune().await;
        Ok(batch)
    }

    /// After a claim that may have committed unseen: gives back this
    /// replica's claims that nobody here holds.
    async fn settle_claims(&self) -> Result<(), StorageError> {
        let mut held = self.held.lock().await;
        if !held.uncertain {
            return Ok(());
        }
        let known: Vec<i64> = held.leases.iter().copied().collect();
        let freed = sqlx::query(
            "UPDATE td_queue SET lease = NULL, leased_until = 0, replica = NULL \
             WHERE replica = $1 AND lease IS NOT NULL AND NOT (lease = ANY($2))",
        )
        .bind(self.replica.load(Ordering::Acquire))
        .bind(&known)
        .execute(&self.pool)
        .await?
        .rows_affected();
        held.uncertain = false;
        if freed > 0 {
            tracing::info!(
                messages = freed,
                "gave back messages claimed by a claim whose answer was lost"
            );
            self.notify.notify_one();
        }
        Ok(())
    }

    async fn report(&self, reports: Vec<Report>) -> Result<Vec<i64>, StorageError> {
        let mut retried = false;
        loop {
            let result = async {
                let mut tx = queue::begin_hot(&self.pool).await?;
                let out = queue::report(&mut tx, &reports).await?;
                if out.promoted {
                    notify_others(&mut tx).await?;
                }
                tx.commit().await?;
                Ok::<_, StorageError>(out)
            }
            .await;
            match result {
                Err(StorageError::Conflict(_)) if !retried => retried = true,
                Err(e) => return Err(e),
                Ok(out) => {
                    {
                        let mut held = self.held.lock().await;
                        for r in &reports {
                            held.leases.remove(&r.lease);
                        }
                    }
                    // What waited behind these messages may be claimable now.
                    self.notify.notify_one();
                    if !out.stale.is_empty() {
                        tracing::warn!(
                            ids = ?out.stale,
                            "ignoring delivery reports whose lease is no longer current"
                        );
                    }
                    return Ok(out.stale);
                }
            }
        }
    }

    async fn replay(&self, filter: MessageFilter) -> Result<Vec<i64>, StorageError> {
        let mut retried = false;
        loop {
            let result = async {
                let mut tx = self.pool.begin().await?;
                let ids = queue::replay(&mut tx, &filter).await?;
                if !ids.is_empty() {
                    notify_others(&mut tx).await?;
                }
                tx.commit().await?;
                Ok::<_, StorageError>(ids)
            }
            .await;
            match result {
                Err(StorageError::Conflict(_)) if !retried => retried = true,
                Err(e) => return Err(e),
                Ok(ids) => {
                    if !ids.is_empty() {
                        self.notify.notify_one();
                    }
                    return Ok(ids);
                }
            }
        }
    }
}

#[async_trait]
impl Storage for PostgresStorage {
    async fn accept_with(
        &self,
        batch: Vec<NewMessage>,
        options: AcceptOptions,
    ) -> Result<Vec<Acceptance>, AcceptError> {
        self.inner.check_open()?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let sender = self.writer.lock().expect("writer lock").clone();
        let Some(sender) = sender else {
            return Err(StorageError::Closed.into());
        };
        let (reply, answer) = oneshot::channel();
        let states: Vec<State> = batch.iter().map(|m| m.state).collect();
        sender
            .send(AcceptCall {
                batch,
                options,
                reply,
            })
            .await
            .map_err(|_| StorageError::Closed)?;
        let out = answer.await.map_err(|_| StorageError::Closed)??;
        self.counters.accepted(
            states
                .into_iter()
                .zip(&out)
                .map(|(s, a)| (s, matches!(a, Acceptance::Duplicate { .. }))),
        );
        Ok(out)
    }

    async fn claim(&self, limit: usize) -> Result<ClaimBatch, StorageError> {
        self.inner.check_open()?;
        self.inner.finish(self.inner.claim(limit).await)
    }

    async fn report(&self, reports: Vec<Report>) -> Result<Vec<i64>, StorageError> {
        self.inner.check_open()?;
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes: Vec<(i64, State)> = reports
            .iter()
            .map(|r| (r.id, r.disposition.outcome().0))
            .collect();
        let stale = self.inner.finish(self.inner.report(reports).await)?;
        for (id, state) in outcomes {
            if let Some(c) = super::history::Count::of_state(state).filter(|_| !stale.contains(&id))
            {
                self.counters.add(c, 1);
            }
        }
        Ok(stale)
    }

    fn notifier(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }

    fn holds_claims(&self) -> bool {
        !self.inner.closed.load(Ordering::Acquire) && self.inner.holds_claims()
    }

    fn erasures(&self) -> u64 {
        self.inner.erasures.load(Ordering::Acquire)
    }

    fn erasures_are_exact(&self) -> bool {
        false
    }

    async fn holds_claim(&self, id: i64, lease: i64) -> Result<bool, StorageError> {
        self.inner.check_open()?;
        let result = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM td_queue WHERE message = $1 AND lease = $2)",
        )
        .bind(id)
        .bind(lease)
        .fetch_one(&self.inner.pool)
        .await;
        self.inner.finish(result.map_err(Into::into))
    }

    async fn pause_endpoint(&self, endpoint: &str, until: Millis) -> Result<(), StorageError> {
        self.inner.check_open()?;
        let result = sqlx::query(
            "INSERT INTO td_paused_endpoints (endpoint, until) VALUES ($1, $2) \
             ON CONFLICT (endpoint) DO UPDATE \
             SET until = GREATEST(td_paused_endpoints.until, EXCLUDED.until)",
        )
        .bind(pg_text(endpoint))
        .bind(until)
        .execute(&self.inner.pool)
        .await;
        self.inner.finish(result.map(|_| ()).map_err(Into::into))
    }

    async fn paused_endpoints(&self) -> Result<Vec<(String, Millis)>, StorageError> {
        self.inner.check_open()?;
        let result = sqlx::query_as(
            "SELECT endpoint, until FROM td_paused_endpoints WHERE until > $1 ORDER BY endpoint",
        )
        .bind(now_millis())
        .fetch_all(&self.inner.pool)
        .await;
        self.inner.finish(result.map_err(Into::into))
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.inner.check_open()?;
        let result = sqlx::query("SELECT 1").execute(&self.inner.pool).await;
        self.inner.finish(result.map(|_| ()).map_err(Into::into))
    }

    async fn get(&self, id: i64) -> Result<Option<StoredMessage>, StorageError> {
        self.inner.check_open()?;
        let result = async {
            let row = sqlx::query(&format!("{SELECT_MESSAGE} WHERE m.id = $1"))
                .bind(id)
                .fetch_optional(&self.inner.pool)
                .await?;
            row.as_ref().map(stored_message).transpose()
        }
        .await;
        self.inner.finish(result)
    }

    async fn queue_stats(&self) -> Result<QueueStats, StorageError> {
        self.inner.check_open()?;
        let result = async {
            let row = sqlx::query(
                "SELECT (SELECT count(*) FROM td_queue), \
                    (SELECT m.received_at FROM td_queue q JOIN td_messages m ON m.id = q.message \
                     ORDER BY q.seq LIMIT 1), \
                    (SELECT COALESCE(sum(size), 0)::bigint FROM td_queue), \
                    (SELECT bytes FROM td_usage WHERE name = 'refused')",
            )
            .fetch_one(&self.inner.pool)
            .await?;
            Ok(QueueStats {
                depth: row.try_get::<i64, _>(0)?.max(0) as u64,
                oldest_received_at: row.try_get(1)?,
                bytes: row.try_get::<i64, _>(2)?.max(0) as u64,
                refused_bytes: row.try_get::<Option<i64>, _>(3)?.unwrap_or(0).max(0) as u64,
            })
        }
        .await;
        self.inner.finish(result)
    }

    async fn list(
        &self,
        filter: MessageFilter,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        self.inner.check_open()?;
        let result = async {
            let (clause, mut args) = where_clause(&filter, 1);
            let sql = format!(
                "{SELECT_MESSAGE} WHERE {clause} ORDER BY m.id DESC LIMIT ${}",
                args.len() + 1
            );
            args.push(Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
            let rows = bind_args(sqlx::query(&sql), args)
                .fetch_all(&self.inner.pool)
                .await?;
            rows.iter().map(stored_message).collect()
        }
        .await;
        self.inner.finish(result)
    }

    async fn replay(&self, filter: MessageFilter) -> Result<Vec<i64>, StorageError> {
        self.inner.check_open()?;
        self.inner.finish(self.inner.replay(filter).await)
    }

    async fn erase_user(&self, erase: Erase) -> Result<Erased, StorageError> {
        self.inner.check_open()?;
        let inner = &self.inner;
        let mut retried = false;
        let result = loop {
            let result = async {
                let mut tx = inner.pool.begin().await?;
                let (erased, promoted) = privacy::erase_user(&mut tx, &erase).await?;
                if promoted {
                    notify_others(&mut tx).await?;
                }
                listen::announce_erase(&mut tx).await?;
                tx.commit().await?;
                Ok::<_, StorageError>((erased, promoted))
            }
            .await;
            match result {
                Err(StorageError::Conflict(_)) if !retried => retried = true,
                r => break r,
            }
        };
        // Counted even when the answer is an error: it may have committed.
        inner.erasures.fetch_add(1, Ordering::AcqRel);
        let result = result.map(|(erased, promoted)| {
            if promoted {
                inner.notify.notify_one();
            }
            erased
        });
        inner.finish(result)
    }

    async fn suppress(&self, user_id: &str, reason: &str) -> Result<bool, StorageError> {
        self.inner.check_open()?;
        let result = async {
            let mut conn = self.inner.pool.acquire().await?;
            privacy::suppress(&mut conn, user_id, reason).await
        }
        .await;
        self.inner.finish(result)
    }

    async fn lift_suppression(&self, user_id: &str) -> Result<bool, StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(privacy::lift(&self.inner.pool, user_id).await)
    }

    async fn suppressions(&self) -> Result<Vec<Suppression>, StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(privacy::suppressions(&self.inner.pool).await)
    }

    async fn record_audit(&self, entry: AuditEntry) -> Result<(), StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(privacy::record_audit(&self.inner.pool, &entry).await)
    }

    async fn audit_log(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(privacy::audit_log(&self.inner.pool, before, limit).await)
    }

    async fn counts(&self) -> Result<Vec<(State, u64)>, StorageError> {
        self.inner.check_open()?;
        let result = sqlx::query_as::<_, (String, i64)>(
            "SELECT state, count(*) FROM td_outcomes GROUP BY state",
        )
        .fetch_all(&self.inner.pool)
        .await;
        let rows = self.inner.finish(result.map_err(Into::into))?;
        Ok(rows
            .into_iter()
            .filter_map(|(state, n)| Some((State::parse(&state)?, n.max(0) as u64)))
            .collect())
    }

    async fn entity_attributes(
        &self,
        kind: EntityKind,
        id: &str,
    ) -> Result<Vec<EntityAttribute>, StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(entity::attributes(&self.inner.pool, kind, id).await)
    }

    async fn entity_activity(
        &self,
        kind: EntityKind,
        id: &str,
        since_day: i64,
    ) -> Result<Vec<DailyActivity>, StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(entity::activity(&self.inner.pool, kind, id, since_day).await)
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        // Dropping the sender ends the writer once it has answered what it holds.
        self.writer.lock().expect("writer lock").take();
        let writer = self.writer_task.lock().expect("writer task lock").take();
        if let Some(task) = writer {
            let _ = task.await;
        }
        let listener = self
            .listener_task
            .lock()
            .expect("listener task lock")
            .take();
        if let Some(task) = listener {
            task.abort();
        }
        let heartbeat = self
            .heartbeat_task
            .lock()
            .expect("heartbeat task lock")
            .take();
        if let Some(task) = heartbeat {
            task.abort();
        }
        // What this replica still holds goes back to the queue now, not
        // after the others judge it gone.
        let me = self.inner.replica.load(Ordering::Acquire);
        match replica::leave(&self.inner.pool, me).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(messages = n, "gave back the messages this replica held"),
            Err(e) => tracing::warn!(
                error = %e,
                "could not leave the replica table; the others take over what this replica held once it times out"
            ),
        }
        self.inner.pool.close().await;
    }

    fn history_counters(&self) -> &HistoryCounters {
        &self.counters
    }

    async fn add_history(&self, rows: Vec<HistoryRow>) -> Result<(), StorageError> {
        self.inner.check_open()?;
        super::history::check_rows(&rows)?;
        if rows.is_empty() {
            return Ok(());
        }
        self.inner
            .finish(history::add(&self.inner.pool, &rows).await)
    }

    async fn history(&self, query: HistoryQuery) -> Result<Vec<HistoryRow>, StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(history::read(&self.inner.pool, query).await)
    }

    async fn prune_history(&self, before: Millis) -> Result<u64, StorageError> {
        self.inner.check_open()?;
        self.inner
            .finish(history::prune(&self.inner.pool, before).await)
    }
}

impl Drop for PostgresStorage {
    fn drop(&mut self) {
        for task in [&self.listener_task, &self.heartbeat_task] {
            if let Some(task) = task.lock().expect("task lock").take() {
                task.abort();
            }
        }
    }
}

impl From<sqlx::Error> for StorageError {
    /// Sorts database failures by SQLSTATE class into passing ones
    /// (connection, resources, shutdown: `Unavailable`; serialization,
    /// deadlock, uniqueness: `Conflict`) and ones retrying does not cure
    /// (damage, or the operation's own data: `Corrupt`).
    fn from(e: sqlx::Error) -> StorageError {
        use sqlx::Error as E;
        let kind: fn(Cause) -> StorageError = match &e {
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let why = format!("{} (SQLSTATE {code})", db.message());
                let class = code.get(..2).unwrap_or("");
                let kind: fn(Cause) -> StorageError = match (code.as_str(), class) {
                    ("40001" | "40P01" | "23505" | "55P03", _) => StorageError::Conflict,
                    // Data corrupted, index corrupted, internal error; schema
                    // objects missing or refused; data a constraint rejects;
                    // a value over a limit (54000: an index entry too long),
                    // caused by the operation's data: not worth retrying,
                    // and (as every error but `Unavailable`) the group
                    // commit isolates the operation that caused it.
                    (_, "XX" | "42" | "22" | "23" | "54") => StorageError::Corrupt,
                    // Connection, resources, shutdown, system errors, and
                    // anything else: may pass.
                    _ => StorageError::Unavailable,
                };
                return kind(Cause::of(e).reworded(|_| why));
            }
            E::Io(_)
            | E::Tls(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed
            | E::Protocol(_)
            | E::BeginFailed => StorageError::Unavailable,
            _ => StorageError::Corrupt,
        };
        kind(Cause::of(e))
    }
}
