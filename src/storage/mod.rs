//! Durable storage of accepted messages and the delivery queue, behind one
//! trait so backends (embedded SQLite, PostgreSQL) are interchangeable.
//!
//! Storage knows nothing of Segment or Totango semantics: it stores what
//! ingest accepted and what delivery reports.

mod entity;
mod error;
pub mod history;
mod late;
pub mod postgres;
pub mod privacy;
mod sqlite;

pub use entity::{ACTIVITY_DAYS_KEPT, DailyActivity, EntityAttribute, EntityKind, day_of};
pub use error::{AcceptError, Cause, StorageError};
pub use history::{HistoryCounters, HistoryQuery, HistoryRow};
pub use late::LateStorage;
pub use postgres::PostgresStorage;
pub use privacy::{AuditEntry, AuditRecord, Erase, Erased, Suppression};
pub use sqlite::SqliteStorage;

use async_trait::async_trait;
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::Notify;

/// Opens the backend `url` names, running its migrations.
pub async fn open(
    url: &crate::config::StorageUrl,
    options: StorageOptions,
) -> Result<Arc<dyn Storage>, StorageError> {
    use crate::config::StorageUrl;
    match url {
        StorageUrl::Sqlite(path) => {
            let path = path.clone();
            let opened =
                tokio::task::spawn_blocking(move || SqliteStorage::open_with(&path, options))
                    .await
                    .map_err(|e| {
                        StorageError::Unavailable(Cause::of(e).context("opening storage"))
                    })?;
            Ok(Arc::new(opened?))
        }
        StorageUrl::Postgres(url) => Ok(Arc::new(postgres::open(url, options).await?)),
    }
}

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// How long things are kept and leased; the same for every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageOptions {
    /// A `messageId` is a duplicate this long after it was accepted.
    pub dedupe_window_ms: Millis,
    /// Finished messages (all but pending and dead) are deleted this long
    /// after their last change; `None` keeps them forever.
    pub retention_ms: Option<Millis>,
    /// Finished messages that were never to be sent (rejected, duplicate,
    /// filtered, unsupported) are deleted after this long, at most
    /// `retention_ms`; `None`: as `retention_ms`.
    pub refused_retention_ms: Option<Millis>,
    /// How often pruning runs.
    pub prune_every_ms: Millis,
    /// SQLite: how often the messages accepted since the last time are
    /// added to the tables by messageId, user and account (lookups scan the
    /// newer ones; deduplication keeps them in memory). PostgreSQL ignores it.
    pub index_every_ms: Millis,
    /// How long a claim holds a message; a live holder's heartbeat renews
    /// it. The backstop for a holder that vanished unnoticed.
    pub lease_ms: Millis,
    /// How often a process sharing the backend says it is alive.
    pub heartbeat_ms: Millis,
    /// A process not heard from for this long is gone: its claims are
    /// claimable again at once.
    pub replica_timeout_ms: Millis,
    /// Connections a networked backend keeps (SQLite ignores it).
    pub pool_size: u32,
    /// Bytes refused messages may keep with their payloads (0: no bound).
    pub max_refused_bytes: u64,
    /// How long payloads are kept, by outcome, before they are dropped
    /// (the row, its outcome and counts stay until `retention_ms`).
    pub payload_retention: PayloadRetention,
}

/// How long stored payloads (and settings, translated requests, Totango's
/// answer) are kept after a message's last change, by outcome; `None`:
/// as long as the row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PayloadRetention {
    pub delivered_ms: Option<Millis>,
    /// Rejected, duplicate, filtered, unsupported.
    pub refused_ms: Option<Millis>,
    pub dead_ms: Option<Millis>,
}

impl PayloadRetention {
    /// The outcomes whose payloads are dropped, as both backends go through
    /// them: how long each keeps its payloads, the SQL condition on `state`,
    /// and which watermark it advances (delivered 0, refused 1; dead
    /// messages are few and looked at whole).
    pub(crate) fn groups(&self) -> [(Option<Millis>, &'static str, Option<usize>); 3] {
        [
            (self.delivered_ms, "state = 'delivered'", Some(0)),
            (
                self.refused_ms,
                "state NOT IN ('pending', 'dead', 'delivered')",
                Some(1),
            ),
            (self.dead_ms, "state = 'dead'", None),
        ]
    }
}

/// The warning kept with a message whose payload was dropped by retention.
pub const PAYLOAD_DROPPED: &str = "payload dropped after its retention (privacy.*_payload_secs)";

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            dedupe_window_ms: 24 * 3600 * 1000,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            refused_retention_ms: Some(24 * 3600 * 1000),
            prune_every_ms: 60 * 1000,
            index_every_ms: 500,
            lease_ms: 10 * 60 * 1000,
            heartbeat_ms: 3 * 1000,
            replica_timeout_ms: 15 * 1000,
            pool_size: 8,
            max_refused_bytes: 256 * 1024 * 1024,
            payload_retention: PayloadRetention::default(),
        }
    }
}

