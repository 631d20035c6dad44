//! From a Search API hit to an account's insights (the snapshot), and from
//! those to a Salesforce record with the configured mapping. Pure: no I/O.

use crate::config::insights::{FieldMapping, Insight, SearchField};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One account's insights as read at `synced_at`: what the widget shows
/// and what is written to Salesforce.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccountInsights {
    pub account_id: String,
    pub display_name: Option<String>,
    /// The Salesforce record Id (`account_link_attribute`), when Totango has it.
    pub salesforce_id: Option<String>,
    /// Totango's colour: green, yellow or red.
    pub health: Option<String>,
    /// Good, Average or Poor.
    pub health_label: Option<String>,
    pub health_profile: Option<String>,
    pub is_online: Option<bool>,
    /// Milliseconds since the epoch.
    pub last_activity_time: Option<i64>,
    pub licenses: Option<f64>,
    /// Active users ÷ licences, percent.
    pub license_utilization: Option<f64>,
    pub url: String,
    pub usage_frequency: Option<String>,
    pub active_users_14_days: Option<f64>,
    pub engagement: Option<f64>,
    pub engagement_change: Option<f64>,
    pub tags: Vec<String>,
    /// ISO 8601 time of the sync that read these values.
    pub synced_at: String,
}

/// The profile link of an account in Totango.
pub fn account_url(account_id: &str) -> String {
    let id: String = url::form_urlencoded::byte_serialize(account_id.as_bytes()).collect();
    format!("https://app.totango.com/#!/customerDetails?customer={id}")
}

/// Why a Totango search hit is skipped.
#[derive(Debug, thiserror::Error)]
pub enum HitError {
    #[error("hit without an account id (\"name\")")]
    NoAccountId,
}

/// Reads one hit. `fields` is the list the query was sent with (the values
/// of `selected_fields` come in that order); `link_field` is the index of
/// the Salesforce Id attribute in `selected_fields`, when requested.
pub fn from_hit(
    hit: &Value,
    fields: &[SearchField],
    link_field: Option<usize>,
    synced_at: &str,
) -> Result<AccountInsights, HitError> {
    let account_id = match hit.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(HitError::NoAccountId),
    };
    let selected = hit
        .get("selected_fields")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let value = |insight: Insight| -> Option<&Value> {
        let i = fields.iter().position(|f| f.insight == insight)?;
        selected.get(i).filter(|v| !v.is_null())
    };
    let text_of = |insight: Insight| value(insight).and_then(|v| text(v, term_of(fields, insight)));
    let number_of =
        |insight: Insight| value(insight).and_then(|v| number(v, term_of(fields, insight)));

    let health = text_of(Insight::AccountHealth).map(|h| h.to_ascii_lowercase());
    let health_label = health.as_deref().and_then(health_label);
    let active_users_14_days = number_of(Insight::ActiveUsers14Days);
    let licenses = number_of(Insight::Licenses);
    let license_utilization = match (active_users_14_days, licenses) {
        (Some(users), Some(l)) if l > 0.0 => Some(round2(users / l * 100.0)),
        _ => None,
    };
    let salesforce_id = link_field
        .and_then(|i| selected.get(i))
        .and_then(|v| text(v, None))
        .filter(|s| !s.is_empty());
    Ok(AccountInsights {
        url: account_url(&account_id),
        account_id,
        display_name: hit
            .get("display_name")
            .and_then(|v| text(v, None))
            .filter(|s| !s.is_empty()),
        salesforce_id,
        health_label,
        health,
        health_profile: text_of(Insight::HealthProfile),
        is_online: hit.get("is_online").and_then(boolean),
        last_activity_time: hit.get("last_activity_time").and_then(Value::as_i64),
        licenses,
        license_utilization,
        usage_frequency: text_of(Insight::UsageFrequency),
        active_users_14_days,
        engagement: number_of(Insight::Engagement),
        engagement_change: number_of(Insight::EngagementChange),
        tags: value(Insight::Insights).map(tags).unwrap_or_default(),
        synced_at: synced_at.to_owned(),
    })
}

/// green/yellow/red → Good/Average/Poor (the labels pass through).
pub fn health_label(colour: &str) -> Option<String> {
    let label = match colour.to_ascii_lowercase().as_str() {
        "green" | "good" => "Good",
        "yellow" | "average" => "Average",
        "red" | "poor" => "Poor",
        _ => return None,
    };
    Some(label.into())
}

