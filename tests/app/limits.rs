//! Issue 19 item 5: Totango's documented limits (docs/mapping.md "Totango's
//! limits") end to end. Three sources on one server, one per
//! `on_limit_breach` mode: the `/segment` answer carries the breach's
//! warning, `/metrics` counts it by rule (not again for a duplicate), and
//! Totango receives the value as is (warn), cut (truncate) or nothing
//! (reject, answered `400` with the rule's code).

use crate::support::totango::FakeTotango;
use crate::support::wait;
use crate::support::{TestApp, config, place};
use serde_json::{Value, json};
use std::time::Duration;
use totango_destination::config::SourceConfig;
use totango_destination::mapping::{LimitMode, SettingsPatch};

const WARN_KEY: &str = "wk-limits-warn";
const TRUNCATE_KEY: &str = "wk-limits-truncate";
const REJECT_KEY: &str = "wk-limits-reject";

fn source(name: &str, key: &str, mode: Option<LimitMode>) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        write_key: key.into(),
        totango: SettingsPatch {
            on_limit_breach: mode,
            ..SettingsPatch::default()
        },
        allowed_origins: Vec::new(),
        allowed_calls: Vec::new(),
        client_requests_per_minute: None,
    }
}

async fn post(app: &TestApp, key: &str, body: &Value) -> (u16, Value) {
    post_with(app, key, body, None).await
}

/// With `header` as X-Segment-Settings (base64 JSON) when given.
async fn post_with(app: &TestApp, key: &str, body: &Value, header: Option<Value>) -> (u16, Value) {
    use base64::Engine;
    let mut req = reqwest::Client::new()
        .post(app.url("/segment"))
        .basic_auth(key, Some(""));
    if let Some(h) = header {
        let encoded = base64::engine::general_purpose::STANDARD.encode(h.to_string());
        req = req.header("X-Segment-Settings", encoded);
    }
    let r = req
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `td_totango_limit_breaches_total{rule="…"}`, 0 while absent.
async fn breaches(app: &TestApp, rule: &str) -> u64 {
    let text = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("td_totango_limit_breaches_total{{rule=\"{rule}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn group(id: &str, account: &str, traits: Value) -> Value {
    json!({"type": "group", "messageId": id, "userId": "u1", "groupId": account,
        "traits": traits})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_warn_truncate_or_reject_per_source() {
    let fake = FakeTotango::ok().await;
    let dir = place();
    let mut c = config(&dir, &fake.uri());
    c.auth.write_keys = vec![WARN_KEY.into()];
    c.sources = vec![
        source("trim", TRUNCATE_KEY, Some(LimitMode::Truncate)),
        source("strict", REJECT_KEY, Some(LimitMode::Reject)),
    ];
    let app = TestApp::start(c).await;
    // The metric is process-wide: other tests may count too, so deltas are
    // checked with rules no other test breaches.
    let names_before = breaches(&app, "account_name").await;
    let numbers_before = breaches(&app, "number").await;

    let long_name = "N".repeat(200);
    let traits = json!({"name": long_name, "Contract Value": "$1,000"});

    // warn (the default): accepted, both warnings in the answer, sent as is.
    let (status, answer) = post(&app, WARN_KEY, &group("lim-1", "acct-warn", traits.clone())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    let warnings = answer["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{answer}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .starts_with("sdr_odn: 200 characters"),
        "{answer}"
    );
    assert!(
        warnings[1]
            .as_str()
            .unwrap()
            .starts_with("sdr_o.Contract Value"),
        "{answer}"
    );

    // truncate: the name is cut to 128, the number sent as is; both warned.
    let (status, answer) = post(
        &app,
        TRUNCATE_KEY,
        &group("lim-2", "acct-trim", traits.clone()),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let warnings = answer["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{answer}");
    assert!(
        warnings[0].as_str().unwrap().contains("truncated to 128"),
        "{answer}"
    );

    // reject: 400 naming the rule and the parameter; nothing sent.
    let (status, answer) = post(&app, REJECT_KEY, &group("lim-3", "acct-strict", traits)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["code"], "limit_account_name", "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.starts_with("sdr_odn:"), "{message}");

    // A request cannot loosen the operator's choice: the header's
    // onLimitBreach is ignored like other settings Segment may send.
    let (status, answer) = post_with(
        &app,
        REJECT_KEY,
        &group("lim-4", "acct-strict", json!({"Contract Value": "$1,000"})),
        Some(json!({"onLimitBreach": "warn", "on_limit_breach": "warn"})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["code"], "limit_number", "{answer}");

    // A duplicate is not counted again.
    let (status, answer) = post(
        &app,
        WARN_KEY,
        &group("lim-1", "acct-warn", json!({"Contract Value": "$1,000"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"], "duplicate", "{answer}");

    let (warn, trim) = wait::until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let hits = fake.hits();
            let warn = hits
                .iter()
                .find(|h| h.get("sdr_o") == Some("acct-warn"))
                .cloned();
            let trim = hits
                .iter()
                .find(|h| h.get("sdr_o") == Some("acct-trim"))
                .cloned();
            match (warn, trim) {
                (Some(w), Some(t)) => Ok((w, t)),
                _ => Err(format!("{} requests so far", hits.len())),
            }
        },
    )
    .await
    .expect("both accepted messages reach Totango");
    assert_eq!(warn.get("sdr_odn"), Some(long_name.as_str()));
    assert_eq!(warn.get("sdr_o.Contract Value"), Some("$1,000"));
    assert_eq!(trim.get("sdr_odn"), Some("N".repeat(128).as_str()));
    assert_eq!(trim.get("sdr_o.Contract Value"), Some("$1,000"));
    assert!(
        !fake
            .hits()
            .iter()
            .any(|h| h.get("sdr_o") == Some("acct-strict")),
        "a rejected message is never sent"
    );

    // Counted once per breach at acceptance, whatever the mode.
    assert_eq!(breaches(&app, "account_name").await - names_before, 3);
    assert_eq!(breaches(&app, "number").await - numbers_before, 4);
    app.stop().await;
}
