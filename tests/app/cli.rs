//! The real binary: `translate` exit codes, `check-config`, start-up refusal,
//! graceful shutdown on SIGTERM that leaves undelivered work stored, and
//! slow clients cut off by the read timeouts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::binary::{self, Served};
use crate::support::wait;

fn translate(settings: &str, stdin: &str) -> (i32, String, String) {
    let mut child = binary::command()
        .args(["translate", "--settings", settings])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command may exit (bad --settings) before it reads stdin.
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn translate_prints_the_spec_shape() {
    let (code, out, _) = translate(
        r#"{"service_id":"SP-1234-01","endpoint":"http://fake.test/"}"#,
        r#"{"type":"track","userId":"u","event":"E","context":{"groupId":"g"}}"#,
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outcome"], "send");
    assert_eq!(v["code"], serde_json::Value::Null);
    assert_eq!(v["requests"][0]["method"], "GET");
    assert_eq!(v["requests"][0]["url"], "http://fake.test/pixel.gif/");
    assert_eq!(v["requests"][0]["params"]["sdr_a"], "E");
}

#[test]
fn translate_exit_codes() {
    let settings = r#"{"service_id":"SP-1234-01"}"#;
    assert_eq!(translate(settings, "[1,2]").0, 1, "not an object");
    assert_eq!(translate(settings, "{nope").0, 1, "not JSON");
    // A rejected message is still a successful translation.
    let (code, out, _) = translate(settings, r#"{"type":"identify","userId":"u"}"#);
    assert_eq!(code, 0);
    assert!(out.contains(r#""code":"missing_group_id""#), "{out}");
    let (code, _, err) = translate(r#"{"region":"us"}"#, "{}");
    assert_eq!(code, 2);
    assert!(err.contains("service_id"), "{err}");
    let (code, _, err) = translate(r#"{"service_id":"SP-1234-01","regoin":"eu"}"#, "{}");
    assert_eq!(code, 2);
    assert!(err.contains("regoin"), "{err}");
}

#[test]
fn check_config_redacts_secrets() {
    let out = binary::command()
        .arg("check-config")
        .env("TD_TOTANGO__API_TOKEN", "very-secret-token")
        .env("TD_AUTH__WRITE_KEYS", "very-secret-key")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("very-secret"), "{text}");
    assert!(text.contains("api_token = \"[redacted]\""), "{text}");
}

#[test]
fn check_config_hides_the_database_password() {
    for url in [
        "postgres://td:very-secret-pw@db:5432/totango?sslmode=require",
        "postgres://td@db:5432/totango?sslmode=require&password=very-secret-pw",
    ] {
        let out = binary::command()
            .arg("check-config")
            .env("TD_STORAGE__URL", url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains("very-secret"), "{text}");
        assert!(text.contains("@db:5432/totango?sslmode=require"), "{text}");
    }
}

#[test]
fn check_config_names_the_bad_setting() {
    let out = binary::command()
        .arg("check-config")
        .env("TD_DELIVERY__RETRY_BASE_MS", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("delivery.retry_base_ms"), "{err}");
}

#[test]
fn refuses_to_start_open_on_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = binary::command()
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env(
            "TD_STORAGE__URL",
            format!("sqlite://{}", dir.path().join("x.db").display()),
        )
        .env_remove("TD_AUTH__WRITE_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("auth.write_keys") && err.contains("TD_AUTH__ALLOW_OPEN"),
        "{err}"
    );
}

/// `serve` on `db` (and `extra` settings), once `/readyz` answers 200.
fn serve(db: &std::path::Path, extra: &[(&str, &str)]) -> Served {
    let mut cmd = binary::serve();
    cmd.env("TD_STORAGE__URL", format!("sqlite://{}", db.display()))
        .env("TD_TOTANGO__SERVICE_ID", "SP-1234-01")
        // Nothing listens on port 9: every delivery attempt fails and is retried.
        .env("TD_TOTANGO__ENDPOINT", "http://127.0.0.1:9")
        .env("TD_AUTH__WRITE_KEYS", "k");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let served = Served::start(cmd);
    let port = served.port;
    wait::until_blocking(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || match get(port, "/readyz") {
            Some(resp) if resp.starts_with("HTTP/1.1 200") => Ok(()),
            other => Err(other),
        },
    )
    .unwrap_or_else(|last| panic!("server not ready: {last:?}\n{}", served.output()));
    served
}

fn post(port: u16, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = "azo="; // base64("k:")
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
fn sigterm_stops_cleanly_and_keeps_undelivered_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let served = serve(&db, &[]);
    for i in 0..3 {
        let body = format!(
            r#"{{"userId":"u{i}","event":"E","messageId":"m{i}","context":{{"groupId":"g"}}}}"#
        );
        let resp = post(served.port, "/v1/track", &body);
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    served.terminate();
    let status = wait::until_blocking(Duration::from_secs(30), Duration::from_millis(50), || {
        served.try_wait().ok_or(())
    })
    .expect("no exit after SIGTERM");
    assert!(status.success(), "{status}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let pending: i64 = conn
        .query_row("SELECT COUNT(*) FROM messages m JOIN queue q ON q.message = m.id WHERE m.state = 'pending'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        pending, 3,
        "accepted messages stay queued for the next start"
    );
}

/// Whether the server has closed `s` (end of stream or reset), without
/// waiting.
fn closed_by_server(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let closed = match s.peek(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Reads until the server closes the connection or `limit` passes.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    (String::from_utf8_lossy(&buf).into_owned(), start.elapsed())
}

#[test]
fn stalled_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(
        &dir.path().join("td.db"),
        &[
            ("TD_LIMITS__HEADER_READ_TIMEOUT_MS", "300"),
            ("TD_LIMITS__BODY_READ_TIMEOUT_MS", "300"),
        ],
    );
    // Headers that never finish.
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (_, waited) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        waited < Duration::from_secs(5),
        "header read not cut off ({waited:?})"
    );

    // A body shorter than its Content-Length.
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic azo=\r\nContent-Length: 100\r\n\r\n{\"type\"").unwrap();
    let (resp, waited) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        waited < Duration::from_secs(5),
        "body read not cut off ({waited:?})"
    );
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("body_timeout"), "{resp}");

    // A body dripped in one byte at a time: each gap is short, the total is not.
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic azo=\r\nContent-Length: 40\r\n\r\n").unwrap();
    let started = Instant::now();
    // All 40 bytes arrive (50 ms apart, 2 s in all): only a deadline on the
    // whole body answers 408; a per-gap timeout would read it and answer 400.
    for _ in 0..40 {
        if s.write_all(b" ").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(served);
}

#[test]
fn json_logs_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = binary::serve();
    cmd.env(
        "TD_STORAGE__URL",
        format!("sqlite://{}", dir.path().join("td.db").display()),
    )
    .env("TD_TOTANGO__SERVICE_ID", "SP-1234-01")
    .env("TD_LOG_FORMAT", "json");
    let served = Served::start(cmd);
    let first = served.stdout_lines().first().cloned().unwrap_or_default();
    drop(served);
    let line: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert!(
        line["level"].is_string() && line["message"].is_string(),
        "{line}"
    );
}

#[test]
fn one_client_address_cannot_take_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(
        &dir.path().join("td.db"),
        &[("TD_LIMITS__MAX_CONNECTIONS_PER_CLIENT", "3")],
    );
    let health = |port: u16| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        read_until_closed(&mut s, Duration::from_secs(10)).0
    };
    // Three connections that never send a request hold this address's places.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", served.port)).unwrap())
        .collect();
    // Once the server has accepted them (later on a loaded machine), a
    // fourth is closed without an answer.
    wait::until_blocking(Duration::from_secs(10), Duration::from_millis(100), || {
        // An earlier connection (the readiness probe's, the last check's)
        // counts until the server's task for it has ended, which can be
        // after the client saw it closed: one of the three may have been
        // refused as a fourth itself. It is replaced, so three are held.
        for s in held.iter_mut() {
            if closed_by_server(s) {
                *s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
            }
        }
        let answer = health(served.port);
        if answer.is_empty() {
            Ok(())
        } else {
            Err(answer)
        }
    })
    .unwrap_or_else(|answer| panic!("a fourth connection is still served: {answer}"));
    // Once one closes, the address is served again.
    drop(held);
    wait::until_blocking(Duration::from_secs(10), Duration::from_millis(50), || {
        let answer = health(served.port);
        if answer.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(answer)
        }
    })
    .unwrap_or_else(|answer| panic!("never served again: {answer:?}"));
}

#[test]
fn a_small_body_gets_a_deadline_that_fits_its_size() {
    let dir = tempfile::tempdir().unwrap();
    // The cap is a minute; a 20-byte body gets 5 s plus what 20 bytes need.
    let served = serve(
        &dir.path().join("td.db"),
        &[("TD_LIMITS__BODY_READ_TIMEOUT_MS", "60000")],
    );
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic azo=\r\nContent-Length: 20\r\n\r\n{")
        .unwrap();
    // Well before the one-minute cap, the stalled body is answered 408.
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(30));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
    assert!(resp.contains("body_timeout"), "{resp}");
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    Some(resp)
}

/// Starts `serve` on `db` without waiting for readiness (storage may be
/// unusable); stderr is kept for the test to read.
fn serve_unready(db: &std::path::Path) -> Served {
    let mut cmd = binary::serve();
    cmd.env("TD_STORAGE__URL", format!("sqlite://{}", db.display()))
        .env("TD_TOTANGO__SERVICE_ID", "SP-1234-01")
        .env("TD_TOTANGO__ENDPOINT", "http://127.0.0.1:9")
        .env("TD_AUTH__WRITE_KEYS", "k")
        .env("TD_LOG_FORMAT", "text");
    let served = Served::start(cmd);
    let port = served.port;
    wait::until_blocking(Duration::from_secs(20), Duration::from_millis(50), || {
        if get(port, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return Ok(());
        }
        assert!(
            served.try_wait().is_none(),
            "the server exited instead of starting"
        );
        Err(())
    })
    .expect("server did not answer /healthz");
    served
}

/// Kills the server and returns what it wrote to stderr.
fn stderr_of(served: Served) -> String {
    served.kill_and_take_stderr()
}

#[test]
fn a_damaged_database_starts_degraded_instead_of_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let garbage = vec![b'x'; 16 * 1024];
    std::fs::write(&db, &garbage).unwrap();
    let served = serve_unready(&db);
    let port = served.port;

    let ready = get(port, "/readyz").unwrap();
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("storage damaged"), "{ready}");
    let track = r#"{"type":"track","userId":"u1","event":"E","context":{"groupId":"a1"}}"#;
    let answer = post(port, "/v1/track", track);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("storage damaged"), "{answer}");
    // Still running a while later: no exit, so no restart loop.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(served.try_wait().is_none(), "the server exited");
    assert!(get(port, "/healthz").unwrap().starts_with("HTTP/1.1 200"));

    let err = stderr_of(served);
    assert!(
        err.contains("is damaged") && err.contains(".recover"),
        "the log names the file and the way to recover: {err}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        garbage,
        "the damaged file is left as it was"
    );
}

