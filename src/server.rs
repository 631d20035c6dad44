//! Wires storage, delivery and the HTTP routes together and serves them
//! until shutdown. `run` is what `main` and the integration tests call.

use crate::admin;
use crate::config::Runtime;
use crate::delivery::Delivery;
use crate::ingest;
use crate::storage::{LateStorage, Storage, StorageError, StorageOptions};
use crate::telemetry;
use crate::web::auth::{AdminAuth, Loaded};
use crate::web::{AppState, ClientRates, IngestState};
use axum::Json;
use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_http::add_extension::AddExtension;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

/// How long shutdown waits for open HTTP requests.
const HTTP_DRAIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("outbound HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    AdminToken(#[from] crate::web::auth::TokenFileError),
}

/// How often a server that could not open its storage tries again.
const STORAGE_RETRY: Duration = Duration::from_secs(5);

/// The storage options the configuration asks for.
pub fn storage_options(runtime: &Runtime) -> StorageOptions {
    let secs = |s: u64| (s as i64).saturating_mul(1000);
    let storage = &runtime.config.storage;
    StorageOptions {
        dedupe_window_ms: secs(storage.dedupe_window_secs),
        retention_ms: (storage.retention_secs > 0).then(|| secs(storage.retention_secs)),
        refused_retention_ms: (storage.refused_retention_secs > 0)
            .then(|| secs(storage.refused_retention_secs)),
        prune_every_ms: 60_000,
        index_every_ms: crate::storage::StorageOptions::default().index_every_ms,
        lease_ms: secs(storage.lease_secs),
        heartbeat_ms: secs(storage.heartbeat_secs),
        replica_timeout_ms: secs(storage.replica_timeout_secs),
        pool_size: storage.pool_size,
        max_refused_bytes: storage.max_refused_bytes,
        payload_retention: {
            let p = &runtime.config.privacy;
            let keep = |s: u64| (s > 0).then(|| secs(s));
            crate::storage::PayloadRetention {
                delivered_ms: keep(p.delivered_payload_secs),
                refused_ms: keep(p.refused_payload_secs),
                dead_ms: keep(p.dead_payload_secs),
            }
        },
    }
}

/// Opens the configured storage backend (running its migrations).
pub async fn open_storage(runtime: &Runtime) -> Result<Arc<dyn Storage>, RunError> {
    Ok(crate::storage::open(&runtime.storage, storage_options(runtime)).await?)
}

/// Opens storage; when that fails the server still starts, without it: health
/// answers, `/readyz` and ingest say why with 503, and a passing failure (a
/// database not reachable yet, a file another process holds) is retried in
/// the background. A damaged database is not retried: it needs an operator,
/// and a process that exits would only be restarted into the same failure.
async fn open_or_wait(
    runtime: &Runtime,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn Storage>, RunError> {
    let e = match open_storage(runtime).await {
        Ok(s) => return Ok(s),
        Err(RunError::Storage(e)) => e,
        Err(other) => return Err(other),
    };
    let late = Arc::new(LateStorage::failed(e.clone()));
    if e.is_transient() {
        tracing::error!(error = %e, "storage unavailable; serving without it and retrying every {}s", STORAGE_RETRY.as_secs());
        let (late, runtime, shutdown) = (late.clone(), runtime.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(STORAGE_RETRY) => {}
                }
                match open_storage(&runtime).await {
                    Ok(s) if shutdown.is_cancelled() => return s.close().await,
                    Ok(s) => {
                        tracing::info!("storage is open; accepting messages");
                        return late.install(s);
                    }
                    Err(RunError::Storage(e)) => late.still_failing(e),
                    Err(e) => return tracing::error!(error = %e, "storage cannot be opened"),
                }
            }
        });
    } else {
        tracing::error!(error = %e, "storage cannot be used; serving without it (/readyz answers 503) until an operator repairs it and restarts the server");
    }
    Ok(late)
}

