//! Answers commit groups once their WAL frames are on disk.
//!
//! The writer commits with `synchronous=NORMAL`: SQLite writes a commit's
//! WAL frames without an fsync, while checkpoints still sync the WAL and then
//! the database file before the WAL is reused. Each committed group's answers
//! come here; this thread syncs the WAL file and then answers every group
//! committed before the sync started. A `2xx` so still means the message is
//! on disk, as with `synchronous=FULL`, but the writer runs the next group
//! while the disk syncs the last one instead of waiting for it.
//!
//! A failed sync is not retried: after a failed `fdatasync` the kernel may
//! have dropped the pages it could not write, and a later sync can succeed
//! without them. The storage stops instead (every later write and `ping`
//! fail), and a restart recovers the file from what is on disk.

use super::writer::{Done, Op};
use crate::storage::{Cause, StorageError};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Committed groups waiting for their sync at most; the writer waits when
/// the disk falls this far behind.
const PENDING_GROUPS: usize = 16;

/// Makes every write issued so far durable.
pub(super) type SyncFn = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// A committed group: its operations and what each produced.
pub(super) struct Committed {
    pub ops: Vec<Op>,
    pub results: Vec<Result<Done, StorageError>>,
}

/// Set once a sync failed: the storage refuses writes from then on.
#[derive(Clone, Default)]
pub(super) struct Failed(Arc<AtomicBool>);

impl Failed {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release)
    }

    /// The error every operation gets once a sync failed.
    pub fn error() -> StorageError {
        StorageError::Unavailable(
            "the disk did not confirm a write of the database's WAL; restart the server \
             to recover the file from what is on disk"
                .into(),
        )
    }
}

/// Syncs the WAL file beside the database at `path` (`<path>-wal`, which
/// SQLite keeps while any connection is open), after syncing the directory
/// once so that the WAL's own name is durable.
pub(super) fn wal_sync(path: &Path) -> Result<SyncFn, StorageError> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let open_error = |e: std::io::Error, what: &Path| {
        StorageError::Unavailable(
            Cause::of(e).context(format_args!("cannot open {}", what.display())),
        )
    };
    let wal_path = Path::new(&wal);
    let file = std::fs::File::open(wal_path).map_err(|e| open_error(e, wal_path))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| open_error(e, dir))?;
    file.sync_all().map_err(|e| open_error(e, wal_path))?;
    Ok(Box::new(move || file.sync_data()))
}

/// Starts the thread that syncs and answers.
pub(super) fn start(
    sync: SyncFn,
    failed: Failed,
) -> Result<(SyncSender<Committed>, JoinHandle<()>), StorageError> {
    let (tx, rx) = sync_channel(PENDING_GROUPS);
    let thread = std::thread::Builder::new()
        .name("sqlite-sync".into())
        .spawn(move || run(rx, sync, failed))
        .map_err(|e| {
            StorageError::Unavailable(Cause::of(e).context("cannot start the WAL sync thread"))
        })?;
    Ok((tx, thread))
}

fn run(rx: Receiver<Committed>, mut sync: SyncFn, failed: Failed) {
    while let Ok(first) = rx.recv() {
        // Everything committed so far shares this sync.
        let groups: Vec<Committed> = std::iter::once(first).chain(rx.try_iter()).collect();
        let error = if failed.is_set() {
            Some(Failed::error())
        } else {
            match sync() {
                Ok(()) => None,
                Err(e) => {
                    tracing::error!(error = %e, "syncing the database's WAL failed; writes stop");
                    failed.set();
                    Some(Failed::error())
                }
            }
        };
        for group in groups {
            for (op, result) in group.ops.into_iter().zip(group.results) {
                op.answer(result, error.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::SqliteStorage;
    use super::SyncFn;
    use crate::storage::{NewMessage, State, Storage, StorageOptions, now_millis};
    use std::sync::mpsc;
    use std::time::Duration;

    fn message(id: &str) -> NewMessage {
        NewMessage {
            source: "web".to_owned(),
            message_id: id.to_owned(),
            call: "track".to_owned(),
            service_id: "svc".to_owned(),
            user_id: Some("u1".to_owned()),
            account_id: None,
            ordering_key: None,
            payload: format!(r#"{{"type":"track","userId":"u1","messageId":"{id}"}}"#).into(),
            settings: "{}".to_owned().into(),
            state: State::Pending,
            code: None,
            reason: None,
            warnings: Vec::new(),
            received_at: now_millis(),
            set_page_category: None,
            needs_page_category: false,
        }
    }

    /// A stand-in for the disk: each sync waits for the test to say how it
    /// ends.
    fn gated_disk(dir: &std::path::Path) -> (SqliteStorage, mpsc::Sender<std::io::Result<()>>) {
        let (tell, told) = mpsc::channel::<std::io::Result<()>>();
        let storage =
            SqliteStorage::open_syncing(&dir.join("td.db"), StorageOptions::default(), move |_| {
                let sync: SyncFn = Box::new(move || {
                    told.recv()
                        .unwrap_or_else(|_| Err(std::io::Error::other("test ended")))
                });
                Ok(sync)
            })
            .unwrap();
        (storage, tell)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_accept_is_answered_only_once_the_wal_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, disk) = gated_disk(dir.path());
        let storage = std::sync::Arc::new(storage);
        let s = storage.clone();
        let mut accept = tokio::spawn(async move { s.accept(vec![message("m1")]).await });
        // Committed (readers see it) but not answered while the sync waits.
        let stored = || async {
            let counts = storage.counts().await.unwrap();
            counts.iter().map(|(_, n)| n).sum::<u64>()
        };
        let mut waited = 0;
        while stored().await == 0 {
            assert!(waited < 200, "never committed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut accept)
                .await
                .is_err(),
            "answered before the WAL was synced"
        );
        disk.send(Ok(())).unwrap();
        let accepted = accept.await.unwrap().unwrap();
        assert_eq!(accepted.len(), 1);
        // Later groups are synced (and answered) the same way.
        let s = storage.clone();
        let second = tokio::spawn(async move { s.accept(vec![message("m2")]).await });
        disk.send(Ok(())).unwrap();
        assert_eq!(second.await.unwrap().unwrap().len(), 1);
        storage.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_fails_its_writes_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, disk) = gated_disk(dir.path());
        disk.send(Err(std::io::Error::other("EIO"))).unwrap();
        let err = storage.accept(vec![message("m1")]).await.unwrap_err();
        assert!(err.to_string().contains("did not confirm"), "{err}");
        // No further sync is asked for: writes and the readiness check fail.
        let err = storage.accept(vec![message("m2")]).await.unwrap_err();
        assert!(err.to_string().contains("did not confirm"), "{err}");
        assert!(storage.ping().await.is_err());
        storage.close().await;
    }
}
