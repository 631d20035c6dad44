//! Replica liveness. Each process sharing the database registers a row in
//! `td_replicas` for its lifetime and renews its `alive_until` (database
//! clock) every heartbeat. Every heartbeat also judges the others: a replica
//! not heard from by its `alive_until` is deleted, and the claims it held
//! (`td_queue.replica`) become claimable at once, in the same transaction:
//! claims are only ever taken from a replica by deleting its row, so a
//! replica that finds its row still there has lost nothing. A replica whose own
//! heartbeat has not reached the database for nearly the timeout stops
//! claiming and sending (it fences itself) before anyone may judge it gone.
//!
//! A heartbeat row judged by the others was chosen over a session advisory
//! lock: a lock is freed only when PostgreSQL notices the connection is dead,
//! which for a half-open connection (a partition) takes as long as TCP
//! keepalives say, and it would pin one pooled connection per replica. A
//! row needs no connection of its own, works through poolers, and its
//! timeout is a setting (`storage.replica_timeout_secs`).

use super::super::StorageError;
use super::Inner;
use super::queue::{CHANNEL, CLOCK_MS};
use sqlx::{PgConnection, PgExecutor, PgPool};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Registers a new replica (named after its host and process, for people
/// reading the table); returns its id.
pub async fn register<'c>(conn: impl PgExecutor<'c>, timeout_ms: i64) -> Result<i64, StorageError> {
    let name = format!(
        "{}:{}",
        hostname().unwrap_or_else(|| "unknown".into()),
        std::process::id()
    );
    let id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO td_replicas (id, name, started_at, alive_until) \
         VALUES (nextval('td_replica'), $1, {CLOCK_MS}, {CLOCK_MS} + $2) RETURNING id"
    ))
    .bind(name)
    .bind(timeout_ms)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

/// What one heartbeat found.
pub struct Beat {
    /// This replica's id: `me`, or a new one when `me` had been judged gone.
    pub id: i64,
    /// Replicas judged gone by this heartbeat.
    pub gone: Vec<i64>,
    /// Claims given back (of gone replicas, or orphaned).
    pub freed: u64,
}

/// One heartbeat of replica `me`, in one transaction: judges the others when
/// `judge` (only a replica that has been in touch with the database all
/// along does: after an outage every replica gets a heartbeat's time to
/// renew before anyone is judged), renews its own row (or, when it was
/// judged gone and its claims given back, rejoins under a new id), and gives
/// back the claims of replicas that are gone. `sweep` also looks for claims
/// whose holder vanished without being judged (a scan of the queue; done at
/// start and now and then).
pub async fn beat(
    pool: &PgPool,
    me: i64,
    timeout_ms: i64,
    judge: bool,
    sweep: bool,
) -> Result<Beat, StorageError> {
    let mut tx = pool.begin().await?;
    let gone: Vec<i64> = if judge {
        sqlx::query_scalar(&format!(
            "DELETE FROM td_replicas WHERE alive_until < {CLOCK_MS} AND id <> $1 RETURNING id"
        ))
        .bind(me)
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    let renewed: Option<i64> = sqlx::query_scalar(&format!(
        "UPDATE td_replicas SET alive_until = {CLOCK_MS} + $2 WHERE id = $1 RETURNING id"
    ))
    .bind(me)
    .bind(timeout_ms)
    .fetch_optional(&mut *tx)
    .await?;
    let id = match renewed {
        Some(id) => id,
        None => register(&mut *tx, timeout_ms).await?,
    };
    let freed = if !gone.is_empty() || sweep || renewed.is_none() {
        free_orphans(&mut tx).await?
    } else {
        0
    };
    if freed > 0 {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Beat { id, gone, freed })
}

/// Gives back every claim whose holder is not a registered replica.
async fn free_orphans(conn: &mut PgConnection) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "UPDATE td_queue q SET lease = NULL, leased_until = 0, replica = NULL \
         WHERE q.replica IS NOT NULL AND NOT EXISTS ( \
            SELECT 1 FROM td_replicas r WHERE r.id = q.replica)",
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// A replica that stops: gives back what it still holds and leaves.
pub async fn leave(pool: &PgPool, me: i64) -> Result<u64, StorageError> {
    let mut tx = pool.begin().await?;
    let freed = sqlx::query(
        "UPDATE td_queue SET lease = NULL, leased_until = 0, replica = NULL WHERE replica = $1",
    )
    .bind(me)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM td_replicas WHERE id = $1")
        .bind(me)
        .execute(&mut *tx)
        .await?;
    if freed > 0 {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(freed)
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
}

/// Renews this replica's row every heartbeat and judges the others (see
/// `replica.rs`). A heartbeat that fails or hangs is retried at the next
/// tick; failures are logged once a minute.
pub(super) async fn heartbeat(inner: Arc<Inner>) {
    let every = Duration::from_millis(inner.options.heartbeat_ms.max(1) as u64);
    let quiet = crate::telemetry::Throttle::default();
    let mut ticks: u64 = 0;
    // Whether the previous heartbeat reached the database.
    let mut in_touch = true;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        ticks += 1;
        let me = inner.replica.load(Ordering::Acquire);
        let sent = Instant::now();
        // Now and then, a sweep for claims of holders nobody judged.
        let sweep = ticks % 20 == 0;
        let beat = tokio::time::timeout(
            every.max(Duration::from_secs(1)),
            beat(
                &inner.pool,
                me,
                inner.options.replica_timeout_ms,
                in_touch,
                sweep,
            ),
        )
        .await;
        in_touch = matches!(beat, Ok(Ok(_)));
        match beat {
            Ok(Ok(beat)) => {
                *inner.heard.lock().expect("heard lock") = sent;
                inner.replica.store(beat.id, Ordering::Release);
                log_beat(&beat, me);
                if beat.freed > 0 {
                    inner.notify.notify_one();
                }
                if let Err(e) = inner.settle_claims().await {
                    if quiet.ready() {
                        tracing::warn!(error = %e, "could not settle this replica's claims (said once a minute)");
                    }
                }
            }
            Ok(Err(e)) => {
                if quiet.ready() {
                    tracing::warn!(error = %e, "replica heartbeat failed (said once a minute)");
                }
            }
            Err(_) => {
                if quiet.ready() {
                    tracing::warn!(
                        "replica heartbeat did not reach the database in time (said once a minute)"
                    );
                }
            }
        }
    }
}

pub(super) fn log_beat(beat: &Beat, me: i64) {
    if beat.id != me {
        tracing::warn!(
            old = me,
            new = beat.id,
            "this replica was judged gone (its heartbeat was late): the messages it held \
             went back to the queue; rejoined under a new id"
        );
    }
    if !beat.gone.is_empty() || beat.freed > 0 {
        tracing::info!(
            replicas = ?beat.gone,
            messages = beat.freed,
            "replicas gone: the messages they held are claimable again"
        );
    }
}
