//! Operator sessions and one-time login codes, kept in the storage backend
//! (the SQLite file or the PostgreSQL database), so every replica sharing
//! the database knows them and a logout or an expiry holds everywhere.
//!
//! Only SHA-256 digests of the random values are stored: a copy of the
//! database opens no session. Rows also carry a fingerprint of the admin
//! token, so changing the token ends every session and code made with the
//! old one.
//!
//! The table is this module's own (`admin_sessions`, created with `CREATE
//! TABLE IF NOT EXISTS`), beside the queue's tables, on its own connection:
//! SQLite's single writer is not involved, PostgreSQL uses a small pool.

use crate::config::StorageUrl;
use crate::secret::digest;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A session ends after this long without a request.
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// And at the latest this long after sign-in.
pub const ABSOLUTE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A login code (the printed link) is good once, for this long.
pub const CODE_TTL: Duration = Duration::from_secs(15 * 60);
/// `last_seen_at` is written at most this often per session.
const TOUCH_EVERY_MS: i64 = 60_000;

const SQLITE_TABLE: &str = "CREATE TABLE IF NOT EXISTS admin_sessions (
    digest       TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    token        TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
)";
const PG_TABLE: &str = "CREATE TABLE IF NOT EXISTS admin_sessions (
    digest       TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    token        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
)";

#[derive(Debug, Clone, thiserror::Error)]
#[error("admin sessions: {0}")]
pub struct SessionError(String);

impl SessionError {
    pub fn new(why: impl Into<String>) -> SessionError {
        SessionError(why.into())
    }
}

fn err(e: impl std::fmt::Display) -> SessionError {
    SessionError(e.to_string())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Session,
    Code,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Session => "session",
            Kind::Code => "code",
        }
    }
}

/// Where sessions live.
#[derive(Clone)]
pub struct SessionStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite {
        path: PathBuf,
        conn: Arc<Mutex<Option<rusqlite::Connection>>>,
    },
    Postgres {
        pool: PgPool,
        ready: Arc<tokio::sync::OnceCell<()>>,
    },
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

/// A new random value (256 bits, hex) and the digest stored for it.
pub fn new_secret() -> (String, String) {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let value = hex::encode(bytes);
    let stored = stored_digest(&value);
    (value, stored)
}

/// What is stored for a session id or code.
pub fn stored_digest(value: &str) -> String {
    hex::encode(digest(value.as_bytes()))
}

impl SessionStore {
    /// The store of this storage backend. Connects lazily: nothing is
    /// opened until the first sign-in or session check.
    pub fn for_storage(storage: &StorageUrl) -> Result<SessionStore, SessionError> {
        let backend = match storage {
            StorageUrl::Sqlite(path) => Backend::Sqlite {
                path: path.clone(),
                conn: Arc::new(Mutex::new(None)),
            },
            StorageUrl::Postgres(url) => {
                let options: PgConnectOptions = url.parse().map_err(err)?;
                Backend::Postgres {
                    pool: PgPoolOptions::new()
                        .max_connections(2)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_lazy_with(options),
                    ready: Arc::new(tokio::sync::OnceCell::new()),
                }
            }
        };
        Ok(SessionStore { backend })
    }

