//! The widget (`/insights/accounts/{id}`), its JSON twin and the run list
//! under `/api/insights/`. Served from the last snapshot; never calls
//! Totango or Salesforce. Reachable with the admin token or a link signed
//! with `insights.widget_secret`.

use super::model::AccountInsights;
use super::store::Store;
use crate::ingest::{ApiError, AppState};
use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

const CSS: &str = include_str!("widget.css");

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/insights/widget.css", get(css))
        .route("/insights/accounts/{account_id}", get(widget))
        .route("/api/insights/accounts/{account_id}", get(account_json))
        .route("/api/insights/runs", get(runs))
        .route_layer(axum::middleware::map_response(common_headers))
}

async fn common_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// Hex HMAC-SHA256 of the account id (and `"\n" + exp` for a link that
/// expires at `exp`, Unix seconds) with `insights.widget_secret`.
pub fn sign(secret: &str, account_id: &str, exp: Option<i64>) -> String {
    hex::encode(mac(secret, account_id, exp).finalize().into_bytes())
}

fn mac(secret: &str, account_id: &str, exp: Option<i64>) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(account_id.as_bytes());
    if let Some(exp) = exp {
        m.update(format!("\n{exp}").as_bytes());
    }
    m
}

#[derive(Debug, Default, Deserialize)]
struct LinkQuery {
    sig: Option<String>,
    exp: Option<i64>,
}

fn forbidden(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, code, message)
}

/// Admin access: the operator's credential (the admin token as Bearer, or
/// the operator page's session cookie), as for the admin API.
fn admin(state: &AppState, headers: &HeaderMap, _peer: Option<SocketAddr>) -> Result<(), ApiError> {
    match state.admin.credential(headers) {
        Some(_) => Ok(()),
        None => Err(ApiError::unauthorized(
            "Authorization: expected Bearer <admin token>, or a signed link (?sig=)",
        )
        .with_challenge("Bearer realm=\"totango-destination admin\"")),
    }
}

/// A signed link when `sig` is given, else admin access.
fn authorize(
    state: &AppState,
    account_id: &str,
    q: &LinkQuery,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<(), ApiError> {
    let Some(sig) = q.sig.as_deref() else {
        return admin(state, headers, peer);
    };
    let Some(secret) = state.runtime.config.insights.widget_secret.as_ref() else {
        return Err(forbidden(
            "bad_signature",
            "sig: signed links need insights.widget_secret on the server",
        ));
    };
    let given = hex::decode(sig).map_err(|_| forbidden("bad_signature", "sig: not hex"))?;
    use secrecy::ExposeSecret;
    mac(secret.expose_secret(), account_id, q.exp)
        .verify_slice(&given)
        .map_err(|_| forbidden("bad_signature", "sig: wrong signature for this account"))?;
    if let Some(exp) = q.exp {
        if chrono::Utc::now().timestamp() > exp {
            return Err(forbidden("link_expired", "exp: this link has expired"));
        }
    }
    Ok(())
}

fn peer_of(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a)
}

fn link_query(req: &Request) -> Result<LinkQuery, ApiError> {
    Query::<LinkQuery>::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("query", e.body_text()))
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "insights store unavailable");
    ApiError::unavailable("insights store unavailable")
}

async fn with_store<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Store) -> Result<T, super::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let path = state
        .runtime
        .config
        .insights
        .snapshot_path(&state.runtime.storage);
    tokio::task::spawn_blocking(move || f(&Store::open(&path)?))
        .await
        .map_err(store_error)?
        .map_err(store_error)
}

async fn load(
    state: &AppState,
    account_id: &str,
    req: Request,
) -> Result<Option<AccountInsights>, ApiError> {
    authorize(
        state,
        account_id,
        &link_query(&req)?,
        req.headers(),
        peer_of(&req),
    )?;
    drop(req);
    let id = account_id.to_owned();
    with_store(state, move |s| s.snapshot(&id)).await
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
}

async fn account_json(
    State(state): State<Arc<AppState>>,
    Path(account_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    match load(&state, &account_id, req).await? {
        Some(a) => Ok(([(header::CACHE_CONTROL, "no-store")], Json(a)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("account {account_id:?}: no insights synced yet"),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    limit: Option<usize>,
}

async fn runs(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    admin(&state, req.headers(), peer_of(&req))?;
    let q = Query::<RunsQuery>::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    drop(req);
    let limit = q.limit.unwrap_or(20).clamp(1, 200);
    let runs = with_store(&state, move |s| s.runs(limit)).await?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"runs": runs})),
    )
        .into_response())
}

async fn widget(
    State(state): State<Arc<AppState>>,
    Path(account_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let snapshot = load(&state, &account_id, req).await?;
    let status = if snapshot.is_some() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    let csp = format!(
        "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; \
         form-action 'none'; frame-ancestors {}",
        state.runtime.config.insights.frame_ancestors
    );
    let mut resp = (
        status,
        [(header::CACHE_CONTROL, "private, no-store")],
        Html(render(&account_id, snapshot.as_ref())),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        resp.headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, v);
    }
    Ok(resp)
}

