//! Answers that changed with fixes, asserted strictly one by one.

use super::*;

/// Cases the issues list as defects of today's server, with the answer the
/// issue asks for, and a check of the answer beyond its status.
pub(super) type Check = fn(&Answer) -> Result<(), String>;

pub(super) fn none(_: &Answer) -> Result<(), String> {
    Ok(())
}

pub(super) fn later_fixed() -> Vec<(&'static str, Case, Check)> {
    let mut out: Vec<(&'static str, Case, Check)> = Vec::new();
    // Issue 6.9: trailing bytes after the JSON body are refused.
    for c in trailing_bytes() {
        out.push((
            "6.9 trailing",
            c.tap(|c| c.name = format!("fixed: {}", c.name)),
            none,
        ));
    }
    // Issue 6.9: Content-Encoding matched case-insensitively.
    for path in ["/v1/track", "/segment", "/webhook"] {
        let plain = wrap(path, &message(path, &format!("GZIP-{path}")));
        out.push((
            "6.9 case",
            ingest(format!("fixed: {path} Content-Encoding GZIP"), path, &plain)
                .header("Content-Encoding", "GZIP")
                .body(gzip(&plain))
                .expect(any_of(&[200])),
            none,
        ));
    }
    // Issue 6.9: the Bearer scheme is case-insensitive; the admin 401 asks for Bearer.
    for scheme in ["bearer", "BEARER"] {
        out.push((
            "6.9 case",
            Case::new(format!("fixed: admin {scheme} scheme"), "GET", "/api/stats")
                .header("Authorization", format!("{scheme} {ADMIN_TOKEN}"))
                .length(Length::Omit)
                .expect(any_of(&[200])),
            none,
        ));
    }
    out.push((
        "6.9 case",
        Case::new("fixed: admin 401 asks for Bearer", "GET", "/api/stats")
            .length(Length::Omit)
            .expect(error(401, "unauthorized")),
        |a| match a.header("www-authenticate") {
            Some(v) if v.to_ascii_lowercase().starts_with("bearer") => Ok(()),
            other => Err(format!("WWW-Authenticate {other:?}, expected Bearer")),
        },
    ));
    // Issue 6.3: an array signed by its first element only is refused by default.
    {
        let first = json!({"type":"track","messageId":"first-signed","userId":"u","event":"E","context":{"groupId":"g"}});
        let extra = json!({"type":"track","messageId":"appended","userId":"evil","event":"Forged","context":{"groupId":"g"}});
        let body = json!([first, extra]).to_string();
        out.push((
            "6.3",
            Case::new(
                "fixed: /webhook array signed by its first element",
                "POST",
                "/webhook",
            )
            .header("X-Signature", hmac_hex(first.to_string().as_bytes()))
            .body(body)
            .expect(error(401, "unauthorized")),
            none,
        ));
    }
    // Issue 6.4: credentials are checked before the body is read: a stalled
    // body with bad credentials is answered 401, not 408 after the deadline.
    for (path, auth) in [
        ("/webhook", None),
        ("/v1/track", Some(basic("wk-wrong"))),
        ("/segment", Some(basic("wk-wrong"))),
    ] {
        let mut c = Case::new(
            format!("fixed: {path} stalled body, bad credentials"),
            "POST",
            path,
        )
        .length(Length::Declared("4096".into()))
        .expect(error(401, "unauthorized"));
        if let Some(a) = auth {
            c = c.header("Authorization", a);
        }
        out.push(("6.4", c, none));
    }
    // Issue 6.1: limits hold on the merged item.
    {
        let ctx = json!({"groupId": "g", "pad": "c".repeat(20_000)});
        let item = json!({"type":"track","messageId":"merged-big","userId":"u","event":"E","properties":{"pad":"p".repeat(20_000)}});
        let body = json!({"batch":[item], "context": ctx}).to_string();
        out.push((
            "6.1",
            ingest(
                "fixed: /v1/batch merged item over 32 KB (rejected alone)",
                "/v1/batch",
                body.as_bytes(),
            )
            .expect(any_of(&[200])),
            none,
        ));
    }
    // Issue 7.1: one wrongly typed batch item is rejected alone (200).
    for (field, raw) in [
        ("context.groupId", r#"{"id":"acme"}"#),
        ("timestamp", "1700000000"),
    ] {
        let good = message("/v1/batch", &format!("item-good-{field}"));
        let bad = with_field(
            message("/v1/batch", &format!("item-bad-{field}")),
            field,
            raw,
        );
        for path in ["/v1/batch", "/v1/import"] {
            let body =
                json!({"batch":[good.clone().tap_id(path), bad.clone().tap_id(path)]}).to_string();
            out.push((
                "7.1",
                ingest(
                    format!("fixed: {path} item with {field} = {raw}"),
                    path,
                    body.as_bytes(),
                )
                .expect(any_of(&[200])),
                |a| match a.json() {
                    Some(v) if v["success"] == true => Ok(()),
                    _ => Err("expected {\"success\":true}".into()),
                },
            ));
        }
    }
    // Issue 7.1: a batch item without a type is rejected alone.
    out.push((
        "7.1",
        ingest(
            "fixed: /v1/batch item without a type",
            "/v1/batch",
            json!({"batch":[message("/v1/batch","typed"), {"userId":"u","messageId":"untyped"}]})
                .to_string()
                .as_bytes(),
        )
        .expect(any_of(&[200])),
        none,
    ));
    // Issue 7.1, webhook arrays: the bad item is rejected (400 with outcomes,
    // so Segment shows it), the good one accepted.
    {
        let good = message("/webhook", "wh-item-good");
        let bad = with_field(
            message("/webhook", "wh-item-bad"),
            "timestamp",
            "1700000000",
        );
        let body = json!([good, bad]).to_string();
        out.push((
            "7.1",
            ingest(
                "fixed: /webhook array with a wrongly typed item",
                "/webhook",
                body.as_bytes(),
            )
            .expect(error(400, "invalid_field")),
            |a| {
                let v = a.json().ok_or("no JSON")?;
                let o = &v["outcomes"];
                if o[0]["outcome"] == "accepted"
                    && o[1]["outcome"] == "rejected"
                    && o[1]["code"] == "invalid_field"
                {
                    Ok(())
                } else {
                    Err(format!("outcomes {o}"))
                }
            },
        ));
    }
    // Issue 7.2, as issue 18 changed it: Segment's delete call erases its
    // user and answers 200 everywhere (outcome `erased`), once durable.
    let delete =
        json!({"type":"delete","messageId":"delete-1","userId":"u-del","context":{"groupId":"g"}});
    out.push((
        "7.2",
        ingest(
            "fixed: /v1/batch delete",
            "/v1/batch",
            json!({"batch":[delete]}).to_string().as_bytes(),
        )
        .expect(any_of(&[200])),
        none,
    ));
    let mut d2 = delete.clone();
    d2["messageId"] = json!("delete-2");
    out.push((
        "7.2",
        ingest(
            "fixed: /webhook delete",
            "/webhook",
            d2.to_string().as_bytes(),
        )
        .expect(any_of(&[200])),
        |a| match a.json() {
            Some(v) if v["outcomes"][0]["outcome"] == "erased" => Ok(()),
            other => Err(format!("expected outcome erased: {other:?}")),
        },
    ));
    let mut d3 = delete.clone();
    d3["messageId"] = json!("delete-3");
    out.push((
        "7.2",
        ingest(
            "fixed: /segment delete",
            "/segment",
            d3.to_string().as_bytes(),
        )
        .expect(any_of(&[200])),
        |a| match a.json() {
            Some(v) if v["outcome"] == "erased" => Ok(()),
            other => Err(format!("expected outcome erased: {other:?}")),
        },
    ));
    out
}

trait TapId {
    fn tap_id(self, path: &str) -> Value;
}

impl TapId for Value {
    /// A messageId unique per path, so the same item is not a duplicate.
    fn tap_id(mut self, path: &str) -> Value {
        let id = format!("{}{path}", self["messageId"].as_str().unwrap_or_default());
        self["messageId"] = json!(id);
        self
    }
}

pub(super) async fn run_strict(base: &str, cases: Vec<(Case, Check)>) {
    let mut failures = Vec::new();
    for (c, check) in cases {
        let answer = send(base, &c).await;
        // 501 is the deliberate answer for an unsupported call on /segment.
        let verdict = match (&answer, c.expect.statuses.as_slice()) {
            (Ok(a), [501]) if a.status == 501 => None,
            _ => judge(&c, &answer),
        }
        .or_else(|| answer.as_ref().ok().and_then(|a| check(a).err()));
        if let Some(why) = verdict {
            failures.push(format!("{}: {why}", c.name));
        }
    }
    assert_healthy(base).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs the `later_fixed` cases of one issue item strictly.
pub(super) async fn strictly(item: &str) {
    let env = start(false).await;
    let cases: Vec<(Case, Check)> = later_fixed()
        .into_iter()
        .filter(|(i, _, _)| *i == item)
        .map(|(_, c, check)| (c, check))
        .collect();
    assert!(!cases.is_empty(), "no cases for {item}");
    run_strict(&env.server.base, cases).await;
    env.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn trailing_bytes_after_the_body_are_refused() {
    strictly("6.9 trailing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn encoding_and_bearer_names_are_case_insensitive() {
    strictly("6.9 case").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn webhook_arrays_signed_by_their_first_element_are_refused_by_default() {
    strictly("6.3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn credentials_are_checked_before_the_body_is_read() {
    strictly("6.4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn limits_hold_on_merged_batch_items() {
    strictly("6.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn one_bad_item_does_not_cost_the_batch() {
    strictly("7.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn segment_delete_calls_erase_their_user() {
    strictly("7.2").await;
}

/// Issue 7.1: after a batch with one wrongly typed item, that item is stored
/// as `rejected` with code `invalid_field` and the others are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn batch_item_errors_reject_that_item_only() {
    let env = start(false).await;
    let good = message("/v1/batch", "stored-good");
    let bad = with_field(
        message("/v1/batch", "stored-bad"),
        "context.groupId",
        r#"{"id":1}"#,
    );
    let c = ingest(
        "batch with one bad item",
        "/v1/batch",
        json!({"batch":[good, bad]}).to_string().as_bytes(),
    )
    .expect(any_of(&[200]));
    let a = send(&env.server.base, &c).await;
    assert_eq!(judge(&c, &a), None);
    let list = |query: &str| {
        Case::new(query, "GET", format!("/api/messages?{query}"))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .length(Length::Omit)
    };
    let rejected = send(&env.server.base, &list("outcome=rejected"))
        .await
        .unwrap();
    let rejected = rejected.json().unwrap();
    let messages = rejected["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{rejected}");
    assert_eq!(messages[0]["code"], "invalid_field", "{rejected}");
    assert_eq!(
        messages[0]["payload"]["messageId"], "hostile-stored-bad",
        "{rejected}"
    );
    let all = send(&env.server.base, &list("limit=10")).await.unwrap();
    let all = all.json().unwrap();
    assert_eq!(all["messages"].as_array().unwrap().len(), 2, "{all}");
    env.server.stop().await;
}

/// Issues 6.2, 6.5 and 6.6, in open mode (the quick start): the admin API
/// needs a credential even from a loopback client (a token is generated at
/// first start), the operator page cannot be framed, and a cross-site browser
/// request cannot post events.
pub(super) fn open_mode_cases() -> Vec<(&'static str, Case, Check)> {
    let body: Value = message("/v1/track", "cross-site");
    let mut cases: Vec<(&'static str, Case, Check)> = vec![
        (
            "6.2",
            Case::new(
                "admin API without a credential from loopback",
                "GET",
                "/api/stats",
            )
            .length(Length::Omit)
            .expect(error(401, "unauthorized")),
            none,
        ),
        (
            "6.2",
            Case::new(
                "replay without a credential",
                "POST",
                "/api/replay?outcome=dead",
            )
            .expect(error(401, "unauthorized")),
            none,
        ),
        (
            "6.5",
            Case::new("operator page cannot be framed", "GET", "/")
                .length(Length::Omit)
                // The sign-in form: HTML, and no more frameable than the page.
                .expect(any_of(&[401]).protocol()),
            |a| {
                let csp = a.header("content-security-policy").unwrap_or_default();
                let framing =
                    a.header("x-frame-options").is_some() || csp.contains("frame-ancestors");
                let nosniff = a.header("x-content-type-options") == Some("nosniff");
                let referrer = a.header("referrer-policy").is_some();
                if framing && nosniff && referrer && !csp.contains("unsafe-inline") {
                    Ok(())
                } else {
                    Err(format!("headers {:?}", a.headers))
                }
            },
        ),
    ];
    for (i, path) in ["/v1/track", "/v1/batch", "/webhook", "/segment"]
        .into_iter()
        .enumerate()
    {
        let mut m = body.clone();
        m["messageId"] = json!(format!("cross-site-{i}"));
        cases.push((
            "6.6",
            Case::new(
                format!("cross-site text/plain post to {path}"),
                "POST",
                path,
            )
            .header("Content-Type", "text/plain")
            .header("Origin", "https://evil.example")
            .header("Sec-Fetch-Site", "cross-site")
            .header("Sec-Fetch-Mode", "no-cors")
            .body(wrap(path, &m))
            .expect(any_of(&[400, 401, 403])),
            none,
        ));
    }
    cases
}

pub(super) async fn strictly_in_open_mode(item: &str) {
    let env = start(true).await;
    let cases: Vec<(Case, Check)> = open_mode_cases()
        .into_iter()
        .filter(|(i, _, _)| *i == item)
        .map(|(_, c, check)| (c, check))
        .collect();
    run_strict(&env.server.base, cases).await;
    env.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn admin_api_always_needs_a_credential() {
    strictly_in_open_mode("6.2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn operator_page_cannot_be_framed() {
    strictly_in_open_mode("6.5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn cross_site_browser_posts_are_refused_in_open_mode() {
    strictly_in_open_mode("6.6").await;
}

/// Found by this corpus: a non-numeric message id in an admin path is
/// answered by the framework's path extractor with a plain-text 400, not the
/// JSON error shape every other 4xx has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_path_ids_that_are_not_numbers_get_json_errors() {
    let env = start(false).await;
    let cases = ["/api/messages/abc", "/api/messages/99999999999999999999"]
        .into_iter()
        .map(|target| {
            (
                Case::new(format!("GET {target}"), "GET", target)
                    .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
                    .length(Length::Omit)
                    .expect(any_of(&[400, 404])),
                none as Check,
            )
        })
        .collect();
    run_strict(&env.server.base, cases).await;
    env.server.stop().await;
}

/// Issue 14.6: DNS rebinding. A page on `rebind.attacker.example`, whose name
/// the attacker re-points at 127.0.0.1, makes same-origin requests (`Host`
/// and `Origin` agree, `Sec-Fetch-Site: same-origin`). An open-mode server
/// (no write key) took them as ingest; it now serves loopback Host names
/// only (and `auth.allowed_hosts`), answering others `421 host_not_allowed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_refuses_rebound_host_names() {
    let env = start(true).await;
    let base = env.server.base.clone();
    let port = base.rsplit(':').next().unwrap().to_owned();
    let attacker = format!("rebind.attacker.example:{port}");
    let mut cases: Vec<(Case, Check)> = Vec::new();
    for (i, path) in ALL_INGEST.into_iter().enumerate() {
        let mut m = message(path, "rebind");
        m["messageId"] = json!(format!("rebind-{i}"));
        cases.push((
            Case::new(format!("rebound {path}"), "POST", path)
                .header("Host", attacker.clone())
                .header("Origin", format!("http://{attacker}"))
                .header("Sec-Fetch-Site", "same-origin")
                .header("Content-Type", "text/plain")
                .body(wrap(path, &m))
                .expect(error(421, "host_not_allowed")),
            |a| {
                let message = a.json().unwrap()["message"].to_string();
                if message.contains("Host") && message.contains("rebind.attacker.example") {
                    Ok(())
                } else {
                    Err(format!("message does not name the Host: {message}"))
                }
            },
        ));
    }
    // The loopback names still work, with or without a port.
    for (i, host) in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "localhost".into(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut m = message("/v1/track", "loopback");
        m["messageId"] = json!(format!("loopback-{i}"));
        cases.push((
            Case::new(format!("Host {host}"), "POST", "/v1/track")
                .header("Host", host.clone())
                .header("Content-Type", "application/json")
                .body(wrap("/v1/track", &m))
                .expect(status(200)),
            none,
        ));
    }
    run_strict(&base, cases).await;
    let stored = env
        .server
        .storage
        .list(Default::default(), 100)
        .await
        .unwrap();
    assert_eq!(stored.len(), 3, "only the loopback requests were stored");
    env.server.stop().await;
}

/// `auth.allowed_hosts` adds names an open-mode server answers to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_serves_configured_host_names() {
    let env = start_with(true, "[auth]\nallowed_hosts = [\"td.internal\"]\n").await;
    let mut m = message("/v1/track", "allowed");
    m["messageId"] = json!("allowed-host");
    let cases: Vec<(Case, Check)> = vec![
        (
            Case::new("configured Host", "POST", "/v1/track")
                .header("Host", "td.internal:8080")
                .header("Content-Type", "application/json")
                .body(wrap("/v1/track", &m))
                .expect(status(200)),
            none,
        ),
        (
            Case::new("other Host", "POST", "/v1/track")
                .header("Host", "td.internal.attacker.example")
                .header("Content-Type", "application/json")
                .body(wrap("/v1/track", &m))
                .expect(error(421, "host_not_allowed")),
            none,
        ),
    ];
    run_strict(&env.server.base, cases).await;
    env.server.stop().await;
}