    async fn sqlite<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, SessionError> {
        let Backend::Sqlite { path, conn } = &self.backend else {
            return Err(err("not SQLite"));
        };
        let (path, conn) = (path.clone(), conn.clone());
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                if !path.exists() {
                    return Err(err(format!("{} does not exist yet", path.display())));
                }
                let c = rusqlite::Connection::open(&path).map_err(err)?;
                c.busy_timeout(Duration::from_secs(5)).map_err(err)?;
                c.execute_batch(SQLITE_TABLE).map_err(err)?;
                *guard = Some(c);
            }
            let c = guard.as_ref().ok_or_else(|| err("no connection"))?;
            f(c).map_err(err)
        })
        .await
        .map_err(err)?
    }

    async fn pg(&self) -> Result<&PgPool, SessionError> {
        let Backend::Postgres { pool, ready } = &self.backend else {
            return Err(err("not PostgreSQL"));
        };
        ready
            .get_or_try_init(|| async {
                // Two replicas creating the table at once: one may lose the
                // race on the catalog; the table exists either way.
                if let Err(e) = sqlx::query(PG_TABLE).execute(pool).await {
                    let exists: Option<(String,)> =
                        sqlx::query_as("SELECT to_regclass('admin_sessions')::text")
                            .fetch_optional(pool)
                            .await
                            .map_err(err)?;
                    if exists.is_none_or(|(t,)| t.is_empty()) {
                        return Err(err(e));
                    }
                }
                Ok(())
            })
            .await?;
        Ok(pool)
    }

    /// Stores a new session or code (by digest), pruning what has expired.
    pub async fn create(
        &self,
        kind: Kind,
        stored: String,
        token: String,
        ttl: Duration,
    ) -> Result<(), SessionError> {
        let now = now_ms();
        let expires = now + ms(ttl);
        let idle_before = now - ms(IDLE);
        match &self.backend {
            Backend::Sqlite { .. } => {
                self.sqlite(move |c| {
                    c.execute(
                        "DELETE FROM admin_sessions WHERE expires_at <= ?1
                         OR (kind = 'session' AND last_seen_at <= ?2)",
                        rusqlite::params![now, idle_before],
                    )?;
                    c.execute(
                        "INSERT INTO admin_sessions
                         (digest, kind, token, created_at, last_seen_at, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
                        rusqlite::params![stored, kind.as_str(), token, now, expires],
                    )?;
                    Ok(())
                })
                .await
            }
            Backend::Postgres { .. } => {
                let pool = self.pg().await?;
                sqlx::query(
                    "DELETE FROM admin_sessions WHERE expires_at <= $1
                     OR (kind = 'session' AND last_seen_at <= $2)",
                )
                .bind(now)
                .bind(idle_before)
                .execute(pool)
                .await
                .map_err(err)?;
                sqlx::query(
                    "INSERT INTO admin_sessions
                     (digest, kind, token, created_at, last_seen_at, expires_at)
                     VALUES ($1, $2, $3, $4, $4, $5)",
                )
                .bind(stored)
                .bind(kind.as_str())
                .bind(token)
                .bind(now)
                .bind(expires)
                .execute(pool)
                .await
                .map_err(err)?;
                Ok(())
            }
        }
    }

    /// Whether this session is live (made with this token, not expired,
    /// not idle too long); refreshes its last use.
    pub async fn check(&self, stored: String, token: String) -> Result<bool, SessionError> {
        let now = now_ms();
        let row: Option<(String, i64, i64)> = match &self.backend {
            Backend::Sqlite { .. } => {
                let stored = stored.clone();
                self.sqlite(move |c| {
                    use rusqlite::OptionalExtension;
                    c.query_row(
                        "SELECT token, last_seen_at, expires_at FROM admin_sessions
                         WHERE digest = ?1 AND kind = 'session'",
                        [stored],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                })
                .await?
            }
            Backend::Postgres { .. } => sqlx::query_as(
                "SELECT token, last_seen_at, expires_at FROM admin_sessions
                 WHERE digest = $1 AND kind = 'session'",
            )
            .bind(&stored)
            .fetch_optional(self.pg().await?)
            .await
            .map_err(err)?,
        };
        let Some((row_token, last_seen, expires)) = row else {
            return Ok(false);
        };
        if row_token != token || now >= expires || now - last_seen >= ms(IDLE) {
            return Ok(false);
        }
        if now - last_seen >= TOUCH_EVERY_MS {
            match &self.backend {
                Backend::Sqlite { .. } => {
                    self.sqlite(move |c| {
                        c.execute(
                            "UPDATE admin_sessions SET last_seen_at = ?1 WHERE digest = ?2",
                            rusqlite::params![now, stored],
                        )
                    })
                    .await?;
                }
                Backend::Postgres { .. } => {
                    sqlx::query("UPDATE admin_sessions SET last_seen_at = $1 WHERE digest = $2")
                        .bind(now)
                        .bind(stored)
                        .execute(self.pg().await?)
                        .await
                        .map_err(err)?;
                }
            }
        }
        Ok(true)
    }

    /// Uses up a login code: true once, for a live code of this token.
    pub async fn redeem(&self, stored: String, token: String) -> Result<bool, SessionError> {
        let now = now_ms();
        let deleted = match &self.backend {
            Backend::Sqlite { .. } => {
                self.sqlite(move |c| {
                    c.execute(
                        "DELETE FROM admin_sessions WHERE digest = ?1 AND kind = 'code'
                         AND token = ?2 AND expires_at > ?3",
                        rusqlite::params![stored, token, now],
                    )
                })
                .await? as u64
            }
            Backend::Postgres { .. } => sqlx::query(
                "DELETE FROM admin_sessions WHERE digest = $1 AND kind = 'code'
                 AND token = $2 AND expires_at > $3",
            )
            .bind(stored)
            .bind(token)
            .bind(now)
            .execute(self.pg().await?)
            .await
            .map_err(err)?
            .rows_affected(),
        };
        Ok(deleted == 1)
    }

    /// Ends a session (logout).
    pub async fn revoke(&self, stored: String) -> Result<(), SessionError> {
        match &self.backend {
            Backend::Sqlite { .. } => {
                self.sqlite(move |c| {
                    c.execute(
                        "DELETE FROM admin_sessions WHERE digest = ?1 AND kind = 'session'",
                        [stored],
                    )
                })
                .await?;
            }
            Backend::Postgres { .. } => {
                sqlx::query("DELETE FROM admin_sessions WHERE digest = $1 AND kind = 'session'")
                    .bind(stored)
                    .execute(self.pg().await?)
                    .await
                    .map_err(err)?;
            }
        }
        Ok(())
    }
}
