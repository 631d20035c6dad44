//! Account insights against local fakes that speak the documented wire
//! formats: Totango's Search API (form field `query`, `app-token`), and
//! Salesforce's token endpoint and sObject Collections API.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tempfile::TempDir;
use totango_destination::config::insights::SalesforceAuth;
use totango_destination::config::{Config, Runtime};
use totango_destination::insights::sync::{NoProgress, RunOutcome, RunStatus};
use totango_destination::insights::{Target, sign, sync_and_store};
use totango_destination::storage::Storage;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const APP_TOKEN: &str = "totango-app-token";
const CLIENT_ID: &str = "3MVG9-test-client";
const CLIENT_SECRET: &str = "sf-client-secret";
const SF_USER: &str = "integration@example.com";

/// One Totango hit with the default fields (and the `sfid` link last).
fn account(i: usize) -> Value {
    let colour = ["green", "yellow", "red"][i % 3];
    json!({
        "name": format!("acct-{i}"),
        "display_name": format!("Account {i}"),
        "last_activity_time": 1_700_000_000_000i64 + i as i64,
        "is_online": i % 2 == 0,
        "selected_fields": [
            {"health": colour, "health_prev": "green", "change_date": 1_699_000_000_000i64},
            "Enterprise",
            50 + (i % 50),
            (i % 7) as i64 - 3,
            {"unique_users": 10 + (i % 10)},
            "Daily",
            "40",
            ["vip", format!("cohort-{}", i % 4)],
            format!("001{i:015}")
        ]
    })
}

/// Serves `total` accounts (made by `account`), paging by `offset`/`count`;
/// refuses a wrong app token like Totango does.
struct FakeTotango {
    total: usize,
    hits_cap: Option<usize>,
}

impl Respond for FakeTotango {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if req.headers.get("app-token").and_then(|v| v.to_str().ok()) != Some(APP_TOKEN) {
            return ResponseTemplate::new(401)
                .set_body_json(json!({"status": "failed", "_error": "Invalid app token"}));
        }
        let form: HashMap<String, String> =
            form_urlencoded::parse(&req.body).into_owned().collect();
        let Some(query) = form
            .get("query")
            .and_then(|q| serde_json::from_str::<Value>(q).ok())
        else {
            return ResponseTemplate::new(400)
                .set_body_json(json!({"status": "failed", "_error": "missing query"}));
        };
        let count = query["count"].as_u64().unwrap() as usize;
        let offset = query["offset"].as_u64().unwrap() as usize;
        if count > 1000 || offset + count > 10_000 {
            return ResponseTemplate::new(400).set_body_json(
                json!({"status": "failed", "_error": "count/offset beyond the result window"}),
            );
        }
        let end = (offset + count).min(self.hits_cap.unwrap_or(self.total));
        let hits: Vec<Value> = (offset..end.max(offset)).map(account).collect();
        ResponseTemplate::new(200).set_body_json(json!({
            "status": "success",
            "response": {"accounts": {"total_hits": self.total, "hits": hits}}
        }))
    }
}

async fn fake_totango(total: usize) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/search/accounts"))
        .respond_with(FakeTotango {
            total,
            hits_cap: None,
        })
        .mount(&server)
        .await;
    server
}

/// How the fake Salesforce behaves.
#[derive(Default)]
struct SfState {
    /// Tokens issued so far; only the last one is valid.
    tokens_issued: usize,
    /// Answer 401 INVALID_SESSION_ID to the first N collection calls.
    expire_first: usize,
    /// Answer 403 REQUEST_LIMIT_EXCEEDED from the Nth collection call on (1-based).
    limit_from_call: Option<usize>,
    collection_calls: usize,
    /// Records received, by Id.
    updated: HashMap<String, Value>,
    /// Existing records' external id → Id (for the query endpoint).
    external: HashMap<String, String>,
    /// The daily allocation in `Sforce-Limit-Info` (0: 15000).
    usage_limit: u64,
    /// Why the last token request was refused, if it was.
    auth_error: Option<String>,
    base: String,
}

#[derive(Clone)]
struct FakeSalesforce(Arc<Mutex<SfState>>);

