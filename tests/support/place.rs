//! Where a test's server keeps its data: a real SQLite file in a temporary
//! directory, or its own PostgreSQL database when `TEST_BACKEND=postgres`
//! (on `TEST_DATABASE_URL`'s server).

use super::pg;
use tempfile::TempDir;
use totango_destination::config::Config;

/// Where a test keeps its files and its storage: a temporary directory and,
/// when `TEST_BACKEND=postgres`, a database of its own (dropped with this).
/// Dereferences to the directory.
pub struct TestPlace {
    dir: TempDir,
    db: Option<pg::TestDatabase>,
}

impl std::ops::Deref for TestPlace {
    type Target = TempDir;
    fn deref(&self) -> &TempDir {
        &self.dir
    }
}

impl TestPlace {
    /// The `storage.url` of this place.
    pub fn storage_url(&self) -> String {
        match &self.db {
            Some(db) => db.url().to_owned(),
            None => format!("sqlite://{}", self.dir.path().join("td.db").display()),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.db.is_some()
    }

    /// Points `storage.url` here. On PostgreSQL, also keeps in this directory
    /// the files that live beside a SQLite database (the generated admin
    /// token, the insights snapshots), which would go to ./data otherwise.
    pub fn configure(&self, c: &mut Config) {
        c.storage.url = self.storage_url();
        if self.is_postgres() {
            c.admin.token_file = Some(self.path().join("admin-token"));
            c.insights.snapshot_path = Some(self.path().join("insights.db").display().to_string());
        }
    }
}

/// A fresh place on the backend `TEST_BACKEND` names (`sqlite`, the
/// default, or `postgres`). Not `TD_…`: the server reads those as settings.
pub fn place() -> TestPlace {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = match std::env::var("TEST_BACKEND").as_deref() {
        Ok("postgres") => Some(
            pg::TestDatabase::create("TEST_BACKEND=postgres")
                .expect("TEST_BACKEND=postgres needs TEST_DATABASE_URL"),
        ),
        Ok("sqlite") | Ok("") | Err(_) => None,
        Ok(other) => panic!("TEST_BACKEND={other:?}: expected sqlite or postgres"),
    };
    TestPlace { dir, db }
}

/// Defaults with a fresh storage, a service ID and `endpoint` as Totango.
pub fn config(place: &TestPlace, endpoint: &str) -> Config {
    let mut c = Config::default();
    place.configure(&mut c);
    c.totango.service_id = Some("SP-1234-01".into());
    c.totango.endpoint = Some(endpoint.to_owned());
    c
}
