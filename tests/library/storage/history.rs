//! Issue 19: the per-minute history, on both backends. Backends count what
//! they store and record; counts written add into the minute (two writers,
//! or two flushes, make one history); gauges keep the highest value; it is
//! read back in buckets, pruned before a time, and kept across a reopen.
//! The flush loop writes what was counted, the last counts at its stop.

use std::sync::Arc;
use std::time::Duration;

use crate::support::backends::{Backend, Opened, options};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use totango_destination::storage::history::{
    Count, FLUSH_EVERY, HistoryOptions, MINUTE_MS, flush_loop, minute_of,
};
use totango_destination::storage::{
    Disposition, HistoryQuery, HistoryRow, NewMessage, PostgresStorage, Report, SqliteStorage,
    State, Storage, now_millis,
};

fn message(message_id: &str, state: State) -> NewMessage {
    NewMessage {
        ordering_key: None,
        payload: json!({"type": "track", "messageId": message_id})
            .to_string()
            .into(),
        state,
        ..super::msg(message_id, "")
    }
}

fn report(id: i64, lease: i64, disposition: Disposition) -> Report {
    Report {
        id,
        lease,
        requests: None,
        sent: 0,
        attempted: true,
        disposition,
        last: None,
        settings: None,
    }
}

/// A minute with `accepted` accepted, round trips of 20 ms, and gauges.
fn row(at: i64, accepted: u64, depth: u64, limit: u64) -> HistoryRow {
    let mut r = HistoryRow::new(at);
    r.counts.set(Count::Accepted, accepted);
    r.counts.set(Count::Delivered, accepted / 2);
    for _ in 0..accepted {
        r.rtt.record(20.0);
    }
    r.gauges.queue_depth = Some(depth);
    r.gauges.concurrency_limit = Some(limit);
    r
}

/// Whole minutes, far enough in the past not to meet a flush of this run.
fn base() -> i64 {
    minute_of(now_millis()) - 100 * MINUTE_MS
}

async fn read(s: &dyn Storage, from: i64, to: i64, step_ms: i64) -> Vec<HistoryRow> {
    s.history(HistoryQuery { from, to, step_ms })
        .await
        .expect("read history")
}

async fn backends_count_what_they_store_and_record(b: Backend) {
    let Some(s) = b.open(options()).await else {
        return;
    };
    let out = s
        .accept(vec![
            message("a", State::Pending),
            message("b", State::Pending),
            message("c", State::Rejected),
            message("d", State::Filtered),
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 4);
    // The same messageId again: stored as a duplicate.
    s.accept(vec![message("a", State::Pending)]).await.unwrap();
    let claimed = s.claim(10).await.unwrap().messages;
    assert_eq!(claimed.len(), 2);
    let reports = vec![
        report(claimed[0].id, claimed[0].lease, Disposition::Delivered),
        report(
            claimed[1].id,
            claimed[1].lease,
            Disposition::Dead {
                code: "x".into(),
                reason: "y".into(),
            },
        ),
    ];
    s.report(reports).await.unwrap();
    let (counts, _) = s.history_counters().take();
    assert_eq!(counts.get(Count::Accepted), 5);
    assert_eq!(counts.get(Count::Duplicate), 1);
    assert_eq!(counts.get(Count::Rejected), 1);
    assert_eq!(counts.get(Count::Filtered), 1);
    assert_eq!(counts.get(Count::Delivered), 1);
    assert_eq!(counts.get(Count::Dead), 1);
    // A report whose lease is not current is not counted.
    s.report(vec![report(
        claimed[0].id,
        claimed[0].lease,
        Disposition::Delivered,
    )])
    .await
    .unwrap();
    let (counts, _) = s.history_counters().take();
    assert_eq!(counts.get(Count::Delivered), 0, "{counts:?}");
    s.close().await;
}

async fn written_history_is_read_back_by_minute_and_in_buckets(b: Backend) {
    let Some(s) = b.open(options()).await else {
        return;
    };
    let t = base();
    s.add_history(vec![row(t, 4, 10, 64), row(t + MINUTE_MS, 6, 30, 32)])
        .await
        .unwrap();
    let rows = read(&**s, t, t + 10 * MINUTE_MS, MINUTE_MS).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0], row(t, 4, 10, 64));
    assert_eq!(rows[1].counts.get(Count::Accepted), 6);
    assert_eq!(rows[1].counts.get(Count::Delivered), 3);
    assert_eq!(rows[1].gauges.queue_depth, Some(30));
    let p50 = rows[1].rtt.quantile(0.5).unwrap();
    assert!((16.0..24.0).contains(&p50), "{p50}");
    // Outside the span: nothing.
    assert!(
        read(&**s, t - 10 * MINUTE_MS, t, MINUTE_MS)
            .await
            .is_empty()
    );
    // One bucket over both minutes (buckets start at multiples of the step).
    let step = 1_000 * MINUTE_MS;
    let rows = read(&**s, t - step, t + step, step).await;
    let total: u64 = rows.iter().map(|r| r.counts.get(Count::Accepted)).sum();
    assert_eq!(total, 10);
    let depth = rows.iter().filter_map(|r| r.gauges.queue_depth).max();
    assert_eq!(depth, Some(30), "a bucket's gauge is its highest");
    assert_eq!(rows.iter().map(|r| r.rtt.total()).sum::<u64>(), 10);
    // A row that is not at a whole minute is refused, naming it.
    let e = s.add_history(vec![row(t + 1, 1, 1, 1)]).await.unwrap_err();
    assert!(e.to_string().contains("minute"), "{e}");
    s.close().await;
}