/// Serves on `listener` until `shutdown` is cancelled, then stops accepting,
/// finishes open requests and in-flight deliveries, and closes storage.
pub async fn run(
    runtime: Runtime,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let storage = open_or_wait(&runtime, &shutdown).await?;
    run_with_storage(runtime, listener, storage, shutdown).await
}

/// [`run`] on storage the caller opened (tests keep a handle to inspect it).
/// Closes the storage when it returns.
pub async fn run_with_storage(
    runtime: Runtime,
    listener: TcpListener,
    storage: Arc<dyn Storage>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    telemetry::metrics();
    let (admin, loaded) = AdminAuth::load(&runtime)?;
    let address = listener.local_addr()?;
    announce_admin(&admin, &loaded, address);
    let runtime = Arc::new(runtime);
    let backpressure = Arc::new(crate::backpressure::Backpressure::default());
    // The first reading, before any request: exact, and the base the
    // acceptance counters add to.
    backpressure.check(&runtime, storage.as_ref()).await;
    let stop_monitor = CancellationToken::new();
    let monitor = tokio::spawn(backpressure.clone().run(
        runtime.clone(),
        storage.clone(),
        stop_monitor.clone(),
    ));
    let delivery = Delivery::new(storage.clone(), runtime.clone())?;
    let stop_delivery = CancellationToken::new();
    let delivery_task = tokio::spawn(delivery.clone().run(stop_delivery.clone()));
    // The per-minute history: counts written every few seconds, the last
    // ones after delivery stopped.
    let stop_history = CancellationToken::new();
    let history_task = tokio::spawn(crate::storage::history::flush_loop(
        storage.clone(),
        {
            let delivery = delivery.clone();
            move || delivery.stats().concurrency_limit as u64
        },
        crate::storage::history::HistoryOptions {
            retention_ms: (runtime.config.storage.history_retention_secs as i64)
                .saturating_mul(1000),
            flush_every: crate::storage::history::FLUSH_EVERY,
        },
        stop_history.clone(),
    ));
    let limits = runtime.config.limits.clone();
    let insights = crate::insights::spawn(runtime.clone());
    let client_rates = Arc::new(ClientRates::new(&runtime));
    let state = AppState::new(crate::web::AppParts {
        storage: storage.clone(),
        delivery,
        runtime,
        shutting_down: Arc::new(false.into()),
        admin: Arc::new(admin),
        backpressure: backpressure.clone(),
        client_rates,
    });
    let transport = crate::budget::Transport::new(&limits);
    let app = router(
        state.clone(),
        Duration::from_millis(limits.body_read_timeout_ms),
        transport,
    );

    // HTTP/1 only: Segment and its libraries speak HTTP/1.1, and cleartext
    // HTTP/2 would escape the header read timeout.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
    let graceful = GracefulShutdown::new();
    tracing::info!(%address, "listening");
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_client = PerClient::new(&limits);
    loop {
        // At most max_connections open: the next accept waits for a free slot.
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => slot.expect("semaphore open"),
            _ = shutdown.cancelled() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // One address cannot take every slot (slow-body floods).
                let Some(client_slot) = per_client.admit(peer.ip()) else {
                    metrics::counter!(telemetry::REFUSED_CONNECTIONS).increment(1);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(AddExtension::new(app.clone(), ConnectInfo(peer))))
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(slot);
                    drop(client_slot);
                });
            }
            _ = shutdown.cancelled() => break,
        }
    }
    tracing::info!("shutting down: no new requests");
    state.shutting_down.store(true, Ordering::Relaxed);
    drop(listener);
    // Delivery stops claiming now (other replicas take the queue) and winds
    // down while open requests finish, so both fit one termination grace.
    stop_delivery.cancel();
    if tokio::time::timeout(HTTP_DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open requests did not finish in time");
    }
    stop_monitor.cancel();
    let _ = monitor.await;
    let _ = delivery_task.await;
    stop_history.cancel();
    let _ = history_task.await;
    insights.stop().await;
    storage.close().await;
    tracing::info!("stopped; undelivered messages stay stored for the next start");
    Ok(())
}

