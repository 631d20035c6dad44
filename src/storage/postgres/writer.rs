//! The writer task: accept calls are gathered into group transactions (one
//! commit for many requests, as the SQLite writer does) and answered after
//! the commit, up to [`GROUPS_AT_ONCE`] groups at a time; an operation that
//! fails on its own data is retried alone, so it fails only itself. Pruning
//! runs after a group, one replica at a time.

use super::*;

/// Accept calls one transaction groups at most.
const MAX_GROUP: usize = 1024;

/// Messages one transaction groups at most (a longer batch still goes whole).
const MAX_GROUP_MESSAGES: usize = 5_000;

/// When this process pruned last, and whether it has more to prune.
#[derive(Default)]
pub(super) struct PruneClock {
    last: Option<Instant>,
    behind: bool,
    running: bool,
    /// Up to where payloads were dropped by retention (delivered, refused).
    dropped_to: [Millis; 2],
}

pub(super) struct AcceptCall {
    pub(super) batch: Vec<NewMessage>,
    pub(super) options: AcceptOptions,
    pub(super) reply: oneshot::Sender<Result<Vec<Acceptance>, AcceptError>>,
}

/// Groups committing at once. A group's commit is a few round trips to the
/// database and a WAL flush; while one waits, the next is written on another
/// connection of the pool. Concurrent groups are as safe as concurrent
/// replicas: keys are locked in order (`lock_keys`), dedupe holds by its
/// primary key, a deadlock or duplicate is retried or isolated per call.
/// Measured (docs/performance.md): 2 and 3 gave the same rate, 6 less.
const GROUPS_AT_ONCE: usize = 2;

pub(super) async fn write_loop(inner: Arc<Inner>, rx: mpsc::Receiver<AcceptCall>) {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..GROUPS_AT_ONCE {
        loops.spawn(group_loop(inner.clone(), rx.clone()));
    }
    while loops.join_next().await.is_some() {}
}

