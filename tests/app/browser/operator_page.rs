//! The operator page in a real browser (Debian's Chromium driven by
//! playwright-core, `tests/browser/`), against the real server. Skipped with a
//! message when Chromium or the node module is missing, except under CI.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::TestApp;
use crate::support::totango::{FakeTotango, Reply};
use crate::support::wait;
use totango_destination::storage::{State, Storage};

/// A fake Totango refusing "Broken Feature" with 400 until `healthy` is set.
async fn flaky(healthy: Arc<AtomicBool>) -> FakeTotango {
    FakeTotango::replying(move |_, params| {
        let broken = params.get("sdr_a").map(String::as_str) == Some("Broken Feature");
        if broken && !healthy.load(Ordering::SeqCst) {
            Reply::status(400).body("totango says no")
        } else {
            Reply::ok()
        }
    })
    .await
}

async fn wait_for(storage: &Arc<dyn Storage>, id: i64, state: State) {
    wait::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            let m = storage.get(id).await.unwrap();
            if m.as_ref().is_some_and(|m| m.state == state) {
                Ok(())
            } else {
                Err(m)
            }
        },
    )
    .await
    .unwrap_or_else(|m| panic!("message {id} never became {state:?}: {m:#?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_page_shows_and_replays_messages() {
    let Some((browser_dir, chromium)) = super::browser() else {
        return;
    };

    let healthy = Arc::new(AtomicBool::new(false));
    let fake = flaky(healthy.clone()).await;
    let dir = crate::support::place();
    let config = crate::support::config(&dir, &fake.uri());
    let srv = TestApp::start(config.clone()).await;
    let (base, storage) = (srv.base.clone(), srv.storage.clone());

    let http = reqwest::Client::new();
    for body in [
        r#"{"userId":"u1","event":"Working Feature","context":{"groupId":"acme"}}"#,
        r#"{"userId":"u2","event":"Broken Feature","context":{"groupId":"acme"}}"#,
        r#"{"userId":"u3","event":"No Account"}"#,
    ] {
        let r = http
            .post(format!("{base}/v1/track"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    wait_for(&storage, 1, State::Delivered).await;
    wait_for(&storage, 2, State::Dead).await;
    wait_for(&storage, 3, State::Rejected).await;
    healthy.store(true, Ordering::SeqCst);

    // The token the server generated at first start, beside the database.
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    // A login link as `admin-link` prints it: a one-time code, not the token.
    let runtime = config.validate().unwrap();
    let (auth, _) = totango_destination::web::auth::AdminAuth::load(&runtime).unwrap();
    let link = auth.login_link(&base);
    let screenshot = dir.path().join("operator.png");
    let stdout = super::run_node(
        &browser_dir,
        &chromium,
        "operator.mjs",
        &[
            base.as_ref(),
            screenshot.as_os_str(),
            token.trim().as_ref(),
            link.as_ref(),
        ],
    )
    .await;
    assert!(stdout.contains("operator page: ok"), "{stdout}");
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "screenshot written"
    );
    if let Ok(keep) = std::env::var("TD_KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
    wait_for(&storage, 2, State::Delivered).await;

    srv.stop().await;
}
