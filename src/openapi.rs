//! The OpenAPI 3.1 document of the admin and ingest APIs, generated from the
//! handlers' own annotations and answer types, served at
//! `GET /api/openapi.json` (behind the operator's credential, like all of
//! `/api/`).

use crate::web::AppState;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::LazyLock;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "totango-destination",
        description = "Segment-compatible destination for Totango: ingest APIs (Tracking API, \
            partner destination, webhook) and the operator's admin API."
    ),
    paths(
        crate::ingest::tracking::single,
        crate::ingest::tracking::batch,
        crate::ingest::tracking::import,
        crate::ingest::partner::handle,
        crate::ingest::webhook::handle,
        crate::admin::list,
        crate::admin::one,
        crate::admin::replay_one,
        crate::admin::replay_matching,
        crate::admin::stats,
        crate::admin::history::history,
        crate::admin::entity::account,
        crate::admin::entity::user,
        crate::admin::privacy::erase_user,
        crate::admin::privacy::list_suppressions,
        crate::admin::privacy::suppress,
        crate::admin::privacy::lift,
        crate::admin::privacy::audit,
        crate::insights::by_hand::start,
        crate::insights::widget::runs,
        crate::insights::widget::account_json,
        crate::insights::widget::record_json,
        document,
    ),
    components(schemas(crate::ingest::tracking::CallPath)),
    modifiers(&Security),
    tags(
        (name = "ingest", description = "Segment messages in"),
        (name = "messages", description = "What was received, sent and answered"),
        (name = "privacy", description = "Erasure, suppression, the audit trail"),
        (name = "insights", description = "Totango account insights in Salesforce"),
    )
)]
pub struct ApiDoc;

/// The credentials the document names.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "admin_session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("td_session"))),
        );
        components.add_security_scheme(
            "write_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
    }
}

/// The document as served (built once).
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.to_pretty_json()
        .expect("the OpenAPI document serializes")
});

/// Routes behind the operator's credential.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/openapi.json", get(document))
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "messages",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"),
        (status = 401, body = crate::web::answers::ErrorBody)),
    security(("admin_token" = []), ("admin_session" = [])))]
pub async fn document() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}
