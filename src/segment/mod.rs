//! The Segment message model: typed views of untrusted Segment JSON.
//!
//! Parsing only; no I/O and no Totango knowledge. Every parse error names the
//! field it is about, so ingest can answer `400` with it.

use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// A Segment call type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallType {
    Identify,
    Group,
    Page,
    Screen,
    Track,
    Alias,
    /// A user deletion request (Segment's Webhooks destination sends it).
    Delete,
}

impl CallType {
    pub const ALL: [CallType; 7] = [
        CallType::Identify,
        CallType::Group,
        CallType::Page,
        CallType::Screen,
        CallType::Track,
        CallType::Alias,
        CallType::Delete,
    ];

    pub fn parse(s: &str) -> Option<CallType> {
        CallType::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The call of a Tracking API path segment: its name, or the short
    /// form analytics.js posts to (`i`, `g`, `p`, `s`, `t`, `a`).
    pub fn from_path(segment: &str) -> Option<CallType> {
        match segment {
            "i" => Some(CallType::Identify),
            "g" => Some(CallType::Group),
            "p" => Some(CallType::Page),
            "s" => Some(CallType::Screen),
            "t" => Some(CallType::Track),
            "a" => Some(CallType::Alias),
            other => CallType::parse(other),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Identify => "identify",
            CallType::Group => "group",
            CallType::Page => "page",
            CallType::Screen => "screen",
            CallType::Track => "track",
            CallType::Alias => "alias",
            CallType::Delete => "delete",
        }
    }
}

impl fmt::Display for CallType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a JSON value is not a Segment message. `field` is a dotted path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the message must be a JSON object")]
    NotAnObject,
    #[error(
        "type: missing; every message needs a type (identify, group, page, screen, track, alias, delete)"
    )]
    MissingType,
    #[error("type: unknown call type {0:?}")]
    UnknownType(String),
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
}

impl ParseError {
    /// A stable, searchable code for API answers.
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::NotAnObject => "invalid_message",
            ParseError::MissingType => "missing_type",
            ParseError::UnknownType(_) => "unknown_type",
            ParseError::InvalidField { .. } => "invalid_field",
        }
    }

    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParseError::NotAnObject => None,
            ParseError::MissingType | ParseError::UnknownType(_) => Some("type"),
            ParseError::InvalidField { field, .. } => Some(field),
        }
    }
}

/// Longest id (`messageId`, `userId`, `anonymousId`, `groupId`,
/// `previousId`, `context.groupId`) accepted, in UTF-8 bytes. Ids are stored
/// in indexes (dedupe, ordering keys, lookups); PostgreSQL refuses index
/// entries over about 2.7 KB, so ids are bounded well below that.
pub const MAX_ID_BYTES: usize = 1024;

/// An id longer than [`MAX_ID_BYTES`] is an error naming its field.
pub fn check_id_length(field: &str, id: Option<&str>) -> Result<(), ParseError> {
    match id {
        Some(id) if id.len() > MAX_ID_BYTES => Err(ParseError::InvalidField {
            field: field.to_owned(),
            reason: format!(
                "{} bytes long; ids are at most {MAX_ID_BYTES} bytes",
                id.len()
            ),
        }),
        _ => Ok(()),
    }
}

/// A parsed Segment message. Ids are kept in their text form (numbers in
/// decimal), empty ids count as absent. Object fields default to empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub call: CallType,
    pub message_id: Option<String>,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub group_id: Option<String>,
    pub previous_id: Option<String>,
    pub event: Option<String>,
    pub name: Option<String>,
    pub category: Option<String>,
    pub traits: Map<String, Value>,
    pub properties: Map<String, Value>,
    pub context: Map<String, Value>,
    pub integrations: Map<String, Value>,
    pub timestamp: Option<String>,
    pub original_timestamp: Option<String>,
    pub sent_at: Option<String>,
    pub received_at: Option<String>,
}

/// The wire form; field deserializers accept what Segment's libraries send.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    #[serde(rename = "type", default, deserialize_with = "opt_string")]
    call: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    message_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    user_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    anonymous_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    group_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    previous_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    event: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    name: Option<String>,
    #[serde(default, deserialize_with = "opt_text")]
    category: Option<String>,
    #[serde(default, deserialize_with = "opt_object")]
    traits: Map<String, Value>,
    #[serde(default, deserialize_with = "opt_object")]
    properties: Map<String, Value>,
    #[serde(default, deserialize_with = "opt_object")]
    context: Map<String, Value>,
    #[serde(default, deserialize_with = "opt_object")]
    integrations: Map<String, Value>,
    #[serde(default, deserialize_with = "opt_string")]
    timestamp: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    original_timestamp: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    sent_at: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    received_at: Option<String>,
}

