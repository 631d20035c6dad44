//! Parse + translate of typical messages. Run: `cargo bench --bench translate`.

use divan::{Bencher, black_box};
use serde_json::Value;
use totango_destination::mapping::{Settings, SettingsPatch, translate_value};

fn main() {
    divan::main();
}

const TRACK: &str = r#"{"type":"track","userId":"u-1842","event":"Completed Purchase",
  "messageId":"022bb90c-bbac-11e4-8dfc-aa07a5b093db","timestamp":"2024-03-05T10:20:30.123Z",
  "properties":{"revenue":42.99,"shippingMethod":"2-day","category":"Conversion","items":[{"sku":"a"}]},
  "context":{"groupId":"acct-77","ip":"8.8.8.8","library":{"name":"analytics-node","version":"6.0.0"},
  "userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)"}}"#;

const IDENTIFY: &str = r#"{"type":"identify","userId":"u-1842","messageId":"a1","timestamp":"2024-03-05T10:20:30Z",
  "traits":{"email":"lawrence@initech.com","name":"Lawrence Drywall","created":"2024-03-05T10:20:30+02:00",
  "address":{"city":"Paris","zip":"75001","street":"1 Rue de Rivoli"},"roles":["admin","billing"],"age":42,
  "verified":true,"id":"u-1842","title":null},
  "context":{"groupId":"acct-77","library":{"name":"analytics.js","version":"2.11.1"}}}"#;

fn settings() -> Settings {
    SettingsPatch {
        service_id: Some("SP-3126-05".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap()
}

fn parse_and_translate(b: Bencher, text: &str) {
    let settings = settings();
    b.bench(|| {
        let v: Value = serde_json::from_str(black_box(text)).unwrap();
        let t = translate_value(&v, &settings, None);
        black_box(t.requests.iter().map(|r| r.query().len()).sum::<usize>())
    });
}

#[divan::bench]
fn track(b: Bencher) {
    parse_and_translate(b, TRACK);
}

#[divan::bench]
fn identify(b: Bencher) {
    parse_and_translate(b, IDENTIFY);
}
