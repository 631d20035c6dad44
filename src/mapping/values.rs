//! Segment values → Totango parameter values (mapping.md "Values").

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{Number, Value};

/// Numbers below this are Unix seconds, at or above it Unix milliseconds.
const SECONDS_LIMIT: f64 = 31_557_600_000.0;

/// Appends `value` under `key` to `out`, flattening objects with `.`.
/// `null` adds nothing.
pub fn flatten_into(key: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Null => {}
        Value::Object(map) => {
            for (k, v) in map {
                flatten_into(&format!("{key}.{k}"), v, out);
            }
        }
        other => {
            if let Some(text) = scalar_or_array_text(other) {
                out.push((key.to_owned(), text));
            }
        }
    }
}

/// Text of a non-object value: strings as given, numbers in shortest JSON form,
/// booleans as words, arrays of scalars joined with `,` (nulls skipped), other
/// arrays as compact JSON.
pub fn scalar_or_array_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(number_text(n)),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(items) => {
            if items.iter().any(|i| i.is_object() || i.is_array()) {
                Some(Value::Array(items.clone()).to_string())
            } else {
                let parts: Vec<String> = items.iter().filter_map(scalar_or_array_text).collect();
                Some(parts.join(","))
            }
        }
        Value::Object(_) => Some(value.to_string()),
    }
}

pub use crate::segment::number_text;

/// Normalises a `created` value to UTC `YYYY-MM-DDTHH:MM:SS.sssZ`.
/// `None` when it cannot be read as a date.
pub fn normalise_create_date(value: &Value) -> Option<String> {
    let at = match value {
        Value::Number(n) => from_epoch_number(n)?,
        Value::String(s) => parse_date_text(s.trim())?,
        _ => return None,
    };
    Some(at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// Whether Totango reads `s` as an ISO 8601 date or date-time: the text forms
/// [`normalise_create_date`] accepts, without surrounding spaces; a Unix time
/// (a string of digits) is not one.
pub fn is_iso_date(s: &str) -> bool {
    s == s.trim()
        && !s
            .strip_prefix('-')
            .unwrap_or(s)
            .bytes()
            .all(|b| b.is_ascii_digit())
        && parse_date_text(s).is_some()
}

fn from_epoch_number(n: &Number) -> Option<DateTime<Utc>> {
    let x = n.as_f64()?;
    if !x.is_finite() {
        return None;
    }
    let millis = if x.abs() < SECONDS_LIMIT {
        x * 1000.0
    } else {
        x
    };
    // Round to whole milliseconds; out-of-range values are unparseable.
    let millis = millis.round();
    if millis.abs() > 8.2e15 {
        return None;
    }
    Utc.timestamp_millis_opt(millis as i64).single()
}

fn parse_date_text(s: &str) -> Option<DateTime<Utc>> {
    if s.is_empty() {
        return None;
    }
    // Epoch numbers sent as strings ("1700000000") are read as numbers.
    if s.bytes().all(|b| b.is_ascii_digit())
        || (s.starts_with('-') && s.len() > 1 && s[1..].bytes().all(|b| b.is_ascii_digit()))
    {
        let n: Number = s.parse::<i64>().ok()?.into();
        return from_epoch_number(&n);
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    // ISO 8601 variants: space separator, offsets without colon, no offset (UTC).
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f%z",
        "%Y-%m-%dT%H:%M%z",
    ] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.with_timezone(&Utc));
        }
    }
    let naive = s.strip_suffix('Z').unwrap_or(s);
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(naive, fmt) {
            return Some(dt.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|dt| dt.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(v: Value) -> Vec<(String, String)> {
        let mut out = Vec::new();
        flatten_into("sdr_u.x", &v, &mut out);
        out
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn scalars() {
        assert_eq!(flat(json!("a b")), pairs(&[("sdr_u.x", "a b")]));
        assert_eq!(flat(json!(42)), pairs(&[("sdr_u.x", "42")]));
        assert_eq!(flat(json!(42.99)), pairs(&[("sdr_u.x", "42.99")]));
        assert_eq!(flat(json!(1e21)), pairs(&[("sdr_u.x", "1e21")]));
        assert_eq!(flat(json!(-0.5)), pairs(&[("sdr_u.x", "-0.5")]));
        assert_eq!(flat(json!(1e-7)), pairs(&[("sdr_u.x", "1e-7")]));
        assert_eq!(flat(json!(42.0)), pairs(&[("sdr_u.x", "42")]));
        assert_eq!(
            flat(json!(u64::MAX)),
            pairs(&[("sdr_u.x", "18446744073709551615")])
        );
        assert_eq!(flat(json!(false)), pairs(&[("sdr_u.x", "false")]));
        assert_eq!(flat(json!(null)), pairs(&[]));
    }

    #[test]
    fn objects_flatten_with_dots() {
        assert_eq!(
            flat(json!({"a": {"b": 1, "c": null}, "d": "e"})),
            pairs(&[("sdr_u.x.a.b", "1"), ("sdr_u.x.d", "e")])
        );
        assert_eq!(flat(json!({})), pairs(&[]));
    }

    #[test]
    fn arrays() {
        assert_eq!(
            flat(json!(["a", 1, true, null])),
            pairs(&[("sdr_u.x", "a,1,true")])
        );
        assert_eq!(flat(json!([])), pairs(&[("sdr_u.x", "")]));
        assert_eq!(
            flat(json!([{"a": 1}, 2])),
            pairs(&[("sdr_u.x", r#"[{"a":1},2]"#)])
        );
        assert_eq!(flat(json!([[1, 2]])), pairs(&[("sdr_u.x", "[[1,2]]")]));
    }

    #[test]
    fn create_dates() {
        let n = |v: Value| normalise_create_date(&v);
        assert_eq!(
            n(json!("2023-11-02")).as_deref(),
            Some("2023-11-02T00:00:00.000Z")
        );
        assert_eq!(
            n(json!("2024-03-05T10:20:30+02:00")).as_deref(),
            Some("2024-03-05T08:20:30.000Z")
        );
        assert_eq!(
            n(json!("2024-03-05T10:20:30.123456Z")).as_deref(),
            Some("2024-03-05T10:20:30.123Z")
        );
        assert_eq!(
            n(json!("2024-03-05T10:20:30-0500")).as_deref(),
            Some("2024-03-05T15:20:30.000Z")
        );
        assert_eq!(
            n(json!("2024-03-05 10:20:30")).as_deref(),
            Some("2024-03-05T10:20:30.000Z")
        );
        assert_eq!(
            n(json!(1700000000)).as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        assert_eq!(
            n(json!(1700000000.5)).as_deref(),
            Some("2023-11-14T22:13:20.500Z")
        );
        assert_eq!(
            n(json!(1700000000123u64)).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        // The boundary: 31557600000 is read as milliseconds.
        assert_eq!(
            n(json!(31557600000u64)).as_deref(),
            Some("1971-01-01T06:00:00.000Z")
        );
        assert_eq!(
            n(json!(31557599999u64)).as_deref(),
            Some("2970-01-07T23:59:59.000Z")
        );
        assert_eq!(
            n(json!("1700000000")).as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        for bad in [
            json!("last tuesday"),
            json!(""),
            json!(true),
            json!({}),
            json!([1]),
            json!(1e300),
            json!("2023-13-01"),
        ] {
            assert_eq!(n(bad.clone()), None, "{bad}");
        }
    }
}