/// Takes the waiting calls as one group, commits it, and again; ends when
/// every sender is gone.
async fn group_loop(inner: Arc<Inner>, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<AcceptCall>>>) {
    loop {
        let group = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut messages = first.batch.len();
            let mut group = vec![first];
            while group.len() < MAX_GROUP && messages < MAX_GROUP_MESSAGES {
                match rx.try_recv() {
                    Ok(call) => {
                        messages += call.batch.len();
                        group.push(call);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        inner.commit_group(group).await;
    }
}

impl Inner {
    /// Commits a group of accept calls and answers each.
    async fn commit_group(&self, group: Vec<AcceptCall>) {
        let results = self.accept_group(&group).await;
        // Pruning before the answers (as the SQLite writer does, in its
        // commit): a caller sees retention applied once its accept returns.
        self.maybe_prune().await;
        for (call, result) in group.into_iter().zip(results) {
            let _ = call.reply.send(result);
        }
    }

    async fn accept_group(
        &self,
        group: &[AcceptCall],
    ) -> Vec<Result<Vec<Acceptance>, AcceptError>> {
        let all = || {
            group
                .iter()
                .flat_map(|c| c.batch.iter())
                .collect::<Vec<&NewMessage>>()
        };
        if group.iter().any(|c| c.options.first_unseen) {
            // Checked per call, in its own savepoint.
            return self.accept_each(group).await;
        }
        let mut result = self.accept_together(&all()).await;
        if group.len() == 1 {
            if matches!(result, Err(StorageError::Conflict(_))) {
                // A deadlock or a concurrent duplicate: once more, afresh.
                result = self.accept_together(&all()).await;
            }
            return vec![result.map_err(AcceptError::from)];
        }
        match result {
            Ok(mut acceptances) => group
                .iter()
                .map(|c| Ok(acceptances.drain(..c.batch.len()).collect()))
                .collect(),
            Err(e @ StorageError::Unavailable(_)) => group
                .iter()
                .map(|_| Err(AcceptError::from(e.clone())))
                .collect(),
            // One call's failure must not fail the others: each in a savepoint.
            Err(_) => self.accept_each(group).await,
        }
    }

    /// Every message of the group in one pass (the usual case).
    async fn accept_together(
        &self,
        batch: &[&NewMessage],
    ) -> Result<Vec<Acceptance>, StorageError> {
        let mut tx = queue::begin_hot(&self.pool).await?;
        let out = queue::accept(
            &mut tx,
            batch,
            self.options.dedupe_window_ms,
            self.options.max_refused_bytes,
        )
        .await?;
        // The accept statement itself told the other replicas.
        tx.commit().await?;
        if out.queued {
            self.notify.notify_one();
        }
        Ok(out.acceptances)
    }

    /// Each call of the group in its own savepoint of one transaction.
    async fn accept_each(&self, group: &[AcceptCall]) -> Vec<Result<Vec<Acceptance>, AcceptError>> {
        let all_fail = |e: StorageError| {
            group
                .iter()
                .map(|_| Err(AcceptError::from(e.clone())))
                .collect()
        };
        let mut tx = match queue::begin_hot(&self.pool).await {
            Ok(tx) => tx,
            Err(e) => return all_fail(e),
        };
        // Every call's keys at once, in order, before the first savepoint: a
        // call locking its own keys after an earlier call's would take them
        // out of order, and deadlock with another group or replica.
        let keys = group
            .iter()
            .flat_map(|c| c.batch.iter())
            .filter_map(|m| m.ordering_key.as_deref().map(text::text_key))
            .collect();
        if let Err(e) = queue::lock_keys(&mut tx, keys).await {
            return all_fail(e);
        }
        let mut results = Vec::with_capacity(group.len());
        let mut queued = false;
        for call in group {
            if let Err(e) = sqlx::query("SAVEPOINT accept").execute(&mut *tx).await {
                return all_fail(e.into());
            }
            let batch: Vec<&NewMessage> = call.batch.iter().collect();
            let accepted = async {
                if let (true, Some(first)) = (call.options.first_unseen, batch.first()) {
                    if queue::message_id_stored_locked(&mut tx, &first.message_id).await? {
                        return Err(AcceptError::AlreadyStored(first.message_id.clone()));
                    }
                }
                Ok(queue::accept(
                    &mut tx,
                    &batch,
                    self.options.dedupe_window_ms,
                    self.options.max_refused_bytes,
                )
                .await?)
            }
            .await;
            let step = match accepted {
                Ok(out) => {
                    queued |= out.queued;
                    sqlx::query("RELEASE SAVEPOINT accept")
                        .execute(&mut *tx)
                        .await
                        .map(|_| Ok(out.acceptances))
                }
                Err(e) => sqlx::query("ROLLBACK TO SAVEPOINT accept")
                    .execute(&mut *tx)
                    .await
                    .map(|_| Err(e)),
            };
            match step {
                Ok(result) => results.push(result),
                Err(e) => return all_fail(e.into()),
            }
        }
        // Each accept statement told the other replicas of what it queued.
        let committed = tx.commit().await.map_err(StorageError::from);
        match committed {
            Ok(()) => {
                if queued {
                    self.notify.notify_one();
                }
                results
            }
            Err(e) => all_fail(e),
        }
    }

    /// Prunes one chunk when it is time (or when the last one was full).
    pub(super) async fn maybe_prune(&self) {
        let mut marks;
        {
            let mut clock = self.prune.lock().expect("prune lock");
            let every = Duration::from_millis(self.options.prune_every_ms.max(0) as u64);
            let due = clock.behind || clock.last.is_none_or(|t| t.elapsed() >= every);
            if clock.running || !due {
                return;
            }
            clock.running = true;
            marks = clock.dropped_to;
        }
        let outcome = async {
            let mut tx = self.pool.begin().await?;
            let more = queue::prune(
                &mut tx,
                self.options.dedupe_window_ms,
                self.options.retention_ms,
                self.options.refused_retention_ms,
            )
            .await?;
            // Only the replica holding the prune lock drops payloads.
            let dropped = match more {
                Some(_) => {
                    queue::drop_payloads(&mut tx, &self.options.payload_retention, &mut marks)
                        .await?
                }
                None => false,
            };
            tx.commit().await?;
            Ok::<_, StorageError>(more.map(|m| m || dropped))
        }
        .await;
        let mut clock = self.prune.lock().expect("prune lock");
        clock.running = false;
        clock.last = Some(Instant::now());
        if outcome.is_ok() {
            clock.dropped_to = marks;
        }
        clock.behind = match outcome {
            Ok(more) => more == Some(true),
            Err(e) => {
                tracing::warn!(error = %e, "pruning old records failed");
                false
            }
        };
    }
}
