//! One test per mapping.md rule.

use super::*;
use serde_json::json;

fn settings(extra: Value) -> Settings {
    let mut v = json!({"service_id": "SP-3126-05", "endpoint": "http://fake.test"});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    SettingsPatch::from_json(&v).unwrap().resolve().unwrap()
}

fn run(msg: Value) -> Translation {
    translate_value(&msg, &settings(json!({})), None)
}

fn params(t: &Translation) -> Vec<Vec<(String, String)>> {
    t.requests
        .iter()
        .map(|r| {
            r.params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .collect()
}

fn expect(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn assert_not_sent(t: &Translation, outcome: Outcome, code: Code, field: &str) {
    assert_eq!(t.outcome, outcome, "{t:?}");
    assert_eq!(t.code, Some(code), "{t:?}");
    assert!(t.requests.is_empty());
    let message = t.message.as_deref().unwrap();
    assert!(
        message.starts_with(field),
        "message {message:?} should name {field}"
    );
}

#[test]
fn identify_sends_user_attributes() {
    let t = run(json!({"type": "identify", "userId": "29ej29d",
        "traits": {"email": "l@initech.com", "name": "Lawrence", "id": "29ej29d", "age": 42, "title": null},
        "context": {"groupId": "acct-1"}}));
    assert_eq!(t.outcome, Outcome::Send);
    assert_eq!(
        params(&t),
        vec![expect(&[
            ("sdr_s", "SP-3126-05"),
            ("sdr_o", "acct-1"),
            ("sdr_u", "29ej29d"),
            ("sdr_u.email", "l@initech.com"),
            ("sdr_u.name", "Lawrence"),
            ("sdr_u.age", "42"),
        ])]
    );
    assert!(t.warnings.is_empty());
}

#[test]
fn identify_created_and_created_at() {
    let t = run(
        json!({"type": "identify", "userId": "u", "context": {"groupId": "a"},
        "traits": {"created": "2024-03-05T10:20:30+02:00", "createdAt": "2000-01-01"}}),
    );
    assert_eq!(
        t.requests[0].params["sdr_u.Create Date"],
        "2024-03-05T08:20:30.000Z"
    );
    assert!(!t.requests[0].params.contains_key("sdr_u.createdAt"));

    let t = run(
        json!({"type": "identify", "userId": "u", "context": {"groupId": "a"},
        "traits": {"createdAt": 1700000000123u64}}),
    );
    assert_eq!(
        t.requests[0].params["sdr_u.Create Date"],
        "2023-11-14T22:13:20.123Z"
    );

    // null `created` counts as absent, so createdAt is used.
    let t = run(
        json!({"type": "identify", "userId": "u", "context": {"groupId": "a"},
        "traits": {"created": null, "createdAt": "2020-02-02"}}),
    );
    assert_eq!(
        t.requests[0].params["sdr_u.Create Date"],
        "2020-02-02T00:00:00.000Z"
    );
}

#[test]
fn unparseable_created_is_omitted_with_a_warning() {
    let t = run(json!({"type": "group", "groupId": "g", "traits": {"created": "last tuesday"}}));
    assert_eq!(t.outcome, Outcome::Send);
    assert!(!t.requests[0].params.contains_key("sdr_o.Create Date"));
    assert!(!t.requests[0].params.contains_key("sdr_o.created"));
    assert_eq!(t.warnings.len(), 1);
    assert!(
        t.warnings[0].starts_with("traits.created"),
        "{:?}",
        t.warnings
    );
}

#[test]
fn group_maps_name_plan_and_defaults_status() {
    let t = run(
        json!({"type": "group", "userId": "u", "groupId": "sjsj2hdj2",
        "traits": {"name": "Initech", "website": "http://www.initech.com", "id": "x"}}),
    );
    assert_eq!(
        params(&t),
        vec![expect(&[
            ("sdr_s", "SP-3126-05"),
            ("sdr_o", "sjsj2hdj2"),
            ("sdr_odn", "Initech"),
            ("sdr_u", "u"),
            ("sdr_o.website", "http://www.initech.com"),
            ("sdr_o.Status", "Free"),
        ])]
    );

    let t = run(json!({"type": "group", "groupId": "g",
        "traits": {"plan": "Paying", "created": "2023-11-02", "Contract Value": 1200}}));
    let p = &t.requests[0].params;
    assert_eq!(p["sdr_o.Status"], "Paying");
    assert_eq!(p["sdr_o.Create Date"], "2023-11-02T00:00:00.000Z");
    assert_eq!(p["sdr_o.Contract Value"], "1200");
    assert!(!p.contains_key("sdr_o.plan") && !p.contains_key("sdr_u"));
}

#[test]
fn explicit_status_wins_over_plan() {
    let t = run(
        json!({"type": "group", "groupId": "g", "traits": {"plan": "Trial", "Status": "Paying"}}),
    );
    assert_eq!(t.requests[0].params["sdr_o.Status"], "Paying");
}

#[test]
fn group_without_created_sends_no_create_date() {
    let t = run(json!({"type": "group", "groupId": "g", "traits": {}}));
    assert!(
        !t.requests[0]
            .params
            .keys()
            .any(|k| k.contains("Create Date"))
    );
}

#[test]
fn group_options_from_integrations() {
    let t = run(
        json!({"type": "group", "groupId": "g", "traits": {"name": "Child"},
        "integrations": {"Totango": {"parent": {"id": "p-1"}, "product": {"id": 7}}}}),
    );
    let p = &t.requests[0].params;
    assert_eq!(p["sdr_o.parent_id"], "p-1");
    assert_eq!(p["sdr_o.product_id"], "7");
}

#[test]
fn group_id_sources_and_rejections() {
    let t = run(json!({"type": "group", "userId": "u", "traits": {"name": "n"}}));
    assert_not_sent(&t, Outcome::Rejected, Code::MissingGroupId, "groupId");
    // group ignores context.groupId as the account
    let t = run(json!({"type": "group", "userId": "u", "context": {"groupId": "c"}}));
    assert_not_sent(&t, Outcome::Rejected, Code::MissingGroupId, "groupId");
    for call in ["identify", "page", "track"] {
        let t =
            run(json!({"type": call, "userId": "u", "groupId": "top", "event": "E", "name": "N"}));
        assert_not_sent(
            &t,
            Outcome::Rejected,
            Code::MissingGroupId,
            "context.groupId",
        );
        let t = run(
            json!({"type": call, "userId": "u", "event": "E", "name": "N", "context": {"groupId": ""}}),
        );
        assert_not_sent(
            &t,
            Outcome::Rejected,
            Code::MissingGroupId,
            "context.groupId",
        );
    }
}

#[test]
fn user_is_required_except_for_group() {
    for call in ["identify", "page", "track"] {
        let t = run(
            json!({"type": call, "anonymousId": "anon", "event": "E", "name": "N",
            "context": {"groupId": "g"}}),
        );
        assert_not_sent(&t, Outcome::Rejected, Code::MissingUserId, "userId");
    }
}

#[test]
fn track_needs_an_event() {
    for event in [json!(null), json!("")] {
        let t = run(
            json!({"type": "track", "userId": "u", "event": event, "context": {"groupId": "g"}}),
        );
        assert_not_sent(&t, Outcome::Rejected, Code::MissingEvent, "event");
    }
}

#[test]
fn invalid_ids_are_rejected() {
    let long = "x".repeat(256);
    let t =
        run(json!({"type": "track", "userId": long, "event": "E", "context": {"groupId": "g"}}));
    assert_not_sent(&t, Outcome::Rejected, Code::InvalidId, "userId");
    let t =
        run(json!({"type": "track", "userId": "u", "event": "E", "context": {"groupId": "a\nb"}}));
    assert_not_sent(&t, Outcome::Rejected, Code::InvalidId, "context.groupId");
    let t = run(json!({"type": "group", "groupId": "x".repeat(255)}));
    assert_eq!(t.outcome, Outcome::Send, "255 bytes is allowed");
    // 128 two-byte characters are 256 bytes
    let t = run(json!({"type": "group", "groupId": "é".repeat(128)}));
    assert_not_sent(&t, Outcome::Rejected, Code::InvalidId, "groupId");
}

#[test]
fn wrong_field_types_are_rejected_naming_the_field() {
    let t = run(
        json!({"type": "track", "userId": "u", "event": "E", "context": {"groupId": {"a": 1}}}),
    );
    assert_not_sent(&t, Outcome::Rejected, Code::InvalidField, "context.groupId");
    let t = run(json!({"type": "identify", "userId": "u", "traits": [1]}));
    assert_not_sent(&t, Outcome::Rejected, Code::InvalidField, "traits");
    let t = run(json!({"userId": "u"}));
    assert_not_sent(&t, Outcome::Rejected, Code::MissingType, "type");
}

#[test]
fn numeric_ids_in_decimal_form() {
    let t = run(
        json!({"type": "track", "userId": 12345, "event": "Ping", "context": {"groupId": 987}}),
    );
    let p = &t.requests[0].params;
    assert_eq!((p["sdr_o"].as_str(), p["sdr_u"].as_str()), ("987", "12345"));
}

#[test]
fn page_sends_categorized_and_named_activities() {
    let t = run(
        json!({"type": "page", "userId": "u", "category": "Docs", "name": "Index",
        "context": {"groupId": "g"}}),
    );
    let acts: Vec<_> = t
        .requests
        .iter()
        .map(|r| (r.params["sdr_a"].as_str(), r.params["sdr_m"].as_str()))
        .collect();
    assert_eq!(
        acts,
        vec![
            ("Viewed Docs Page", "Docs"),
            ("Viewed Docs Index Page", "Docs")
        ]
    );

    let t =
        run(json!({"type": "page", "userId": "u", "name": "Signup", "context": {"groupId": "g"}}));
    let acts: Vec<_> = t
        .requests
        .iter()
        .map(|r| (r.params["sdr_a"].as_str(), r.params["sdr_m"].as_str()))
        .collect();
    assert_eq!(acts, vec![("Viewed Signup Page", "Application")]);

    // Fields may come from properties instead.
    let t = run(
        json!({"type": "page", "userId": "u", "properties": {"category": "Blog", "name": "Post"},
        "context": {"groupId": "g"}}),
    );
    let acts: Vec<_> = t
        .requests
        .iter()
        .map(|r| r.params["sdr_a"].as_str())
        .collect();
    assert_eq!(acts, vec!["Viewed Blog Page", "Viewed Blog Post Page"]);
}

#[test]
fn page_options() {
    let msg = json!({"type": "page", "userId": "u", "category": "Docs", "name": "Index", "context": {"groupId": "g"}});
    let only_named = translate_value(
        &msg,
        &settings(json!({"track_categorized_pages": false})),
        None,
    );
    let acts: Vec<_> = only_named
        .requests
        .iter()
        .map(|r| r.params["sdr_a"].as_str())
        .collect();
    assert_eq!(acts, vec!["Viewed Docs Index Page"]);

    let only_categorized =
        translate_value(&msg, &settings(json!({"track_named_pages": false})), None);
    let acts: Vec<_> = only_categorized
        .requests
        .iter()
        .map(|r| r.params["sdr_a"].as_str())
        .collect();
    assert_eq!(acts, vec!["Viewed Docs Page"]);

    let none = translate_value(
        &msg,
        &settings(json!({"track_named_pages": false, "track_categorized_pages": false})),
        None,
    );
    assert_not_sent(&none, Outcome::Filtered, Code::NoPageActivity, "page");

    let bare = run(json!({"type": "page", "userId": "u", "context": {"groupId": "g"}}));
    assert_not_sent(&bare, Outcome::Filtered, Code::NoPageActivity, "page");
}

#[test]
fn track_module_sources() {
    let msg = json!({"type": "track", "userId": "u", "event": "Completed Purchase",
        "properties": {"revenue": 42.99, "category": "Conversion"}, "context": {"groupId": "g"}});
    let t = translate_value(&msg, &settings(json!({})), Some("Reports"));
    assert_eq!(
        params(&t),
        vec![expect(&[
            ("sdr_s", "SP-3126-05"),
            ("sdr_o", "g"),
            ("sdr_u", "u"),
            ("sdr_a", "Completed Purchase"),
            ("sdr_m", "Conversion"),
        ])]
    );
    let bare = json!({"type": "track", "userId": "u", "event": "E", "context": {"groupId": "g"}});
    let t = translate_value(&bare, &settings(json!({})), Some("Reports"));
    assert_eq!(t.requests[0].params["sdr_m"], "Reports");
    let t = translate_value(&bare, &settings(json!({"default_module": "Core"})), None);
    assert_eq!(t.requests[0].params["sdr_m"], "Core");
}

#[test]
fn integrations_filtering() {
    let with = |integrations: Value| {
        run(
            json!({"type": "track", "userId": "u", "event": "E", "context": {"groupId": "g"},
            "integrations": integrations}),
        )
    };
    for off in [
        json!({"Totango": false}),
        json!({"All": false}),
        json!({"All": false, "Totango": false}),
        json!({"All": false, "Mixpanel": true}),
        json!({"All": true, "Totango": false}),
    ] {
        let t = with(off.clone());
        assert_not_sent(
            &t,
            Outcome::Filtered,
            Code::IntegrationDisabled,
            "integrations",
        );
    }
    for on in [
        json!({}),
        json!({"All": false, "Totango": true}),
        json!({"All": false, "Totango": {}}),
        json!({"Mixpanel": false}),
        json!({"All": true}),
    ] {
        assert_eq!(with(on.clone()).outcome, Outcome::Send, "{on}");
    }
}

#[test]
fn unsupported_calls() {
    for call in ["screen", "alias", "purchase"] {
        let t = run(json!({"type": call, "userId": "u", "context": {"groupId": "g"}}));
        assert_not_sent(&t, Outcome::Unsupported, Code::UnsupportedCall, "type");
    }
}

#[test]
fn api_token_goes_on_every_request() {
    let msg = json!({"type": "page", "userId": "u", "category": "Docs", "name": "Index", "context": {"groupId": "g"}});
    let t = translate_value(&msg, &settings(json!({"api_token": "tok en"})), None);
    assert_eq!(t.requests.len(), 2);
    for r in &t.requests {
        assert_eq!(r.params["api-token"], "tok en");
        assert!(r.query().ends_with("api-token=tok+en"), "{}", r.query());
    }
}

#[test]
fn query_encoding() {
    let t = run(
        json!({"type": "group", "groupId": "a&b", "traits": {"name": "Zürich Café 東京", "Contract Value": "1+1=2"}}),
    );
    let url = t.requests[0].url("http://fake.test/");
    assert_eq!(
        url,
        "http://fake.test/pixel.gif/?sdr_s=SP-3126-05&sdr_o=a%26b&sdr_odn=Z%C3%BCrich+Caf%C3%A9+%E6%9D%B1%E4%BA%AC&sdr_o.Contract+Value=1%2B1%3D2&sdr_o.Status=Free"
    );
}

#[test]
fn odd_service_id_is_a_settings_warning_not_a_message_warning() {
    let msg = json!({"type": "group", "groupId": "g"});
    let s = settings(json!({"service_id": "nope"}));
    let t = translate_value(&msg, &s, None);
    assert_eq!(t.outcome, Outcome::Send);
    // Said once at start (or once per header service ID), not per message.
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert!(
        s.warnings()[0].starts_with("service_id"),
        "{:?}",
        s.warnings()
    );
}

#[test]
fn group_traits_keep_their_order_around_special_traits() {
    let t = run(json!({"type": "group", "groupId": "g", "traits": {
        "a": 1, "name": "Acme", "b": 2, "plan": "Paying", "c": 3, "created": 0,
        "d": 4, "Status": "Trial", "e": 5, "id": "x", "f": 6
    }}));
    let keys: Vec<&str> = t.requests[0].params.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "sdr_s",
            "sdr_o",
            "sdr_odn",
            "sdr_o.a",
            "sdr_o.b",
            "sdr_o.c",
            "sdr_o.Create Date",
            "sdr_o.d",
            "sdr_o.e",
            "sdr_o.f",
            "sdr_o.Status"
        ]
    );
    let t = run(
        json!({"type": "identify", "userId": "u", "context": {"groupId": "g"},
        "traits": {"z": 1, "createdAt": "2024-01-01", "name": "Ann", "a": 2}}),
    );
    let keys: Vec<&str> = t.requests[0].params.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "sdr_s",
            "sdr_o",
            "sdr_u",
            "sdr_u.z",
            "sdr_u.Create Date",
            "sdr_u.name",
            "sdr_u.a"
        ]
    );
}

