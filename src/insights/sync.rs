//! One sync run: page through Totango's accounts, map them, update
//! Salesforce in chunks, and sum up what happened.

use super::model::{self, AccountInsights};
use super::salesforce::{CHUNK, SalesforceClient, SalesforceError};
use super::totango::TotangoClient;
use crate::config::Config;
use crate::config::insights::{InsightsConfig, RESULT_WINDOW, SearchField};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::time::Duration;

/// Per-record failures listed in a summary at most (the count is exact).
const MAX_LISTED_FAILURES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every record was written (or there was nothing to write).
    Ok,
    /// Some records failed; the others were written.
    Partial,
    /// Stopped early by Salesforce's request limit or the usage cap.
    Stopped,
    /// Nothing could be done (Totango unreadable, authentication failed…).
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecordFailure {
    pub account_id: String,
    /// The Salesforce record, when known.
    pub record: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiCalls {
    pub totango: u64,
    pub salesforce: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunSummary {
    /// Set when read back from the store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    pub started_at: String,
    pub finished_at: String,
    pub dry_run: bool,
    pub status: RunStatus,
    /// Why the run failed or stopped, or a warning (the 10,000 window).
    pub message: Option<String>,
    /// Accounts matching the search, as Totango counts them.
    pub total_hits: usize,
    pub accounts_read: usize,
    /// True when Totango had more accounts than one query can return.
    pub truncated: bool,
    pub records_updated: usize,
    pub records_failed: usize,
    /// Accounts not linked to a Salesforce record.
    pub records_skipped: usize,
    pub failures: Vec<RecordFailure>,
    pub api_calls: ApiCalls,
    /// Salesforce's daily API usage after the run (`Sforce-Limit-Info`).
    pub salesforce_api_usage: Option<String>,
}

impl RunSummary {
    /// Failed or stopped: the process exits non-zero.
    pub fn failed(&self) -> bool {
        matches!(self.status, RunStatus::Failed | RunStatus::Stopped)
    }
}

/// Where the CLI's progress bar gets its news; the scheduled run ignores it.
pub trait Progress: Send + Sync {
    fn reading(&self, _read: usize, _total: usize) {}
    fn writing(&self, _done: usize, _total: usize) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// A record the run would write: the account and its Salesforce fields.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedRecord {
    pub account_id: String,
    /// Record Id, or the external id value when matching by external id.
    pub record: String,
    pub fields: Map<String, Value>,
}

/// The result of a run: its summary, the accounts read (for snapshots) and,
/// on a dry run, what would have been written.
pub struct RunOutcome {
    pub summary: RunSummary,
    pub accounts: Vec<AccountInsights>,
    pub planned: Vec<PlannedRecord>,
}

/// The search fields sent: the configured ones, plus the link attribute
/// when records are addressed by Id. Returns them and the link's index.
pub fn query_fields(c: &InsightsConfig) -> (Vec<SearchField>, Vec<Value>, Option<usize>) {
    let fields = c.fields.clone();
    let mut wire: Vec<Value> = fields.iter().map(|f| f.query.clone()).collect();
    let link = if c.salesforce.external_id_field.is_none() {
        wire.push(json!({"type": "string_attribute", "attribute": c.account_link_attribute}));
        Some(wire.len() - 1)
    } else {
        None
    };
    (fields, wire, link)
}

fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Runs one sync. Never panics on bad answers: they end up in the summary.
pub async fn run_once(config: &Config, dry_run: bool, progress: &dyn Progress) -> RunOutcome {
    let c = &config.insights;
    let started_at = now_iso();
    let mut s = RunSummary {
        id: None,
        started_at: started_at.clone(),
        finished_at: String::new(),
        dry_run,
        status: RunStatus::Ok,
        message: None,
        total_hits: 0,
        accounts_read: 0,
        truncated: false,
        records_updated: 0,
        records_failed: 0,
        records_skipped: 0,
        failures: Vec::new(),
        api_calls: ApiCalls {
            totango: 0,
            salesforce: 0,
        },
        salesforce_api_usage: None,
    };
    let http =
        match crate::delivery::client::outbound_client(Duration::from_millis(c.request_timeout_ms))
            .build()
        {
            Ok(http) => http,
            Err(e) => {
                s.status = RunStatus::Failed;
                s.message = Some(format!("cannot build the HTTP client: {e}"));
                s.finished_at = now_iso();
                return RunOutcome {
                    summary: s,
                    accounts: Vec::new(),
                    planned: Vec::new(),
                };
            }
        };
    let totango = TotangoClient::new(
        http.clone(),
        &c.totango_api_url(config),
        c.totango_app_token
            .clone()
            .unwrap_or_else(|| crate::secret::Secret::new("")),
        c.totango_calls_per_minute,
    );
    let salesforce = SalesforceClient::new(http, c.salesforce.clone());
    let mut accounts = Vec::new();
    let mut planned = Vec::new();
    let result = async {
        read_accounts(c, &totango, &started_at, &mut s, &mut accounts, progress).await?;
        let records = plan(c, &accounts, &mut s);
        if dry_run {
            planned = records;
            return Ok(());
        }
        write(c, &salesforce, records, &mut s, progress).await
    }
    .await;
    if let Err(e) = result {
        s.status = if e.stops {
            RunStatus::Stopped
        } else {
            RunStatus::Failed
        };
        s.message = Some(match s.message.take() {
            Some(m) => format!("{}; {m}", e.message),
            None => e.message,
        });
    } else if s.records_failed > 0 {
        s.status = if s.records_updated == 0 {
            RunStatus::Failed
        } else {
            RunStatus::Partial
        };
    }
    s.api_calls = ApiCalls {
        totango: totango.calls(),
        salesforce: salesforce.calls(),
    };
    s.salesforce_api_usage = salesforce
        .api_usage()
        .map(|(used, limit)| format!("{used}/{limit}"));
    s.finished_at = now_iso();
    RunOutcome {
        summary: s,
        accounts,
        planned,
    }
}

struct RunError {
    message: String,
    stops: bool,
}

impl<E: std::fmt::Display> From<E> for RunError {
    fn from(e: E) -> Self {
        RunError {
            message: e.to_string(),
            stops: false,
        }
    }
}

async fn read_accounts(
    c: &InsightsConfig,
    totango: &TotangoClient,
    synced_at: &str,
    s: &mut RunSummary,
    out: &mut Vec<AccountInsights>,
    progress: &dyn Progress,
) -> Result<(), RunError> {
    let (fields, wire, link) = query_fields(c);
    let mut offset = 0;
    loop {
        let count = c.page_size.min(RESULT_WINDOW - offset);
        let query = json!({
            "terms": c.terms,
            "fields": wire,
            "count": count,
            "offset": offset,
            "scope": "all",
        });
        let page = totango.search(&query).await?;
        s.total_hits = page.total_hits;
        let got = page.hits.len();
        for hit in &page.hits {
            match model::from_hit(hit, &fields, link, synced_at) {
                Ok(a) => out.push(a),
                Err(reason) => {
                    tracing::warn!(%reason, "Totango hit skipped");
                    s.records_skipped += 1;
                }
            }
        }
        offset += got;
        s.accounts_read = out.len();
        progress.reading(offset, page.total_hits.min(RESULT_WINDOW));
        if got == 0 || offset >= page.total_hits {
            return Ok(());
        }
        if offset >= RESULT_WINDOW {
            s.truncated = true;
            let warning = format!(
                "Totango returns at most {RESULT_WINDOW} accounts per search; {} of {} accounts \
                 were not read (narrow insights.terms, e.g. one run per segment)",
                page.total_hits - offset,
                page.total_hits
            );
            tracing::warn!("{warning}");
            s.message = Some(warning);
            return Ok(());
        }
    }
}

/// The records to write: one per account linked to a Salesforce record.
/// A record claimed by several accounts (through the link attribute) is
/// written by none of them: each claimant is a failure naming the others,
/// so the run summary shows the conflict instead of the last write winning.
fn plan(
    c: &InsightsConfig,
    accounts: &[AccountInsights],
    s: &mut RunSummary,
) -> Vec<PlannedRecord> {
    let by_external_id = c.salesforce.external_id_field.is_some();
    let mut linked: Vec<(&AccountInsights, String)> = Vec::new();
    for a in accounts {
        let record = if by_external_id {
            Some(a.account_id.clone())
        } else {
            a.salesforce_id.clone()
        };
        match record {
            Some(record) => linked.push((a, record)),
            None => s.records_skipped += 1,
        }
    }
    let mut claims: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for (a, record) in &linked {
        claims
            .entry(model::record_key(record))
            .or_default()
            .push(&a.account_id);
    }
    let mut out = Vec::new();
    for (a, record) in &linked {
        let claimants = &claims[model::record_key(record)];
        if claimants.len() > 1 {
            let others: Vec<&str> = claimants
                .iter()
                .copied()
                .filter(|o| *o != a.account_id)
                .take(5)
                .collect();
            let more = claimants.len() - 1 - others.len();
            fail(
                s,
                &a.account_id,
                Some(record),
                format!(
                    "duplicate link: record also claimed by {:?}{}; not written",
                    others,
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            );
            continue;
        }
        out.push(PlannedRecord {
            account_id: a.account_id.clone(),
            record: record.clone(),
            fields: model::salesforce_fields(a, &c.mapping),
        });
    }
    out
}

fn fail(s: &mut RunSummary, account_id: &str, record: Option<&str>, reason: String) {
    s.records_failed += 1;
    if s.failures.len() < MAX_LISTED_FAILURES {
        s.failures.push(RecordFailure {
            account_id: account_id.to_owned(),
            record: record.map(String::from),
            reason,
        });
    }
}

async fn write(
    c: &InsightsConfig,
    sf: &SalesforceClient,
    records: Vec<PlannedRecord>,
    s: &mut RunSummary,
    progress: &dyn Progress,
) -> Result<(), RunError> {
    if records.is_empty() {
        return Ok(());
    }
    sf.connect().await?;
    let total = records.len();
    let mut done = 0;
    for chunk in records.chunks(CHUNK) {
        let result = write_chunk(c, sf, chunk, s).await;
        if let Err(e) = result {
            let not_sent = total - done;
            return Err(RunError {
                stops: e.stops_run(),
                message: if e.stops_run() {
                    format!("{e}; run stopped, {not_sent} records not sent")
                } else {
                    e.to_string()
                },
            });
        }
        done += chunk.len();
        progress.writing(done, total);
    }
    Ok(())
}

async fn write_chunk(
    c: &InsightsConfig,
    sf: &SalesforceClient,
    chunk: &[PlannedRecord],
    s: &mut RunSummary,
) -> Result<(), SalesforceError> {
    // By external id: look the Ids up, so that no Account is ever created.
    let ids: Vec<Option<String>> = match &c.salesforce.external_id_field {
        None => chunk.iter().map(|r| Some(r.record.clone())).collect(),
        Some(field) => {
            let values: Vec<&str> = chunk.iter().map(|r| r.record.as_str()).collect();
            let found = sf.ids_by_external_id(field, &values).await?;
            chunk
                .iter()
                .map(|r| found.get(&r.record).cloned())
                .collect()
        }
    };
    let mut batch = Vec::new();
    let mut owners = Vec::new();
    for (r, id) in chunk.iter().zip(ids) {
        match id {
            Some(id) => {
                batch.push((id, r.fields.clone()));
                owners.push(r);
            }
            None => fail(
                s,
                &r.account_id,
                None,
                format!(
                    "no {} with {} = {:?}",
                    c.salesforce.object,
                    c.salesforce.external_id_field.as_deref().unwrap_or("Id"),
                    r.record
                ),
            ),
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    let results = sf.update(&batch).await?;
    for (result, owner) in results.iter().zip(owners) {
        if result.success {
            s.records_updated += 1;
        } else {
            let reason = if result.errors.is_empty() {
                "failed without a reason".to_owned()
            } else {
                result.errors.join("; ")
            };
            fail(s, &owner.account_id, Some(&result.id), reason);
        }
    }
    Ok(())
}