/// Where a message stands. `Pending` is the only state with queue work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Delivered,
    Filtered,
    Unsupported,
    Duplicate,
    Rejected,
    Dead,
    /// Not sent because its user was erased or is suppressed (no payload kept).
    Suppressed,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Pending,
        State::Delivered,
        State::Filtered,
        State::Unsupported,
        State::Duplicate,
        State::Rejected,
        State::Dead,
        State::Suppressed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Filtered => "filtered",
            State::Unsupported => "unsupported",
            State::Duplicate => "duplicate",
            State::Rejected => "rejected",
            State::Dead => "dead",
            State::Suppressed => "suppressed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Never to be sent ([`REFUSED_STATES`]).
    pub fn is_refused(self) -> bool {
        matches!(
            self,
            State::Rejected
                | State::Duplicate
                | State::Filtered
                | State::Unsupported
                | State::Suppressed
        )
    }
}

/// JSON text as stored (a message's payload, its request settings): made by
/// serializing JSON, so it parses; kept as text, since that is what storage
/// holds and what delivery decodes. Reads as a `str`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredJson(String);

impl StoredJson {
    /// The text of `value`.
    pub fn of(value: &serde_json::Value) -> StoredJson {
        StoredJson(value.to_string())
    }

    /// `{}`: what a message keeps when its payload or settings are not kept.
    pub fn empty() -> StoredJson {
        StoredJson(EMPTY_JSON.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Text that is JSON already (serialized, or read back from storage).
impl From<String> for StoredJson {
    fn from(text: String) -> StoredJson {
        StoredJson(text)
    }
}

impl From<&str> for StoredJson {
    fn from(text: &str) -> StoredJson {
        StoredJson(text.to_owned())
    }
}

impl std::ops::Deref for StoredJson {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StoredJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message as ingest accepted it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Configured source name (never the write key itself).
    pub source: String,
    pub message_id: String,
    pub call: String,
    pub service_id: String,
    pub user_id: Option<String>,
    pub account_id: Option<String>,
    /// Messages with the same key are delivered in acceptance order (a user's
    /// or an account's attribute updates); `None`: no order, always claimable.
    pub ordering_key: Option<String>,
    /// The Segment message as accepted (JSON).
    pub payload: StoredJson,
    /// Settings the request itself carried (`X-Segment-Settings`), as a JSON
    /// settings patch; the rest comes from the configuration at delivery time.
    pub settings: StoredJson,
    /// `Pending` to deliver, or a final state decided at ingest.
    pub state: State,
    pub code: Option<String>,
    pub reason: Option<String>,
    /// What the mapping noticed but sent anyway (an unreadable create date).
    pub warnings: Vec<String>,
    pub received_at: Millis,
    /// `Some(Some(c))`: remember `c` as the latest page category of
    /// (service_id, user_id); `Some(None)`: forget it; `None`: leave it.
    /// Applied at acceptance in batch order, whatever `state` is.
    pub set_page_category: Option<Option<String>>,
    /// Store the (service_id, user_id) latest page category as it stands at
    /// acceptance (after earlier messages of the batch) with this message.
    pub needs_page_category: bool,
}

/// How a batch is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptOptions {
    /// The batch is stored only if no message with the first message's
    /// `messageId` is stored yet (from any source, whatever its state);
    /// otherwise nothing is stored and the call fails with
    /// [`StorageError::AlreadyStored`]. Checked and recorded atomically:
    /// of concurrent batches with the same first `messageId` (on every
    /// replica sharing the storage), at most one is stored.
    pub first_unseen: bool,
}

/// Who accepts a batch: a label (the ingest interface, for metrics) and the
/// options. A bare label means the default options.
#[derive(Debug, Clone, Copy)]
pub struct AcceptAs {
    pub label: &'static str,
    pub options: AcceptOptions,
}

impl From<&'static str> for AcceptAs {
    fn from(label: &'static str) -> AcceptAs {
        AcceptAs {
            label,
            options: AcceptOptions::default(),
        }
    }
}

/// What became of one accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    Stored {
        id: i64,
    },
    /// Its `messageId` was accepted within the dedupe window; recorded, not queued.
    Duplicate {
        id: i64,
    },
}

