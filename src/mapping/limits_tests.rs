//! One test per limit of docs/mapping.md "Totango's limits", in each mode.

use super::limits::{is_plain_number, truncate_chars};
use super::*;
use serde_json::json;

fn run_in(mode: &str, msg: Value) -> Translation {
    let settings = SettingsPatch::from_json(&json!({
        "service_id": "SP-3126-05",
        "endpoint": "http://fake.test",
        "on_limit_breach": mode,
    }))
    .unwrap()
    .resolve()
    .unwrap();
    translate_value(&msg, &settings, None)
}

fn group(traits: Value) -> Value {
    json!({"type": "group", "userId": "u1", "groupId": "acme", "traits": traits})
}

fn identify(traits: Value) -> Value {
    json!({"type": "identify", "userId": "u1", "context": {"groupId": "acme"}, "traits": traits})
}

fn obj(key: &str, value: Value) -> Value {
    let mut m = Map::new();
    m.insert(key.to_owned(), value);
    Value::Object(m)
}

fn param(t: &Translation, key: &str) -> String {
    assert_eq!(t.outcome, Outcome::Send, "{t:?}");
    t.requests[0].params[key].clone()
}

/// Warn sends the value unchanged with one warning naming the parameter.
fn assert_warned(t: &Translation, rule: LimitRule, key: &str, sent: &str) {
    assert_eq!(param(t, key), sent);
    assert_eq!(t.breaches, vec![rule], "{t:?}");
    assert_eq!(t.warnings.len(), 1, "{t:?}");
    assert!(t.warnings[0].starts_with(key), "{:?}", t.warnings);
}

fn assert_rejected(t: &Translation, code: Code, field: &str) {
    assert_eq!(t.outcome, Outcome::Rejected, "{t:?}");
    assert_eq!(t.code, Some(code));
    assert!(t.requests.is_empty());
    let message = t.message.as_deref().unwrap();
    assert!(
        message.starts_with(field),
        "{message:?} should name {field}"
    );
    assert!(message.contains("on_limit_breach"), "{message}");
    assert!(!t.warnings.is_empty() && !t.breaches.is_empty());
}

fn assert_clean(t: &Translation) {
    assert_eq!(t.outcome, Outcome::Send, "{t:?}");
    assert!(t.breaches.is_empty(), "{t:?}");
    assert!(t.warnings.is_empty(), "{t:?}");
}

#[test]
fn default_mode_is_warn() {
    let t = run_in("warn", group(json!({"notes": "x".repeat(513)})));
    let settings = SettingsPatch::from_json(&json!({"service_id": "SP-3126-05"}))
        .unwrap()
        .resolve()
        .unwrap();
    let d = translate_value(&group(json!({"notes": "x".repeat(513)})), &settings, None);
    assert_eq!(d.warnings, t.warnings);
    assert_eq!(d.requests, t.requests);
}

#[test]
fn account_text_at_most_512_characters() {
    // Counted in characters, not bytes.
    let fits = "é".repeat(MAX_ACCOUNT_TEXT);
    assert_clean(&run_in("reject", group(json!({"notes": fits}))));
    let long = format!("{}ab", "é".repeat(511));
    let t = run_in("warn", group(json!({"notes": long})));
    assert_warned(&t, LimitRule::AccountText, "sdr_o.notes", &long);
    assert!(t.warnings[0].contains("513 characters"), "{:?}", t.warnings);

    let t = run_in("truncate", group(json!({"notes": long})));
    let cut = param(&t, "sdr_o.notes");
    assert_eq!(cut, format!("{}a", "é".repeat(511)));
    assert_eq!(cut.chars().count(), 512);
    assert_eq!(t.breaches, vec![LimitRule::AccountText]);
    assert!(
        t.warnings[0].contains("truncated to 512"),
        "{:?}",
        t.warnings
    );

    let t = run_in("reject", group(json!({"notes": long})));
    assert_rejected(&t, Code::LimitAccountText, "sdr_o.notes");
    // Nested and array values are text too; so are group options.
    let t = run_in("warn", group(json!({"a": {"b": [], "c": "z".repeat(600)}})));
    assert_warned(&t, LimitRule::AccountText, "sdr_o.a.c", &"z".repeat(600));
}

const MAX_ACCOUNT_TEXT: usize = limits::MAX_ACCOUNT_TEXT_CHARS;

