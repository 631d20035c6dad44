//! Storage that could not be opened at start. The server still runs (health,
//! readiness with the reason, the operator page) instead of exiting into a
//! restart loop; every storage call fails with the reason until a backend is
//! installed (after a passing failure, by a background retry).

use super::*;
use std::sync::{OnceLock, RwLock};

pub struct LateStorage {
    inner: OnceLock<Arc<dyn Storage>>,
    why: RwLock<StorageError>,
    notify: Arc<Notify>,
    /// Counts made before a backend is installed (none are expected).
    counters: HistoryCounters,
}

impl LateStorage {
    /// Storage that fails every call with `why` until [`LateStorage::install`].
    pub fn failed(why: StorageError) -> LateStorage {
        LateStorage {
            inner: OnceLock::new(),
            why: RwLock::new(why),
            notify: Arc::new(Notify::new()),
            counters: HistoryCounters::default(),
        }
    }

    /// Starts using `storage`; wakes whoever waits for work.
    pub fn install(&self, storage: Arc<dyn Storage>) {
        if self.inner.set(storage).is_ok() {
            self.notify.notify_waiters();
        }
    }

    /// Records why the latest attempt to open failed.
    pub fn still_failing(&self, why: StorageError) {
        *self.why.write().expect("why lock") = why;
    }

    fn get(&self) -> Result<&Arc<dyn Storage>, StorageError> {
        self.inner
            .get()
            .ok_or_else(|| self.why.read().expect("why lock").clone())
    }
}

#[async_trait]
impl Storage for LateStorage {
    async fn accept_with(
        &self,
        batch: Vec<NewMessage>,
        options: AcceptOptions,
    ) -> Result<Vec<Acceptance>, AcceptError> {
        self.get()?.accept_with(batch, options).await
    }
    async fn claim(&self, limit: usize) -> Result<ClaimBatch, StorageError> {
        self.get()?.claim(limit).await
    }
    async fn report(&self, reports: Vec<Report>) -> Result<Vec<i64>, StorageError> {
        self.get()?.report(reports).await
    }
    fn notifier(&self) -> Arc<Notify> {
        match self.inner.get() {
            Some(s) => s.notifier(),
            None => self.notify.clone(),
        }
    }
    fn holds_claims(&self) -> bool {
        self.inner.get().is_some_and(|s| s.holds_claims())
    }
    fn erasures(&self) -> u64 {
        self.inner.get().map_or(0, |s| s.erasures())
    }
    fn erasures_are_exact(&self) -> bool {
        self.inner.get().is_some_and(|s| s.erasures_are_exact())
    }
    async fn holds_claim(&self, id: i64, lease: i64) -> Result<bool, StorageError> {
        self.get()?.holds_claim(id, lease).await
    }
    async fn pause_endpoint(&self, endpoint: &str, until: Millis) -> Result<(), StorageError> {
        self.get()?.pause_endpoint(endpoint, until).await
    }
    async fn paused_endpoints(&self) -> Result<Vec<(String, Millis)>, StorageError> {
        self.get()?.paused_endpoints().await
    }
    async fn ping(&self) -> Result<(), StorageError> {
        self.get()?.ping().await
    }
    async fn get(&self, id: i64) -> Result<Option<StoredMessage>, StorageError> {
        LateStorage::get(self)?.get(id).await
    }
    async fn queue_stats(&self) -> Result<QueueStats, StorageError> {
        self.get()?.queue_stats().await
    }
    async fn list(
        &self,
        filter: MessageFilter,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        self.get()?.list(filter, limit).await
    }
    async fn replay(&self, filter: MessageFilter) -> Result<Vec<i64>, StorageError> {
        self.get()?.replay(filter).await
    }
    async fn counts(&self) -> Result<Vec<(State, u64)>, StorageError> {
        self.get()?.counts().await
    }
    async fn erase_user(&self, erase: Erase) -> Result<Erased, StorageError> {
        self.get()?.erase_user(erase).await
    }
    async fn suppress(&self, user_id: &str, reason: &str) -> Result<bool, StorageError> {
        self.get()?.suppress(user_id, reason).await
    }
    async fn lift_suppression(&self, user_id: &str) -> Result<bool, StorageError> {
        self.get()?.lift_suppression(user_id).await
    }
    async fn suppressions(&self) -> Result<Vec<Suppression>, StorageError> {
        self.get()?.suppressions().await
    }
    async fn record_audit(&self, entry: AuditEntry) -> Result<(), StorageError> {
        self.get()?.record_audit(entry).await
    }
    async fn audit_log(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StorageError> {
        self.get()?.audit_log(before, limit).await
    }
    async fn close(&self) {
        if let Some(s) = self.inner.get() {
            s.close().await;
        }
    }
    async fn entity_attributes(
        &self,
        kind: EntityKind,
        id: &str,
    ) -> Result<Vec<EntityAttribute>, StorageError> {
        self.get()?.entity_attributes(kind, id).await
    }
    async fn entity_activity(
        &self,
        kind: EntityKind,
        id: &str,
        since_day: i64,
    ) -> Result<Vec<DailyActivity>, StorageError> {
        self.get()?.entity_activity(kind, id, since_day).await
    }
    fn history_counters(&self) -> &HistoryCounters {
        match self.inner.get() {
            Some(s) => s.history_counters(),
            None => &self.counters,
        }
    }
    async fn add_history(&self, rows: Vec<HistoryRow>) -> Result<(), StorageError> {
        self.get()?.add_history(rows).await
    }
    async fn history(&self, query: HistoryQuery) -> Result<Vec<HistoryRow>, StorageError> {
        self.get()?.history(query).await
    }
    async fn prune_history(&self, before: Millis) -> Result<u64, StorageError> {
        self.get()?.prune_history(before).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Until a backend is installed no claim is held; then claims and
    /// erasures are the backend's own (a wrapper that kept the trait's
    /// answers would let delivery send on claims a replica may have lost).
    #[tokio::test]
    async fn claims_and_erasures_are_the_installed_backends() {
        let late = LateStorage::failed(StorageError::Closed);
        assert!(!late.holds_claims());
        assert_eq!(late.erasures(), 0);
        assert!(!late.erasures_are_exact());
        assert!(late.holds_claim(1, 1).await.is_err());
        let dir = tempfile::tempdir().unwrap();
        let sqlite =
            SqliteStorage::open_with(&dir.path().join("td.db"), StorageOptions::default()).unwrap();
        late.install(Arc::new(sqlite));
        assert!(late.holds_claims());
        assert!(late.erasures_are_exact());
        late.erase_user(Erase {
            user_id: "alice".into(),
            suppress: false,
            reason: "test".into(),
        })
        .await
        .unwrap();
        assert_eq!(late.erasures(), 1);
        assert!(!late.holds_claim(1, 1).await.unwrap());
        late.close().await;
    }
}
