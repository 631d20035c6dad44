//! Salesforce: OAuth 2.0 server-to-server (client credentials or JWT
//! bearer), and updates through the sObject Collections API. Only updates:
//! records are addressed by Id (looked up first when matching by an
//! external id field, so that a missing record is never created).

use crate::config::insights::{SalesforceAuth, SalesforceConfig, expose};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Mutex;

/// Records per collection call (the API's maximum).
pub const CHUNK: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum SalesforceError {
    #[error("Salesforce authentication failed: {0}")]
    Auth(String),
    #[error("Salesforce session expired again right after re-authenticating: {0}")]
    SessionExpired(String),
    #[error("Salesforce request limit reached (REQUEST_LIMIT_EXCEEDED): {0}")]
    RequestLimit(String),
    #[error(
        "Salesforce API usage {used}/{limit} is at or above salesforce.max_api_usage_percent ({percent}%)"
    )]
    UsageCap { used: u64, limit: u64, percent: u8 },
    #[error("Salesforce: HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("Salesforce: {0}")]
    Transport(#[from] reqwest::Error),
    /// An answer of the wrong shape.
    #[error("Salesforce: {0}")]
    Answer(String),
}

impl SalesforceError {
    /// Errors that end the run before every record was tried.
    pub fn stops_run(&self) -> bool {
        matches!(
            self,
            SalesforceError::RequestLimit(_) | SalesforceError::UsageCap { .. }
        )
    }
}

#[derive(Debug, Clone)]
struct Session {
    access_token: String,
    instance_url: String,
}

/// One record's result from a collection call.
#[derive(Debug, Clone, Serialize)]
pub struct RecordResult {
    pub id: String,
    pub success: bool,
    /// `STATUS_CODE: message (fields)` per error.
    pub errors: Vec<String>,
}

pub struct SalesforceClient {
    http: reqwest::Client,
    config: SalesforceConfig,
    session: Mutex<Option<Session>>,
    calls: AtomicU64,
    /// The last `Sforce-Limit-Info: api-usage=used/limit`.
    usage: std::sync::Mutex<Option<(u64, u64)>>,
}

impl SalesforceClient {
    pub fn new(http: reqwest::Client, config: SalesforceConfig) -> Self {
        SalesforceClient {
            http,
            config,
            session: Mutex::new(None),
            calls: AtomicU64::new(0),
            usage: std::sync::Mutex::new(None),
        }
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn api_usage(&self) -> Option<(u64, u64)> {
        *self.usage.lock().expect("usage lock")
    }

    fn token_url(&self) -> String {
        format!(
            "{}/services/oauth2/token",
            self.config.login_url.trim_end_matches('/')
        )
    }

    async fn authenticate(&self) -> Result<Session, SalesforceError> {
        let c = &self.config;
        let client_id = c.client_id.clone().unwrap_or_default();
        let form: Vec<(&str, String)> = match c.auth {
            SalesforceAuth::ClientCredentials => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", client_id),
                ("client_secret", expose(&c.client_secret).to_owned()),
            ],
            SalesforceAuth::Jwt => vec![
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
                ),
                ("assertion", self.assertion(&client_id)?),
            ],
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .http
            .post(self.token_url())
            .form(&form)
            .send()
            .await
            .map_err(|e| SalesforceError::Auth(e.to_string()))?;
        let status = resp.status();
        let body: Value =
            serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or(Value::Null);
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(String::from);
        match (field("access_token"), field("instance_url")) {
            (Some(access_token), Some(instance_url)) if status.is_success() => Ok(Session {
                access_token,
                instance_url: instance_url.trim_end_matches('/').to_owned(),
            }),
            _ => Err(SalesforceError::Auth(format!(
                "HTTP {}: {}",
                status.as_u16(),
                field("error_description")
                    .or_else(|| field("error"))
                    .unwrap_or_else(|| "no access_token in the answer".into())
            ))),
        }
    }