/// A second writer: another process on the same database (PostgreSQL), or
/// a second flush into the same minute (SQLite: one process per file).
async fn second_writer(b: Backend, first: &Opened) -> Option<Arc<dyn Storage>> {
    match b {
        Backend::Sqlite => None,
        Backend::Postgres => Some(Arc::new(
            PostgresStorage::open(first.url.as_deref().unwrap(), options())
                .await
                .unwrap(),
        )),
    }
}

async fn two_writers_add_into_one_history(b: Backend) {
    let Some(s) = b.open(options()).await else {
        return;
    };
    let other = second_writer(b, &s).await;
    let other_writer: &dyn Storage = other.as_deref().unwrap_or(&**s);
    let t = base();
    // Both at once, into the same minutes.
    let (a, c) = tokio::join!(
        s.add_history(vec![row(t, 3, 5, 16), row(t + MINUTE_MS, 1, 1, 16)]),
        other_writer.add_history(vec![row(t, 7, 2, 48), row(t + MINUTE_MS, 1, 9, 8)]),
    );
    a.unwrap();
    c.unwrap();
    for reader in [&**s, other_writer] {
        let rows = read(reader, t, t + 2 * MINUTE_MS, MINUTE_MS).await;
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].counts.get(Count::Accepted), 10);
        assert_eq!(rows[0].counts.get(Count::Delivered), 1 + 3);
        assert_eq!(rows[0].rtt.total(), 10);
        assert_eq!(rows[0].gauges.queue_depth, Some(5));
        assert_eq!(rows[0].gauges.concurrency_limit, Some(48));
        assert_eq!(rows[1].counts.get(Count::Accepted), 2);
        assert_eq!(rows[1].gauges.queue_depth, Some(9));
    }
    // A gauge not sampled keeps the other's value.
    let mut unsampled = HistoryRow::new(t);
    unsampled.counts.set(Count::Failed, 2);
    s.add_history(vec![unsampled]).await.unwrap();
    let rows = read(&**s, t, t + MINUTE_MS, MINUTE_MS).await;
    assert_eq!(rows[0].gauges.queue_depth, Some(5));
    assert_eq!(rows[0].counts.get(Count::Failed), 2);
    if let Some(o) = other {
        o.close().await;
    }
    s.close().await;
}

