//! `GET /api/history?range=hour|day|week`: the stored per-minute history
//! (storage/history.rs) as the operator page's charts read it: one column
//! per series, a point per minute over the last hour, per 3 minutes over the
//! last day, per 20 minutes over the last week (at most 504 points). A
//! bucket no replica wrote (the server was down) is `null`.

use super::{query, storage_error};
use crate::storage::history::{Count, HistoryQuery, HistoryRow, MINUTE_MS};
use crate::storage::now_millis;
use crate::web::answers::ErrorBody;
use crate::web::{AdminState, ApiError};
use axum::Json;
use axum::extract::{Query, State as Extract};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// `hour` (the default), `day` or `week`.
    range: Option<String>,
}

/// `GET /api/history`: the stored history as columns for charts.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct HistoryView {
    pub range: String,
    /// The first bucket's start and the last bucket's end (ms since the epoch).
    pub from: i64,
    pub to: i64,
    pub step_seconds: i64,
    /// Each count summed over the range.
    pub totals: std::collections::BTreeMap<String, u64>,
    /// `time` (each bucket's start, ms) and one column per series, a value
    /// per bucket: `null` where no process wrote.
    #[schema(value_type = std::collections::HashMap<String, Vec<Option<f64>>>)]
    pub series: Map<String, Value>,
}

/// A range the page offers: its name, span and bucket, in minutes.
const RANGES: [(&str, i64, i64); 3] = [("hour", 60, 1), ("day", 1440, 3), ("week", 10080, 20)];

/// Per-minute history over the last hour, day or week.
#[utoipa::path(get, path = "/api/history", tag = "messages", params(HistoryParams),
    responses((status = 200, body = HistoryView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn history(
    Extract(state): Extract<AdminState>,
    q: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryView>, ApiError> {
    let q = query(q)?;
    let name = q.range.as_deref().unwrap_or("hour");
    let Some(&(range, span, step)) = RANGES.iter().find(|(n, ..)| *n == name) else {
        return Err(ApiError::bad_request(
            "range",
            format!("{name:?} is not one of hour, day, week"),
        ));
    };
    let step_ms = step * MINUTE_MS;
    // Up to the end of the bucket under way, so the newest minute shows.
    let to = (now_millis().div_euclid(step_ms) + 1) * step_ms;
    let from = to - span * MINUTE_MS;
    let rows = state
        .storage
        .history(HistoryQuery { from, to, step_ms })
        .await
        .map_err(storage_error)?;
    Ok(Json(columns(range, from, to, step_ms, &rows)))
}

/// The rows as columns over every bucket of `from..to`.
fn columns(range: &str, from: i64, to: i64, step_ms: i64, rows: &[HistoryRow]) -> HistoryView {
    let times: Vec<i64> = (0..(to - from) / step_ms)
        .map(|i| from + i * step_ms)
        .collect();
    let mut at = rows.iter().peekable();
    let found: Vec<Option<&HistoryRow>> = times
        .iter()
        .map(|t| {
            while at.next_if(|r| r.at < *t).is_some() {}
            at.next_if(|r| r.at == *t)
        })
        .collect();
    let series = |f: &dyn Fn(&HistoryRow) -> Option<f64>| -> Value {
        found
            .iter()
            .map(|r| r.and_then(f))
            .collect::<Vec<_>>()
            .into()
    };
    let mut out = Map::new();
    out.insert("time".into(), times.clone().into());
    let mut totals = std::collections::BTreeMap::new();
    for c in Count::ALL {
        out.insert(c.name().into(), series(&|r| Some(r.counts.get(c) as f64)));
        let total: u64 = rows.iter().map(|r| r.counts.get(c)).sum();
        totals.insert(c.name().to_owned(), total);
    }
    out.insert(
        "queue_depth".into(),
        series(&|r| r.gauges.queue_depth.map(|v| v as f64)),
    );
    out.insert(
        "oldest_pending_age_seconds".into(),
        series(&|r| r.gauges.oldest_pending_ms.map(|v| v as f64 / 1000.0)),
    );
    out.insert(
        "concurrency_limit".into(),
        series(&|r| r.gauges.concurrency_limit.map(|v| v as f64)),
    );
    out.insert("rtt_p50_ms".into(), series(&|r| r.rtt.quantile(0.5)));
    out.insert("rtt_p99_ms".into(), series(&|r| r.rtt.quantile(0.99)));
    HistoryView {
        range: range.to_owned(),
        from,
        to,
        step_seconds: step_ms / 1000,
        totals,
        series: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_bucket_has_a_point_and_missing_ones_are_null() {
        let mut row = HistoryRow::new(2 * MINUTE_MS);
        row.counts.set(Count::Delivered, 7);
        row.gauges.queue_depth = Some(3);
        row.rtt.record(40.0);
        let v = serde_json::to_value(columns("hour", 0, 4 * MINUTE_MS, MINUTE_MS, &[row])).unwrap();
        let s = &v["series"];
        assert_eq!(s["time"].as_array().unwrap().len(), 4);
        assert_eq!(s["delivered"], json!([null, null, 7.0, null]));
        assert_eq!(s["queue_depth"], json!([null, null, 3.0, null]));
        assert!(s["rtt_p50_ms"][2].as_f64().unwrap() > 30.0);
        assert_eq!(v["totals"]["delivered"], 7);
        assert_eq!(v["step_seconds"], 60);
    }
}
