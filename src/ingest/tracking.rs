//! Segment HTTP Tracking API: `POST /v1/{identify,group,page,screen,track,alias}`
//! (and analytics.js's short paths `/v1/{i,g,p,s,t,a}`) and `/v1/batch`
//! (`/v1/import`), so Segment's libraries can point here.

use super::*;
use crate::web::answers::ErrorBody;
use axum::Extension;
use axum::Json;
use axum::extract::{ConnectInfo, Path, State as Extract};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::net::SocketAddr;

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(default)]
    context: Option<Map<String, Value>>,
    #[serde(default)]
    integrations: Option<Map<String, Value>>,
    #[serde(default, rename = "writeKey")]
    write_key: Option<String>,
    #[serde(default, rename = "sentAt")]
    sent_at: Option<String>,
}

fn success() -> Response {
    Json(Success::YES).into_response()
}

/// The call types `/v1/{call}` takes (its OpenAPI description).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum CallPath {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
    I,
    T,
    P,
    S,
    G,
    A,
}

/// The Tracking API: one call (`identify`, `track`, `page`, `screen`,
/// `group`, `alias`, or the short paths `i`, `t`, `p`, `s`, `g`, `a`).
#[utoipa::path(post, path = "/v1/{call}", tag = "ingest",
    params(("call" = CallPath, Path, description = "The call type")),
    request_body(content = Object, description = "One Segment message", content_type = "application/json"),
    responses((status = 200, body = Success),
        (status = 404, description = "no such call", body = ErrorBody), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 421, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("write_key" = []), ()))]
pub async fn single(
    Extract(state): Extract<IngestState>,
    Path(call): Path<String>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // `delete` comes only inside batches and webhooks; it has no endpoint.
    let Some(call) = CallType::from_path(&call).filter(|c| *c != CallType::Delete) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "/v1/{call}: no such endpoint (identify, group, page, screen, track, alias, batch)"
            ),
        ));
    };
    let client = client.map(|Extension(ConnectInfo(a))| a.ip());
    let header_key = basic_user(&headers)?;
    // A key in the header is checked before the body is read.
    if header_key.is_some() {
        let source = state.source_for(header_key.as_deref())?;
        browser::admit(&state, source, &headers, client)?;
    }
    let bytes = read_body(&state, &headers, body, BodyKind::Single).await?;
    let mut limits = RequestLimits::new(&state);
    limits.check_raw(bytes.len(), "")?;
    let mut obj: Map<String, Value> = parse_json(&bytes)?;
    drop(bytes);
    let body_key = take_write_key(&mut obj)?;
    let source = state.source_for(header_key.as_deref().or(body_key.as_deref()))?;
    if header_key.is_none() {
        browser::admit(&state, source, &headers, client)?;
    }
    let received = Utc::now();
    obj.insert("type".into(), Value::String(call.as_str().into()));
    fill(&mut obj, received, None);
    let prepared = prepare(
        &mut limits,
        Value::Object(obj),
        source,
        None,
        "",
        received.timestamp_millis(),
        Invalid::Refuse,
    )?;
    state.store(vec![prepared], "tracking").await?;
    Ok(success())
}

/// The Tracking API's batch: `{"batch": [...], "context"?, "writeKey"?}`.
#[utoipa::path(post, path = "/v1/batch", tag = "ingest",
    request_body(content = Object, description = "A Segment batch", content_type = "application/json"),
    responses((status = 200, body = Success), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 421, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("write_key" = []), ()))]
pub async fn batch(
    state: Extract<IngestState>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    take_batch(state, client, headers, body).await
}

/// `/v1/import`: the same as `/v1/batch`.
#[utoipa::path(post, path = "/v1/import", tag = "ingest",
    request_body(content = Object, description = "A Segment batch", content_type = "application/json"),
    responses((status = 200, body = Success), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 421, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("write_key" = []), ()))]
