//! Property test: arbitrary JSON never panics the parser or the mapping, and
//! every outcome other than `send` carries a code and a message.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use totango_destination::mapping::{Outcome, SettingsPatch, translate_value};

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("created"),
            Just("createdAt"),
            Just("name"),
            Just("plan"),
            Just("Status"),
            Just("id")
        ]
        .prop_map(|s| Value::String(s.into())),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("type"),
            Just("userId"),
            Just("groupId"),
            Just("event"),
            Just("name"),
            Just("category"),
            Just("traits"),
            Just("properties"),
            Just("context"),
            Just("integrations"),
            Just("Totango"),
            Just("All"),
            Just("created"),
            Just("plan"),
            Just("parent"),
            Just("id"),
            Just("messageId"),
            Just("timestamp"),
        ]
        .prop_map(String::from),
        "[a-zA-Z .]{0,8}",
    ]
}

/// Messages that look like Segment calls, with arbitrary values in every field.
fn message() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just("identify"),
            Just("group"),
            Just("page"),
            Just("track"),
            Just("screen"),
            Just("alias"),
            Just("x")
        ],
        prop::collection::vec((key(), json_value()), 0..8),
        json_value(),
        json_value(),
    )
        .prop_map(|(call, fields, traits, context)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            m.insert("type".into(), json!(call));
            m.entry("traits").or_insert(traits);
            m.entry("properties").or_insert(context.clone());
            m.entry("context").or_insert(json!({"groupId": context}));
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_messages_never_panic(msg in prop_oneof![message(), json_value()], cat in proptest::option::of(".{0,6}")) {
        let settings = SettingsPatch { service_id: Some("SP-1234-01".into()), ..Default::default() }
            .resolve()
            .unwrap();
        let t = translate_value(&msg, &settings, cat.as_deref());
        if t.outcome == Outcome::Send {
            prop_assert!(!t.requests.is_empty());
            for r in &t.requests {
                prop_assert_eq!(r.params.get("sdr_s").map(String::as_str), Some("SP-1234-01"));
                prop_assert!(r.params.contains_key("sdr_o"));
                // The query is valid form encoding that decodes back to the params.
                let decoded: Vec<(String, String)> = form_urlencoded::parse(r.query().as_bytes()).into_owned().collect();
                let params: Vec<(String, String)> = r.params.clone().into_iter().collect();
                prop_assert_eq!(decoded, params);
            }
        } else {
            prop_assert!(t.code.is_some());
            prop_assert!(t.message.as_deref().is_some_and(|m| !m.is_empty()));
            prop_assert!(t.requests.is_empty());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let settings = SettingsPatch { service_id: Some("SP-1234-01".into()), ..Default::default() }
            .resolve()
            .unwrap();
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = translate_value(&v, &settings, None);
        }
    }
}