/// HTML-escapes text for element content and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.1}")
    }
}

fn render(account_id: &str, a: Option<&AccountInsights>) -> String {
    let mut h = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <link rel=\"stylesheet\" href=\"../widget.css\">",
    );
    let Some(a) = a else {
        let _ = write!(
            h,
            "<title>Totango insights</title></head><body><main class=\"widget empty\">\
             <p>No Totango insights for <b>{}</b> yet: they appear after the next sync.</p>\
             </main></body></html>",
            escape(account_id)
        );
        return h;
    };
    let name = a.display_name.as_deref().unwrap_or(&a.account_id);
    let colour = a
        .health
        .as_deref()
        .filter(|c| matches!(*c, "green" | "yellow" | "red"));
    let _ = write!(
        h,
        "<title>Totango insights: {name}</title></head><body><main class=\"widget\">\
         <header><span class=\"health health-{cls}\" title=\"Account health\">{label}</span>\
         <h1 title=\"{name}\">{name}</h1>{online}</header><dl class=\"metrics\">",
        name = escape(name),
        cls = colour.unwrap_or("unknown"),
        label = escape(a.health_label.as_deref().unwrap_or("No health")),
        online = match a.is_online {
            Some(true) => "<span class=\"dot online\" title=\"Online now\">online</span>",
            Some(false) => "<span class=\"dot offline\" title=\"Not online\">offline</span>",
            None => "",
        },
    );
    let dash = || "–".to_owned();
    let change = match a.engagement_change {
        Some(c) if c > 0.0 => format!(" <span class=\"change up\">▲ {}</span>", num(c)),
        Some(c) if c < 0.0 => format!(" <span class=\"change down\">▼ {}</span>", num(-c)),
        Some(_) => " <span class=\"change flat\">± 0</span>".to_owned(),
        None => String::new(),
    };
    // Short labels fit three columns in a narrow frame; the title has the full name.
    let metric = |h: &mut String, class: &str, label: (&str, &str), value: String| {
        let _ = write!(
            h,
            "<div class=\"metric {class}\" title=\"{}\"><dt>{}</dt><dd>{value}</dd></div>",
            label.1, label.0
        );
    };
    metric(
        &mut h,
        "engagement",
        ("Engagement", "Engagement score and its change"),
        a.engagement.map(num).unwrap_or_else(dash) + &change,
    );
    metric(
        &mut h,
        "active-users",
        ("Active users 14d", "Active users, last 14 days"),
        a.active_users_14_days.map(num).unwrap_or_else(dash),
    );
    metric(
        &mut h,
        "utilization",
        (
            "Licence use",
            "Licence utilisation: active users ÷ licences",
        ),
        a.license_utilization
            .map(|u| format!("{}%", num(u)))
            .unwrap_or_else(dash),
    );
    metric(
        &mut h,
        "frequency",
        ("Usage", "Usage frequency"),
        a.usage_frequency
            .as_deref()
            .map(escape)
            .unwrap_or_else(dash),
    );
    metric(
        &mut h,
        "profile",
        ("Profile", "Health profile"),
        a.health_profile.as_deref().map(escape).unwrap_or_else(dash),
    );
    h.push_str("</dl><ul class=\"tags\">");
    for t in &a.tags {
        let _ = write!(h, "<li>{}</li>", escape(t));
    }
    let updated = chrono::DateTime::parse_from_rfc3339(&a.synced_at)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_else(|_| a.synced_at.clone());
    let _ = write!(
        h,
        "</ul><footer><span>Updated <time datetime=\"{}\">{}</time></span>\
         <a href=\"{}\" target=\"_blank\" rel=\"noopener noreferrer\">Open in Totango</a>\
         </footer></main></body></html>",
        escape(&a.synced_at),
        escape(&updated),
        escape(&a.url),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_the_account_and_expiry() {
        let s = sign("k", "acme", None);
        assert_eq!(s.len(), 64);
        assert_ne!(s, sign("k", "other", None));
        assert_ne!(s, sign("k2", "acme", None));
        assert_ne!(sign("k", "acme", Some(1)), sign("k", "acme", Some(2)));
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog") (RFC 4231 style vector).
        assert_eq!(
            sign("key", "The quick brown fox jumps over the lazy dog", None),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn everything_is_escaped() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
        let a = AccountInsights {
            account_id: "a<1>".into(),
            display_name: Some("<script>alert(1)</script>".into()),
            salesforce_id: None,
            health: Some("red\" onload=\"x".into()),
            health_label: None,
            health_profile: Some("<b>".into()),
            is_online: Some(true),
            last_activity_time: None,
            licenses: None,
            license_utilization: None,
            url: "https://app.totango.com/#!/customerDetails?customer=a%3C1%3E".into(),
            usage_frequency: None,
            active_users_14_days: None,
            engagement: None,
            engagement_change: None,
            tags: vec!["<i>".into()],
            synced_at: "x".into(),
        };
        let html = render("a<1>", Some(&a));
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>") && !html.contains("<i>"), "{html}");
        assert!(html.contains("health-unknown"), "{html}");
        assert!(!render("<x>", None).contains("<x>"));
    }
}