    /// The RS256 JWT bearer assertion: iss = client id, sub = username,
    /// aud = login URL, exp = now + 3 minutes.
    fn assertion(&self, client_id: &str) -> Result<String, SalesforceError> {
        let c = &self.config;
        let path = c.private_key_path.as_deref().unwrap_or("");
        let pem = std::fs::read(path).map_err(|e| {
            SalesforceError::Auth(format!("salesforce.private_key_path {path}: {e}"))
        })?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| {
            SalesforceError::Auth(format!("salesforce.private_key_path {path}: {e}"))
        })?;
        let claims = json!({
            "iss": client_id,
            "sub": c.username.as_deref().unwrap_or(""),
            "aud": c.login_url.trim_end_matches('/'),
            "exp": chrono::Utc::now().timestamp() + 180,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .map_err(|e| SalesforceError::Auth(format!("signing the JWT assertion: {e}")))
    }

    async fn session(&self, renew: bool) -> Result<Session, SalesforceError> {
        let mut s = self.session.lock().await;
        if renew || s.is_none() {
            *s = Some(self.authenticate().await?);
        }
        Ok(s.clone().expect("session set"))
    }

    fn data_url(&self, session: &Session, rest: &str) -> String {
        format!(
            "{}/services/data/v{}/{rest}",
            session.instance_url, self.config.api_version
        )
    }

    /// Authenticates now (so a bad configuration fails before any write).
    pub async fn connect(&self) -> Result<(), SalesforceError> {
        self.session(false).await.map(|_| ())
    }

    /// Sends one API request; on `401 INVALID_SESSION_ID` re-authenticates
    /// once and sends it again.
    async fn call(
        &self,
        build: impl Fn(&Session) -> reqwest::RequestBuilder,
    ) -> Result<Value, SalesforceError> {
        let mut session = self.session(false).await?;
        let mut renewed = false;
        loop {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let resp = build(&session)
                .bearer_auth(&session.access_token)
                .send()
                .await?;
            self.read_limit_info(resp.headers());
            let status = resp.status();
            let text = resp.text().await?;
            if status.is_success() {
                return serde_json::from_str(&text)
                    .map_err(|e| SalesforceError::Answer(format!("answer is not JSON: {e}")));
            }
            let (code, message) = error_code(&text);
            match (status.as_u16(), code.as_str()) {
                (401, "INVALID_SESSION_ID") if !renewed => {
                    tracing::info!("Salesforce session expired; authenticating again");
                    session = self.session(true).await?;
                    renewed = true;
                }
                (401, "INVALID_SESSION_ID") => {
                    return Err(SalesforceError::SessionExpired(message));
                }
                (403, "REQUEST_LIMIT_EXCEEDED") => {
                    return Err(SalesforceError::RequestLimit(message));
                }
                (s, _) => {
                    return Err(SalesforceError::Status {
                        status: s,
                        body: text.chars().take(300).collect(),
                    });
                }
            }
            self.check_usage()?;
        }
    }

    fn read_limit_info(&self, headers: &reqwest::header::HeaderMap) {
        let parsed = headers
            .get("sforce-limit-info")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_limit_info);
        if let Some(u) = parsed {
            *self.usage.lock().expect("usage lock") = Some(u);
        }
    }

    /// Refuses further calls once the configured share of the daily
    /// allocation is used.
    pub fn check_usage(&self) -> Result<(), SalesforceError> {
        let percent = self.config.max_api_usage_percent;
        match self.api_usage() {
            Some((used, limit)) if limit > 0 && used * 100 >= limit * u64::from(percent) => {
                Err(SalesforceError::UsageCap {
                    used,
                    limit,
                    percent,
                })
            }
            _ => Ok(()),
        }
    }