pub async fn import(
    state: Extract<IngestState>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    take_batch(state, client, headers, body).await
}

async fn take_batch(
    Extract(state): Extract<IngestState>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let client = client.map(|Extension(ConnectInfo(a))| a.ip());
    let header_key = basic_user(&headers)?;
    if header_key.is_some() {
        let source = state.source_for(header_key.as_deref())?;
        browser::admit(&state, source, &headers, client)?;
    }
    let bytes = read_body(&state, &headers, body, BodyKind::Batch).await?;
    let body: BatchBody = parse_json(&bytes)?;
    let source = state.source_for(header_key.as_deref().or(body.write_key.as_deref()))?;
    if header_key.is_none() {
        browser::admit(&state, source, &headers, client)?;
    }
    let max = state.limits().max_batch_messages;
    if body.batch.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch_too_large",
            format!(
                "batch: {} messages; a batch may hold at most {max}",
                body.batch.len()
            ),
        ));
    }
    let mut limits = RequestLimits::new(&state);
    // Batch-level defaults too large for any message would make every item
    // too large: the request as a whole is unusable.
    let max_message = state.limits().max_message_bytes;
    for (name, defaults) in [
        ("context", &body.context),
        ("integrations", &body.integrations),
    ] {
        let len = defaults
            .as_ref()
            .map_or(0, |d| serde_json::to_string(d).map_or(0, |t| t.len()));
        if len > max_message {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "message_too_large",
                format!(
                    "{name}: {len} bytes; merged into every item, it would make each larger \
                     than {max_message} bytes"
                ),
            ));
        }
    }
    let received = Utc::now();
    let mut prepared = Vec::with_capacity(body.batch.len());
    // Batch-level defaults larger than this are not stored with messages that
    // will never be sent (small ones, which explain an outcome, are).
    let large = |d: &Option<Map<String, Value>>| {
        d.as_ref()
            .is_some_and(|d| serde_json::to_string(d).map_or(0, |t| t.len()) > KEEP_MERGED_MAX)
    };
    let large = [large(&body.context), large(&body.integrations)];
    for (i, raw) in body.batch.iter().enumerate() {
        // An item over the size limit is rejected alone (`prepare`).
        let field = format!("batch[{i}].");
        // The body parsed, so every item is valid JSON.
        let mut value: Value = serde_json::from_str(raw.get())
            .map_err(|e| ApiError::bad_request(&field[..field.len() - 1], e))?;
        // An item that is not an object is stored as rejected by `prepare`.
        let mut merged = [Merged::Nothing, Merged::Nothing];
        if let Value::Object(obj) = &mut value {
            obj.remove("writeKey");
            merged = [
                merge_defaults(obj, "context", body.context.as_ref()),
                merge_defaults(obj, "integrations", body.integrations.as_ref()),
            ];
            fill(obj, received, body.sent_at.as_deref());
        }
        let mut item = prepare(
            &mut limits,
            value,
            source,
            None,
            &field,
            received.timestamp_millis(),
            Invalid::RejectItem,
        )?;
        // A message that will never be sent is kept as its client sent it,
        // without the batch-level defaults merged in: a large batch `context`
        // copied into every rejected item would store many times the body.
        if item.new.state != State::Pending {
            for (m, large) in merged.iter_mut().zip(large) {
                if !large {
                    *m = Merged::Nothing;
                }
            }
            if merged.iter().any(|m| *m != Merged::Nothing) {
                item.new.payload = unmerge(&item.new.payload, &merged).into();
            }
        }
        prepared.push(item);
    }
    drop(body);
    drop(bytes);
    state.store(prepared, "tracking").await?;
    Ok(success())
}

/// Takes `writeKey` out of the message (it is a credential, not data).
fn take_write_key(obj: &mut Map<String, Value>) -> Result<Option<String>, ApiError> {
    match obj.remove("writeKey") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request("writeKey", "expected a string")),
    }
}

