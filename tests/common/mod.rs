//! Shared by the integration test binaries: the real server on port 0 with a
//! real SQLite file in a temporary directory.
#![allow(dead_code)]

use std::sync::Arc;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use totango_destination::config::Config;
use totango_destination::server::{RunError, open_storage, run_with_storage};
use totango_destination::storage::Storage;

/// Defaults with a fresh SQLite file, a service ID and `endpoint` as Totango.
pub fn config(dir: &TempDir, endpoint: &str) -> Config {
    let mut c = Config::default();
    c.storage.url = format!("sqlite://{}", dir.path().join("td.db").display());
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