/// A queued message handed to a delivery worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    /// The lease this claim holds; the report must carry it back. A report
    /// whose lease is no longer current (it ran out and the message was
    /// claimed again) is ignored.
    pub lease: i64,
    /// The configured source (write key name) it came through.
    pub source: String,
    pub payload: StoredJson,
    pub settings: StoredJson,
    /// Translated requests (JSON), once the first attempt has translated it.
    pub requests: Option<String>,
    /// How many of `requests` Totango already accepted.
    pub sent: u32,
    pub attempts: u32,
    pub received_at: Millis,
    /// When retrying started to count: acceptance, or the last replay.
    pub retry_from: Millis,
    /// The user's latest page category at acceptance, stored for messages
    /// that asked for it (`NewMessage::needs_page_category`).
    pub latest_page_category: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ClaimBatch {
    pub messages: Vec<Claimed>,
    /// The earliest future time a queued message becomes due, if any.
    pub next_due: Option<Millis>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub depth: u64,
    pub oldest_received_at: Option<Millis>,
    /// Stored size of the queued messages, bytes: payload, request settings
    /// (`X-Segment-Settings`), messageId, translated requests, last answer.
    pub bytes: u64,
    /// Stored size of the refused messages kept (payload, settings,
    /// messageId), counted as they are stored and pruned.
    pub refused_bytes: u64,
}

/// Which stored messages an operator means. Every field narrows the set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageFilter {
    pub id: Option<i64>,
    pub state: Option<State>,
    pub message_id: Option<String>,
    pub user_id: Option<String>,
    pub account_id: Option<String>,
    /// Only messages older than this id (the next page of a newest-first list).
    pub before: Option<i64>,
}

/// Totango's last answer to a message, kept for the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LastResponse {
    pub status: Option<u16>,
    pub body: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Delivered,
    Retry {
        next_attempt_at: Millis,
    },
    Dead {
        code: String,
        reason: String,
    },
    /// A final state found while delivering (for example `filtered`).
    Final {
        state: State,
        code: Option<String>,
        reason: Option<String>,
    },
}

impl Disposition {
    /// The state a message takes, with its code and reason (`Pending` for a retry).
    pub fn outcome(&self) -> (State, Option<&str>, Option<&str>) {
        match self {
            Disposition::Delivered => (State::Delivered, None, None),
            Disposition::Retry { .. } => (State::Pending, None, None),
            Disposition::Dead { code, reason } => (State::Dead, Some(code), Some(reason)),
            Disposition::Final {
                state,
                code,
                reason,
            } => (*state, code.as_deref(), reason.as_deref()),
        }
    }
}

/// A delivery worker's report on one claimed message.
#[derive(Debug, Clone)]
pub struct Report {
    pub id: i64,
    /// `Claimed::lease` of the claim this reports on.
    pub lease: i64,
    /// Requests translated on this attempt (JSON), to keep for later attempts.
    pub requests: Option<String>,
    pub sent: u32,
    /// Whether a request was sent (counts as an attempt).
    pub attempted: bool,
    pub disposition: Disposition,
    pub last: Option<LastResponse>,
    /// New request settings to keep (`Some`): the API token a request brought
    /// is dropped once the message is finished and will not be sent again.
    pub settings: Option<String>,
}

/// A stored message, for the operator view and tests.
#[derive(Debug, Clone, Serialize)]
pub struct StoredMessage {
    pub id: i64,
    pub message_id: String,
    pub source: String,
    pub call: String,
    pub service_id: String,
    pub user_id: Option<String>,
    pub account_id: Option<String>,
    pub state: State,
    pub code: Option<String>,
    pub reason: Option<String>,
    pub warnings: Vec<String>,
    pub payload: serde_json::Value,
    pub requests: Option<serde_json::Value>,
    pub sent: u32,
    pub attempts: u32,
    pub last_response: Option<LastResponse>,
    pub received_at: Millis,
    pub updated_at: Millis,
    pub next_attempt_at: Option<Millis>,
}

/// States of finished messages that were never to be sent; their own
/// (shorter) retention applies.
pub const REFUSED_STATES: &str =
    "('rejected', 'duplicate', 'filtered', 'unsupported', 'suppressed')";

