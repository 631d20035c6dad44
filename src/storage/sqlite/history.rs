//! The history's SQL on SQLite (tables `history` and `history_rtt`, see
//! `schema.rs`). Written on a connection of its own every few seconds, so
//! the writer thread's group commits never wait for it longer than one small
//! transaction.

use crate::storage::history::{Count, HistoryQuery, HistoryRow, RTT_BUCKETS};
use crate::storage::{Millis, StorageError};
use rusqlite::{Connection, params};

fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_sql(n: Option<i64>) -> Option<u64> {
    n.map(|n| n.max(0) as u64)
}

const GAUGES: [&str; 3] = ["queue_depth", "oldest_pending_ms", "concurrency_limit"];

fn upsert_sql() -> String {
    let counts: Vec<&str> = Count::ALL.iter().map(|c| c.name()).collect();
    let columns = counts.iter().chain(GAUGES.iter()).copied();
    let names = std::iter::once("minute")
        .chain(columns.clone())
        .collect::<Vec<_>>()
        .join(", ");
    let values = (1..=1 + counts.len() + GAUGES.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut set: Vec<String> = counts
        .iter()
        .map(|c| format!("{c} = history.{c} + excluded.{c}"))
        .collect();
    // SQLite's max() of a NULL is NULL: a gauge not sampled keeps the other.
    set.extend(GAUGES.iter().map(|g| {
        format!(
            "{g} = max(coalesce(history.{g}, excluded.{g}), coalesce(excluded.{g}, history.{g}))"
        )
    }));
    format!(
        "INSERT INTO history ({names}) VALUES ({values}) ON CONFLICT (minute) DO UPDATE SET {}",
        set.join(", ")
    )
}

/// Adds `rows` into the history, in one transaction.
pub(super) fn add(conn: &mut Connection, rows: &[HistoryRow]) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare_cached(&upsert_sql())?;
        let mut rtt = tx.prepare_cached(
            "INSERT INTO history_rtt (minute, bucket, count) VALUES (?1, ?2, ?3) \
             ON CONFLICT (minute, bucket) DO UPDATE SET count = history_rtt.count + excluded.count",
        )?;
        for row in rows {
            let mut values: Vec<Option<i64>> = vec![Some(row.at)];
            values.extend(Count::ALL.iter().map(|c| Some(to_sql(row.counts.get(*c)))));
            let g = &row.gauges;
            values.extend(
                [g.queue_depth, g.oldest_pending_ms, g.concurrency_limit].map(|v| v.map(to_sql)),
            );
            upsert.execute(rusqlite::params_from_iter(values))?;
            for (bucket, n) in row.rtt.0.iter().enumerate().filter(|(_, n)| **n > 0) {
                rtt.execute(params![row.at, bucket as i64, to_sql(*n)])?;
            }
        }
    }
    Ok(tx.commit()?)
}

/// The history of `q`, summed into its buckets.
pub(super) fn read(conn: &Connection, q: HistoryQuery) -> Result<Vec<HistoryRow>, StorageError> {
    let sums = Count::ALL
        .iter()
        .map(|c| format!("SUM({})", c.name()))
        .chain(GAUGES.iter().map(|g| format!("MAX({g})")))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT (minute / ?3) * ?3 AS at, {sums} FROM history \
         WHERE minute >= ?1 AND minute < ?2 GROUP BY at ORDER BY at"
    );
    let step = q.step_ms.max(1);
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows: Vec<HistoryRow> = stmt
        .query_map(params![q.from, q.to, step], |r| {
            let mut row = HistoryRow::new(r.get(0)?);
            for (i, c) in Count::ALL.iter().enumerate() {
                row.counts
                    .set(*c, from_sql(r.get(1 + i)?).unwrap_or_default());
            }
            let g = 1 + Count::ALL.len();
            row.gauges.queue_depth = from_sql(r.get(g)?);
            row.gauges.oldest_pending_ms = from_sql(r.get(g + 1)?);
            row.gauges.concurrency_limit = from_sql(r.get(g + 2)?);
            Ok(row)
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT (minute / ?3) * ?3 AS at, bucket, SUM(count) FROM history_rtt \
         WHERE minute >= ?1 AND minute < ?2 GROUP BY at, bucket ORDER BY at, bucket",
    )?;
    let buckets = stmt.query_map(params![q.from, q.to, step], |r| {
        Ok((
            r.get::<_, Millis>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for b in buckets {
        let (at, bucket, n) = b?;
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
pub(super) fn prune(conn: &mut Connection, before: Millis) -> Result<u64, StorageError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute("DELETE FROM history WHERE minute < ?1", [before])?;
    tx.execute("DELETE FROM history_rtt WHERE minute < ?1", [before])?;
    tx.commit()?;
    Ok(n as u64)
}