impl Message {
    /// Parses one message. Unknown call types are an error here; callers decide
    /// whether that means `400` (ingest) or `unsupported` (translate).
    pub fn from_value(value: &Value) -> Result<Message, ParseError> {
        if !value.is_object() {
            return Err(ParseError::NotAnObject);
        }
        // Tracking the path costs on every value; it is needed only to name
        // the field of an error, so an error parses again with it.
        let wire = Wire::deserialize(value)
            .or_else(|_| serde_path_to_error::deserialize::<_, Wire>(value));
        let wire: Wire = wire.map_err(|e| {
            let field = e.path().to_string();
            ParseError::InvalidField {
                field: if field == "." {
                    "message".into()
                } else {
                    field
                },
                reason: e.into_inner().to_string(),
            }
        })?;
        Message::from_wire(wire)
    }

    /// Parses one message from JSON text, as [`Message::from_value`] parses
    /// its value, without building the value first (delivery parses every
    /// stored message this way). Errors are those of `from_value`.
    pub fn from_json(text: &str) -> Result<Message, ParseError> {
        // A struct also deserializes from an array: objects only here.
        let object = text.trim_start().starts_with('{');
        match serde_json::from_str::<Wire>(text).ok().filter(|_| object) {
            Some(wire) => Message::from_wire(wire),
            None => match serde_json::from_str::<Value>(text) {
                Ok(value) => Message::from_value(&value),
                Err(e) => Err(ParseError::InvalidField {
                    field: "message".into(),
                    reason: e.to_string(),
                }),
            },
        }
    }

    fn from_wire(wire: Wire) -> Result<Message, ParseError> {
        for (field, id) in [
            ("messageId", &wire.message_id),
            ("userId", &wire.user_id),
            ("anonymousId", &wire.anonymous_id),
            ("groupId", &wire.group_id),
            ("previousId", &wire.previous_id),
        ] {
            check_id_length(field, id.as_deref())?;
        }
        let call = match wire.call.as_deref() {
            None | Some("") => return Err(ParseError::MissingType),
            Some(t) => CallType::parse(t).ok_or_else(|| ParseError::UnknownType(t.to_owned()))?,
        };
        Ok(Message {
            call,
            message_id: wire.message_id,
            user_id: wire.user_id,
            anonymous_id: wire.anonymous_id,
            group_id: wire.group_id,
            previous_id: wire.previous_id,
            event: wire.event,
            name: wire.name,
            category: wire.category,
            traits: wire.traits,
            properties: wire.properties,
            context: wire.context,
            integrations: wire.integrations,
            timestamp: wire.timestamp,
            original_timestamp: wire.original_timestamp,
            sent_at: wire.sent_at,
            received_at: wire.received_at,
        })
    }

    /// `context.groupId` as text (string or number), empty counts as absent.
    pub fn context_group_id(&self) -> Result<Option<String>, ParseError> {
        match self.context.get("groupId") {
            None => Ok(None),
            Some(v) => {
                let id = scalar_text(v).map_err(|reason| ParseError::InvalidField {
                    field: "context.groupId".into(),
                    reason,
                })?;
                check_id_length("context.groupId", id.as_deref())?;
                Ok(id)
            }
        }
    }
}

/// Text of a JSON string or number (numbers in decimal form); `null` and ""
/// are absent; anything else is an error.
pub fn scalar_text(v: &Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(number_text(n))),
        other => Err(format!(
            "invalid type: {}, expected a string or a number",
            kind_of(other)
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn opt_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Value::deserialize(d)?;
    scalar_text(&v).map_err(serde::de::Error::custom)
}

fn opt_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(serde::de::Error::custom(format!(
            "invalid type: {}, expected a string",
            kind_of(&other)
        ))),
    }
}

fn opt_object<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        other => Err(serde::de::Error::custom(format!(
            "invalid type: {}, expected an object",
            kind_of(&other)
        ))),
    }
}