fn term_of(fields: &[SearchField], insight: Insight) -> Option<&str> {
    let f = fields.iter().find(|f| f.insight == insight)?;
    ["term", "attribute", "aggregation"]
        .iter()
        .find_map(|k| f.query.get(*k).and_then(Value::as_str))
}

/// The scalar inside a selected value: itself, or from an object the entry
/// named like the term (`{"health":"green","health_prev":…}`), `value`, or
/// the first scalar.
fn scalar<'a>(v: &'a Value, term: Option<&str>) -> Option<&'a Value> {
    match v {
        Value::Object(m) => term
            .and_then(|t| m.get(t))
            .or_else(|| m.get("value"))
            .or_else(|| m.values().find(|x| !x.is_object() && !x.is_array()))
            .filter(|x| !x.is_null()),
        Value::Array(a) if a.len() == 1 => scalar(&a[0], term),
        Value::Null | Value::Array(_) => None,
        _ => Some(v),
    }
}

fn text(v: &Value, term: Option<&str>) -> Option<String> {
    match scalar(v, term)? {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn number(v: &Value, term: Option<&str>) -> Option<f64> {
    match scalar(v, term)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        _ => None,
    }
}

/// Tags as a list of names, a list of `{name}` objects, or one string
/// separated by `,` or `;`.
fn tags(v: &Value) -> Vec<String> {
    // Linear: a set of the tags seen, and the list in first-seen order.
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut push = |s: &str| {
        for t in s.split([',', ';']) {
            let t = t.trim();
            if !t.is_empty() && seen.insert(t.to_owned()) {
                out.push(t.to_owned());
            }
        }
    };
    match v {
        Value::String(s) => push(s),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => push(s),
                    Value::Object(m) => {
                        if let Some(s) = m.get("name").and_then(Value::as_str) {
                            push(s)
                        }
                    }
                    _ => {}
                }
            }
        }
        Value::Object(m) => {
            if let Some(inner) = m.get("tags").or_else(|| m.get("value")) {
                return tags(inner);
            }
        }
        _ => {}
    }
    out
}

/// The record a link names: Salesforce Ids have a 15-character
/// case-sensitive form and an 18-character one (the same 15 plus a
/// checksum of their case), so both forms of one record count as one. An
/// 18-character text whose last three characters are not that checksum is
/// taken as it is.
pub fn record_key(record: &str) -> &str {
    if record.len() == 18 && record.is_ascii() && id_checksum(&record[..15]) == record[15..] {
        &record[..15]
    } else {
        record
    }
}

/// The three characters Salesforce appends to a 15-character Id.
fn id_checksum(id15: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    id15.as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_ascii_uppercase())
                .fold(0usize, |acc, (i, _)| acc | (1 << i));
            ALPHABET[bits] as char
        })
        .collect()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The Salesforce field values of one account (no Id, no attributes).