/// Counts open connections per client: an address prefix (/24 and /64 by
/// default), so one host's or site's many addresses count as one.
#[derive(Clone)]
struct PerClient {
    max: usize,
    v4: u8,
    v6: u8,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One admitted connection; closing it frees its place.
struct ClientSlot {
    ip: std::net::IpAddr,
    clients: PerClient,
}

impl PerClient {
    fn new(limits: &crate::config::LimitsConfig) -> PerClient {
        PerClient {
            max: limits.max_connections_per_client,
            v4: limits.client_prefix_v4,
            v6: limits.client_prefix_v6,
            open: Default::default(),
        }
    }

    fn admit(&self, ip: std::net::IpAddr) -> Option<Option<ClientSlot>> {
        if self.max == 0 {
            return Some(None);
        }
        let ip = crate::budget::client_prefix(ip, self.v4, self.v6);
        let mut open = self.open.lock().expect("connection counts");
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Some(ClientSlot {
            ip,
            clients: self.clone(),
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().expect("connection counts");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Says where the admin token comes from; a freshly generated one is shown
/// once, as a login link on standard error (not in the logs).
fn announce_admin(admin: &AdminAuth, loaded: &Loaded, address: std::net::SocketAddr) {
    match loaded {
        Loaded::Configured => tracing::info!("operator page: admin token from admin.token"),
        Loaded::FromFile(path) => tracing::info!(
            file = %path.display(),
            "operator page: admin token from its file (`totango-destination admin-link` prints the login link)"
        ),
        Loaded::Generated(path) => {
            let host = if address.ip().is_unspecified() {
                std::net::SocketAddr::new([127, 0, 0, 1].into(), address.port())
            } else {
                address
            };
            tracing::warn!(
                file = %path.display(),
                "generated an admin token for the operator page; its login link follows on standard error, once"
            );
            eprintln!(
                "\n  Operator page login link (shown once; the token is kept in {}):\n  {}\n",
                path.display(),
                admin.login_link(&format!("http://{host}"))
            );
        }
    }
}

/// The service every connection serves: the routes inside one stack of
/// layers. The layers wrap the router as a whole, not each route
/// (`Router::layer`): a layer given to the router boxes each route again, and
/// a request clones every box below the one it enters, so a dozen layers
/// cost about a hundred boxed clones per request (17% of an ingest request's
/// instructions). Here a request clones the stack once.
fn router(
    state: AppState,
    body_timeout: Duration,
    transport: Arc<crate::budget::Transport>,
) -> BoxCloneSyncService<Request<hyper::body::Incoming>, axum::response::Response, Infallible> {
    let routes = Router::new()
        .merge(ingest::routes(state.clone()))
        .merge(admin::routes(
            state.clone(),
            crate::insights::operator_routes().merge(crate::openapi::routes()),
        ))
        .merge(crate::insights::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn(record_latency))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    // Outermost first: a request passes the layers from the top down. The
    // `map_request`/`map_response` steps put bodies and answers back into
    // axum's types where the next layer needs them.
    let stack = ServiceBuilder::new()
        .map_response(IntoResponse::into_response)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        })
        // Failed answers are logged by the handlers that know why, once per
        // cause; a log line per 503 would flood the log in an outage.
        .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)))
        .layer(PropagateRequestIdLayer::x_request_id())
        .map_response(IntoResponse::into_response)
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::map_response(explain_unsupported_encoding))
        .map_request(|req: Request<_>| req.map(axum::body::Body::new))
        .layer(axum::middleware::map_request(lowercase_content_encoding))
        // The wire body's deadline follows the bytes that arrive.
        .layer(axum::middleware::from_fn_with_state(
            transport,
            crate::budget::pace,
        ))
        // Segment's Java library (and others, optionally) gzip their bodies;
        // the body limit applies to the decompressed bytes.
        .map_response(IntoResponse::into_response)
        .layer(RequestDecompressionLayer::new())
        .map_request(|req: Request<_>| req.map(axum::body::Body::new))
        // Decoded body bytes are charged to the global budget as they are read.
        .layer(axum::middleware::from_fn(crate::budget::charge))
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .service(routes);
    BoxCloneSyncService::new(stack)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when ingest could store a message now.
