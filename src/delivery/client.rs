//! Transport to Totango: pooled, rustls, timeouts, no redirects. It says
//! what happened (status, `Retry-After`, body, or a transport error) and
//! leaves what that means to `policy`.

use super::policy::parse_retry_after;
use std::time::{Duration, SystemTime};

/// Longest response body kept for the operator.
const MAX_KEPT_BODY: usize = 2048;

#[derive(Debug, Clone)]
pub struct Attempt {
    /// Totango's status, when it answered.
    pub status: Option<u16>,
    /// The start of its body, kept for the operator.
    pub body: Option<String>,
    /// What went wrong when there was no answer (without the URL).
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    /// No connection could be made (refused, unreachable, DNS): nothing
    /// listens there now.
    pub connect_error: bool,
}

/// What every outbound HTTP client starts from (Totango delivery, the
/// insights sync): rustls, a total and a connect timeout, this product's user
/// agent. Callers build it and handle the error: there is no fallback client
/// without a timeout.
pub fn outbound_client(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("totango-destination/", env!("CARGO_PKG_VERSION")))
}

#[derive(Clone)]
pub struct TotangoClient {
    http: reqwest::Client,
}

impl TotangoClient {
    pub fn new(timeout: Duration, max_idle_per_host: usize) -> Result<Self, reqwest::Error> {
        let http = outbound_client(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_keepalive(Duration::from_secs(60))
            .build()?;
        Ok(TotangoClient { http })
    }

    /// One GET; never fails, the outcome says what happened.
    pub async fn send(&self, url: &str) -> Attempt {
        match self.http.get(url).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let body = match read_capped(resp).await {
                    Ok(b) if b.is_empty() => None,
                    Ok(b) => Some(printable(&b)),
                    Err(e) => Some(format!("(body unreadable: {e})")),
                };
                Attempt {
                    status: Some(status),
                    body,
                    error: None,
                    retry_after,
                    connect_error: false,
                }
            }
            Err(e) => Attempt {
                connect_error: e.is_connect(),
                status: None,
                body: None,
                error: Some(describe(e)),
                retry_after: None,
            },
        }
    }
}

/// Reads at most `MAX_KEPT_BODY` (+1) bytes of a response; the rest is dropped.
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        out.extend_from_slice(&chunk);
        if out.len() > MAX_KEPT_BODY {
            break;
        }
    }
    Ok(out)
}

/// Response bodies are often a GIF: keep text, summarise binary.
fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let mut end = text.len().min(MAX_KEPT_BODY);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].to_owned()
        }
        Err(_) => format!("({} bytes of binary data)", bytes.len()),
    }
}

fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection error"
    } else {
        "request error"
    };
    // Without the URL: it may carry the api-token.
    let e = e.without_url();
    let mut msg = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}