    /// Record Ids by external id value (only records that exist).
    pub async fn ids_by_external_id(
        &self,
        field: &str,
        values: &[&str],
    ) -> Result<std::collections::HashMap<String, String>, SalesforceError> {
        self.check_usage()?;
        let quoted: Vec<String> = values.iter().map(|v| soql_quote(v)).collect();
        let soql = format!(
            "SELECT Id, {field} FROM {} WHERE {field} IN ({})",
            self.config.object,
            quoted.join(",")
        );
        let mut out = std::collections::HashMap::new();
        let mut next: Option<String> = None;
        loop {
            let answer = match &next {
                None => {
                    self.call(|s| {
                        self.http
                            .get(self.data_url(s, "query"))
                            .query(&[("q", &soql)])
                    })
                    .await?
                }
                Some(path) => {
                    self.call(|s| self.http.get(format!("{}{path}", s.instance_url)))
                        .await?
                }
            };
            for r in answer
                .get("records")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let id = r.get("Id").and_then(Value::as_str);
                let ext = r.get(field).and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
                if let (Some(id), Some(ext)) = (id, ext) {
                    out.insert(ext, id.to_owned());
                }
            }
            next = answer
                .get("nextRecordsUrl")
                .and_then(Value::as_str)
                .map(String::from);
            if next.is_none() || answer.get("done") == Some(&Value::Bool(true)) {
                return Ok(out);
            }
        }
    }

    /// Updates up to [`CHUNK`] records by Id (`allOrNone: false`): one
    /// result per record, in order.
    pub async fn update(
        &self,
        records: &[(String, Map<String, Value>)],
    ) -> Result<Vec<RecordResult>, SalesforceError> {
        self.check_usage()?;
        let object = &self.config.object;
        let body = json!({
            "allOrNone": false,
            "records": records.iter().map(|(id, fields)| {
                let mut r = Map::new();
                r.insert("attributes".into(), json!({"type": object}));
                r.insert("id".into(), Value::String(id.clone()));
                r.extend(fields.clone());
                Value::Object(r)
            }).collect::<Vec<_>>(),
        });
        let answer = self
            .call(|s| {
                self.http
                    .patch(self.data_url(s, "composite/sobjects"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string())
            })
            .await?;
        let results = answer.as_array().ok_or_else(|| {
            SalesforceError::Answer("collection answer is not a list of results".into())
        })?;
        Ok(records
            .iter()
            .enumerate()
            .map(|(i, (id, _))| match results.get(i) {
                Some(r) => RecordResult {
                    id: r.get("id").and_then(Value::as_str).unwrap_or(id).to_owned(),
                    success: r.get("success") == Some(&Value::Bool(true)),
                    errors: r
                        .get("errors")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(describe_error)
                        .collect(),
                },
                None => RecordResult {
                    id: id.clone(),
                    success: false,
                    errors: vec!["no result for this record in the answer".into()],
                },
            })
            .collect())
    }
}

fn describe_error(e: &Value) -> String {
    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
    let fields: Vec<&str> = e
        .get("fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut out = format!("{}: {}", s("statusCode"), s("message"));
    if !fields.is_empty() {
        out.push_str(&format!(" ({})", fields.join(", ")));
    }
    out
}

/// `errorCode` and `message` of an error answer (`[{"errorCode","message"}]`).
fn error_code(text: &str) -> (String, String) {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let first = v.as_array().and_then(|a| a.first()).unwrap_or(&v);
    let s = |k: &str| {
        first
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let message = s("message");
    (
        s("errorCode"),
        if message.is_empty() {
            text.chars().take(300).collect()
        } else {
            message
        },
    )
}

/// `api-usage=25/15000` → (25, 15000).
pub fn parse_limit_info(header: &str) -> Option<(u64, u64)> {
    header.split(',').find_map(|part| {
        let (used, limit) = part.trim().strip_prefix("api-usage=")?.split_once('/')?;
        Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
    })
}

fn soql_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_info_and_quoting() {
        assert_eq!(parse_limit_info("api-usage=25/15000"), Some((25, 15000)));
        assert_eq!(
            parse_limit_info("per-app-api-usage=1/10(appName=x), api-usage=7/100"),
            Some((7, 100))
        );
        assert_eq!(parse_limit_info("nonsense"), None);
        assert_eq!(soql_quote(r"o'k\"), r"'o\'k\\'");
    }

    #[test]
    fn error_answers_are_read() {
        let (code, msg) = error_code(
            r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#,
        );
        assert_eq!(code, "INVALID_SESSION_ID");
        assert_eq!(msg, "Session expired or invalid");
        assert_eq!(error_code("oops").1, "oops");
        assert_eq!(
            describe_error(
                &json!({"statusCode":"INVALID_FIELD","message":"bad","fields":["A__c"]})
            ),
            "INVALID_FIELD: bad (A__c)"
        );
    }
}
