use super::*;
use serde_json::json;

fn glob(p: &str) -> Glob {
    Glob::parse(p).unwrap()
}

fn named<T>(setting: &str, value: T) -> Named<T> {
    Named {
        setting: setting.to_owned(),
        value,
    }
}

fn rule(path: &str, action: PiiAction) -> PiiRule {
    PiiRule {
        setting: format!("pii {path}"),
        path: PiiPath::parse(path).unwrap(),
        action,
    }
}

fn hashing(rules: Vec<PiiRule>) -> Rules {
    Rules {
        pii: rules,
        hmac_key: Some(Secret::new("0123456789abcdef-test")),
        ..Rules::default()
    }
}

#[test]
fn globs_match_exact_names_stars_and_question_marks() {
    assert!(glob("Signed Up").matches("Signed Up"));
    assert!(!glob("Signed Up").matches("signed up"), "case counts");
    assert!(!glob("Signed Up").matches("Signed Up!"));
    assert!(glob("Debug *").matches("Debug click"));
    assert!(glob("Debug *").matches("Debug "));
    assert!(!glob("Debug *").matches("Debugging"));
    assert!(glob("Internal*").matches("Internal"));
    assert!(glob("Internal*").matches("Internal Ping"));
    assert!(glob("*Test*").matches("A Test Event"));
    assert!(glob("*").matches(""));
    assert!(glob("a*b*c").matches("aXXbYYbc"));
    assert!(!glob("a*b*c").matches("aXXbYYb"));
    assert!(glob("v?").matches("v2"));
    assert!(!glob("v?").matches("v"));
    assert!(glob("é*").matches("élan"), "characters, not bytes");
    assert!(glob("?").matches("é"));
    assert!(Glob::parse("").is_err());
    // No exponential backtracking on hostile names.
    let long = "a".repeat(10_000);
    assert!(!glob("*a*a*a*a*a*b").matches(&long));
}

#[test]
fn call_filters_allow_then_deny() {
    let filters = Filters {
        allow_calls: Some(named(
            "f.allow_calls",
            vec![CallType::Identify, CallType::Track, CallType::Page],
        )),
        deny_calls: vec![named("f.deny_calls[0]", CallType::Page)],
        ..Filters::default()
    };
    assert!(filters.check(CallType::Identify, None).is_ok());
    assert!(filters.check(CallType::Track, Some("Anything")).is_ok());
    let e = filters.check(CallType::Group, None).unwrap_err();
    assert_eq!(e.reason, "group calls are not in f.allow_calls");
    let e = filters.check(CallType::Page, None).unwrap_err();
    assert_eq!(e.reason, "page calls are denied by f.deny_calls[0]");
}

#[test]
fn event_filters_apply_to_track_calls_only() {
    let filters = Filters {
        allow_events: Some(named(
            "f.allow_events",
            vec![glob("App *"), glob("Signed Up")],
        )),
        deny_events: vec![named("f.deny_events[0]", glob("App Debug*"))],
        ..Filters::default()
    };
    assert!(filters.check(CallType::Track, Some("Signed Up")).is_ok());
    assert!(filters.check(CallType::Track, Some("App Opened")).is_ok());
    let e = filters.check(CallType::Track, Some("Clicked")).unwrap_err();
    assert_eq!(
        e.reason,
        "event \"Clicked\" matches no pattern of f.allow_events"
    );
    let e = filters
        .check(CallType::Track, Some("App Debug Ping"))
        .unwrap_err();
    assert_eq!(
        e.reason,
        "event \"App Debug Ping\" is denied by f.deny_events[0] (\"App Debug*\")"
    );
    // Identify has no event; a track without one is left to validation.
    assert!(filters.check(CallType::Identify, None).is_ok());
    assert!(filters.check(CallType::Track, None).is_ok());
}

#[test]
fn apply_reads_the_call_and_event_of_raw_json() {
    let rules = Rules {
        filters: Filters {
            deny_events: vec![named("d", glob("Debug *"))],
            deny_calls: vec![named("c", CallType::Alias)],
            ..Filters::default()
        },
        ..Rules::default()
    };
    let mut m = json!({"type": "track", "event": "Debug tap", "userId": "u"});
    assert!(rules.apply(&mut m).is_err());
    let mut m = json!({"type": "alias", "userId": "u", "previousId": "p"});
    assert!(rules.apply(&mut m).is_err());
    // A page's name is not an event; unknown types go to validation.
    let mut m = json!({"type": "page", "name": "Debug page", "userId": "u"});
    assert!(rules.apply(&mut m).is_ok());
    let mut m = json!({"type": "nonsense", "event": "Debug tap"});
    assert!(rules.apply(&mut m).is_ok());
    let mut m = json!(["not", "an", "object"]);
    assert!(rules.apply(&mut m).is_ok());
}

