//! The work signal between replicas: `NOTIFY td_work` at commit when work
//! may be claimable, and a `LISTEN` connection that wakes this process's
//! delivery.

use super::*;
use sqlx::postgres::PgListener;

/// Longest wait between attempts to restore the `LISTEN` connection.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Tells the other replicas, at commit, that work may be claimable.
pub(super) async fn notify_others(conn: &mut PgConnection) -> Result<(), StorageError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(queue::CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// The payload that says a user was erased (delivery re-checks its claims).
const ERASED: &str = "erase";

/// Tells every replica, at commit, that a user was erased: their claimed
/// messages of that user may be cancelled.
pub(super) async fn announce_erase(conn: &mut PgConnection) -> Result<(), StorageError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(queue::CHANNEL)
        .bind(ERASED)
        .execute(conn)
        .await?;
    Ok(())
}

/// Signals `notify` for every `NOTIFY td_work` (other replicas queued or
/// released work) and after reconnecting (a signal may have been missed);
/// counts announced erasures in `erasures`, and counts one after
/// reconnecting too (an announcement may have been missed).
/// Reconnects with a growing pause; delivery also polls, so a lost
/// connection only delays work queued elsewhere.
pub(super) async fn listen(pool: PgPool, notify: Arc<Notify>, erasures: Arc<AtomicU64>) {
    let missed = || {
        erasures.fetch_add(1, Ordering::AcqRel);
        notify.notify_one();
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(queue::CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match listener {
            Ok(mut listener) => {
                backoff = Duration::from_secs(1);
                missed();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => {
                            if n.payload() == ERASED {
                                erasures.fetch_add(1, Ordering::AcqRel);
                            }
                            notify.notify_one()
                        }
                        // The connection was lost; the next call reconnects.
                        Ok(None) => missed(),
                        Err(e) => {
                            tracing::warn!(error = %e, "storage notifications interrupted");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for storage notifications"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}
