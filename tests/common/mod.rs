//! Shared by the integration test binaries: the real server on port 0 with a
//! real SQLite file in a temporary directory, or its own PostgreSQL database
//! when `TD_TEST_BACKEND=postgres` (on `TEST_DATABASE_URL`'s server).
#![allow(dead_code)]

pub mod pg;

use std::sync::Arc;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use totango_destination::config::Config;
use totango_destination::server::{RunError, open_storage, run_with_storage};
use totango_destination::storage::Storage;

/// Where a test keeps its files and its storage: a temporary directory and,
/// when `TD_TEST_BACKEND=postgres`, a database of its own (dropped with this).
/// Dereferences to the directory.
pub struct TestPlace {
    dir: TempDir,
    db: Option<pg::TestDatabase>,
}

impl std::ops::Deref for TestPlace {
    type Target = TempDir;
    fn deref(&self) -> &TempDir {
        &self.dir
    }
}

impl TestPlace {
    /// The `storage.url` of this place.
    pub fn storage_url(&self) -> String {
        match &self.db {
            Some(db) => db.url().to_owned(),
            None => format!("sqlite://{}", self.dir.path().join("td.db").display()),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.db.is_some()
    }
}

/// A fresh place on the backend `TD_TEST_BACKEND` names (`sqlite`, the
/// default, or `postgres`).
pub fn place() -> TestPlace {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = match std::env::var("TD_TEST_BACKEND").as_deref() {
        Ok("postgres") => Some(
            pg::TestDatabase::create("TD_TEST_BACKEND=postgres")
                .expect("TD_TEST_BACKEND=postgres needs TEST_DATABASE_URL"),
        ),
        Ok("sqlite") | Ok("") | Err(_) => None,
        Ok(other) => panic!("TD_TEST_BACKEND={other:?}: expected sqlite or postgres"),
    };
    TestPlace { dir, db }
}

/// Defaults with a fresh storage, a service ID and `endpoint` as Totango.
pub fn config(place: &TestPlace, endpoint: &str) -> Config {
    let mut c = Config::default();
    c.storage.url = place.storage_url();
    c.totango.service_id = Some("SP-1234-01".into());
    c.totango.endpoint = Some(endpoint.to_owned());
    c
}

pub struct TestServer {
    pub base: String,
    pub storage: Arc<dyn Storage>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let runtime = config.validate().unwrap();
        let storage = open_storage(&runtime).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_storage(
            runtime,
            listener,
            storage.clone(),
            shutdown.clone(),
        ));
        TestServer {
            base,
            storage,
            shutdown,
            task,
        }
    }

    /// Stops like SIGTERM does and checks the server ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}
