//! Restart recovery: undelivered work survives and uses the settings of the
//! new start.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_messages_survive_a_restart() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let fake = Fake::with(move |_, _| {
        if h.load(Ordering::SeqCst) {
            reply(200)
        } else {
            reply(503)
        }
    })
    .await;
    let dir = crate::support::place();
    let srv = Server::start(config(&dir, &fake.uri())).await;

    for n in ["1", "2", "3"] {
        assert_success(
            &srv.post("/v1/identify", Some(KEY), &identify("u1", n))
                .await,
        );
    }
    srv.wait_until(1, "a failed attempt", |m| m.attempts >= 1)
        .await;
    let runtime = srv.stop().await;
    if !dir.is_postgres() {
        assert!(dir.path().join("td.db").exists());
    }

    // Start again on the same file, now with Totango answering.
    let storage = open_storage(&runtime).await.expect("reopen storage");
    let pending: Vec<State> = {
        let mut v = Vec::new();
        for id in 1..=3 {
            v.push(storage.get(id).await.unwrap().expect("kept").state);
        }
        v
    };
    assert_eq!(pending, [State::Pending; 3]);
    healthy.store(true, Ordering::SeqCst);
    let srv = Server::start_with(runtime, storage).await;
    for id in 1..=3 {
        srv.wait_for(id, State::Delivered).await;
    }
    let hits = fake.hits();
    let delivered: Vec<&str> = hits
        .iter()
        .filter(|h| h.status == 200)
        .map(|h| h.get("sdr_u.n").unwrap())
        .collect();
    assert_eq!(
        delivered,
        ["1", "2", "3"],
        "in acceptance order after the restart"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_use_the_endpoint_configured_at_restart() {
    let fake = Fake::ok().await;
    let dir = crate::support::place();
    // First run: Totango unreachable (nothing listens on port 9).
    let srv = Server::start(config(&dir, "http://127.0.0.1:9")).await;
    for event in ["1", "2"] {
        assert_success(&srv.post("/v1/track", Some(KEY), &track("u1", event)).await);
    }
    let m = srv
        .wait_until(1, "a failed connection", |m| m.attempts >= 1)
        .await;
    assert!(
        m.last_response
            .as_ref()
            .and_then(|l| l.error.as_ref())
            .is_some(),
        "a connection error is recorded: {m:#?}"
    );
    assert_eq!(m.state, State::Pending, "connection errors are retried");
    srv.stop().await;

    // The operator fixes the endpoint and restarts.
    let srv = Server::start(config(&dir, &fake.uri())).await;
    srv.wait_for(1, State::Delivered).await;
    srv.wait_for(2, State::Delivered).await;
    let mut sent: Vec<String> = fake
        .hits()
        .iter()
        .map(|h| h.get("sdr_a").unwrap().to_owned())
        .collect();
    sent.sort_unstable();
    assert_eq!(sent, ["1", "2"]);
    srv.stop().await;
}

/// A `2xx` means stored: a server killed (SIGKILL) in the middle of a load
/// keeps every message it answered, whatever was in flight (SQLite: each
/// commit group is answered after its commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_answered_before_a_kill_is_in_the_file() {
    use crate::support::binary::{Served, serve_sqlite_totango_down};
    use std::sync::atomic::AtomicUsize;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("td.db");
    let cmd = serve_sqlite_totango_down(&db);
    let served = tokio::task::block_in_place(|| Served::start(cmd));
    let http = reqwest::Client::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..16)
        .map(|t| {
            let (http, url, answered) = (http.clone(), served.url("/v1/track"), answered.clone());
            tokio::spawn(async move {
                let mut kept = Vec::new();
                for n in 0.. {
                    let id = format!("kill-{t}-{n}");
                    let body = json!({"userId": format!("u{t}"), "event": "Clicked",
                        "messageId": id, "context": {"groupId": "acct-1"}});
                    match http.post(&url).body(body.to_string()).send().await {
                        Ok(r) if r.status() == 200 => {
                            kept.push(id);
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        // Refused or cut off by the kill: not answered.
                        _ => break,
                    }
                }
                kept
            })
        })
        .collect();
    wait::until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || match answered.load(Ordering::Relaxed) {
            n if n >= 2_000 => Ok(()),
            n => Err(n),
        },
    )
    .await
    .unwrap_or_else(|n| panic!("only {n} answered\n{}", served.tail(20)));
    tokio::task::block_in_place(|| served.kill());
    let mut acknowledged = Vec::new();
    for s in senders {
        acknowledged.extend(s.await.unwrap());
    }
    assert!(acknowledged.len() >= 2_000, "{}", acknowledged.len());

    // Opening the file recovers it from its WAL, as the next start would.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stmt = conn.prepare("SELECT message_id FROM messages").unwrap();
    let stored: std::collections::HashSet<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered messages lost, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
}