#[test]
fn user_text_at_most_255_characters() {
    assert_clean(&run_in("reject", identify(json!({"bio": "u".repeat(255)}))));
    let long = "u".repeat(256);
    let t = run_in("warn", identify(json!({"bio": long})));
    assert_warned(&t, LimitRule::UserText, "sdr_u.bio", &long);

    let t = run_in("truncate", identify(json!({"bio": long})));
    assert_eq!(param(&t, "sdr_u.bio"), "u".repeat(255));
    assert_eq!(t.breaches, vec![LimitRule::UserText]);

    let t = run_in("reject", identify(json!({"bio": long})));
    assert_rejected(&t, Code::LimitUserText, "sdr_u.bio");
    // A user attribute of 300 characters on a group call is an account one: fine.
    assert_clean(&run_in("reject", group(json!({"bio": "u".repeat(300)}))));
}

#[test]
fn account_name_at_most_128_characters() {
    assert_clean(&run_in("reject", group(json!({"name": "n".repeat(128)}))));
    let long = "n".repeat(129);
    let t = run_in("warn", group(json!({"name": long})));
    assert_warned(&t, LimitRule::AccountName, "sdr_odn", &long);

    let t = run_in("truncate", group(json!({"name": long})));
    assert_eq!(param(&t, "sdr_odn"), "n".repeat(128));
    assert_eq!(t.breaches, vec![LimitRule::AccountName]);

    let t = run_in("reject", group(json!({"name": long})));
    assert_rejected(&t, Code::LimitAccountName, "sdr_odn");
    // The user's name is a user attribute (255).
    assert_clean(&run_in("reject", identify(json!({"name": long}))));
}

#[test]
fn contract_value_is_a_plain_number() {
    for ok in [
        json!(1000),
        json!(42.99),
        json!("1000.50"),
        json!(-3),
        json!(1e21),
    ] {
        assert_clean(&run_in("reject", group(json!({"Contract Value": ok}))));
    }
    for bad in ["$1,000", "1,000", "1000 USD", "€5", " 5", "", "1.", "abc"] {
        let t = run_in("warn", group(json!({"Contract Value": bad})));
        assert_warned(&t, LimitRule::Number, "sdr_o.Contract Value", bad);
        // Cannot be truncated: sent as is, with the warning.
        let t = run_in("truncate", group(json!({"Contract Value": bad})));
        assert_warned(&t, LimitRule::Number, "sdr_o.Contract Value", bad);
        assert!(t.warnings[0].contains("only text can be truncated"));
        let t = run_in("reject", group(json!({"Contract Value": bad})));
        assert_rejected(&t, Code::LimitNumber, "sdr_o.Contract Value");
    }
    // A number attribute is not held to the text length.
    let big = "9".repeat(600);
    assert_clean(&run_in("reject", group(json!({"Contract Value": big}))));
}

#[test]
fn contract_dates_are_iso_8601() {
    for key in ["Contract Renewal Date", "Contract Start Date"] {
        for ok in [
            "2024-05-01",
            "2024-05-01T10:20:30Z",
            "2024-05-01T10:20:30.123+02:00",
        ] {
            assert_clean(&run_in("reject", group(obj(key, json!(ok)))));
        }
        let param_key = format!("sdr_o.{key}");
        for (bad, sent) in [
            (json!("05/01/2024"), "05/01/2024"),
            (json!("next year"), "next year"),
            (json!(1714521600), "1714521600"),
            (json!("2024-13-01"), "2024-13-01"),
        ] {
            let t = run_in("warn", group(obj(key, bad.clone())));
            assert_warned(&t, LimitRule::Date, &param_key, sent);
            let t = run_in("truncate", group(obj(key, bad.clone())));
            assert_warned(&t, LimitRule::Date, &param_key, sent);
            let t = run_in("reject", group(obj(key, bad.clone())));
            assert_rejected(&t, Code::LimitDate, &param_key);
        }
    }
}

