//! The whole corpus, against the server with keys and in open mode.

use super::*;

pub(super) fn corpus() -> Vec<Case> {
    let mut all = Vec::new();
    all.extend(malformed_bodies());
    all.extend(
        trailing_bytes()
            .into_iter()
            .map(|c| c.expect(any_of(&[200, 400]))),
    );
    all.extend(wrong_types());
    all.extend(huge_numbers());
    all.extend(hostile_ids());
    all.extend(encodings());
    all.extend(oversized());
    all.extend(credentials());
    all.extend(segment_settings());
    all.extend(shapes());
    all.extend(paths());
    all.extend(methods());
    all.extend(headers());
    all.extend(admin());
    all.extend(later_fixed().into_iter().map(|(_, c, _)| {
        let mut c = c;
        // Answered either way today; strictly in the ignored tests.
        c.expect = any_of(&[200, 400, 401, 403, 408, 413, 415, 501]).protocol();
        c
    }));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_answered_cleanly() {
    let env = start(false).await;
    let cases = corpus();
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(
            names.insert(c.name.clone()),
            "duplicate case name {}",
            c.name
        );
    }
    let n = run_corpus(&env.server.base, cases).await;
    eprintln!("{n} hostile inputs answered cleanly");
    assert!(n >= 200, "only {n} hostile inputs");
    env.server.stop().await;
}

/// Open mode (the quick start): the admin API and ingest from a loopback
/// client, hostile variants included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_in_open_mode_are_answered_cleanly() {
    let env = start(true).await;
    let body = message("/v1/track", "open").to_string();
    let mut cases = vec![
        Case::new("open: admin via a proxy header", "GET", "/api/stats")
            .header("X-Forwarded-For", "203.0.113.9")
            .length(Length::Omit)
            .expect(any_of(&[401, 403])),
        Case::new("open: admin with a foreign Host", "GET", "/api/stats")
            .header("Host", "evil.example")
            .length(Length::Omit)
            .expect(any_of(&[401, 403])),
        Case::new(
            "open: cross-site replay",
            "POST",
            "/api/replay?outcome=dead",
        )
        .header("Origin", "https://evil.example")
        .header("Sec-Fetch-Site", "cross-site")
        .expect(any_of(&[401, 403])),
        Case::new("open: /segment without a key", "POST", "/segment")
            .body(body.clone())
            .expect(any_of(&[200])),
    ];
    for path in ["/v1/track", "/segment", "/webhook"] {
        for (what, b) in [("garbage", &b"\x00\xff"[..]), ("empty", &b""[..])] {
            cases.push(
                Case::new(format!("open: {path} {what}"), "POST", path)
                    .body(b.to_vec())
                    .expect(any_of(&[400])),
            );
        }
    }
    cases.extend(open_mode_cases().into_iter().map(|(_, mut c, _)| {
        c.name = format!("open: {}", c.name);
        c
    }));
    run_corpus(&env.server.base, cases).await;
    env.server.stop().await;
}
