//! Account insights: read Totango's per-account insights (health,
//! engagement, active users…) through its Search API, write them into
//! Salesforce Account fields, and serve a small widget for the CRM page.
//!
//! Independent of the Segment → Totango path: it shares the configuration
//! and the HTTP server, not the message queue.

pub mod cli;

pub mod model;
pub mod salesforce;
pub mod store;
pub mod sync;
pub mod totango;
mod widget;

pub use crate::config::insights::InsightsConfig;
pub use widget::{Target, mac_input, routes, sign};

use crate::config::Runtime;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Opens the insights store of this configuration.
pub fn open_store(runtime: &Runtime) -> Result<Store, store::StoreError> {
    Store::open(&runtime.config.insights.snapshot_path(&runtime.storage))
}

/// Runs a sync and keeps its result: snapshots of the accounts read and the
/// summary. Dry runs keep nothing.
pub async fn sync_and_store(
    runtime: &Runtime,
    dry_run: bool,
    progress: &dyn sync::Progress,
) -> Result<sync::RunOutcome, store::StoreError> {
    let store = if dry_run {
        None
    } else {
        Some(open_store(runtime)?)
    };
    let mut outcome = sync::run_once(&runtime.config, dry_run, progress).await;
    if let Some(store) = store {
        if !outcome.accounts.is_empty() {
            store.save_snapshots(&outcome.accounts)?;
        }
        outcome.summary.id = Some(store.save_run(&outcome.summary)?);
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
