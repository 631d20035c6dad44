//! `GET /api/openapi.json`: served behind the operator's credential, an
//! OpenAPI 3.1 document whose references resolve and whose every operation
//! is a route of the server. (CI also runs schemathesis against it on both
//! backends: tests/openapi/schemathesis.sh.)

use crate::support::{TestApp, config, place};
use serde_json::Value;
use std::collections::BTreeSet;

const TOKEN: &str = "openapi-test-admin-token-0123456789";

fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref") {
                out.insert(r.clone());
            }
            o.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_served_resolves_and_names_only_real_routes() {
    let dir = place();
    let mut c = config(&dir, "http://127.0.0.1:9");
    c.admin.token = Some(TOKEN.into());
    let srv = TestApp::start(c).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/openapi.json", srv.base);

    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let r = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    // Every reference names a schema the document holds.
    let mut found = BTreeSet::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in &found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected reference {r}"));
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{r} does not resolve"
        );
    }

    // The APIs the spec names are all described.
    let paths = doc["paths"].as_object().unwrap();
    for want in [
        "/v1/{call}",
        "/v1/batch",
        "/v1/import",
        "/segment",
        "/webhook",
        "/api/messages",
        "/api/messages/{id}",
        "/api/messages/{id}/replay",
        "/api/replay",
        "/api/stats",
        "/api/audit",
        "/api/suppressions",
        "/api/openapi.json",
    ] {
        assert!(paths.contains_key(want), "{want} not described");
    }

    // Each described operation is routed: the server's own fallbacks (no
    // such endpoint, method not allowed) never answer it.
    for (path, ops) in paths {
        let concrete = path
            .replace("{call}", "track")
            .replace("{id}", "1")
            .replace("{userId}", "someone")
            .replace("{account_id}", "acme")
            .replace("{record_id}", "001000000000000001");
        assert!(!concrete.contains('{'), "{path}: unknown parameter");
        for method in ops.as_object().unwrap().keys() {
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let r = http
                .request(method.clone(), format!("{}{concrete}", srv.base))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value =
                serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
            assert_ne!(status, 405, "{method} {path}: {body}");
            assert_ne!(
                body["message"], "no such endpoint",
                "{method} {path} is described but not routed"
            );
        }
    }
    srv.stop().await;
}