#[test]
fn a_database_held_by_another_process_is_waited_for() {
    use fs4::fs_std::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let lock = std::fs::File::create(dir.path().join("td.db.lock")).unwrap();
    assert!(lock.try_lock_exclusive().unwrap());
    let served = serve_unready(&db);
    let port = served.port;
    let ready = get(port, "/readyz").unwrap();
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("storage unavailable"),
        "{ready}"
    );

    // The other process lets go: the server opens the file on its next try.
    drop(lock);
    wait::until_blocking(Duration::from_secs(20), Duration::from_millis(100), || {
        let ready = get(port, "/readyz").unwrap_or_default();
        if ready.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(ready)
        }
    })
    .unwrap_or_else(|ready| panic!("never became ready: {ready}"));
    let track = r#"{"type":"track","userId":"u1","event":"E","context":{"groupId":"a1"}}"#;
    let answer = post(port, "/v1/track", track);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let err = stderr_of(served);
    assert!(err.contains("in use by another server process"), "{err}");
}

fn migrate(storage_url: &str) -> (i32, String, String) {
    let out = binary::command()
        .arg("migrate")
        .env("TD_STORAGE__URL", storage_url)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn migrate_creates_or_upgrades_the_schema_and_says_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("td.db").display());
    let (code, out, err) = migrate(&url);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("storage schema version "), "{out}");
    assert!(dir.path().join("td.db").exists());
    // Once more: nothing to do, the same answer.
    assert_eq!(migrate(&url), (0, out, String::new()));
}

use crate::support::pg;

#[test]
fn migrate_works_on_postgres_and_refuses_a_newer_schema() {
    let Some(db) = pg::TestDatabase::create("migrate_works_on_postgres") else {
        return;
    };
    let (code, out, err) = migrate(db.url());
    assert_eq!(code, 0, "{err}");
    let version = out
        .trim()
        .strip_prefix("storage schema version ")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(migrate(db.url()).1, out, "a second run changes nothing");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
            let newer = version.parse::<i32>().unwrap() + 1;
            sqlx::query("INSERT INTO td_schema (version) VALUES ($1)")
                .bind(newer)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        });
    let (code, _, err) = migrate(db.url());
    assert_ne!(code, 0);
    assert!(err.contains("upgrade the server"), "{err}");
}