impl FakeSalesforce {
    fn token(&self, req: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let form: HashMap<String, String> =
            form_urlencoded::parse(&req.body).into_owned().collect();
        let refuse = |s: &mut SfState, why: String| {
            s.auth_error = Some(why.clone());
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": "invalid_grant", "error_description": why}))
        };
        match form.get("grant_type").map(String::as_str) {
            Some("client_credentials") => {
                if form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
                    || form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
                {
                    return refuse(&mut s, "invalid client credentials".into());
                }
            }
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
                let public = std::fs::read(fixture("insights-test-key.pub.pem")).unwrap();
                let key = jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap();
                let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
                v.set_audience(&[s.base.clone()]);
                v.set_issuer(&[CLIENT_ID]);
                v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
                let assertion = form.get("assertion").cloned().unwrap_or_default();
                match jsonwebtoken::decode::<Value>(&assertion, &key, &v) {
                    Ok(t) => {
                        let exp = t.claims["exp"].as_i64().unwrap();
                        let now = chrono::Utc::now().timestamp();
                        if t.claims["sub"] != SF_USER || !(now + 60..=now + 300).contains(&exp) {
                            return refuse(&mut s, format!("bad claims {}", t.claims));
                        }
                    }
                    Err(e) => return refuse(&mut s, format!("assertion refused: {e}")),
                }
            }
            other => return refuse(&mut s, format!("unsupported grant_type {other:?}")),
        }
        s.tokens_issued += 1;
        ResponseTemplate::new(200).set_body_json(json!({
            "access_token": format!("tok-{}", s.tokens_issued),
            "instance_url": s.base,
            "token_type": "Bearer",
        }))
    }

    fn collection(&self, req: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        s.collection_calls += 1;
        let valid = format!("Bearer tok-{}", s.tokens_issued);
        let allocation = if s.usage_limit == 0 {
            15_000
        } else {
            s.usage_limit
        };
        let limit_info = (
            "Sforce-Limit-Info",
            format!("api-usage={}/{allocation}", 40 + s.collection_calls),
        );
        if s.collection_calls <= s.expire_first
            || req
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                != Some(&valid)
        {
            return ResponseTemplate::new(401).set_body_json(json!([
                {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}
            ]));
        }
        if s.limit_from_call.is_some_and(|n| s.collection_calls >= n) {
            return ResponseTemplate::new(403)
                .insert_header(limit_info.0, "api-usage=15001/15000")
                .set_body_json(json!([
                    {"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}
                ]));
        }
        let body: Value = req.body_json().unwrap();
        assert_eq!(body["allOrNone"], false);
        let records = body["records"].as_array().unwrap();
        assert!(records.len() <= 200, "chunks of at most 200");
        let mut results = Vec::new();
        for r in records {
            assert_eq!(r["attributes"]["type"], "Account");
            let id = r["id"].as_str().unwrap().to_owned();
            if id.ends_with('7') {
                results.push(json!({"id": id, "success": false, "errors": [
                    {"statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Account is locked", "fields": []}
                ]}));
            } else {
                s.updated.insert(id.clone(), r.clone());
                results.push(json!({"id": id, "success": true, "errors": []}));
            }
        }
        ResponseTemplate::new(200)
            .insert_header(limit_info.0, limit_info.1.as_str())
            .set_body_json(Value::Array(results))
    }

    fn query(&self, req: &Request) -> ResponseTemplate {
        let s = self.0.lock().unwrap();
        let q = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "q")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let records: Vec<Value> = s
            .external
            .iter()
            .filter(|(ext, _)| q.contains(&format!("'{ext}'")))
            .map(|(ext, id)| json!({"attributes": {"type": "Account"}, "Id": id, "Totango_Id__c": ext}))
            .collect();
        ResponseTemplate::new(200).set_body_json(json!({
            "totalSize": records.len(), "done": true, "records": records
        }))
    }
}

struct Route(
    FakeSalesforce,
    fn(&FakeSalesforce, &Request) -> ResponseTemplate,
);

impl Respond for Route {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        (self.1)(&self.0, req)
    }
}