/// The warning kept with a refused message stored without its payload.
pub const PAYLOAD_NOT_KEPT: &str =
    "payload not kept: refused messages fill storage.max_refused_bytes";

/// What refused messages store, against `storage.max_refused_bytes`: each
/// backend reads the stored total in the accepting transaction and adds to
/// it, and pruning takes off what it deletes. Past the bound a refused
/// message is kept without payload and settings (its outcome, reason and
/// ids stay), so a client sending only junk grows the disk by its ids at
/// most and never stops anyone's ingest.
pub(crate) struct RefusedBudget {
    used: i64,
    max: i64,
    /// Bytes this transaction adds.
    pub added: i64,
}

impl RefusedBudget {
    pub fn new(used: i64, max_bytes: u64) -> RefusedBudget {
        RefusedBudget {
            used,
            max: i64::try_from(max_bytes).unwrap_or(i64::MAX),
            added: 0,
        }
    }

    /// The payload and settings to store for a refused message, or `None`
    /// for empty ones (over the bound); counts what is stored.
    pub fn keep<'a>(
        &mut self,
        payload: &'a str,
        settings: &'a str,
        message_id: &str,
    ) -> Option<(&'a str, &'a str)> {
        let full = refused_size(payload, settings, message_id);
        if self.max == 0 || self.used + self.added + full <= self.max {
            self.added += full;
            return Some((payload, settings));
        }
        self.added += refused_size(EMPTY_JSON, EMPTY_JSON, message_id);
        None
    }
}

/// What a refused message stored without payload and settings holds there.
pub const EMPTY_JSON: &str = "{}";

/// The bytes a refused message counts: as the backends' SQL sums them
/// (lengths of payload, settings and messageId in UTF-8).
pub fn refused_size(payload: &str, settings: &str, message_id: &str) -> i64 {
    (payload.len() + settings.len() + message_id.len()) as i64
}

