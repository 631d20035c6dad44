//! A fresh PostgreSQL database per test, on the server `TEST_DATABASE_URL`
//! names, dropped (connections and all) when the handle goes.
use sqlx::{Connection, Executor, PgConnection};

/// The server tests create their databases on, if one is configured.
pub fn server_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// A database that exists for as long as this value.
pub struct TestDatabase {
    url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    /// Creates `td_test_<random>`; `None`, saying so, when
    /// `TEST_DATABASE_URL` is not set. `test` names the caller in that line.
    pub fn create(test: &str) -> Option<TestDatabase> {
        let Some(admin_url) = server_url() else {
            eprintln!("skipping {test} on PostgreSQL: TEST_DATABASE_URL is not set");
            return None;
        };
        let name = format!("td_test_{}", uuid::Uuid::new_v4().simple());
        let mut url = url::Url::parse(&admin_url)
            .unwrap_or_else(|e| panic!("TEST_DATABASE_URL {admin_url:?}: {e}"));
        url.set_path(&name);
        let statement = format!("CREATE DATABASE \"{name}\"");
        on_server(&admin_url, statement)
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        Some(TestDatabase {
            url: url.to_string(),
            admin_url,
            name,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = on_server(&self.admin_url, statement) {
            eprintln!("dropping test database {}: {e}", self.name);
        }
    }
}

/// Runs one statement on the server, from a thread of its own so it works
/// inside and outside a runtime (and from `Drop`).
fn on_server(admin_url: &str, statement: String) -> Result<(), sqlx::Error> {
    let admin_url = admin_url.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let mut conn = PgConnection::connect(&admin_url).await?;
                conn.execute(statement.as_str()).await?;
                conn.close().await
            })
    })
    .join()
    .expect("test database thread")
}

/// Judges replica `only` (or every replica) registered in the database at
/// `url` gone, as another replica would after missing its heartbeats
/// (removes its row), and waits until no claim is held: the claims of a
/// replica judged gone are given back.
pub async fn judge_replicas_gone(url: &str, only: Option<i64>) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("DELETE FROM td_replicas WHERE $1::bigint IS NULL OR id = $1")
        .bind(only)
        .execute(&mut conn)
        .await
        .expect("judge replicas gone");
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM td_queue WHERE lease IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .expect("count claims");
        if held == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "{held} claims still held 15 s after their replicas were judged gone"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