async fn history_before_a_time_is_pruned(b: Backend) {
    let Some(s) = b.open(options()).await else {
        return;
    };
    let t = base();
    let rows: Vec<HistoryRow> = (0..6).map(|i| row(t + i * MINUTE_MS, 2, 1, 1)).collect();
    s.add_history(rows).await.unwrap();
    assert_eq!(s.prune_history(t + 3 * MINUTE_MS).await.unwrap(), 3);
    let left = read(&**s, t - MINUTE_MS, t + 10 * MINUTE_MS, MINUTE_MS).await;
    let at: Vec<i64> = left.iter().map(|r| (r.at - t) / MINUTE_MS).collect();
    assert_eq!(at, vec![3, 4, 5]);
    assert!(
        left.iter().all(|r| r.rtt.total() == 2),
        "round trips pruned with their minute"
    );
    // The pruned minutes' round trips are gone too.
    let all = read(&**s, t - MINUTE_MS, t + 10 * MINUTE_MS, 1_000 * MINUTE_MS).await;
    assert_eq!(all.iter().map(|r| r.rtt.total()).sum::<u64>(), 6);
    s.close().await;
}

async fn history_survives_a_reopen(b: Backend) {
    let Some(s) = b.open(options()).await else {
        return;
    };
    let t = base();
    s.add_history(vec![row(t, 5, 7, 64)]).await.unwrap();
    s.close().await;
    assert!(
        s.add_history(vec![row(t, 1, 1, 1)]).await.is_err(),
        "closed"
    );
    let reopened: Arc<dyn Storage> = match b {
        Backend::Sqlite => {
            Arc::new(SqliteStorage::open_with(s.path.as_deref().unwrap(), options()).unwrap())
        }
        Backend::Postgres => Arc::new(
            PostgresStorage::open(s.url.as_deref().unwrap(), options())
                .await
                .unwrap(),
        ),
    };
    let rows = read(&*reopened, t, t + MINUTE_MS, MINUTE_MS).await;
    assert_eq!(rows, vec![row(t, 5, 7, 64)]);
    reopened.close().await;
}

async fn the_flush_loop_writes_counts_and_gauges_and_flushes_at_its_stop(b: Backend) {
    let Some(s) = b.open(options()).await else {
        return;
    };
    let stop = CancellationToken::new();
    let options = HistoryOptions {
        retention_ms: 24 * 3600 * 1000,
        flush_every: Duration::from_millis(200),
    };
    let task = tokio::spawn(flush_loop(s.storage.clone(), || 17, options, stop.clone()));
    s.accept(vec![
        message("a", State::Pending),
        message("b", State::Rejected),
    ])
    .await
    .unwrap();
    let since = minute_of(now_millis()) - MINUTE_MS;
    let total = |rows: &[HistoryRow], c: Count| rows.iter().map(|r| r.counts.get(c)).sum::<u64>();
    let rows = crate::support::wait::until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let rows = read(&**s, since, since + 3 * MINUTE_MS, MINUTE_MS).await;
            if total(&rows, Count::Accepted) == 2 {
                Ok(rows)
            } else {
                Err(rows)
            }
        },
    )
    .await
    .expect("the flush wrote the counts");
    assert_eq!(total(&rows, Count::Rejected), 1);
    let depth = rows.iter().filter_map(|r| r.gauges.queue_depth).max();
    assert_eq!(depth, Some(1), "the pending message: {rows:?}");
    let limit = rows.iter().filter_map(|r| r.gauges.concurrency_limit).max();
    assert_eq!(limit, Some(17));
    // Counted just before the stop: written by the last flush.
    s.history_counters().add(Count::Failed, 3);
    stop.cancel();
    task.await.unwrap();
    let rows = read(&**s, since, since + 3 * MINUTE_MS, MINUTE_MS).await;
    assert_eq!(total(&rows, Count::Failed), 3, "{rows:?}");
    s.close().await;
}

#[test]
fn the_flush_interval_is_about_ten_seconds() {
    assert_eq!(FLUSH_EVERY, Duration::from_secs(10));
}

crate::on_backends!(
    backends_count_what_they_store_and_record,
    written_history_is_read_back_by_minute_and_in_buckets,
    two_writers_add_into_one_history,
    history_before_a_time_is_pruned,
    history_survives_a_reopen,
    the_flush_loop_writes_counts_and_gauges_and_flushes_at_its_stop,
);