async fn readyz(State(state): State<IngestState>) -> impl IntoResponse {
    if state.shutting_down.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        );
    }
    if let Some(why) = state.backpressure.reason() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "backpressure", "reason": why})),
        );
    }
    match state.storage.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            let status = match e {
                StorageError::Corrupt(_) => "storage damaged",
                _ => "storage unavailable",
            };
            // The details (paths, hosts) go to the log, not to this
            // unauthenticated answer.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": status})),
            )
        }
    }
}

/// Prometheus text exposition; queue gauges are read from storage per scrape.
async fn metrics_text(State(storage): State<Arc<dyn Storage>>) -> impl IntoResponse {
    let handle = telemetry::metrics();
    match storage.queue_stats().await {
        Ok(q) => {
            metrics::gauge!(telemetry::QUEUE_DEPTH).set(q.depth as f64);
            let age = q
                .oldest_received_at
                .map(|t| (crate::storage::now_millis() - t).max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            metrics::gauge!(telemetry::OLDEST_PENDING).set(age);
            metrics::gauge!(telemetry::REFUSED_BYTES).set(q.refused_bytes as f64);
        }
        Err(e) => tracing::warn!(error = %e, "queue stats unavailable"),
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
}

/// Inbound latency by route (the route pattern, so ids do not explode the labels).
async fn record_latency(
    req: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics::histogram!(
        telemetry::HTTP_LATENCY,
        "route" => route,
        "status" => resp.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    resp
}

async fn method_not_allowed(req: Request<axum::body::Body>) -> impl IntoResponse {
    let message = format!("{} {}: method not allowed", req.method(), req.uri().path());
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({"message": message, "code": "method_not_allowed"})),
    )
}

/// The decompression layer answers an unknown `Content-Encoding` with an
/// empty 415; give it the same JSON shape as every other error.
async fn explain_unsupported_encoding(resp: axum::response::Response) -> axum::response::Response {
    if resp.status() != StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return resp;
    }
    (
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Json(json!({
            "message": "Content-Encoding: only gzip and deflate (or none) are accepted",
            "code": "unsupported_encoding",
        })),
    )
        .into_response()
}

/// Content codings are case-insensitive (RFC 9110); the decompression layer
/// matches lowercase names only.
async fn lowercase_content_encoding(
    mut req: Request<axum::body::Body>,
) -> Request<axum::body::Body> {
    use axum::http::header::{CONTENT_ENCODING, HeaderValue};
    let lower = req
        .headers()
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.bytes().any(|b| b.is_ascii_uppercase()))
        .and_then(|v| HeaderValue::from_str(&v.to_ascii_lowercase()).ok());
    if let Some(v) = lower {
        req.headers_mut().insert(CONTENT_ENCODING, v);
    }
    req
}

/// On every answer: no MIME sniffing, no referrer, and no framing unless a
/// page says otherwise in its own CSP (`frame-ancestors`).
async fn security_headers(mut resp: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{self, HeaderValue};
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.entry(header::REFERRER_POLICY)
        .or_insert(HeaderValue::from_static("no-referrer"));
    let csp = h
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(
            "default-src 'none'; frame-ancestors 'none'",
        ));
    // Older browsers know X-Frame-Options only; it cannot express an allow
    // list, so a page that may be framed says so in its CSP alone.
    if csp
        .to_str()
        .is_ok_and(|v| v.contains("frame-ancestors 'none'"))
    {
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    resp
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"message": "no such endpoint", "code": "not_found"})),
    )
}