#[test]
fn delete_is_unsupported() {
    let t = run(json!({"type": "delete", "userId": "u", "context": {"groupId": "g"}}));
    assert_eq!(t.outcome, Outcome::Unsupported);
    assert_eq!(t.code, Some(Code::UnsupportedCall));
}

#[test]
fn value_flattening_in_traits() {
    let t = run(
        json!({"type": "identify", "userId": "u", "context": {"groupId": "g"},
        "traits": {"address": {"city": "Paris", "zip": 75001}, "roles": ["admin", "billing"],
                   "verified": true, "score": 0.5, "big": 1e21}}),
    );
    let p = &t.requests[0].params;
    assert_eq!(p["sdr_u.address.city"], "Paris");
    assert_eq!(p["sdr_u.address.zip"], "75001");
    assert_eq!(p["sdr_u.roles"], "admin,billing");
    assert_eq!(p["sdr_u.verified"], "true");
    assert_eq!(p["sdr_u.score"], "0.5");
    assert_eq!(p["sdr_u.big"], "1e21");
}

#[test]
fn ordering_keys() {
    let key = |v: Value| ordering_key(&Message::from_value(&v).unwrap());
    assert_eq!(
        key(json!({"type": "identify", "userId": "u"})).as_deref(),
        Some("u:u")
    );
    assert_eq!(
        key(json!({"type": "group", "groupId": "g"})).as_deref(),
        Some("o:g")
    );
    assert_eq!(
        key(json!({"type": "group", "groupId": "g", "userId": "u"})).as_deref(),
        Some("o:g")
    );
    // Activities go out unordered.
    assert_eq!(
        key(json!({"type": "track", "userId": "u", "event": "E"})),
        None
    );
    assert_eq!(
        key(json!({"type": "page", "userId": "u", "name": "N"})),
        None
    );
}