#[test]
fn create_date_that_is_no_date_is_a_date_breach() {
    // Warn and truncate: as before, left out with the mapping's own warning.
    for mode in ["warn", "truncate"] {
        let t = run_in(mode, identify(json!({"created": "soon"})));
        assert_eq!(t.outcome, Outcome::Send);
        assert!(!t.requests[0].params.contains_key("sdr_u.Create Date"));
        assert_eq!(
            t.warnings,
            vec![r#"traits.created: "soon" is not a date; sdr_u.Create Date not sent"#]
        );
        assert_eq!(t.breaches, vec![LimitRule::Date]);
    }
    let t = run_in("reject", group(json!({"created": "soon"})));
    assert_rejected(&t, Code::LimitDate, "traits.created");
    // Normalised dates always pass.
    assert_clean(&run_in("reject", group(json!({"created": 1700000000}))));
}

#[test]
fn account_id_is_letters_digits_underscore_and_hyphen() {
    assert_clean(&run_in("reject", group(json!({}))));
    let ok = json!({"type": "group", "groupId": "Acme_01-eu", "traits": {}});
    assert_clean(&run_in("reject", ok));
    let num = json!({"type": "group", "groupId": 42, "traits": {}});
    assert_clean(&run_in("reject", num));
    for bad in ["acme.com", "acme corp", "org:1", "zürich"] {
        let msg = json!({"type": "group", "groupId": bad, "traits": {}});
        for mode in ["warn", "truncate"] {
            let t = run_in(mode, msg.clone());
            assert_eq!(param(&t, "sdr_o"), bad);
            assert_eq!(t.breaches, vec![LimitRule::AccountId], "{t:?}");
            assert_eq!(t.warnings.len(), 1, "{t:?}");
            assert!(t.warnings[0].starts_with("groupId: "), "{:?}", t.warnings);
        }
        let t = run_in("reject", msg);
        assert_rejected(&t, Code::LimitAccountId, "groupId");
    }
    // Calls with context.groupId; a page's two requests give one breach.
    let page = json!({"type": "page", "userId": "u1", "category": "Docs", "name": "Index",
        "context": {"groupId": "acme.com"}});
    let t = run_in("warn", page.clone());
    assert_eq!(t.requests.len(), 2);
    assert_eq!(t.breaches, vec![LimitRule::AccountId]);
    assert!(
        t.warnings[0].starts_with("context.groupId"),
        "{:?}",
        t.warnings
    );
    assert_rejected(
        &run_in("reject", page),
        Code::LimitAccountId,
        "context.groupId",
    );
    let track = json!({"type": "track", "userId": "u1", "event": "E",
        "context": {"groupId": "a/b"}});
    assert_rejected(
        &run_in("reject", track),
        Code::LimitAccountId,
        "context.groupId",
    );
}

#[test]
fn reject_names_the_first_breach_and_warns_of_all() {
    let msg = json!({"type": "group", "groupId": "acme.com",
        "traits": {"name": "n".repeat(200), "Contract Value": "$5"}});
    let t = run_in("reject", msg.clone());
    assert_eq!(t.outcome, Outcome::Rejected);
    assert_eq!(t.warnings.len(), 3, "{:?}", t.warnings);
    assert_eq!(
        t.breaches,
        vec![
            LimitRule::AccountId,
            LimitRule::AccountName,
            LimitRule::Number
        ]
    );
    assert!(
        t.message
            .as_deref()
            .unwrap()
            .ends_with("2 more in the warnings"),
        "{t:?}"
    );
    // Truncate fixes the text and keeps the rest.
    let t = run_in("truncate", msg);
    assert_eq!(t.outcome, Outcome::Send);
    assert_eq!(param(&t, "sdr_odn").len(), 128);
    assert_eq!(param(&t, "sdr_o.Contract Value"), "$5");
    assert_eq!(t.warnings.len(), 3);
}

#[test]
fn checks_do_not_touch_activities_or_the_token() {
    let settings = SettingsPatch::from_json(&json!({
        "service_id": "SP-3126-05", "api_token": "t".repeat(600), "on_limit_breach": "reject",
    }))
    .unwrap()
    .resolve()
    .unwrap();
    let t = translate_value(
        &json!({"type": "track", "userId": "u1", "event": "e".repeat(600),
            "properties": {"category": "c".repeat(600)}, "context": {"groupId": "acme"}}),
        &settings,
        None,
    );
    assert_clean(&t);
}

#[test]
fn plain_numbers_and_character_cuts() {
    for ok in ["0", "-1", "1.5", "1e21", "1E-7", "12.5e+3"] {
        assert!(is_plain_number(ok), "{ok}");
    }
    for bad in [
        "", "-", "1.", ".5", "1e", "1,0", "$1", "1 ", "+1", "NaN", "inf",
    ] {
        assert!(!is_plain_number(bad), "{bad}");
    }
    let mut s = "aé😀b".to_owned();
    truncate_chars(&mut s, 3);
    assert_eq!(s, "aé😀");
    truncate_chars(&mut s, 10);
    assert_eq!(s, "aé😀");
    truncate_chars(&mut s, 0);
    assert_eq!(s, "");
}

#[test]
fn every_rule_has_a_name_and_a_code() {
    for rule in LimitRule::ALL {
        assert_eq!(rule.code().as_str(), format!("limit_{}", rule.as_str()));
    }
}
