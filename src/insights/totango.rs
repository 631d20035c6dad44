//! Totango's Search API: `POST {api}/api/v1/search/accounts` with a form
//! field `query` (JSON) and the `app-token` header, at most N calls a minute.

use crate::secret::Secret;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TotangoError {
    #[error("Totango search: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("Totango search: HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("Totango search failed: {0}")]
    Failed(String),
    #[error("Totango search: unexpected answer: {0}")]
    Shape(String),
}

/// At most `per_minute` calls in any 60-second window.
pub struct RateLimiter {
    per_minute: usize,
    window: Duration,
    calls: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_minute: per_minute.max(1) as usize,
            window: Duration::from_secs(60),
            calls: Mutex::new(VecDeque::new()),
        }
    }

    /// Waits until one more call fits in the window, and counts it.
    pub async fn acquire(&self) {
        let mut calls = self.calls.lock().await;
        loop {
            let now = Instant::now();
            while calls.front().is_some_and(|t| now - *t >= self.window) {
                calls.pop_front();
            }
            if calls.len() < self.per_minute {
                calls.push_back(now);
                return;
            }
            let oldest = *calls.front().expect("window is full");
            tracing::debug!("Totango rate limit: waiting for the next call slot");
            tokio::time::sleep_until(oldest + self.window).await;
        }
    }
}

/// One page of the answer.
pub struct SearchPage {
    pub total_hits: usize,
    pub hits: Vec<Value>,
}

pub struct TotangoClient {
    http: reqwest::Client,
    url: String,
    token: Secret,
    limiter: RateLimiter,
    calls: AtomicU64,
}

impl TotangoClient {
    pub fn new(http: reqwest::Client, api_url: &str, token: Secret, per_minute: u32) -> Self {
        TotangoClient {
            http,
            url: format!("{}/api/v1/search/accounts", api_url.trim_end_matches('/')),
            token,
            limiter: RateLimiter::new(per_minute),
            calls: AtomicU64::new(0),
        }
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub async fn search(&self, query: &Value) -> Result<SearchPage, TotangoError> {
        self.limiter.acquire().await;
        self.calls.fetch_add(1, Ordering::Relaxed);
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", &query.to_string())
            .finish();
        let resp = self
            .http
            .post(&self.url)
            .header("app-token", self.token.expose())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        let answer: Option<Value> = serde_json::from_str(&text).ok();
        let failed = answer
            .as_ref()
            .filter(|a| a.get("status").and_then(Value::as_str) == Some("failed"));
        if let Some(a) = failed {
            let why = a
                .get("_error")
                .or_else(|| a.get("error"))
                .map(|e| {
                    e.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| e.to_string())
                })
                .unwrap_or_else(|| "no reason given".into());
            return Err(TotangoError::Failed(why));
        }
        if !status.is_success() {
            return Err(TotangoError::Status {
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
            });
        }
        let answer = answer.ok_or_else(|| TotangoError::Shape("not JSON".into()))?;
        let accounts = answer
            .pointer("/response/accounts")
            .ok_or_else(|| TotangoError::Shape("no response.accounts".into()))?;
        let hits = accounts
            .get("hits")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| TotangoError::Shape("no response.accounts.hits list".into()))?;
        let total_hits = accounts
            .get("total_hits")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(hits.len());
        Ok(SearchPage { total_hits, hits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_n_per_minute() {
        let limiter = RateLimiter::new(3);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire().await;
        }
        assert_eq!(
            Instant::now() - start,
            Duration::ZERO,
            "first three at once"
        );
        limiter.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(60));
        limiter.acquire().await;
        limiter.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(60));
        limiter.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(120));
    }
}
