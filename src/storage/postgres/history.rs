//! The history's SQL on PostgreSQL (`td_history`, `td_history_rtt`; schema
//! version 4). Replicas add into the same minute rows; each transaction
//! takes its rows in the same order (minute, then bucket), so two replicas
//! flushing together wait for each other instead of deadlocking.

use crate::storage::history::{Count, HistoryQuery, HistoryRow, RTT_BUCKETS};
use crate::storage::{Millis, StorageError};
use sqlx::{PgPool, Row};

const GAUGES: [&str; 3] = ["queue_depth", "oldest_pending_ms", "concurrency_limit"];

fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_sql(n: Option<i64>) -> Option<u64> {
    n.map(|n| n.max(0) as u64)
}

fn upsert_sql() -> String {
    let counts: Vec<&str> = Count::ALL.iter().map(|c| c.name()).collect();
    let names = std::iter::once("minute")
        .chain(counts.iter().copied())
        .chain(GAUGES)
        .collect::<Vec<_>>()
        .join(", ");
    let values = (1..=1 + counts.len() + GAUGES.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut set: Vec<String> = counts
        .iter()
        .map(|c| format!("{c} = td_history.{c} + EXCLUDED.{c}"))
        .collect();
    // GREATEST ignores NULLs: a gauge not sampled keeps the other.
    set.extend(
        GAUGES
            .iter()
            .map(|g| format!("{g} = GREATEST(td_history.{g}, EXCLUDED.{g})")),
    );
    format!(
        "INSERT INTO td_history ({names}) VALUES ({values}) \
         ON CONFLICT (minute) DO UPDATE SET {}",
        set.join(", ")
    )
}

async fn add_once(pool: &PgPool, rows: &[HistoryRow]) -> Result<(), StorageError> {
    let upsert = upsert_sql();
    let mut tx = pool.begin().await?;
    for row in rows {
        let mut q = sqlx::query(&upsert).bind(row.at);
        for c in Count::ALL {
            q = q.bind(to_sql(row.counts.get(c)));
        }
        let g = &row.gauges;
        for v in [g.queue_depth, g.oldest_pending_ms, g.concurrency_limit] {
            q = q.bind(v.map(to_sql));
        }
        q.execute(&mut *tx).await?;
        let (buckets, counts): (Vec<i32>, Vec<i64>) = row
            .rtt
            .0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(b, n)| (b as i32, to_sql(*n)))
            .unzip();
        if !buckets.is_empty() {
            sqlx::query(
                "INSERT INTO td_history_rtt (minute, bucket, count) \
                 SELECT $1, b, n FROM unnest($2::integer[], $3::bigint[]) AS t(b, n) \
                 ORDER BY b \
                 ON CONFLICT (minute, bucket) DO UPDATE \
                 SET count = td_history_rtt.count + EXCLUDED.count",
            )
            .bind(row.at)
            .bind(&buckets)
            .bind(&counts)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Adds `rows` (sorted by minute) in one transaction; once more after a
/// conflict.
pub(super) async fn add(pool: &PgPool, rows: &[HistoryRow]) -> Result<(), StorageError> {
    let mut rows = rows.to_vec();
    rows.sort_by_key(|r| r.at);
    match add_once(pool, &rows).await {
        Err(StorageError::Conflict(_)) => add_once(pool, &rows).await,
        r => r,
    }
}

/// The history of `q`, summed into its buckets.
pub(super) async fn read(pool: &PgPool, q: HistoryQuery) -> Result<Vec<HistoryRow>, StorageError> {
    let sums = Count::ALL
        .iter()
        .map(|c| format!("sum({})::bigint", c.name()))
        .chain(GAUGES.iter().map(|g| format!("max({g})")))
        .collect::<Vec<_>>()
        .join(", ");
    let step = q.step_ms.max(1);
    let found = sqlx::query(&format!(
        "SELECT (minute / $3) * $3 AS at, {sums} FROM td_history \
         WHERE minute >= $1 AND minute < $2 GROUP BY 1 ORDER BY 1"
    ))
    .bind(q.from)
    .bind(q.to)
    .bind(step)
    .fetch_all(pool)
    .await?;
    let mut rows = Vec::with_capacity(found.len());
    for r in &found {
        let mut row = HistoryRow::new(r.try_get(0)?);
        for (i, c) in Count::ALL.iter().enumerate() {
            row.counts
                .set(*c, from_sql(r.try_get(1 + i)?).unwrap_or_default());
        }
        let g = 1 + Count::ALL.len();
        row.gauges.queue_depth = from_sql(r.try_get(g)?);
        row.gauges.oldest_pending_ms = from_sql(r.try_get(g + 1)?);
        row.gauges.concurrency_limit = from_sql(r.try_get(g + 2)?);
        rows.push(row);
    }
    let buckets: Vec<(Millis, i32, i64)> = sqlx::query_as(
        "SELECT (minute / $3) * $3, bucket, sum(count)::bigint FROM td_history_rtt \
         WHERE minute >= $1 AND minute < $2 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(q.from)
    .bind(q.to)
    .bind(step)
    .fetch_all(pool)
    .await?;
    for (at, bucket, n) in buckets {
        let Ok(bucket) = usize::try_from(bucket) else {
            continue;
        };
        if bucket >= RTT_BUCKETS {
            continue;
        }
        let i = match rows.binary_search_by_key(&at, |r| r.at) {
            Ok(i) => i,
            Err(i) => {
                rows.insert(i, HistoryRow::new(at));
                i
            }
        };
        rows[i].rtt.0[bucket] += n.max(0) as u64;
    }
    Ok(rows)
}

/// Deletes minutes before `before`.
pub(super) async fn prune(pool: &PgPool, before: Millis) -> Result<u64, StorageError> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query("DELETE FROM td_history WHERE minute < $1")
        .bind(before)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM td_history_rtt WHERE minute < $1")
        .bind(before)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(n)
}
