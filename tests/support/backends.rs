//! The storage backends the storage suites run against. SQLite always; the
//! PostgreSQL runs need `TEST_DATABASE_URL` and are skipped (with a message)
//! without it. Each opened storage has its own file or database.

use std::sync::Arc;
use totango_destination::storage::{PostgresStorage, SqliteStorage, Storage, StorageOptions};

use super::pg;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An open storage and what keeps its place alive (a temporary directory or
/// database, removed when this is dropped).
pub struct Opened {
    pub storage: Arc<dyn Storage>,
    /// The database's URL (PostgreSQL).
    pub url: Option<String>,
    /// The database file (SQLite), for tests that look into it.
    pub path: Option<std::path::PathBuf>,
    _place: Box<dyn std::any::Any + Send + Sync>,
}

impl Opened {
    /// Claims this storage holds stop being held, the way they would when
    /// their holder was lost: on SQLite by outwaiting the lease `lease_ms`,
    /// on PostgreSQL by the replica being judged gone.
    pub async fn lose_claims(&self, lease_ms: i64) {
        match &self.url {
            None => {
                tokio::time::sleep(std::time::Duration::from_millis(lease_ms as u64 + 100)).await
            }
            Some(url) => pg::judge_replicas_gone(url, None).await,
        }
    }
}

impl std::ops::Deref for Opened {
    type Target = Arc<dyn Storage>;
    fn deref(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

/// Options for tests: a long lease unless a test shortens it, and a quick
/// heartbeat (with room for a loaded machine before a replica is judged gone).
pub fn options() -> StorageOptions {
    StorageOptions {
        lease_ms: 60_000,
        heartbeat_ms: 200,
        replica_timeout_ms: 3_000,
        ..StorageOptions::default()
    }
}

impl Backend {
    /// Opens a fresh storage, or `None` (after saying why) when this backend
    /// cannot run here.
    pub async fn open(self, options: StorageOptions) -> Option<Opened> {
        match self {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let path = dir.path().join("td.db");
                let storage =
                    SqliteStorage::open_with(&path, options).expect("open SQLite storage");
                Some(Opened {
                    storage: Arc::new(storage),
                    url: None,
                    path: Some(path),
                    _place: Box::new(dir),
                })
            }
            Backend::Postgres => {
                let db = pg::TestDatabase::create("the PostgreSQL run")?;
                let storage = PostgresStorage::open(db.url(), options)
                    .await
                    .expect("open PostgreSQL storage");
                Some(Opened {
                    storage: Arc::new(storage),
                    url: Some(db.url().to_owned()),
                    path: None,
                    _place: Box::new(db),
                })
            }
        }
    }
}

/// Runs an async test body once per backend, each as its own `#[test]`.
#[macro_export]
macro_rules! on_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    $crate::support::backends::block_on(super::$name($crate::support::backends::Backend::Sqlite));
                }
                #[test]
                fn postgres() {
                    $crate::support::backends::block_on(super::$name($crate::support::backends::Backend::Postgres));
                }
            }
        )*
    };
}

pub fn block_on<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