#[test]
fn track_page_category_need() {
    let needs = |v: Value| track_uses_page_category(&Message::from_value(&v).unwrap());
    assert!(needs(json!({"type": "track", "userId": "u", "event": "E"})));
    assert!(!needs(
        json!({"type": "track", "userId": "u", "event": "E", "properties": {"category": "C"}})
    ));
    assert!(!needs(json!({"type": "page", "userId": "u", "name": "N"})));
}

#[test]
fn page_category_to_remember() {
    let cat = |v: Value| page_category(&Message::from_value(&v).unwrap());
    assert_eq!(
        cat(json!({"type": "page", "category": "A"})).as_deref(),
        Some("A")
    );
    assert_eq!(
        cat(json!({"type": "page", "properties": {"category": "B"}})).as_deref(),
        Some("B")
    );
    assert_eq!(cat(json!({"type": "page", "name": "N"})), None);
}

#[test]
fn identify_reads_context_traits_when_traits_lack_a_key() {
    // RudderStack's Python SDK sends identify traits only in context.traits.
    let t = run(json!({"type": "identify", "userId": "u1",
        "context": {"groupId": "acct-1", "traits": {"email": "a@b.c", "plan": "pro"}}}));
    assert_eq!(
        params(&t),
        vec![expect(&[
            ("sdr_s", "SP-3126-05"),
            ("sdr_o", "acct-1"),
            ("sdr_u", "u1"),
            ("sdr_u.email", "a@b.c"),
            ("sdr_u.plan", "pro"),
        ])]
    );
    // Both: the top level wins key by key; context adds the keys it lacks.
    let t = run(json!({"type": "identify", "userId": "u1",
        "traits": {"email": "top@b.c", "createdAt": "2024-01-02T00:00:00Z"},
        "context": {"groupId": "acct-1",
            "traits": {"email": "ctx@b.c", "role": "admin", "created": "2020-01-01T00:00:00Z"}}}));
    assert_eq!(
        params(&t),
        vec![expect(&[
            ("sdr_s", "SP-3126-05"),
            ("sdr_o", "acct-1"),
            ("sdr_u", "u1"),
            ("sdr_u.email", "top@b.c"),
            ("sdr_u.Create Date", "2024-01-02T00:00:00.000Z"),
            ("sdr_u.role", "admin"),
        ])]
    );
}

#[test]
fn group_does_not_apply_context_traits_to_the_account() {
    let t = run(json!({"type": "group", "userId": "u1", "groupId": "acct-1",
        "traits": {"name": "Acme"},
        "context": {"traits": {"email": "a@b.c"}}}));
    let p = &params(&t)[0];
    assert!(p.iter().all(|(k, _)| !k.contains("email")), "{p:?}");
}
