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

/// Signals `notify` for every `NOTIFY td_work` (other replicas queued or
/// released work) and after reconnecting (a signal may have been missed).
/// Reconnects with a growing pause; delivery also polls, so a lost
/// connection only delays work queued elsewhere.
pub(super) async fn listen(pool: PgPool, notify: Arc<Notify>) {
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
                notify.notify_one();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => notify.notify_one(),
                        // The connection was lost; the next call reconnects.
                        Ok(None) => notify.notify_one(),
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