async fn fake_salesforce(state: SfState) -> (MockServer, FakeSalesforce) {
    let server = MockServer::start().await;
    let fake = FakeSalesforce(Arc::new(Mutex::new(SfState {
        base: server.uri(),
        ..state
    })));
    Mock::given(method("POST"))
        .and(path("/services/oauth2/token"))
        .respond_with(Route(fake.clone(), FakeSalesforce::token))
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/services/data/v60.0/composite/sobjects"))
        .respond_with(Route(fake.clone(), FakeSalesforce::collection))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/services/data/v60.0/query"))
        .respond_with(Route(fake.clone(), FakeSalesforce::query))
        .mount(&server)
        .await;
    (server, fake)
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config(
    dir: &crate::support::TestPlace,
    totango: &MockServer,
    salesforce: &MockServer,
) -> Config {
    let mut c = crate::support::config(dir, "http://127.0.0.1:9");
    let i = &mut c.insights;
    i.totango_api_url = Some(totango.uri());
    i.totango_app_token = Some(APP_TOKEN.into());
    i.salesforce.login_url = salesforce.uri();
    i.salesforce.client_id = Some(CLIENT_ID.into());
    i.salesforce.client_secret = Some(CLIENT_SECRET.into());
    i.widget_secret = Some("widget-secret".into());
    i.frame_ancestors = MY_DOMAIN.into();
    c
}

/// The customer's own org, as `insights.frame_ancestors` must name it.
const MY_DOMAIN: &str = "'self' https://acme.lightning.force.com https://acme.my.salesforce.com";

async fn sync(c: &Config, dry_run: bool) -> RunOutcome {
    let runtime: Runtime = c.clone().validate().unwrap();
    sync_and_store(&runtime, dry_run, &NoProgress)
        .await
        .unwrap()
}

async fn json(r: reqwest::Response) -> Value {
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

fn totango_queries(requests: &[Request]) -> Vec<Value> {
    requests
        .iter()
        .map(|r| {
            assert_eq!(
                r.headers.get("content-type").unwrap(),
                "application/x-www-form-urlencoded"
            );
            let form: HashMap<String, String> =
                form_urlencoded::parse(&r.body).into_owned().collect();
            serde_json::from_str(&form["query"]).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn pages_through_totango_and_updates_every_record() {
    let totango = fake_totango(450).await;
    let (salesforce, fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.page_size = 200;
    c.insights.salesforce.external_id_field = None;
    let o = sync(&c, false).await;
    let s = &o.summary;

    let queries = totango_queries(&totango.received_requests().await.unwrap());
    let pages: Vec<(u64, u64)> = queries
        .iter()
        .map(|q| (q["offset"].as_u64().unwrap(), q["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(pages, [(0, 200), (200, 200), (400, 200)]);
    assert_eq!(queries[0]["scope"], "all");
    let fields = queries[0]["fields"].as_array().unwrap();
    assert_eq!(fields[0], json!({"type": "string", "term": "health"}));
    assert_eq!(
        fields.last().unwrap(),
        &json!({"type": "string_attribute", "attribute": "sfid"}),
        "the link attribute is asked for"
    );

    assert_eq!(s.total_hits, 450);
    assert_eq!(s.accounts_read, 450);
    assert!(!s.truncated);
    // Ids ending in 7 are refused by the fake: 45 of 450.
    assert_eq!(s.records_failed, 45, "{s:#?}");
    assert_eq!(s.records_updated, 405);
    assert_eq!(s.status, RunStatus::Partial);
    assert_eq!(s.api_calls.totango, 3);
    assert_eq!(
        s.api_calls.salesforce,
        1 + 3,
        "one token, three chunks (200, 200, 50)"
    );
    assert_eq!(s.salesforce_api_usage.as_deref(), Some("43/15000"));
    let f = &s.failures[0];
    assert_eq!(f.account_id, "acct-7");
    assert_eq!(f.record.as_deref(), Some("001000000000000007"));
    assert_eq!(
        f.reason,
        "FIELD_CUSTOM_VALIDATION_EXCEPTION: Account is locked"
    );

    // Every field of the default mapping, for one account.
    let sf = fake.0.lock().unwrap();
    let r = &sf.updated["001000000000000004"];
    let synced = r["Totango_Last_Update__c"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(synced).is_ok(),
        "ISO 8601: {synced}"
    );
    assert_eq!(
        r,
        &json!({
            "attributes": {"type": "Account"},
            "id": "001000000000000004",
            "Totango_Account_Health__c": "Average",
            "Totango_Health_Profile__c": "Enterprise",
            "Totango_Is_Online__c": true,
            "Totango_Last_Update__c": synced,
            "Totango_License_Utilization__c": 35.0,
            "Totango_URL__c": "https://app.totango.com/#!/customerDetails?customer=acct-4",
            "Totango_Usage_Frequency__c": "Daily",
            "Totango_Active_Users_14_Days__c": 14.0,
            "Totango_Engagement__c": 54.0,
            "Totango_Engagement_Change__c": 1.0,
            "Totango_Insights__c": "vip;cohort-0"
        })
    );
    assert_eq!(
        sf.updated["001000000000000000"]["Totango_Account_Health__c"],
        "Good"
    );
    assert_eq!(
        sf.updated["001000000000000002"]["Totango_Account_Health__c"],
        "Poor"
    );
    assert_eq!(sf.updated.len(), 405);
}

#[tokio::test]
async fn stops_at_the_10000_result_window_and_says_so() {
    let totango = fake_totango(25_000).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let c = config(&dir, &totango, &salesforce);
    let o = sync(&c, true).await;
    let s = &o.summary;
    let queries = totango_queries(&totango.received_requests().await.unwrap());
    assert_eq!(queries.len(), 10, "ten pages of 1000");
    assert_eq!(queries[9]["offset"], 9000);
    assert_eq!(s.accounts_read, 10_000);
    assert_eq!(s.total_hits, 25_000);
    assert!(s.truncated);
    let m = s.message.as_deref().unwrap();
    assert!(m.contains("15000 of 25000") && m.contains("10000"), "{m}");
    assert_eq!(s.status, RunStatus::Ok, "a warning, not a failure");
    assert_eq!(o.planned.len(), 10_000);
}

#[tokio::test]
async fn the_window_edge_asks_for_no_more_than_fits() {
    let totango = fake_totango(10_500).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.page_size = 700;
    let o = sync(&c, true).await;
    let queries = totango_queries(&totango.received_requests().await.unwrap());
    let last = queries.last().unwrap();
    assert_eq!(
        (last["offset"].as_u64(), last["count"].as_u64()),
        (Some(9800), Some(200)),
        "offset + count stays within 10,000"
    );
    assert_eq!(o.summary.accounts_read, 10_000);
}

#[tokio::test]
async fn expired_session_reauthenticates_once() {
    let totango = fake_totango(10).await;
    let (salesforce, fake) = fake_salesforce(SfState {
        expire_first: 1,
        ..Default::default()
    })
    .await;
    let dir = crate::support::place();
    let c = config(&dir, &totango, &salesforce);
    let s = sync(&c, false).await.summary;
    assert_eq!(s.status, RunStatus::Partial, "{s:#?}"); // acct-7 is refused
    assert_eq!(s.records_updated, 9);
    let sf = fake.0.lock().unwrap();
    assert_eq!(sf.tokens_issued, 2, "authenticated again after the 401");
    assert_eq!(sf.collection_calls, 2);
}

#[tokio::test]
async fn a_second_expired_session_fails_the_run() {
    let totango = fake_totango(10).await;
    let (salesforce, fake) = fake_salesforce(SfState {
        expire_first: 5,
        ..Default::default()
    })
    .await;
    let dir = crate::support::place();
    let c = config(&dir, &totango, &salesforce);
    let s = sync(&c, false).await.summary;
    assert_eq!(s.status, RunStatus::Failed);
    assert!(s.failed());
    let m = s.message.unwrap();
    assert!(m.contains("session expired again"), "{m}");
    assert_eq!(
        fake.0.lock().unwrap().tokens_issued,
        2,
        "re-authenticated once only"
    );
}

#[tokio::test]
async fn request_limit_stops_the_run() {
    let totango = fake_totango(500).await;
    let (salesforce, fake) = fake_salesforce(SfState {
        limit_from_call: Some(2),
        ..Default::default()
    })
    .await;
    let dir = crate::support::place();
    let c = config(&dir, &totango, &salesforce);
    let s = sync(&c, false).await.summary;
    assert_eq!(s.status, RunStatus::Stopped);
    assert!(s.failed(), "the CLI exits non-zero");
    let m = s.message.clone().unwrap();
    assert!(
        m.contains("REQUEST_LIMIT_EXCEEDED") && m.contains("300 records not sent"),
        "{m}"
    );
    assert_eq!(
        s.records_updated, 180,
        "the first chunk counts (20 refused)"
    );
    assert_eq!(s.salesforce_api_usage.as_deref(), Some("15001/15000"));
    assert_eq!(
        fake.0.lock().unwrap().collection_calls,
        2,
        "no call after the limit"
    );
}

#[tokio::test]
async fn usage_cap_stops_before_the_daily_allocation_is_spent() {
    let totango = fake_totango(600).await;
    let (salesforce, fake) = fake_salesforce(SfState {
        usage_limit: 100,
        ..Default::default()
    })
    .await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    // The fake reports 41/100 after the first collection call, 42/100 after the second.
    c.insights.salesforce.max_api_usage_percent = 42;
    let s = sync(&c, false).await.summary;
    assert_eq!(s.status, RunStatus::Stopped, "{s:#?}");
    let m = s.message.unwrap();
    assert!(
        m.contains("42/100") && m.contains("200 records not sent"),
        "{m}"
    );
    assert_eq!(s.records_updated, 360);
    assert_eq!(fake.0.lock().unwrap().collection_calls, 2);
}

#[tokio::test]
async fn jwt_bearer_flow_is_verified_by_salesforce() {
    let totango = fake_totango(3).await;
    let (salesforce, fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.salesforce.auth = SalesforceAuth::Jwt;
    c.insights.salesforce.client_secret = None;
    c.insights.salesforce.username = Some(SF_USER.into());
    c.insights.salesforce.private_key_path =
        Some(fixture("insights-test-key.pem").display().to_string());
    let s = sync(&c, false).await.summary;
    let sf = fake.0.lock().unwrap();
    assert_eq!(sf.auth_error, None);
    assert_eq!(s.status, RunStatus::Ok, "{s:#?}");
    assert_eq!(s.records_updated, 3);
    assert_eq!(sf.tokens_issued, 1);
}

#[tokio::test]
async fn wrong_credentials_fail_the_run_with_salesforces_reason() {
    let totango = fake_totango(3).await;
    let (salesforce, fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.salesforce.client_secret = Some("wrong".into());
    let s = sync(&c, false).await.summary;
    assert_eq!(s.status, RunStatus::Failed);
    let m = s.message.unwrap();
    assert!(
        m.contains("authentication failed") && m.contains("invalid client credentials"),
        "{m}"
    );
    assert_eq!(fake.0.lock().unwrap().collection_calls, 0);
}

#[tokio::test]
async fn totango_refusal_fails_the_run() {
    let totango = fake_totango(3).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.totango_app_token = Some("wrong".into());
    let s = sync(&c, false).await.summary;
    assert_eq!(s.status, RunStatus::Failed);
    assert!(s.message.unwrap().contains("Invalid app token"));
}

#[tokio::test]
async fn external_id_matching_never_creates_records() {
    let totango = fake_totango(4).await;
    let (salesforce, fake) = fake_salesforce(SfState {
        external: HashMap::from([
            ("acct-0".to_owned(), "001A".to_owned()),
            ("acct-2".to_owned(), "001B".to_owned()),
        ]),
        ..Default::default()
    })
    .await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.salesforce.external_id_field = Some("Totango_Id__c".into());
    let s = sync(&c, false).await.summary;
    assert_eq!(s.records_updated, 2);
    assert_eq!(s.records_failed, 2);
    assert!(
        s.failures
            .iter()
            .any(|f| f.account_id == "acct-1" && f.reason.contains("no Account with Totango_Id__c")),
        "{s:#?}"
    );
    let mut ids: Vec<String> = fake.0.lock().unwrap().updated.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, ["001A", "001B"]);
    // The link attribute is not asked for when matching by external id.
    let queries = totango_queries(&totango.received_requests().await.unwrap());
    assert!(!queries[0]["fields"].to_string().contains("sfid"));
}

#[tokio::test]
async fn the_widget_and_its_json_twin() {
    let totango = fake_totango(5).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.admin.token = Some("admin-token-0123456789".into());
    let o = sync(&c, false).await;
    assert_eq!(o.summary.status, RunStatus::Ok, "{:#?}", o.summary);
    let srv = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    let get = |url: String| http.get(url).send();

    let sig = sign("widget-secret", Target::Account, "acct-1", None);
    let r = get(format!("{}/insights/accounts/acct-1?sig={sig}", srv.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("style-src 'self'"),
        "{csp}"
    );
    assert!(
        csp.ends_with(&format!("frame-ancestors {MY_DOMAIN}")),
        "{csp}"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let html = r.text().await.unwrap();
    for want in [
        "health-yellow",
        ">Average<",
        "Account 1",
        "dot offline",
        "vip",
        "cohort-1",
        "27.5%",
        "href=\"https://app.totango.com/#!/customerDetails?customer=acct-1\"",
    ] {
        assert!(html.contains(want), "{want} not in {html}");
    }
    assert!(!html.contains("<script") && !html.contains("style="));

    // By Salesforce record Id, on its own route, with a link signed for a record.
    let sfid = "001000000000000001";
    let sig = sign("widget-secret", Target::Record, sfid, None);
    let r = get(format!(
        "{}/api/insights/records/{sfid}?sig={sig}",
        srv.base
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = json(r).await;
    assert_eq!(v["account_id"], "acct-1");
    assert_eq!(v["health_label"], "Average");
    assert_eq!(v["engagement"], 51.0);
    assert_eq!(v["engagement_change"], -2.0);
    assert_eq!(v["active_users_14_days"], 11.0);

    // Refused: a wrong signature, another account's, none at all.
    let other = sign("widget-secret", Target::Account, "acct-2", None);
    for (query, status, code) in [
        (format!("sig={other}"), 403, "bad_signature"),
        ("sig=00ff".to_owned(), 403, "bad_signature"),
        ("sig=nothex".to_owned(), 403, "bad_signature"),
        (String::new(), 401, "unauthorized"),
    ] {
        for prefix in ["/insights/accounts", "/api/insights/accounts"] {
            let r = get(format!("{}{prefix}/acct-1?{query}", srv.base))
                .await
                .unwrap();
            assert_eq!(r.status(), status, "{prefix} {query}");
            let v: Value = json(r).await;
            assert_eq!(v["code"], code, "{v}");
            assert!(v["message"].is_string());
        }
    }

    // Expiring links: valid until exp, and exp is signed.
    let future = chrono::Utc::now().timestamp() + 600;
    let sig = sign("widget-secret", Target::Account, "acct-1", Some(future));
    let ok = get(format!(
        "{}/insights/accounts/acct-1?sig={sig}&exp={future}",
        srv.base
    ))
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);
    let moved = get(format!(
        "{}/insights/accounts/acct-1?sig={sig}&exp={}",
        srv.base,
        future + 1
    ))
    .await
    .unwrap();
    assert_eq!(moved.status(), 403);
    let past = chrono::Utc::now().timestamp() - 1;
    let sig = sign("widget-secret", Target::Account, "acct-1", Some(past));
    let r = get(format!(
        "{}/insights/accounts/acct-1?sig={sig}&exp={past}",
        srv.base
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(json(r).await["code"], "link_expired");

    // The admin token opens everything; unknown accounts are 404.
    let admin = |url: String| http.get(url).bearer_auth("admin-token-0123456789").send();
    let r = admin(format!("{}/insights/accounts/acct-3", srv.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = admin(format!("{}/api/insights/accounts/nobody", srv.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = admin(format!("{}/insights/accounts/nobody", srv.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("No Totango insights"));

    // Recent runs, for the operator page.
    let r = get(format!("{}/api/insights/runs", srv.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v = json(
        admin(format!("{}/api/insights/runs", srv.base))
            .await
            .unwrap(),
    )
    .await;
    let run = &v["runs"][0];
    assert_eq!(run["status"], "ok");
    assert_eq!(run["accounts_read"], 5);
    assert_eq!(run["records_updated"], 5);
    assert!(run["id"].is_i64());

    // The stylesheet is public.
    let r = get(format!("{}/insights/widget.css", srv.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    srv.stop().await;
}

#[tokio::test]
async fn serve_runs_the_sync_on_schedule() {
    let totango = fake_totango(3).await;
    let (salesforce, fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.enabled = true;
    let srv = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    // No admin token configured: the server generated one beside the database.
    let _ = http.get(format!("{}/healthz", srv.base)).send().await;
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let token = token.trim();
    let every = std::time::Duration::from_millis(50);
    crate::support::wait::until(std::time::Duration::from_secs(10), every, async || {
        let v = json(
            http.get(format!("{}/api/insights/runs", srv.base))
                .bearer_auth(token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        if let Some(run) = v["runs"].get(0) {
            assert_eq!(run["status"], "ok", "{run}");
            assert_eq!(run["records_updated"], 3);
            return Ok(());
        }
        Err(v)
    })
    .await
    .unwrap_or_else(|v| panic!("no run recorded: {v}"));
    assert_eq!(fake.0.lock().unwrap().updated.len(), 3);
    // Without a credential nothing is served, local or not.
    for (name, value) in [("host", "localhost"), ("x-forwarded-for", "203.0.113.9")] {
        let r = http
            .get(format!("{}/api/insights/runs", srv.base))
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{name}");
        assert_eq!(json(r).await["code"], "unauthorized");
    }
    srv.stop().await;
}

/// Answers like [`FakeTotango`], each answer `delay` late.
struct Slow(FakeTotango, std::time::Duration);

impl Respond for Slow {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.0.respond(req).set_delay(self.1)
    }
}

#[tokio::test]
async fn a_sync_started_by_hand_runs_one_at_a_time_and_is_audited() {
    let totango = MockServer::start().await;
    let slow = FakeTotango {
        total: 3,
        hits_cap: None,
    };
    Mock::given(method("POST"))
        .and(path("/api/v1/search/accounts"))
        .respond_with(Slow(slow, std::time::Duration::from_millis(1500)))
        .mount(&totango)
        .await;
    let (salesforce, fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    // Not on a schedule: only runs started by hand.
    let srv = crate::support::TestApp::start(config(&dir, &totango, &salesforce)).await;
    let http = reqwest::Client::new();
    let _ = http.get(format!("{}/healthz", srv.base)).send().await;
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let token = token.trim();
    let start = |query: &str| {
        http.post(format!("{}/api/insights/runs{query}", srv.base))
            .bearer_auth(token)
            .send()
    };

    let r = start("").await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(json(r).await, json!({"started": true}));
    // Totango is still answering the first: a second is refused, not queued.
    let r = start("").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(json(r).await["code"], "sync_running");

    let every = std::time::Duration::from_millis(50);
    let runs = async || {
        json(
            http.get(format!("{}/api/insights/runs", srv.base))
                .bearer_auth(token)
                .send()
                .await
                .unwrap(),
        )
        .await
    };
    crate::support::wait::until(std::time::Duration::from_secs(20), every, async || {
        let v = runs().await;
        match v["runs"].get(0) {
            Some(run) if run["records_updated"] == 3 => Ok(()),
            _ => Err(v),
        }
    })
    .await
    .unwrap_or_else(|v| panic!("the run did not finish: {v}"));
    assert_eq!(fake.0.lock().unwrap().updated.len(), 3);

    // Finished: another may start now.
    let r = start("").await.unwrap();
    assert_eq!(r.status(), 202);
    crate::support::wait::until(std::time::Duration::from_secs(20), every, async || {
        let v = runs().await;
        match v["runs"].as_array() {
            Some(all) if all.len() == 2 => Ok(()),
            _ => Err(v),
        }
    })
    .await
    .unwrap_or_else(|v| panic!("the second run did not finish: {v}"));

    // Both are in the audit trail, newest first, with who started them.
    let audit = json(
        http.get(format!("{}/api/audit", srv.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let runs: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "insights_run")
        .collect();
    assert_eq!(runs.len(), 2, "{audit}");
    assert!(runs.iter().all(|e| e["actor"] == "token"), "{audit}");
    assert!(runs[0]["id"].as_i64() > runs[1]["id"].as_i64(), "{audit}");

    // It takes no parameters (dry runs are the command line's); no
    // credential, no run.
    let r = start("?dryRun=true").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        json(r).await["message"]
            .as_str()
            .unwrap()
            .contains("dryRun")
    );
    let r = start("?everything=1").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        json(r).await["message"]
            .as_str()
            .unwrap()
            .contains("everything")
    );
    let r = http
        .post(format!("{}/api/insights/runs", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    srv.stop().await;
}

#[tokio::test]
async fn a_sync_cannot_start_by_hand_without_credentials_naming_the_setting() {
    let totango = fake_totango(1).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.totango_app_token = None;
    let srv = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    let _ = http.get(format!("{}/healthz", srv.base)).send().await;
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let r = http
        .post(format!("{}/api/insights/runs", srv.base))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body = json(r).await;
    assert_eq!(body["code"], "insights_not_configured");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("totango_app_token"),
        "{body}"
    );
    assert!(totango.received_requests().await.unwrap().is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn insights_config_is_validated_and_redacted() {
    let dir = crate::support::place();
    let totango = fake_totango(0).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let mut c = config(&dir, &totango, &salesforce);
    c.insights.enabled = true;
    let text = c.redacted_toml();
    for secret in [APP_TOKEN, CLIENT_SECRET, "widget-secret"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(text.contains("[insights.salesforce]"), "{text}");
    c.insights.salesforce.client_secret = None;
    let e = c.clone().validate().unwrap_err().to_string();
    assert!(e.starts_with("insights.salesforce.client_secret"), "{e}");
    c.insights.salesforce.auth = SalesforceAuth::Jwt;
    c.insights.salesforce.username = Some(SF_USER.into());
    c.insights.salesforce.private_key_path = Some("/nonexistent.pem".into());
    let e = c.clone().validate().unwrap_err().to_string();
    assert!(e.starts_with("insights.salesforce.private_key_path"), "{e}");
    c.insights.mapping.engagement = "Bad Field".into();
    let e = c.clone().validate().unwrap_err().to_string();
    assert!(e.starts_with("insights.mapping.engagement"), "{e}");
}

/// A configuration file as a new user writes it, pointing at the fakes.
fn config_file(dir: &TempDir, totango: &MockServer, salesforce: &MockServer) -> std::path::PathBuf {
    let file = dir.path().join("td.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[storage]
url = "sqlite://{db}"

[insights]
totango_api_url = "{totango}"
totango_app_token = "{APP_TOKEN}"
widget_secret = "widget-secret"
public_url = "https://td.example.com"
frame_ancestors = "https://acme.lightning.force.com"

[insights.salesforce]
login_url = "{salesforce}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
"#,
            db = dir.path().join("td.db").display(),
            totango = totango.uri(),
            salesforce = salesforce.uri(),
        ),
    )
    .unwrap();
    file
}

async fn cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::from(crate::support::binary::command())
        .args(args)
        .env_remove("TD_ADMIN__TOKEN")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn cli_dry_run_prints_what_it_would_write_and_writes_nothing() {
    let totango = fake_totango(3).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let file = config_file(&dir, &totango, &salesforce);
    let (code, out, err) = cli(&[
        "insights",
        "sync",
        "--dry-run",
        "--config",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let records: Vec<Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{out}");
    assert_eq!(records[2]["account_id"], "acct-2");
    assert_eq!(records[2]["record"], "001000000000000002");
    assert_eq!(records[2]["fields"]["Totango_Account_Health__c"], "Poor");
    for want in [
        "insights sync (dry run): ok",
        "accounts read:    3",
        "records to write: 3 (nothing written: dry run)",
        "API calls:        Totango 1, Salesforce 0",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    assert!(
        salesforce.received_requests().await.unwrap().is_empty(),
        "nothing reaches Salesforce on a dry run"
    );
    assert!(
        !dir.path().join("insights.db").exists(),
        "no snapshot stored"
    );
}

#[tokio::test]
async fn cli_sync_summarises_and_fails_on_the_request_limit() {
    let totango = fake_totango(250).await;
    let (salesforce, _fake) = fake_salesforce(SfState {
        limit_from_call: Some(2),
        ..Default::default()
    })
    .await;
    let dir = crate::support::place();
    let file = config_file(&dir, &totango, &salesforce);
    let (code, out, err) = cli(&["insights", "sync", "--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    for want in [
        "insights sync: stopped",
        "accounts read:    250",
        "records updated:  180",
        "records failed:   20",
        "acct-7 (001000000000000007): FIELD_CUSTOM_VALIDATION_EXCEPTION: Account is locked",
        "API calls:        Totango 1, Salesforce 3 (Salesforce daily usage 15001/15000)",
        "REQUEST_LIMIT_EXCEEDED",
        "50 records not sent",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    assert!(
        dir.path().join("insights.db").exists(),
        "snapshots and the run are stored"
    );
}

#[tokio::test]
async fn cli_sync_is_audited_unless_a_server_holds_the_storage() {
    let totango = fake_totango(3).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let file = config_file(&dir, &totango, &salesforce);
    let db = dir.path().join("td.db");
    let audit = async || {
        let storage = totango_destination::storage::SqliteStorage::open(&db, 60_000).unwrap();
        let entries = storage.audit_log(None, 10).await.unwrap();
        storage.close().await;
        entries
    };

    let (code, out, err) = cli(&["insights", "sync", "--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("not in the audit trail"), "{err}");
    let entries = audit().await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0].entry;
    assert_eq!(e.action, "insights_run");
    assert!(e.actor.starts_with("cli"), "{e:?}");
    assert_eq!(e.count, Some(3));
    assert_eq!(e.detail["dryRun"], false);
    assert_eq!(e.detail["status"], "ok");

    // A process holding the file (as a running server does): the run goes
    // on, and says it is not audited and where runs are.
    let held = totango_destination::storage::SqliteStorage::open(&db, 60_000).unwrap();
    let (code, out, err) = cli(&["insights", "sync", "--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("not in the audit trail"), "{err}");
    assert!(err.contains("POST /api/insights/runs"), "{err}");
    held.close().await;
    assert_eq!(audit().await.len(), 1);
}

#[tokio::test]
async fn cli_refuses_to_sync_without_credentials_naming_the_setting() {
    let (code, _, err) = cli(&["insights", "sync", "--dry-run"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("insights.totango_app_token"), "{err}");
}

#[tokio::test]
async fn cli_link_prints_a_signed_widget_url() {
    let totango = fake_totango(0).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let file = config_file(&dir, &totango, &salesforce);
    let (code, out, err) = cli(&[
        "insights",
        "link",
        "0015g00000AbCdEAAV",
        "--config",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let sig = sign("widget-secret", Target::Account, "0015g00000AbCdEAAV", None);
    assert_eq!(
        out.trim(),
        format!("https://td.example.com/insights/accounts/0015g00000AbCdEAAV?sig={sig}")
    );
    let (code, out, err) = cli(&[
        "insights",
        "link",
        "--record",
        "0015g00000AbCdEAAV",
        "--config",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let sig = sign("widget-secret", Target::Record, "0015g00000AbCdEAAV", None);
    assert_eq!(
        out.trim(),
        format!("https://td.example.com/insights/records/0015g00000AbCdEAAV?sig={sig}")
    );
    let (code, out, _) = cli(&[
        "insights",
        "link",
        "acme",
        "--expires-in",
        "600",
        "--config",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0);
    let url = url::Url::parse(out.trim()).unwrap();
    let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
    let exp: i64 = q["exp"].parse().unwrap();
    assert!((exp - chrono::Utc::now().timestamp() - 600).abs() < 30);
    assert_eq!(
        q["sig"],
        sign("widget-secret", Target::Account, "acme", Some(exp))
    );
}

#[tokio::test]
async fn the_documented_example_file_holds_the_insights_defaults() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/totango-destination.toml");
    let (code, defaults, err) = cli(&["check-config"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, from_file, err) =
        cli(&["check-config", "--config", example.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(defaults.contains("[insights.mapping]"), "{defaults}");
    assert!(
        defaults.contains("insight = \"active_users_14_days\""),
        "{defaults}"
    );
    assert_eq!(from_file, defaults);
}

/// A Totango fake answering these hits (default fields, `sfid` last).
async fn totango_with(hits: Vec<Value>) -> MockServer {
    let server = MockServer::start().await;
    let total = hits.len();
    Mock::given(method("POST"))
        .and(path("/api/v1/search/accounts"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "success",
            "response": {"accounts": {"total_hits": total, "hits": hits}}
        })))
        .mount(&server)
        .await;
    server
}

/// `account(i)` renamed, linked to `sfid` (or to nothing).
fn hit(name: &str, i: usize, sfid: Option<&str>) -> Value {
    let mut h = account(i);
    h["name"] = json!(name);
    h["display_name"] = json!(format!("Display {name}"));
    let fields = h["selected_fields"].as_array_mut().unwrap();
    *fields.last_mut().unwrap() = sfid.map_or(Value::Null, |s| json!(s));
    h
}

#[tokio::test]
async fn an_account_named_like_a_record_id_cannot_take_over_its_widget() {
    // acct-1 is linked to record R; an account *named* R (account ids are
    // client-controlled through Segment `group`) must not be R's widget.
    let record = "001000000000000001";
    let totango = totango_with(vec![hit("acct-1", 1, Some(record)), hit(record, 2, None)]).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.admin.token = Some("admin-token-0123456789".into());
    let o = sync(&c, false).await;
    assert_eq!(o.summary.records_updated, 1, "{:#?}", o.summary);
    let srv = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    let get = |url: String| http.get(url).send();

    // The record's widget is acct-1's, by a link signed for the record.
    let sig = sign("widget-secret", Target::Record, record, None);
    for prefix in ["/insights/records", "/api/insights/records"] {
        let r = get(format!("{}{prefix}/{record}?sig={sig}", srv.base))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{prefix}");
        let body = r.text().await.unwrap();
        assert!(body.contains("Display acct-1"), "{prefix}: {body}");
        assert!(!body.contains(&format!("Display {record}")), "{body}");
    }
    // The account named like the record has its own widget, on the account
    // route only, and a link signed for it does not open the record's.
    let as_account = sign("widget-secret", Target::Account, record, None);
    let r = get(format!(
        "{}/api/insights/accounts/{record}?sig={as_account}",
        srv.base
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["account_id"], record);
    for prefix in ["/insights/records", "/api/insights/records"] {
        let r = get(format!("{}{prefix}/{record}?sig={as_account}", srv.base))
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{prefix}");
        assert_eq!(json(r).await["code"], "bad_signature");
    }
    // And the record's link does not open the account named like it.
    let r = get(format!(
        "{}/api/insights/accounts/{record}?sig={sig}",
        srv.base
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    // The account route never falls back to record Ids.
    let r = http
        .get(format!(
            "{}/api/insights/accounts/001000000000000009",
            srv.base
        ))
        .bearer_auth("admin-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    srv.stop().await;
}

#[tokio::test]
async fn two_accounts_claiming_one_record_are_refused_and_reported() {
    // a and b claim R (in its 18- and 15-character forms); c has its own.
    let totango = totango_with(vec![
        hit("a", 0, Some("001000000000000AAA")),
        hit("b", 1, Some("001000000000000")),
        hit("c", 2, Some("001000000000000002")),
    ])
    .await;
    let (salesforce, fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.admin.token = Some("admin-token-0123456789".into());
    let s = sync(&c, false).await.summary;
    assert_eq!(s.records_updated, 1, "{s:#?}");
    assert_eq!(s.records_failed, 2, "{s:#?}");
    assert_eq!(s.status, RunStatus::Partial);
    for (who, other) in [("a", "b"), ("b", "a")] {
        let f = s.failures.iter().find(|f| f.account_id == who).unwrap();
        assert!(
            f.reason.contains("duplicate link") && f.reason.contains(&format!("{other:?}")),
            "{f:?}"
        );
    }
    let updated: Vec<String> = fake.0.lock().unwrap().updated.keys().cloned().collect();
    assert_eq!(
        updated,
        ["001000000000000002"],
        "no write to the contested record"
    );

    // The record's widget is refused as ambiguous rather than picking one.
    let srv = crate::support::TestApp::start(c).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!(
            "{}/api/insights/records/001000000000000AAA",
            srv.base
        ))
        .bearer_auth("admin-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "both forms name one record, claimed twice");
    assert_eq!(json(r).await["code"], "ambiguous_record");
    let r = http
        .get(format!("{}/api/insights/runs", srv.base))
        .bearer_auth("admin-token-0123456789")
        .send()
        .await
        .unwrap();
    let v = json(r).await;
    assert_eq!(v["runs"][0]["records_failed"], 2, "{v}");
    srv.stop().await;
}

#[tokio::test]
async fn a_record_claimed_twice_in_the_store_is_ambiguous_not_first_come() {
    let totango = totango_with(vec![
        hit("a", 0, Some("001000000000000005")),
        hit("b", 1, Some("001000000000000005")),
    ])
    .await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let mut c = config(&dir, &totango, &salesforce);
    c.admin.token = Some("admin-token-0123456789".into());
    let s = sync(&c, false).await.summary;
    assert_eq!((s.records_updated, s.records_failed), (0, 2), "{s:#?}");
    let srv = crate::support::TestApp::start(c).await;
    let sig = sign("widget-secret", Target::Record, "001000000000000005", None);
    let r = reqwest::get(format!(
        "{}/insights/records/001000000000000005?sig={sig}",
        srv.base
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(json(r).await["code"], "ambiguous_record");
    srv.stop().await;
}

#[tokio::test]
async fn signed_links_have_one_encoding_and_one_spelling_of_exp() {
    let totango = totango_with(vec![hit("a", 0, None)]).await;
    let (salesforce, _fake) = fake_salesforce(SfState::default()).await;
    let dir = crate::support::place();
    let c = config(&dir, &totango, &salesforce);
    sync(&c, false).await;
    let srv = crate::support::TestApp::start(c).await;
    let get = |q: String| reqwest::get(format!("{}/api/insights/accounts/{q}", srv.base));
    let exp = chrono::Utc::now().timestamp() + 600;
    let sig = sign("widget-secret", Target::Account, "a", Some(exp));
    assert_eq!(
        get(format!("a?sig={sig}&exp={exp}"))
            .await
            .unwrap()
            .status(),
        200
    );
    // Other spellings of the same expiry are refused, naming `exp`.
    for spelling in [format!("%2B{exp}"), format!("0{exp}"), format!("{exp}.0")] {
        let r = get(format!("a?sig={sig}&exp={spelling}")).await.unwrap();
        assert_eq!(r.status(), 400, "{spelling}");
        assert!(
            json(r).await["message"].as_str().unwrap().contains("exp"),
            "{spelling}"
        );
    }
    // The link for "a" expiring at exp is not a non-expiring link for "a\n<exp>".
    let r = get(format!("a%0A{exp}?sig={sig}")).await.unwrap();
    assert_eq!(r.status(), 403);
    srv.stop().await;
}

#[test]
fn signed_links_need_the_customers_own_my_domain_as_frame_ancestor() {
    let dir = crate::support::place();
    let mut c = crate::support::config(&dir, "http://127.0.0.1:9");
    c.insights.widget_secret = Some("widget-secret".into());
    // The default admitted every Salesforce org.
    let e = c.clone().validate().expect_err("refused").to_string();
    assert!(e.contains("insights.frame_ancestors"), "{e}");
    c.insights.frame_ancestors = "'self' https://*.force.com".into();
    let e = c.clone().validate().expect_err("refused").to_string();
    assert!(e.contains("insights.frame_ancestors"), "{e}");
    c.insights.frame_ancestors = MY_DOMAIN.into();
    assert!(c.clone().validate().is_ok());
    // Without signed links the widget needs the admin credential only.
    c.insights.widget_secret = None;
    c.insights.frame_ancestors = "'self'".into();
    assert!(c.validate().is_ok());
}