/// Unknown values are left out rather than cleared.
pub fn salesforce_fields(a: &AccountInsights, mapping: &FieldMapping) -> Map<String, Value> {
    let mut out = Map::new();
    let mut put = |field: &str, v: Option<Value>| {
        if let (false, Some(v)) = (field.is_empty(), v) {
            out.insert(field.to_owned(), v);
        }
    };
    let num = |x: Option<f64>| x.and_then(|x| serde_json::Number::from_f64(x).map(Value::Number));
    let txt = |s: &Option<String>| s.clone().map(Value::String);
    put(&mapping.account_health, txt(&a.health_label));
    put(&mapping.health_profile, txt(&a.health_profile));
    put(&mapping.is_online, a.is_online.map(Value::Bool));
    put(
        &mapping.last_update,
        Some(Value::String(a.synced_at.clone())),
    );
    put(&mapping.license_utilization, num(a.license_utilization));
    put(&mapping.url, Some(Value::String(a.url.clone())));
    put(&mapping.usage_frequency, txt(&a.usage_frequency));
    put(&mapping.active_users_14_days, num(a.active_users_14_days));
    put(&mapping.engagement, num(a.engagement));
    put(&mapping.engagement_change, num(a.engagement_change));
    put(
        &mapping.insights,
        (!a.tags.is_empty()).then(|| Value::String(a.tags.join(";"))),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::insights::default_fields;
    use serde_json::json;

    fn hit() -> Value {
        json!({
            "name": "acme",
            "display_name": "Acme Inc.",
            "last_activity_time": 1_700_000_000_000i64,
            "is_online": true,
            "selected_fields": [
                {"health": "yellow", "health_prev": "green", "change_date": 1},
                "Enterprise",
                72.5,
                -3,
                {"unique_users": 15},
                "Weekly",
                "40",
                ["vip", "renewal soon"],
                "0015g00000AbCdEAAV"
            ]
        })
    }

    #[test]
    fn every_field_is_read_and_mapped() {
        let fields = default_fields();
        let a = from_hit(&hit(), &fields, Some(8), "2026-01-02T03:04:05Z").unwrap();
        assert_eq!(a.account_id, "acme");
        assert_eq!(a.display_name.as_deref(), Some("Acme Inc."));
        assert_eq!(a.salesforce_id.as_deref(), Some("0015g00000AbCdEAAV"));
        assert_eq!(a.health.as_deref(), Some("yellow"));
        assert_eq!(a.license_utilization, Some(37.5));
        let sf = salesforce_fields(&a, &FieldMapping::default());
        assert_eq!(
            Value::Object(sf),
            json!({
                "Totango_Account_Health__c": "Average",
                "Totango_Health_Profile__c": "Enterprise",
                "Totango_Is_Online__c": true,
                "Totango_Last_Update__c": "2026-01-02T03:04:05Z",
                "Totango_License_Utilization__c": 37.5,
                "Totango_URL__c": "https://app.totango.com/#!/customerDetails?customer=acme",
                "Totango_Usage_Frequency__c": "Weekly",
                "Totango_Active_Users_14_Days__c": 15.0,
                "Totango_Engagement__c": 72.5,
                "Totango_Engagement_Change__c": -3.0,
                "Totango_Insights__c": "vip;renewal soon"
            })
        );
    }

    #[test]
    fn health_colours_become_labels() {
        for (colour, label) in [("green", "Good"), ("YELLOW", "Average"), ("red", "Poor")] {
            assert_eq!(health_label(colour).as_deref(), Some(label));
        }
        assert_eq!(health_label("purple"), None);
    }

    #[test]
    fn missing_values_are_left_out_and_empty_mapping_skips() {
        let fields = default_fields();
        let h = json!({"name": "bare", "selected_fields": [null, null]});
        let a = from_hit(&h, &fields, None, "t").unwrap();
        let mapping = FieldMapping {
            url: String::new(),
            ..Default::default()
        };
        let sf = salesforce_fields(&a, &mapping);
        assert_eq!(
            Value::Object(sf),
            json!({"Totango_Last_Update__c": "t"}),
            "only the sync time is known"
        );
        assert!(from_hit(&json!({"display_name": "x"}), &fields, None, "t").is_err());
    }

    #[test]
    fn tag_shapes() {
        assert_eq!(tags(&json!("a; b,a")), ["a", "b"]);
        assert_eq!(tags(&json!([{"name": "x"}, "y"])), ["x", "y"]);
        assert!(tags(&json!(3)).is_empty());
    }

    #[test]
    fn both_forms_of_a_salesforce_id_name_one_record() {
        // A real Account Id in both forms (checksum from Salesforce's algorithm).
        assert_eq!(id_checksum("0015g00000AbCdE"), "AAV");
        assert_eq!(record_key("0015g00000AbCdEAAV"), "0015g00000AbCdE");
        assert_eq!(record_key("0015g00000AbCdE"), "0015g00000AbCdE");
        // Not a checksum: a different text, kept whole.
        assert_eq!(record_key("001000000000000007"), "001000000000000007");
        assert_eq!(record_key("é"), "é");
    }

    #[test]
    fn many_tags_are_deduplicated_in_linear_time_keeping_order() {
        // 40,000 tags, each twice: the quadratic version took ~1.5 s.
        let names: Vec<String> = (0..40_000).map(|i| format!("t{i}")).collect();
        let mut list: Vec<Value> = names.iter().map(|n| json!(n)).collect();
        list.extend(names.iter().rev().map(|n| json!({"name": n})));
        let started = std::time::Instant::now();
        let got = tags(&Value::Array(list));
        let took = started.elapsed();
        assert_eq!(got, names, "first-seen order, duplicates removed");
        assert!(took < std::time::Duration::from_millis(300), "{took:?}");
        assert_eq!(tags(&json!("b;a;b, a ;c")), ["b", "a", "c"]);
    }

    #[test]
    fn zero_licences_give_no_utilisation() {
        let fields = default_fields();
        let mut h = hit();
        h["selected_fields"][6] = json!(0);
        let a = from_hit(&h, &fields, None, "t").unwrap();
        assert_eq!(a.license_utilization, None);
    }
}