/// The durable queue. Every method that returns `Ok` has committed.
///
/// Several processes may share one backend (PostgreSQL replicas): claims
/// are held while their holder lives and never handed to two live holders,
/// times are the backend's clock, and results come back with the lease
/// they answer.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Stores a batch whole (all or nothing): dedupes by (source, messageId)
    /// within the window and queues `Pending` messages. Signals the notifier
    /// when it queued something.
    async fn accept(&self, batch: Vec<NewMessage>) -> Result<Vec<Acceptance>, StorageError> {
        match self.accept_with(batch, AcceptOptions::default()).await {
            Ok(out) => Ok(out),
            Err(AcceptError::Storage(e)) => Err(e),
            Err(AcceptError::AlreadyStored(id)) => Err(StorageError::Conflict(
                format!("messageId {id:?} already stored (no option asked for this check)").into(),
            )),
        }
    }

    /// [`Storage::accept`] with options, checked in the same transaction.
    async fn accept_with(
        &self,
        batch: Vec<NewMessage>,
        options: AcceptOptions,
    ) -> Result<Vec<Acceptance>, AcceptError>;

    /// Leases up to `limit` due messages (by the backend's clock): messages
    /// without an ordering key, and at most one per ordering key, the oldest
    /// queued message of its key, unless another live lease holds it.
    async fn claim(&self, limit: usize) -> Result<ClaimBatch, StorageError>;

    /// Records delivery results and releases their leases. A report whose
    /// lease is no longer the message's current one is ignored (it must not
    /// overwrite a newer result); returns the ids of the reports ignored so.
    async fn report(&self, reports: Vec<Report>) -> Result<Vec<i64>, StorageError>;

    /// Signalled when work may have become claimable (accepted, replayed,
    /// released), in this process or, where the backend can tell, another.
    /// Waiters should still poll: a signal may be missed.
    fn notifier(&self) -> Arc<Notify>;

    /// Whether claims this process holds are still its own. A backend shared
    /// by replicas says `false` once others may have judged this process
    /// gone (and taken its claims): delivery then sends nothing more until
    /// it is `true` again. (No default: a wrapper must pass it on.)
    fn holds_claims(&self) -> bool;

    /// Erasures this process knows of: its own, and on storage shared by
    /// replicas the others' as they are announced. An erase cancels the
    /// user's claimed messages too, so delivery re-checks a claim
    /// ([`Storage::holds_claim`]) before sending when this changed since
    /// the claim.
    fn erasures(&self) -> u64;

    /// Whether [`Storage::erasures`] counts every erase that can cancel this
    /// process's claims (one process per storage). When it cannot (replicas
    /// learn of each other's erasures by announcements, which can be lost),
    /// delivery also re-checks a claim after waiting for a probe.
    fn erasures_are_exact(&self) -> bool;

    /// Whether `lease` still holds message `id` (not cancelled by an erase,
    /// not expired and taken by another claim, not reported).
    async fn holds_claim(&self, id: i64, lease: i64) -> Result<bool, StorageError>;

    /// Pauses sending to a Totango endpoint until `until` (Totango answered
    /// 429), for every process sharing this storage. Extends, never shortens.
    async fn pause_endpoint(&self, endpoint: &str, until: Millis) -> Result<(), StorageError>;

    /// Endpoints paused now, with the time each pause ends.
    async fn paused_endpoints(&self) -> Result<Vec<(String, Millis)>, StorageError>;

    /// Storage is reachable.
    async fn ping(&self) -> Result<(), StorageError>;

    async fn get(&self, id: i64) -> Result<Option<StoredMessage>, StorageError>;

    /// Queue depth and the acceptance time of the oldest queued message.
    async fn queue_stats(&self) -> Result<QueueStats, StorageError>;

    /// Messages matching `filter`, newest first.
    async fn list(
        &self,
        filter: MessageFilter,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError>;

    /// Queues the `dead` messages matching `filter` again (a fresh retry
    /// window, behind what their ordering key already has queued). Returns their ids.
    async fn replay(&self, filter: MessageFilter) -> Result<Vec<i64>, StorageError>;

    /// Counts by state.
    async fn counts(&self) -> Result<Vec<(State, u64)>, StorageError>;

    /// Erases the payloads of every stored message of `erase.user_id`
    /// (queued and dead ones become `suppressed` and are never sent), its
    /// page category, and keeps a tombstone (a digest of the id, when, why,
    /// how many); suppresses the user when asked. Durable on return.
    async fn erase_user(&self, erase: Erase) -> Result<Erased, StorageError>;

    /// Suppresses a user: its later messages are recorded as `suppressed`,
    /// without payload, never delivered. False when it already was.
    async fn suppress(&self, user_id: &str, reason: &str) -> Result<bool, StorageError>;

    /// Lifts a suppression; false when there was none.
    async fn lift_suppression(&self, user_id: &str) -> Result<bool, StorageError>;

    /// Every suppression, oldest first.
    async fn suppressions(&self) -> Result<Vec<Suppression>, StorageError>;

    /// Keeps an operator action in the audit trail.
    async fn record_audit(&self, entry: AuditEntry) -> Result<(), StorageError>;

    /// The audit trail, newest first, older than `before` when given.
    async fn audit_log(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError>;

    /// Flushes and closes; later calls fail with `Closed`.
    async fn close(&self);

    // Per-account and per-user views (`storage/entity.rs`), kept at delivery.

    /// The last value sent to Totango of each attribute of an account or a
    /// user, by service and name.
    async fn entity_attributes(
        &self,
        kind: EntityKind,
        id: &str,
    ) -> Result<Vec<EntityAttribute>, StorageError>;

    /// Activities sent for an account or a user per UTC day from day
    /// `since_day` on, oldest first; days without any are left out.
    async fn entity_activity(
        &self,
        kind: EntityKind,
        id: &str,
        since_day: i64,
    ) -> Result<Vec<DailyActivity>, StorageError>;

    // The per-minute history behind the operator page's charts
    // (`history.rs`), shared by every process on this storage.

    /// What this process counted for the history and has not written yet:
    /// backends count the messages they store and the outcomes they record;
    /// delivery adds its attempts and round trips.
    fn history_counters(&self) -> &HistoryCounters;

    /// Adds `rows` (whole minutes) into the stored history in one
    /// transaction: counts and round-trip buckets add up, gauges keep the
    /// highest value.
    async fn add_history(&self, rows: Vec<HistoryRow>) -> Result<(), StorageError>;

    /// The stored history of `query.from..query.to`, summed into buckets of
    /// `query.step_ms`, oldest first; buckets with no minutes stored are
    /// left out.
    async fn history(&self, query: HistoryQuery) -> Result<Vec<HistoryRow>, StorageError>;

    /// Deletes the history of minutes before `before`; returns how many
    /// minutes went.
    async fn prune_history(&self, before: Millis) -> Result<u64, StorageError>;
}