/// Batch-level `context`/`integrations` up to this size (serialised) stay
/// merged into messages stored as never sent; larger ones are left out.
const KEEP_MERGED_MAX: usize = 256;

/// What [`merge_defaults`] added to an item, so that it can be taken out again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Merged {
    Nothing,
    /// The item had no such object (or `null`): the defaults became it.
    Whole(&'static str, Option<Value>),
    /// These keys of the item's own object came from the defaults.
    Keys(&'static str, Vec<String>),
}

/// Batch-level `context`/`integrations` apply to every item; the item's own keys win.
fn merge_defaults(
    obj: &mut Map<String, Value>,
    key: &'static str,
    defaults: Option<&Map<String, Value>>,
) -> Merged {
    let Some(defaults) = defaults.filter(|d| !d.is_empty()) else {
        return Merged::Nothing;
    };
    match obj.get_mut(key) {
        Some(Value::Object(own)) => {
            let mut added = Vec::new();
            for (k, v) in defaults {
                if !own.contains_key(k) {
                    own.insert(k.clone(), v.clone());
                    added.push(k.clone());
                }
            }
            Merged::Keys(key, added)
        }
        None | Some(Value::Null) => {
            let before = obj.insert(key.to_owned(), Value::Object(defaults.clone()));
            Merged::Whole(key, before)
        }
        // A wrong type is reported by the parser, naming the field.
        Some(_) => Merged::Nothing,
    }
}

/// The stored payload `merged` without what [`merge_defaults`] added.
fn unmerge(payload: &str, merged: &[Merged]) -> String {
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(payload) else {
        return payload.to_owned();
    };
    for m in merged {
        match m {
            Merged::Nothing => {}
            Merged::Whole(key, None) => {
                obj.remove(*key);
            }
            Merged::Whole(key, Some(before)) => {
                obj.insert((*key).to_owned(), before.clone());
            }
            Merged::Keys(key, added) => {
                if let Some(Value::Object(own)) = obj.get_mut(*key) {
                    for k in added {
                        own.remove(k);
                    }
                }
            }
        }
    }
    Value::Object(obj).to_string()
}

/// Fills what Segment's API fills: `messageId`, `receivedAt`, and `timestamp`
/// corrected for client clock skew: receivedAt − (sentAt − originalTimestamp).
fn fill(obj: &mut Map<String, Value>, received: DateTime<Utc>, batch_sent_at: Option<&str>) {
    fill_message_id(obj);
    let iso = |t: DateTime<Utc>| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true));
    obj.insert("receivedAt".into(), iso(received));
    if let (Some(s), false) = (batch_sent_at, obj.contains_key("sentAt")) {
        obj.insert("sentAt".into(), Value::String(s.to_owned()));
    }
    let parse = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let sent_at = parse(obj.get("sentAt"));
    // The client's own clock: originalTimestamp when the library sent it
    // (analytics.js and others do), else the timestamp it set.
    let given = obj.get("timestamp").filter(|v| !v.is_null()).cloned();
    let original = parse(obj.get("originalTimestamp")).or_else(|| parse(given.as_ref()));
    if let (Some(ts), false) = (&given, obj.contains_key("originalTimestamp")) {
        obj.insert("originalTimestamp".into(), ts.clone());
    }
    let timestamp = match (original, sent_at) {
        (Some(original), Some(sent)) => iso(received - (sent - original)),
        (Some(original), None) => given.unwrap_or_else(|| iso(original)),
        // Unparseable timestamps are kept as sent (the parser checks the type).
        (None, _) => given.unwrap_or_else(|| iso(received)),
    };
    obj.insert("timestamp".into(), timestamp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn fill_corrects_clock_skew() {
        let received = DateTime::parse_from_rfc3339("2024-01-01T12:00:10Z")
            .unwrap()
            .with_timezone(&Utc);
        // Client clock 1 h ahead: it stamped the call 5 s before sending.
        let mut m = obj(
            json!({"type": "track", "timestamp": "2024-01-01T13:00:00Z", "sentAt": "2024-01-01T13:00:05Z"}),
        );
        fill(&mut m, received, None);
        assert_eq!(m["timestamp"], "2024-01-01T12:00:05.000Z");
        assert_eq!(m["originalTimestamp"], "2024-01-01T13:00:00Z");
        assert_eq!(m["receivedAt"], "2024-01-01T12:00:10.000Z");
        let id = m["messageId"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }

    #[test]
    fn fill_corrects_skew_from_original_timestamp() {
        let received = DateTime::parse_from_rfc3339("2024-01-01T12:00:10Z")
            .unwrap()
            .with_timezone(&Utc);
        // analytics.js style: originalTimestamp is the client's clock, timestamp
        // something else; the formula uses originalTimestamp.
        let mut m = obj(json!({
            "timestamp": "2024-01-01T09:00:00Z",
            "originalTimestamp": "2024-01-01T13:00:00Z",
            "sentAt": "2024-01-01T13:00:05Z"
        }));
        fill(&mut m, received, None);
        assert_eq!(m["timestamp"], "2024-01-01T12:00:05.000Z");
        assert_eq!(m["originalTimestamp"], "2024-01-01T13:00:00Z");
        // originalTimestamp alone also gives a timestamp.
        let mut m = obj(json!({
            "originalTimestamp": "2024-01-01T13:00:00Z",
            "sentAt": "2024-01-01T13:00:05Z"
        }));
        fill(&mut m, received, None);
        assert_eq!(m["timestamp"], "2024-01-01T12:00:05.000Z");
    }

    #[test]
    fn fill_uses_batch_sent_at_and_defaults_timestamp() {
        let received = DateTime::parse_from_rfc3339("2024-01-01T12:00:10Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut m = obj(json!({"timestamp": "2024-01-01T12:00:00Z", "messageId": "keep"}));
        fill(&mut m, received, Some("2024-01-01T12:00:02Z"));
        assert_eq!(m["timestamp"], "2024-01-01T12:00:08.000Z");
        assert_eq!(m["messageId"], "keep");
        let mut m = obj(json!({}));
        fill(&mut m, received, None);
        assert_eq!(m["timestamp"], "2024-01-01T12:00:10.000Z");
        // Without sentAt the client's timestamp is kept.
        let mut m = obj(json!({"timestamp": "2020-05-05T00:00:00Z"}));
        fill(&mut m, received, None);
        assert_eq!(m["timestamp"], "2020-05-05T00:00:00Z");
    }

    #[test]
    fn batch_context_merges_under_item_keys() {
        let mut m = obj(json!({"context": {"groupId": "own", "ip": "1.1.1.1"}}));
        merge_defaults(
            &mut m,
            "context",
            Some(&obj(json!({"groupId": "batch", "library": {"name": "x"}}))),
        );
        assert_eq!(
            m["context"],
            json!({"groupId": "own", "ip": "1.1.1.1", "library": {"name": "x"}})
        );
        let mut m = obj(json!({}));
        merge_defaults(
            &mut m,
            "integrations",
            Some(&obj(json!({"Totango": false}))),
        );
        assert_eq!(m["integrations"], json!({"Totango": false}));
    }

    #[test]
    fn unmerge_restores_the_item_as_sent() {
        let sent = json!({"context": {"ip": "1.1.1.1"}, "integrations": null, "x": 1});
        let mut m = obj(sent.clone());
        let merged = [
            merge_defaults(
                &mut m,
                "context",
                Some(&obj(json!({"ip": "2", "big": "…"}))),
            ),
            merge_defaults(&mut m, "integrations", Some(&obj(json!({"All": true})))),
        ];
        let back: Value =
            serde_json::from_str(&unmerge(&Value::Object(m).to_string(), &merged)).unwrap();
        assert_eq!(back, sent);
    }
}
