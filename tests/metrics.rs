//! `/metrics`: Prometheus text with accepted and outcome counters, delivery
//! attempts by status class, queue gauges and latency histograms.

mod support;

use support::TestApp;
use support::totango::FakeTotango;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let fake = FakeTotango::ok().await;
    let dir = support::place();
    let srv = TestApp::start(support::config(&dir, &fake.uri())).await;
    let base = srv.base.clone();

    let http = reqwest::Client::new();
    let post = |body: &'static str| {
        http.post(format!("{base}/v1/track"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        post(r#"{"userId":"u","event":"E","context":{"groupId":"g"}}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post(r#"{"userId":"u","event":"E"}"#)
            .await
            .unwrap()
            .status(),
        200
    );

    let every = std::time::Duration::from_millis(20);
    let text = support::wait::until(std::time::Duration::from_secs(10), every, async || {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("td_messages_total{outcome=\"delivered\"}") {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await
    .unwrap_or_else(|text| text);
    assert_eq!(
        value(&text, "td_messages_accepted_total{interface=\"tracking\"}"),
        2.0
    );
    assert_eq!(
        value(&text, "td_messages_total{outcome=\"delivered\"}"),
        1.0
    );
    assert_eq!(value(&text, "td_messages_total{outcome=\"rejected\"}"), 1.0);
    assert_eq!(
        value(&text, "td_delivery_attempts_total{class=\"2xx\"}"),
        1.0
    );
    assert_eq!(value(&text, "td_queue_depth"), 0.0);
    assert_eq!(value(&text, "td_oldest_pending_age_seconds"), 0.0);
    assert_eq!(
        value(
            &text,
            "td_http_request_duration_seconds_count{route=\"/v1/{call}\",status=\"200\"}"
        ),
        2.0
    );
    assert!(
        text.contains("td_delivery_request_duration_seconds_bucket"),
        "{text}"
    );
    // The adaptive concurrency: two messages use too little of it to grow.
    let limit = value(&text, "td_delivery_concurrency_limit");
    assert!((4.0..=64.0).contains(&limit), "{limit}");

    srv.stop().await;
}
