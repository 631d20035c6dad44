//! Snapshots (the last insights read per account) and run summaries, in a
//! small SQLite file of their own. Kept apart from the message queue's
//! storage on purpose: the queue backend is pluggable (SQLite, PostgreSQL)
//! and its trait is about messages; insights are a cache of Totango's data
//! that can be rebuilt by the next sync.

use super::model::{AccountInsights, record_key};
use super::sync::RunSummary;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

/// A record's account, or how many accounts claim it when several do.
pub type Linked = Result<AccountInsights, usize>;

/// Run summaries kept.
const KEEP_RUNS: i64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("insights store {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// The blocking task that ran the call did not finish.
    #[error("insights store task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub struct Store {
    path: PathBuf,
    conn: std::sync::Mutex<Connection>,
}

impl Store {
    /// Opens (creating) the file and its tables.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS snapshots (
                 account_id TEXT PRIMARY KEY,
                 salesforce_id TEXT,
                 synced_at TEXT NOT NULL,
                 insights TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS snapshots_salesforce_id ON snapshots (salesforce_id);
             CREATE INDEX IF NOT EXISTS snapshots_record_key
                 ON snapshots (substr(salesforce_id, 1, 15));
             CREATE TABLE IF NOT EXISTS runs (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 started_at TEXT NOT NULL,
                 summary TEXT NOT NULL
             );",
        )
        .map_err(err)?;
        Ok(Store {
            path: path.to_owned(),
            conn: std::sync::Mutex::new(conn),
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Replaces the snapshots of these accounts, in one transaction.
    pub fn save_snapshots(&self, accounts: &[AccountInsights]) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare(
                    "INSERT OR REPLACE INTO snapshots (account_id, salesforce_id, synced_at, insights)
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| self.err(e))?;
            for a in accounts {
                let json = serde_json::to_string(a).expect("insights serialize");
                stmt.execute(params![a.account_id, a.salesforce_id, a.synced_at, json])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The snapshot of an account, by Totango account id (only).
    pub fn snapshot_by_account(&self, id: &str) -> Result<Option<AccountInsights>, StoreError> {
        let conn = self.conn.lock().expect("store lock");
        let json: Option<String> = conn
            .query_row(
                "SELECT insights FROM snapshots WHERE account_id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// The snapshot of the account linked to a Salesforce record Id (only;
    /// its 15- and 18-character forms are one record); `Some(Err(n))` when
    /// `n` > 1 accounts claim that record.
    pub fn snapshot_by_record(&self, id: &str) -> Result<Option<Linked>, StoreError> {
        let key = record_key(id);
        let conn = self.conn.lock().expect("store lock");
        let mut stmt = conn
            .prepare(
                "SELECT salesforce_id, insights FROM snapshots
                 WHERE substr(salesforce_id, 1, 15) = substr(?1, 1, 15)",
            )
            .map_err(|e| self.err(e))?;
        let rows: Vec<String> = stmt
            .query_map([key], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?
            .filter_map(|row| match row {
                Ok((sfid, json)) if record_key(&sfid) == key => Some(Ok(json)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        Ok(match rows.as_slice() {
            [] => None,
            [one] => serde_json::from_str(one).ok().map(Ok),
            many => Some(Err(many.len())),
        })
    }

    /// Stores a finished run; returns its id.
    pub fn save_run(&self, summary: &RunSummary) -> Result<i64, StoreError> {
        let conn = self.conn.lock().expect("store lock");
        let json = serde_json::to_string(summary).expect("summary serializes");
        conn.execute(
            "INSERT INTO runs (started_at, summary) VALUES (?1, ?2)",
            params![summary.started_at, json],
        )
        .map_err(|e| self.err(e))?;
        let id = conn.last_insert_rowid();
        conn.execute("DELETE FROM runs WHERE id <= ?1", [id - KEEP_RUNS])
            .map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// The most recent runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunSummary>, StoreError> {
        let conn = self.conn.lock().expect("store lock");
        let mut stmt = conn
            .prepare("SELECT id, summary FROM runs ORDER BY id DESC LIMIT ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row.map_err(|e| self.err(e))?;
            if let Ok(mut s) = serde_json::from_str::<RunSummary>(&json) {
                s.id = Some(id);
                out.push(s);
            }
        }
        Ok(out)
    }
}
