//! Segment's partner-destination protocol: `POST /segment`, one message per
//! request, Basic api key, settings in `X-Segment-Settings`. Status codes are
//! what Segment's Event Delivery understands: 200, 400, 401, 501, 503.

use super::*;
use crate::web::answers::ErrorBody;
use axum::Json;
use axum::extract::State as Extract;
use axum::response::{IntoResponse, Response};

/// Segment's partner-destination protocol: one message.
#[utoipa::path(post, path = "/segment", tag = "ingest",
    request_body(content = Object, description = "One Segment message", content_type = "application/json"),
    params(("X-Segment-Settings" = Option<String>, Header, description = "Base64 JSON of the destination settings")),
    responses((status = 200, body = MessageOutcome),
        (status = 501, description = "unsupported call type", body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 421, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("write_key" = []), ()))]
pub async fn handle(
    Extract(state): Extract<IngestState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = basic_user(&headers)?;
    let source = state.source_for(key.as_deref())?;
    let header_settings = segment_settings(&headers)?;
    let bytes = read_body(&state, &headers, body, BodyKind::Single).await?;
    let mut limits = RequestLimits::new(&state);
    limits.check_raw(bytes.len(), "")?;
    let mut obj: Map<String, Value> = parse_json(&bytes)?;
    drop(bytes);
    // A credential, not data: never stored (it authenticates nothing here).
    obj.remove("writeKey");
    fill_message_id(&mut obj);
    let received = crate::storage::now_millis();
    let prepared = prepare(
        &mut limits,
        Value::Object(obj),
        source,
        header_settings.as_ref(),
        "",
        received,
        Invalid::Refuse,
    )?;
    let (summary, acceptance) = state
        .store(vec![prepared], "segment")
        .await?
        .pop()
        .expect("one message stored");
    let outcome = summary.outcome(acceptance);
    if matches!(acceptance, Kept::Row(Acceptance::Duplicate { .. })) {
        return Ok(Json(outcome).into_response());
    }
    let reason = || summary.message.clone().unwrap_or_default();
    let code = summary.code.unwrap_or("rejected");
    match summary.outcome {
        Outcome::Rejected => Err(ApiError::new(StatusCode::BAD_REQUEST, code, reason())),
        Outcome::Unsupported => Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, code, reason())),
        Outcome::Send | Outcome::Filtered => Ok(Json(outcome).into_response()),
    }
}

/// Known settings from the base64 JSON `X-Segment-Settings` header. Other
/// destination settings Segment sends are ignored; `endpoint` can only be set
/// by configuration.
fn segment_settings(headers: &HeaderMap) -> Result<Option<SettingsPatch>, ApiError> {
    const NAME: &str = "X-Segment-Settings";
    let Some(value) = headers.get(NAME) else {
        return Ok(None);
    };
    let bad = |why: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_settings",
            format!("{NAME}: {why}"),
        )
    };
    let text = value.to_str().map_err(|_| bad("not ASCII".into()))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text.trim()))
        .map_err(|e| bad(format!("not base64: {e}")))?;
    let json: Value =
        serde_json::from_slice(&decoded).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(map) = json else {
        return Err(bad("must be a JSON object".into()));
    };
    const KNOWN: [&str; 14] = [
        "serviceId",
        "service_id",
        "region",
        "apiToken",
        "api_token",
        "trackNamedPages",
        "track_named_pages",
        "trackCategorizedPages",
        "track_categorized_pages",
        "defaultModule",
        "default_module",
        "disableHeartbeat",
        "disable_heartbeat",
        "endpoint",
    ];
    let known: Map<String, Value> = map
        .into_iter()
        // Partner settings often carry "" for unset values: those mean "not set".
        .filter(|(k, v)| {
            KNOWN.contains(&k.as_str()) && k != "endpoint" && !v.is_null() && v.as_str() != Some("")
        })
        .collect();
    SettingsPatch::from_json(&Value::Object(known))
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}
