//! The one fake Totango: an HTTP server in this process that answers
//! `GET /pixel.gif/` as the test says and records every request it received
//! (parameters, arrival, answer) in arrival order.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// A request's query parameters.
pub type Params = BTreeMap<String, String>;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub params: Params,
    /// When it arrived.
    pub at: Instant,
    /// The status answered; 0 while the answer is still being decided.
    pub status: u16,
    /// When the handler finished, or was dropped because the sender vanished.
    pub answered: Option<Instant>,
    /// The handler ran to its answer (not cut off by the sender going away).
    pub completed: bool,
}

impl Hit {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// What the fake answers to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: &str) -> Reply {
        self.body = body.to_owned();
        self
    }

    /// Answers only after `delay`.
    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

impl From<StatusCode> for Reply {
    fn from(status: StatusCode) -> Reply {
        Reply::status(status.as_u16())
    }
}

type Later = dyn Fn(usize, Params) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync;
type Now = dyn Fn(usize, &Params) -> Reply + Send + Sync;

/// How the fake decides: at once (the status is recorded with the hit) or
/// by awaiting (recorded when decided).
enum Handler {
    Now(Box<Now>),
    Later(Box<Later>),
}

struct Inner {
    count: AtomicUsize,
    hits: Mutex<Vec<Hit>>,
    handler: Handler,
}

pub struct FakeTotango {
    base: String,
    inner: Arc<Inner>,
}

/// Marks a hit answered when its handler ends, also when it is dropped early.
struct Answering {
    inner: Arc<Inner>,
    index: usize,
    completed: bool,
}

impl Drop for Answering {
    fn drop(&mut self) {
        let mut hits = self.inner.hits.lock().unwrap();
        // Gone when the record was cleared meanwhile.
        if let Some(hit) = hits.get_mut(self.index) {
            hit.answered = Some(Instant::now());
            hit.completed = self.completed;
        }
    }
}

async fn pixel(State(inner): State<Arc<Inner>>, Query(params): Query<Params>) -> Response {
    let n = inner.count.fetch_add(1, Ordering::SeqCst);
    let (now, later) = match &inner.handler {
        Handler::Now(decide) => (Some(decide(n, &params)), None),
        Handler::Later(handler) => (None, Some(handler(n, params.clone()))),
    };
    let index = {
        let mut hits = inner.hits.lock().unwrap();
        hits.push(Hit {
            params,
            at: Instant::now(),
            status: now.as_ref().map_or(0, |r| r.status),
            answered: None,
            completed: false,
        });
        hits.len() - 1
    };
    let mut answering = Answering {
        inner: inner.clone(),
        index,
        completed: false,
    };
    let reply = match (now, later) {
        (Some(reply), _) => reply,
        (None, Some(answer)) => {
            let reply = answer.await;
            if let Some(hit) = inner.hits.lock().unwrap().get_mut(index) {
                hit.status = reply.status;
            }
            reply
        }
        (None, None) => unreachable!("one of the two"),
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    answering.completed = true;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in &reply.headers {
        response.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    response
}

impl FakeTotango {
    /// Answers 200 to everything, at once.
    pub async fn ok() -> FakeTotango {
        FakeTotango::replying(|_, _| Reply::ok()).await
    }

    /// Answers what `decide(n, params)` says (`n` counts requests from 0).
    pub async fn replying(
        decide: impl Fn(usize, &Params) -> Reply + Send + Sync + 'static,
    ) -> FakeTotango {
        FakeTotango::serve(Handler::Now(Box::new(decide))).await
    }

    /// Answers what `handler(n, params)` comes to (it may wait, for
    /// example for other requests).
    pub async fn answering<F, Fut, R>(handler: F) -> FakeTotango
    where
        F: Fn(usize, Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: Into<Reply>,
    {
        FakeTotango::serve(Handler::Later(Box::new(move |n, params| {
            let answer = handler(n, params);
            Box::pin(async move { answer.await.into() })
        })))
        .await
    }

    async fn serve(handler: Handler) -> FakeTotango {
        let inner = Arc::new(Inner {
            count: AtomicUsize::new(0),
            hits: Mutex::new(Vec::new()),
            handler,
        });
        let app = axum::Router::new()
            .route("/pixel.gif/", get(pixel))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeTotango {
            base: format!("http://{addr}"),
            inner,
        }
    }

    /// The endpoint to configure as `totango.endpoint`.
    pub fn uri(&self) -> String {
        self.base.clone()
    }

    /// Every request so far, in arrival order.
    pub fn hits(&self) -> Vec<Hit> {
        self.inner.hits.lock().unwrap().clone()
    }

    /// Forgets the requests recorded so far.
    pub fn clear(&self) {
        self.inner.hits.lock().unwrap().clear();
    }

    /// Requests answered `status`.
    pub fn answered(&self, status: u16) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.status == status)
            .collect()
    }

    /// Requests whose `sdr_a` (activity) is `activity`.
    pub fn with_activity(&self, activity: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.get("sdr_a") == Some(activity))
            .collect()
    }

    /// Requests for Totango user `user`.
    pub fn for_user(&self, user: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.get("sdr_u") == Some(user))
            .collect()
    }
}
