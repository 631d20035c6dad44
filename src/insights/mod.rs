//! Account insights: read Totango's per-account insights (health,
//! engagement, active users…) through its Search API, write them into
//! Salesforce Account fields, and serve a small widget for the CRM page.
//!
//! Independent of the Segment → Totango path: it shares the configuration
//! and the HTTP server, not the message queue.

pub mod by_hand;
pub mod model;
pub mod salesforce;
pub mod store;
pub mod sync;
pub mod totango;
pub mod widget;

pub use crate::config::insights::InsightsConfig;
pub use by_hand::operator_routes;
pub use widget::{Target, mac_input, routes, sign};

use crate::config::Runtime;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use store::{Store, StoreError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One run at a time per store file in this process: the schedule's and
/// those started by hand (`POST /api/insights/runs`).
static RUNNING: LazyLock<Mutex<Vec<(PathBuf, RunLock)>>> = LazyLock::new(Default::default);

type RunLock = Arc<tokio::sync::Mutex<()>>;

/// The lock a run of this configuration holds while it runs.
fn run_lock(runtime: &Runtime) -> RunLock {
    let path = runtime.config.insights.snapshot_path(&runtime.storage);
    let mut locks = RUNNING.lock().expect("insights run locks");
    if let Some((_, lock)) = locks.iter().find(|(p, _)| *p == path) {
        return lock.clone();
    }
    let lock = RunLock::default();
    locks.push((path, lock.clone()));
    lock
}

/// Each store file, opened once per process and shared by the schedule and
/// the widget.
static STORES: Mutex<Vec<(PathBuf, Arc<Store>)>> = Mutex::new(Vec::new());

/// The store at `path`, opening it (creating its tables) the first time.
/// Blocks: call it on the blocking pool.
fn shared_store(path: PathBuf) -> Result<Arc<Store>, StoreError> {
    let mut stores = STORES.lock().expect("insights stores lock");
    if let Some((_, store)) = stores.iter().find(|(p, _)| *p == path) {
        return Ok(store.clone());
    }
    let store = Arc::new(Store::open(&path)?);
    stores.push((path, store.clone()));
    Ok(store)
}

/// Runs `f` on this configuration's insights store, on the blocking pool
/// (its calls are blocking SQLite calls): the one way async code reaches it.
pub async fn with_store<T: Send + 'static>(
    runtime: &Runtime,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let path = runtime.config.insights.snapshot_path(&runtime.storage);
    tokio::task::spawn_blocking(move || f(shared_store(path)?.as_ref())).await?
}

/// Runs a sync and keeps its result: snapshots of the accounts read and the
/// summary. Dry runs keep nothing.
pub async fn sync_and_store(
    runtime: &Runtime,
    dry_run: bool,
    progress: &dyn sync::Progress,
) -> Result<sync::RunOutcome, StoreError> {
    if !dry_run {
        // A store that cannot be opened fails before Totango is asked.
        with_store(runtime, |_| Ok(())).await?;
    }
    let mut outcome = sync::run_once(&runtime.config, dry_run, progress).await;
    if !dry_run {
        let accounts = std::mem::take(&mut outcome.accounts);
        let summary = outcome.summary.clone();
        let (accounts, id) = with_store(runtime, move |store| {
            if !accounts.is_empty() {
                store.save_snapshots(&accounts)?;
            }
            let id = store.save_run(&summary)?;
            Ok((accounts, id))
        })
        .await?;
        outcome.accounts = accounts;
        outcome.summary.id = Some(id);
    }
    Ok(outcome)
}

/// The scheduled sync inside `serve`.
pub struct Scheduler {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Stops the schedule (an unfinished run is abandoned) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// Starts the sync every `insights.interval_secs` when `insights.enabled`;
/// the first run starts right away.
pub fn spawn(runtime: Arc<Runtime>) -> Scheduler {
    let stop = CancellationToken::new();
    if !runtime.config.insights.enabled {
        return Scheduler { stop, task: None };
    }
    let every = Duration::from_secs(runtime.config.insights.interval_secs);
    let token = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok(running) = run_lock(&runtime).try_lock_owned() else {
                tracing::info!(
                    "scheduled insights sync skipped: a sync started by hand is running"
                );
                tokio::select! {
                    _ = tokio::time::sleep(every) => continue,
                    _ = token.cancelled() => return,
                }
            };
            tokio::select! {
                outcome = sync_and_store(&runtime, false, &sync::NoProgress) => match outcome {
                    Ok(o) => {
                        let s = &o.summary;
                        tracing::info!(
                            status = ?s.status,
                            accounts_read = s.accounts_read,
                            records_updated = s.records_updated,
                            records_failed = s.records_failed,
                            message = s.message.as_deref().unwrap_or(""),
                            "insights sync finished"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "insights sync could not be stored"),
                },
                _ = token.cancelled() => {
                    tracing::info!("insights sync abandoned: shutting down");
                    return;
                }
            }
            drop(running);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = token.cancelled() => return,
            }
        }
    });
    Scheduler {
        stop,
        task: Some(task),
    }
}
