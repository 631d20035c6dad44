//! The storage backends the storage suites run against. SQLite always; the
//! PostgreSQL runs need `TEST_DATABASE_URL` and are skipped (with a message)
//! without it. Each opened storage has its own file or database.

#![allow(dead_code)]

use std::sync::Arc;
use totango_destination::storage::{SqliteStorage, Storage, StorageOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An open storage and what keeps its place alive (a temporary directory or
/// database, removed when this is dropped).
pub struct Opened {
    pub storage: Arc<dyn Storage>,
    _place: Box<dyn std::any::Any + Send + Sync>,
}

impl std::ops::Deref for Opened {
    type Target = Arc<dyn Storage>;
    fn deref(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

/// Options for tests: a long lease unless a test shortens it.
pub fn options() -> StorageOptions {
    StorageOptions {
        lease_ms: 60_000,
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
                    _place: Box::new(dir),
                })
            }
            Backend::Postgres => {
                eprintln!("skipping the PostgreSQL run: this build has no PostgreSQL backend");
                None
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
                    $crate::backends::block_on(super::$name($crate::backends::Backend::Sqlite));
                }
                #[test]
                fn postgres() {
                    $crate::backends::block_on(super::$name($crate::backends::Backend::Postgres));
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
