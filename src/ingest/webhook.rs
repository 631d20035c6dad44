//! Segment Webhooks destination (classic and Actions): `POST /webhook`, one
//! message or a JSON array. With a shared secret, `X-Signature` must be the
//! hex HMAC-SHA1 of the raw body (or, for an array, of its first element).
//! Without a secret, configured write keys are required as Basic auth.

use super::*;
use axum::Json;
use axum::extract::State as Extract;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::value::RawValue;
use sha1::Sha1;

pub async fn handle(
    Extract(state): Extract<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&state, &headers, body).await?;
    let secret = state.runtime.config.auth.webhook_secret.as_deref();
    let key = basic_user(&headers)?;
    let source = match (secret, key) {
        // Signed: the signature authenticates; a Basic key, if any, picks the settings.
        (Some(_), Some(k)) if state.runtime.sources.contains_key(&k) => &state.runtime.sources[&k],
        (Some(_), _) => &state.runtime.default_source,
        (None, key) => state.source_for(key.as_deref())?,
    };
    // Authenticate before looking at the content.
    if let Some(secret) = secret {
        verify_signature(secret, &headers, &bytes)?;
    }
    let raw: &RawValue = parse_json(&bytes)?;
    let items: Vec<&RawValue> = match raw.get().trim_start().as_bytes().first() {
        Some(b'[') => parse_json(raw.get().as_bytes())?,
        _ => vec![raw],
    };
    let max = state.limits().max_batch_messages;
    if items.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "batch_too_large",
            format!("body: {} messages; at most {max} per request", items.len()),
        ));
    }
    let is_array = raw.get().trim_start().starts_with('[');
    let received = crate::storage::now_millis();
    let mut limits = RequestLimits::new(&state);
    let mut prepared = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = if is_array {
            format!("[{i}].")
        } else {
            String::new()
        };
        limits.check_raw(item.get().len(), &field)?;
        let mut value: Value = parse_json(item.get().as_bytes())?;
        if let Value::Object(obj) = &mut value {
            fill_message_id(obj);
        }
        // In an array, an invalid element is stored as rejected on its own.
        let invalid = if is_array {
            Invalid::RejectItem
        } else {
            Invalid::Refuse
        };
        prepared.push(prepare(
            &mut limits,
            value,
            source,
            None,
            &field,
            received,
            invalid,
        )?);
    }
    drop(items);
    let stored = state.store(prepared, "webhook").await?;
    let outcomes: Vec<Value> = stored.iter().map(|(s, a)| s.outcome_json(*a)).collect();
    // Rejected messages are stored, and reported with 400 so Segment shows them
    // and does not retry; the others in the same request are kept.
    let rejected: Vec<(usize, &Summary)> = stored
        .iter()
        .enumerate()
        .filter(|(_, (s, a))| {
            s.outcome == Outcome::Rejected && matches!(a, Acceptance::Stored { .. })
        })
        .map(|(i, (s, _))| (i, s))
        .collect();
    if let Some((i, first)) = rejected.first() {
        let at = if is_array {
            format!("[{i}].")
        } else {
            String::new()
        };
        let mut message = first.message.clone().unwrap_or_default();
        if !message.starts_with(&at) {
            message = format!("{at}{message}");
        }
        if rejected.len() > 1 {
            message.push_str(&format!(" (and {} more rejected)", rejected.len() - 1));
        }
        let code = first.code.map(Code::as_str).unwrap_or("rejected");
        return Err(ApiError::new(StatusCode::BAD_REQUEST, code, message)
            .with("outcomes", Value::Array(outcomes)));
    }
    Ok(Json(serde_json::json!({"success": true, "outcomes": outcomes})).into_response())
}

fn verify_signature(secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let given = headers
        .get("x-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized("X-Signature: missing; this endpoint requires signed requests")
        })?;
    let given = hex::decode(given.trim())
        .map_err(|_| ApiError::unauthorized("X-Signature: not a hex HMAC-SHA1"))?;
    let matches = |data: &[u8]| {
        let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        mac.update(data);
        // Constant-time comparison.
        mac.verify_slice(&given).is_ok()
    };
    let mut candidates: Vec<Vec<u8>> = vec![body.to_vec()];
    // Segment signs an array by its first element.
    let first = body
        .trim_ascii_start()
        .starts_with(b"[")
        .then(|| serde_json::from_slice::<Vec<&RawValue>>(body).ok())
        .flatten()
        .and_then(|items| items.first().copied());
    if let Some(first) = first {
        candidates.push(first.get().as_bytes().to_vec());
        if let Ok(v) = serde_json::from_str::<Value>(first.get()) {
            candidates.push(v.to_string().into_bytes());
        }
    }
    if candidates.iter().any(|c| matches(c)) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "X-Signature: does not match the body",
        ))
    }
}
