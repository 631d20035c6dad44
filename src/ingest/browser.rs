//! Browser sources (analytics.js): CORS answers on the Tracking API for the
//! origins a write key allows, and what such a public key may do: the calls
//! it is limited to, at a rate per client address. The key is still
//! required; every other cross-site browser request stays refused.

use super::*;
use axum::extract::State as Extract;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use std::net::IpAddr;

/// How long a browser may reuse a preflight answer, seconds.
const PREFLIGHT_MAX_AGE_SECS: u32 = 600;

/// The `Origin` of a request, when some write key allows it.
pub fn allowed_origin(runtime: &Runtime, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    let allowed = runtime
        .sources
        .values()
        .chain([&runtime.default_source])
        .any(|s| s.access.allows_origin(text));
    // Open mode (no key) serves no browser.
    (allowed && !runtime.sources.is_empty()).then(|| origin.clone())
}

/// The CORS headers of an answer to an allowed origin.
pub fn add_cors_headers(resp: &mut Response, origin: HeaderValue) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// `OPTIONS` on a Tracking API path: the preflight of an allowed origin (the
/// cross-site check answers other origins `403`) may `POST` with the headers
/// it asks for (analytics.js: `Authorization`, `Content-Type`). Without
/// such an origin, `OPTIONS` is a method this path does not take.
pub async fn preflight(
    Extract(runtime): Extract<Arc<Runtime>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    if allowed_origin(&runtime, &headers).is_none() {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("OPTIONS {}: method not allowed", uri.path()),
        )
        .into_response();
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST"),
    );
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from(PREFLIGHT_MAX_AGE_SECS),
    );
    resp
}

/// Middleware of the Tracking API routes: a cross-site browser request
/// passes only when some key allows its origin (the handler then checks
/// that its own key does), and its answer carries the CORS headers.
pub async fn cors(
    Extract(runtime): Extract<Arc<Runtime>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let Some(why) = crate::web::auth::cross_site(req.headers()) else {
        return Ok(next.run(req).await);
    };
    let Some(origin) = allowed_origin(&runtime, req.headers()) else {
        return Err(super::cross_site_refusal(why));
    };
    let mut resp = next.run(req).await;
    add_cors_headers(&mut resp, origin);
    Ok(resp)
}

/// Checks what `source` allows this request: its browser origin (a
/// cross-site request must come from an origin of this very key) and its
/// rate per client address.
pub fn admit(
    state: &IngestState,
    source: &Source,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<(), ApiError> {
    if crate::web::auth::cross_site(headers).is_some() {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .unwrap_or("");
        if !source.access.allows_origin(origin) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_site",
                format!(
                    "Origin: {:?} may not send with this write key (its allowed_origins)",
                    origin.chars().take(100).collect::<String>()
                ),
            ));
        }
    }
    if let Some(ip) = client {
        state.client_rates.check(source, ip)?;
    }
    Ok(())
}

/// The answer to a call a key may not send.
pub fn call_not_allowed(field: &str, call: CallType) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "call_not_allowed",
        format!(
            "{}: this write key may not send {call} calls (its allowed_calls)",
            if field.is_empty() {
                "type".to_owned()
            } else {
                format!("{field}type")
            }
        ),
    )
}