/// A number in its shortest JSON form: `42`, `42.99`, `1e21`, `1e-7`; floats
/// with an integral value lose their `.0`.
pub fn number_text(n: &serde_json::Number) -> String {
    let s = n.to_string();
    if n.is_f64() {
        let s = s.replace("e+", "e");
        match s.strip_suffix(".0") {
            Some(int) => int.to_owned(),
            None => s,
        }
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Parsing the text directly gives what parsing its value gives, for
    /// messages and for each kind of error.
    #[test]
    fn from_json_is_from_value() {
        let cases = [
            r#"{"type":"track","userId":7,"event":"E","properties":{"a":[1,{"b":null}]},
                "context":{"groupId":"g"},"messageId":"m","timestamp":"2026-01-01T00:00:00Z"}"#,
            r#"{"type":"identify","userId":"u","traits":{"plan":"Pro"},"userId":"v"}"#,
            r#"[{"type":"track"}]"#,
            r#"{"userId":"u"}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"track","event":{"x":1}}"#,
            r#"{"type":"track","traits":"not an object"}"#,
            r#"{"type":"track""#,
        ];
        for text in cases {
            let direct = Message::from_json(text).map_err(|e| e.to_string());
            let via_value = serde_json::from_str::<Value>(text)
                .map_err(|e| format!("message: {e}"))
                .and_then(|v| Message::from_value(&v).map_err(|e| e.to_string()));
            assert_eq!(format!("{direct:?}"), format!("{via_value:?}"), "{text}");
        }
    }

    #[test]
    fn parses_ids_from_strings_and_numbers() {
        let m = Message::from_value(&json!({
            "type": "track", "userId": 12345, "event": "E", "anonymousId": "a",
            "context": {"groupId": 987}, "messageId": 7
        }))
        .unwrap();
        assert_eq!(m.call, CallType::Track);
        assert_eq!(m.user_id.as_deref(), Some("12345"));
        assert_eq!(m.message_id.as_deref(), Some("7"));
        assert_eq!(m.context_group_id().unwrap().as_deref(), Some("987"));
    }

    #[test]
    fn null_and_empty_ids_are_absent() {
        let m = Message::from_value(&json!({
            "type": "identify", "userId": null, "anonymousId": "", "traits": null
        }))
        .unwrap();
        assert_eq!(m.user_id, None);
        assert_eq!(m.anonymous_id, None);
        assert!(m.traits.is_empty());
    }

    #[test]
    fn float_ids_keep_their_decimal_form() {
        let m = Message::from_value(&json!({"type": "group", "groupId": 1.5})).unwrap();
        assert_eq!(m.group_id.as_deref(), Some("1.5"));
    }

    #[test]
    fn overlong_ids_name_the_field() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let fits = "x".repeat(MAX_ID_BYTES);
        for field in [
            "messageId",
            "userId",
            "anonymousId",
            "groupId",
            "previousId",
        ] {
            let e = Message::from_value(&json!({"type": "track", field: long})).unwrap_err();
            assert_eq!(e.code(), "invalid_field");
            assert_eq!(e.field(), Some(field));
            assert!(Message::from_value(&json!({"type": "track", field: fits})).is_ok());
        }
        let m =
            Message::from_value(&json!({"type": "track", "context": {"groupId": long}})).unwrap();
        let e = m.context_group_id().unwrap_err();
        assert_eq!(e.field(), Some("context.groupId"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = Message::from_value(&json!({"type": "identify", "traits": "x"})).unwrap_err();
        assert_eq!(e.field(), Some("traits"));
        assert!(
            e.to_string().starts_with("traits: invalid type: string"),
            "{e}"
        );

        let e = Message::from_value(&json!({"type": "track", "userId": {"a": 1}})).unwrap_err();
        assert_eq!(e.field(), Some("userId"));
        assert_eq!(e.code(), "invalid_field");

        let e = Message::from_value(&json!({"type": "track", "timestamp": 5})).unwrap_err();
        assert_eq!(e.field(), Some("timestamp"));

        let e = Message::from_value(&json!({"type": "track", "context": {"groupId": true}}))
            .unwrap()
            .context_group_id()
            .unwrap_err();
        assert_eq!(e.field(), Some("context.groupId"));
    }

    #[test]
    fn type_is_required_and_must_be_known() {
        assert_eq!(
            Message::from_value(&json!({"userId": "u"})),
            Err(ParseError::MissingType)
        );
        assert_eq!(
            Message::from_value(&json!({"type": "purchase"})),
            Err(ParseError::UnknownType("purchase".into()))
        );
        let e = Message::from_value(&json!({"type": 3})).unwrap_err();
        assert_eq!(e.field(), Some("type"));
        assert_eq!(
            Message::from_value(&json!([1])),
            Err(ParseError::NotAnObject)
        );
    }

    #[test]
    fn every_call_type_round_trips() {
        for c in CallType::ALL {
            assert_eq!(CallType::parse(c.as_str()), Some(c));
        }
    }
}
