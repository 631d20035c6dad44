//! The one in-process way to start the app: the real router and delivery
//! (`run_with_storage`) on a listener bound to port 0 in this process.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use totango_destination::config::{Config, Runtime};
use totango_destination::server::{RunError, open_storage, run_with_storage};
use totango_destination::storage::Storage;

pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub base: String,
    pub runtime: Runtime,
    pub storage: Arc<dyn Storage>,
    /// Cancelled to stop it as SIGTERM does ([`TestApp::stop`] also waits).
    pub shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
}

impl TestApp {
    /// Validates `config`, opens its storage and starts serving.
    pub async fn start(config: Config) -> TestApp {
        let runtime = config.validate().expect("valid test configuration");
        let storage = open_storage(&runtime).await.expect("open storage");
        TestApp::start_with(runtime, storage).await
    }

    /// Starts serving on an already open storage.
    pub async fn start_with(runtime: Runtime, storage: Arc<dyn Storage>) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_storage(
            runtime.clone(),
            listener,
            storage.clone(),
            shutdown.clone(),
        ));
        TestApp {
            addr,
            base: format!("http://{addr}"),
            runtime,
            storage,
            shutdown,
            task,
        }
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops like SIGTERM does, checks the server ended cleanly and returns
    /// its runtime (to start again on the same storage).
    pub async fn stop(self) -> Runtime {
        self.shutdown.cancel();
        self.task
            .await
            .expect("server task")
            .expect("server ran without error");
        self.runtime
    }
}
