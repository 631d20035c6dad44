//! Segment Webhooks destination (classic and Actions): `POST /webhook`, one
//! message or a JSON array. With a shared secret, `X-Signature` must be the
//! hex HMAC-SHA1 of the raw body (of its first element only when
//! `auth.webhook_first_element_signature` allows it, and never twice).
//! Without a secret, configured write keys are required as Basic auth.

use super::*;
use crate::web::answers::ErrorBody;
use axum::Json;
use axum::extract::State as Extract;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::value::RawValue;
use sha1::Sha1;

/// Segment's webhook destination: one message or an array of them.
#[utoipa::path(post, path = "/webhook", tag = "ingest",
    request_body(content = Object, description = "One Segment message, or an array of them", content_type = "application/json"),
    params(("X-Signature" = Option<String>, Header, description = "Hex HMAC-SHA1 of the body with the shared secret")),
    responses((status = 200, body = WebhookAnswer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 421, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("write_key" = []), ()))]
pub async fn handle(
    Extract(state): Extract<IngestState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let auth = &state.runtime.config.auth;
    let secret = auth.webhook_secret.as_ref();
    let key = basic_user(&headers)?;
    // Credentials are checked before the body is read.
    let source = match (secret, key) {
        // Signed: the signature authenticates; a Basic key, if any, picks the settings.
        (Some(_), key) => {
            signature_header(&headers)?;
            key.as_deref()
                .and_then(|k| state.runtime.sources.find(k))
                .unwrap_or(&state.runtime.default_source)
        }
        (None, key) => state.source_for(key.as_deref())?,
    };
    let bytes = read_body(&state, &headers, body, BodyKind::Batch).await?;
    let mut accept = crate::storage::AcceptAs::from("webhook");
    if let Some(secret) = secret {
        let signed = verify_signature(
            secret,
            &headers,
            &bytes,
            auth.webhook_first_element_signature,
        )?;
        if let Signed::FirstElement(message_id) = signed {
            refuse_replayed_element(&state, &message_id).await?;
            // The check above answers a plain replay early; this one, made
            // where the array is stored and in the same transaction, holds
            // under concurrency (and across replicas).
            accept.options.first_unseen = true;
        }
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
        // An array element over the size limit is rejected alone (`prepare`).
        if !is_array {
            limits.check_raw(item.get().len(), &field)?;
        }
        let mut value: Value = parse_json(item.get().as_bytes())?;
        if let Value::Object(obj) = &mut value {
            // A credential, not data: never stored.
            obj.remove("writeKey");
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
    let stored = state.store(prepared, accept).await?;
    let outcomes: Vec<MessageOutcome> = stored.iter().map(|(s, a)| s.outcome(*a)).collect();
    // Rejected messages are stored, and reported with 400 so Segment shows them
    // and does not retry; the others in the same request are kept.
    let rejected: Vec<(usize, &Summary)> = stored
        .iter()
        .enumerate()
        .filter(|(_, (s, a))| {
            s.outcome == Outcome::Rejected && matches!(a, Kept::Row(Acceptance::Stored { .. }))
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
        if !message.starts_with(at.trim_end_matches('.')) {
            message = format!("{at}{message}");
        }
        if rejected.len() > 1 {
            message.push_str(&format!(" (and {} more rejected)", rejected.len() - 1));
        }
        let code = first.code.unwrap_or("rejected");
        return Err(ApiError::new(StatusCode::BAD_REQUEST, code, message).with_outcomes(outcomes));
    }
    Ok(Json(WebhookAnswer {
        success: true,
        outcomes,
    })
    .into_response())
}

/// What a valid signature covered.
enum Signed {
    WholeBody,
    /// Only the first element of an array, whose `messageId` this is.
    FirstElement(String),
}

fn signature_header(headers: &HeaderMap) -> Result<Vec<u8>, ApiError> {
    let given = headers
        .get("x-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized("X-Signature: missing; this endpoint requires signed requests")
        })?;
    hex::decode(given.trim())
        .map_err(|_| ApiError::unauthorized("X-Signature: not a hex HMAC-SHA1"))
}

/// Checks `X-Signature`: the HMAC-SHA1 of the whole body, or, when
/// `first_element` is allowed, of an array's first element.
fn verify_signature(
    secret: &crate::secret::Secret,
    headers: &HeaderMap,
    body: &[u8],
    first_element: bool,
) -> Result<Signed, ApiError> {
    let given = signature_header(headers)?;
    let matches = |data: &[u8]| {
        let mut mac =
            Hmac::<Sha1>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key");
        mac.update(data);
        // Constant-time comparison.
        mac.verify_slice(&given).is_ok()
    };
    if matches(body) {
        return Ok(Signed::WholeBody);
    }
    let mismatch = || ApiError::unauthorized("X-Signature: does not match the body");
    if !first_element || !body.trim_ascii_start().starts_with(b"[") {
        return Err(mismatch());
    }
    let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|_| mismatch())?;
    let Some(first) = items.first() else {
        return Err(mismatch());
    };
    let value: Value = serde_json::from_str(first.get()).map_err(|_| mismatch())?;
    if !matches(first.get().as_bytes()) && !matches(value.to_string().as_bytes()) {
        return Err(mismatch());
    }
    // The signed element must be identifiable, so that a replay is recognised.
    match value.get("messageId").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => Ok(Signed::FirstElement(id.to_owned())),
        _ => Err(ApiError::unauthorized(
            "X-Signature: signs the first element only, and it has no messageId",
        )),
    }
}

/// A first-element signature proves nothing about the rest of the array: an
/// array whose signed element was already accepted is a replay, refused whole.
async fn refuse_replayed_element(state: &IngestState, message_id: &str) -> Result<(), ApiError> {
    let filter = crate::storage::MessageFilter {
        message_id: Some(message_id.to_owned()),
        ..Default::default()
    };
    let seen = state.storage.list(filter, 1).await.map_err(|e| {
        tracing::error!(error = %e, "could not check a signed element");
        ApiError::from(&e)
    })?;
    if seen.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "X-Signature: the signed element was already accepted; a replayed array is refused",
        ))
    }
}