#[test]
fn hashes_are_hmac_sha256_hex_under_the_secret_and_deterministic() {
    let key = Secret::new("key");
    // The well-known example value of
    // HMAC-SHA256(key="key", "The quick brown fox jumps over the lazy dog").
    assert_eq!(
        hmac_hex(&key, b"The quick brown fox jumps over the lazy dog"),
        "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    );
    let a = hash_value(&key, &json!("ann@example.com")).unwrap();
    assert_eq!(a, hash_value(&key, &json!("ann@example.com")).unwrap());
    assert_eq!(a.len(), 64);
    assert!(
        a.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_ne!(
        a,
        hash_value(&Secret::new("other key"), &json!("ann@example.com")).unwrap(),
        "the secret is part of the hash"
    );
    assert_ne!(a, hash_value(&key, &json!("Ann@example.com")).unwrap());
}

#[test]
fn non_string_values_hash_their_json_text_and_null_stays() {
    let key = Secret::new("key");
    assert_eq!(hash_value(&key, &json!(42)), Some(hmac_hex(&key, b"42")));
    assert_eq!(
        hash_value(&key, &json!(true)),
        Some(hmac_hex(&key, b"true"))
    );
    assert_eq!(
        hash_value(&key, &json!({"b": 1, "a": [2]})),
        Some(hmac_hex(&key, br#"{"b":1,"a":[2]}"#))
    );
    assert_eq!(hash_value(&key, &Value::Null), None);
    let rules = hashing(vec![rule("traits.phone", PiiAction::Hash)]);
    let mut m = json!({"type": "identify", "traits": {"phone": null}});
    rules.apply(&mut m).unwrap();
    assert_eq!(m["traits"]["phone"], Value::Null);
}

#[test]
fn trait_rules_cover_traits_and_context_traits_property_rules_properties() {
    let rules = hashing(vec![
        rule("traits.email", PiiAction::Hash),
        rule("properties.card", PiiAction::Drop),
    ]);
    let key = rules.hmac_key.clone().unwrap();
    let h = hmac_hex(&key, b"ann@example.com");
    let mut m = json!({
        "type": "identify",
        "userId": "u1",
        "traits": {"email": "ann@example.com", "plan": "Pro"},
        "context": {"traits": {"email": "ann@example.com"}},
        "properties": {"email": "not a trait"},
    });
    rules.apply(&mut m).unwrap();
    assert_eq!(
        m,
        json!({
            "type": "identify",
            "userId": "u1",
            "traits": {"email": h, "plan": "Pro"},
            "context": {"traits": {"email": h}},
            "properties": {"email": "not a trait"},
        })
    );
    let mut m = json!({
        "type": "track", "event": "Paid", "userId": "u1",
        "properties": {"card": "4111 1111 1111 1111", "amount": 5},
        "traits": {"card": "kept: not a property"},
    });
    rules.apply(&mut m).unwrap();
    assert_eq!(m["properties"], json!({"amount": 5}));
    assert_eq!(m["traits"]["card"], "kept: not a property");
}

#[test]
fn nested_paths_drop_and_hash_inside_objects_only() {
    let rules = hashing(vec![
        rule("traits.address.street", PiiAction::Drop),
        rule("properties.payer.iban", PiiAction::Hash),
    ]);
    let mut m = json!({
        "type": "identify",
        "traits": {"address": {"street": "1 Main St", "city": "Springfield"}},
        "context": {"traits": {"address": "a string, not an object"}},
    });
    rules.apply(&mut m).unwrap();
    assert_eq!(m["traits"]["address"], json!({"city": "Springfield"}));
    assert_eq!(m["context"]["traits"]["address"], "a string, not an object");
    let mut m = json!({"type": "track", "event": "E", "properties": {"payer": {"iban": 12}}});
    rules.apply(&mut m).unwrap();
    let key = rules.hmac_key.clone().unwrap();
    assert_eq!(m["properties"]["payer"]["iban"], hmac_hex(&key, b"12"));
    // Missing objects on the way change nothing.
    let mut m = json!({"type": "track", "event": "E", "properties": {"payer": null}});
    rules.apply(&mut m).unwrap();
    assert_eq!(m["properties"], json!({"payer": null}));
}

#[test]
fn paths_and_actions_parse_strictly() {
    assert!(PiiPath::parse("traits.email").is_ok());
    assert!(PiiPath::parse("properties.a.b.c").is_ok());
    for bad in [
        "",
        "email",
        "traits",
        "traits.",
        "traits..email",
        "context.traits.email",
        "userId",
    ] {
        assert!(PiiPath::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(PiiAction::parse("drop"), Some(PiiAction::Drop));
    assert_eq!(PiiAction::parse("hash"), Some(PiiAction::Hash));
    assert_eq!(PiiAction::parse("Hash"), None);
    assert_eq!(PiiAction::parse("encrypt"), None);
}
