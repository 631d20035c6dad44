//! The `[insights]` section: reading Totango insights, writing them to
//! Salesforce, and the widget. Secrets are `crate::secret::Secret`s that print as
//! `[redacted]` whenever the configuration is serialized.

use super::{Config, ConfigError, StorageUrl};
use crate::mapping::Region;
use crate::secret::Secret;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};
use std::path::PathBuf;

/// Totango answers at most this many accounts per query (offset + count).
pub const RESULT_WINDOW: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InsightsConfig {
    /// Run the sync inside `serve`.
    pub enabled: bool,
    pub interval_secs: u64,
    /// Totango REST API host; unset: from `totango.region`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub totango_api_url: Option<String>,
    #[serde(
        deserialize_with = "opt_secret",
        serialize_with = "redact",
        skip_serializing_if = "Option::is_none"
    )]
    pub totango_app_token: Option<Secret>,
    /// Totango account attribute holding the Salesforce record Id.
    pub account_link_attribute: String,
    /// Search API `terms` (which accounts); empty: all.
    pub terms: Vec<Value>,
    /// Search API `fields`, each tagged with the insight it carries.
    pub fields: Vec<SearchField>,
    /// Accounts per Search API call (`count`), 1 to 1000.
    pub page_size: usize,
    /// Search API calls per minute at most (Totango allows 100 per token).
    pub totango_calls_per_minute: u32,
    /// Timeout of one call to Totango or Salesforce.
    pub request_timeout_ms: u64,
    pub salesforce: SalesforceConfig,
    /// Insight → Salesforce field; an empty name leaves that insight out.
    pub mapping: FieldMapping,
    /// Key for signed widget links (HMAC-SHA256 of the account id).
    #[serde(
        deserialize_with = "opt_secret",
        serialize_with = "redact",
        skip_serializing_if = "Option::is_none"
    )]
    pub widget_secret: Option<Secret>,
    /// Pages allowed to frame the widget (CSP `frame-ancestors`).
    pub frame_ancestors: String,
    /// Base URL printed by `insights link`; unset: `http://{listen}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// SQLite file for snapshots and run summaries; unset: `insights.db`
    /// next to a `sqlite://` storage file, else `data/insights.db`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SalesforceConfig {
    pub login_url: String,
    pub auth: SalesforceAuth,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(
        deserialize_with = "opt_secret",
        serialize_with = "redact",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_secret: Option<Secret>,
    /// JWT bearer: the Salesforce user the job acts as (`sub`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// JWT bearer: PEM file with the RSA private key of the connected app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_path: Option<String>,
    pub api_version: String,
    pub object: String,
    /// Unset: update by record Id (from `account_link_attribute`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id_field: Option<String>,
    /// Stop a run when `Sforce-Limit-Info` shows this share of the daily
    /// API allocation used, percent.
    pub max_api_usage_percent: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SalesforceAuth {
    ClientCredentials,
    Jwt,
}

/// The insights a search field can carry (the rest come with every hit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Insight {
    AccountHealth,
    HealthProfile,
    UsageFrequency,
    #[serde(rename = "active_users_14_days")]
    ActiveUsers14Days,
    Engagement,
    EngagementChange,
    /// Tags.
    Insights,
    /// Purchased licences (for licence utilisation).
    Licenses,
}

/// One entry of the Search API `fields` list and the insight it carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchField {
    pub insight: Insight,
    /// Sent as is, e.g. `{ type = "string", term = "health" }`.
    pub query: Value,
}

/// Salesforce field per insight (defaults: Totango's default mapping).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldMapping {
    pub account_health: String,
    pub health_profile: String,
    pub is_online: String,
    pub last_update: String,
    pub license_utilization: String,
    pub url: String,
    pub usage_frequency: String,
    pub active_users_14_days: String,
    pub engagement: String,
    pub engagement_change: String,
    pub insights: String,
}

impl Default for FieldMapping {
    fn default() -> Self {
        FieldMapping {
            account_health: "Totango_Account_Health__c".into(),
            health_profile: "Totango_Health_Profile__c".into(),
            is_online: "Totango_Is_Online__c".into(),
            last_update: "Totango_Last_Update__c".into(),
            license_utilization: "Totango_License_Utilization__c".into(),
            url: "Totango_URL__c".into(),
            usage_frequency: "Totango_Usage_Frequency__c".into(),
            active_users_14_days: "Totango_Active_Users_14_Days__c".into(),
            engagement: "Totango_Engagement__c".into(),
            engagement_change: "Totango_Engagement_Change__c".into(),
            insights: "Totango_Insights__c".into(),
        }
    }
}

impl FieldMapping {
    pub fn entries(&self) -> [(&'static str, &str); 11] {
        [
            ("account_health", &self.account_health),
            ("health_profile", &self.health_profile),
            ("is_online", &self.is_online),
            ("last_update", &self.last_update),
            ("license_utilization", &self.license_utilization),
            ("url", &self.url),
            ("usage_frequency", &self.usage_frequency),
            ("active_users_14_days", &self.active_users_14_days),
            ("engagement", &self.engagement),
            ("engagement_change", &self.engagement_change),
            ("insights", &self.insights),
        ]
    }
}

/// The default search fields. Which terms carry usage frequency, licences,
/// tags and the health profile is not documented by Totango: override them
/// in `[[insights.fields]]` without a rebuild.
pub fn default_fields() -> Vec<SearchField> {
    let f = |insight, query| SearchField { insight, query };
    vec![
        f(
            Insight::AccountHealth,
            json!({"type": "string", "term": "health"}),
        ),
        f(
            Insight::HealthProfile,
            json!({"type": "string_attribute", "attribute": "Health Profile"}),
        ),
        f(
            Insight::Engagement,
            json!({"type": "number", "term": "score", "field_display_name": "Engagement"}),
        ),
        f(
            Insight::EngagementChange,
            json!({"type": "number", "term": "score_change", "field_display_name": "Engagement change"}),
        ),
        f(
            Insight::ActiveUsers14Days,
            json!({"type": "named_aggregation", "aggregation": "unique_users", "duration": 14}),
        ),
        f(
            Insight::UsageFrequency,
            json!({"type": "string", "term": "usage_frequency"}),
        ),
        f(
            Insight::Licenses,
            json!({"type": "string_attribute", "attribute": "Licenses"}),
        ),
        f(Insight::Insights, json!({"type": "string", "term": "tags"})),
    ]
}

pub const DEFAULT_FRAME_ANCESTORS: &str =
    "'self' https://*.salesforce.com https://*.force.com https://*.lightning.force.com";

impl Default for InsightsConfig {
    fn default() -> Self {
        InsightsConfig {
            enabled: false,
            interval_secs: 3600,
            totango_api_url: None,
            totango_app_token: None,
            account_link_attribute: "sfid".into(),
            terms: Vec::new(),
            fields: default_fields(),
            page_size: 1000,
            totango_calls_per_minute: 100,
            request_timeout_ms: 30_000,
            salesforce: SalesforceConfig::default(),
            mapping: FieldMapping::default(),
            widget_secret: None,
            frame_ancestors: DEFAULT_FRAME_ANCESTORS.into(),
            public_url: None,
            snapshot_path: None,
        }
    }
}

impl Default for SalesforceConfig {
    fn default() -> Self {
        SalesforceConfig {
            login_url: "https://login.salesforce.com".into(),
            auth: SalesforceAuth::ClientCredentials,
            client_id: None,
            client_secret: None,
            username: None,
            private_key_path: None,
            api_version: "60.0".into(),
            object: "Account".into(),
            external_id_field: None,
            max_api_usage_percent: 90,
        }
    }
}

fn invalid(setting: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: format!("insights.{setting}"),
        reason: reason.into(),
    }
}

fn is_api_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_url(setting: &str, url: &str) -> Result<(), ConfigError> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(invalid(setting, format!("{url:?} is not an http(s) URL"))),
    }
}

/// Checks the shape of the section (always) and, when `enabled`, that a sync
/// can run. Called from [`Config::validate`].
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let c = &config.insights;
    if c.interval_secs == 0 {
        return Err(invalid("interval_secs", "must be at least 1"));
    }
    if !(1..=1000).contains(&c.page_size) {
        return Err(invalid("page_size", "must be between 1 and 1000"));
    }
    if c.totango_calls_per_minute == 0 {
        return Err(invalid("totango_calls_per_minute", "must be at least 1"));
    }
    if c.request_timeout_ms == 0 {
        return Err(invalid("request_timeout_ms", "must be at least 1"));
    }
    if let Some(u) = &c.totango_api_url {
        check_url("totango_api_url", u)?;
    }
    if let Some(u) = &c.public_url {
        check_url("public_url", u)?;
    }
    check_url("salesforce.login_url", &c.salesforce.login_url)?;
    let mut seen = std::collections::HashSet::new();
    for (i, f) in c.fields.iter().enumerate() {
        if !f.query.is_object() {
            return Err(invalid(
                &format!("fields[{i}].query"),
                "must be a table like { type = \"string\", term = \"health\" }",
            ));
        }
        if !seen.insert(f.insight) {
            return Err(invalid(
                &format!("fields[{i}].insight"),
                "this insight is already carried by an earlier field",
            ));
        }
    }
    for (name, field) in c.mapping.entries() {
        if !field.is_empty() && !is_api_name(field) {
            return Err(invalid(
                &format!("mapping.{name}"),
                format!("{field:?} is not a Salesforce field API name"),
            ));
        }
    }
    if !is_api_name(&c.salesforce.object) {
        return Err(invalid("salesforce.object", "is not an API name"));
    }
    if let Some(f) = &c.salesforce.external_id_field {
        if !is_api_name(f) {
            return Err(invalid(
                "salesforce.external_id_field",
                "is not a field API name",
            ));
        }
    }
    if c.salesforce.api_version.parse::<f32>().is_err() {
        return Err(invalid(
            "salesforce.api_version",
            "expected a number like 60.0",
        ));
    }
    if c.salesforce.max_api_usage_percent == 0 || c.salesforce.max_api_usage_percent > 100 {
        return Err(invalid(
            "salesforce.max_api_usage_percent",
            "must be between 1 and 100",
        ));
    }
    if c.frame_ancestors
        .chars()
        .any(|ch| matches!(ch, ';' | ',' | '\r' | '\n'))
    {
        return Err(invalid(
            "frame_ancestors",
            "a space-separated list of sources, without ; or ,",
        ));
    }
    if c.widget_secret.is_some() {
        check_frame_ancestors(&c.frame_ancestors)?;
    }
    if c.enabled {
        ready_to_sync(config)?;
    }
    Ok(())
}

/// Domains that every Salesforce org shares: a wildcard over one of them
/// admits every org's pages, not just the customer's.
const SHARED_DOMAINS: &[&str] = &[
    "force.com",
    "salesforce.com",
    "visualforce.com",
    "salesforce-sites.com",
    "site.com",
    "cloudforce.com",
    "database.com",
    "lightning.com",
    "salesforce-setup.com",
    "sfcrmapps.cn",
    "sfcrmproducts.cn",
];

/// With signed links (the widget embedded in a CRM page) the widget may be
/// framed by the customer's own org only: `frame_ancestors` must name its
/// My Domain hosts, never a wildcard over a domain all orgs share.
fn check_frame_ancestors(value: &str) -> Result<(), ConfigError> {
    let example = "list your org's My Domain hosts, e.g. \
        \"https://acme.lightning.force.com https://acme.my.salesforce.com \
        https://acme--c.vf.force.com\"";
    let mut hosts = 0;
    for source in value.split_whitespace() {
        let lower = source.to_ascii_lowercase();
        if lower.starts_with('\'') {
            continue; // 'self', 'none'
        }
        let host = lower.split_once("://").map_or(&*lower, |(_, h)| h);
        let host = host.split(['/', ':']).next().unwrap_or("");
        if host.is_empty() || host == "*" || lower.ends_with(':') {
            return Err(invalid(
                "frame_ancestors",
                format!("{source:?} admits any site; {example}"),
            ));
        }
        if let Some(suffix) = host.strip_prefix("*.") {
            let shared = SHARED_DOMAINS
                .iter()
                .any(|d| suffix == *d || suffix.ends_with(&format!(".{d}")))
                || !suffix.contains('.');
            if shared {
                return Err(invalid(
                    "frame_ancestors",
                    format!("{source:?} admits every Salesforce org; {example}"),
                ));
            }
        }
        hosts += 1;
    }
    if hosts == 0 {
        return Err(invalid(
            "frame_ancestors",
            format!(
                "signed widget links are enabled (insights.widget_secret) but no page of your \
                 org may frame the widget; {example}"
            ),
        ));
    }
    Ok(())
}

/// What a sync needs beyond the shape: credentials and the key file.
pub fn ready_to_sync(config: &Config) -> Result<(), ConfigError> {
    let c = &config.insights;
    if c.totango_app_token.is_none() {
        return Err(invalid(
            "totango_app_token",
            "is required to read insights (TD_INSIGHTS__TOTANGO_APP_TOKEN)",
        ));
    }
    let sf = &c.salesforce;
    if sf.client_id.as_deref().unwrap_or("").is_empty() {
        return Err(invalid(
            "salesforce.client_id",
            "is required (the connected app's consumer key)",
        ));
    }
    match sf.auth {
        SalesforceAuth::ClientCredentials => {
            if sf.client_secret.is_none() {
                return Err(invalid(
                    "salesforce.client_secret",
                    "is required with auth = \"client_credentials\"",
                ));
            }
        }
        SalesforceAuth::Jwt => {
            if sf.username.as_deref().unwrap_or("").is_empty() {
                return Err(invalid(
                    "salesforce.username",
                    "is required with auth = \"jwt\"",
                ));
            }
            let Some(path) = sf.private_key_path.as_deref() else {
                return Err(invalid(
                    "salesforce.private_key_path",
                    "is required with auth = \"jwt\"",
                ));
            };
            let pem = std::fs::read(path).map_err(|e| {
                invalid(
                    "salesforce.private_key_path",
                    format!("cannot read {path}: {e}"),
                )
            })?;
            jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| {
                invalid(
                    "salesforce.private_key_path",
                    format!("{path} is not an RSA private key in PEM: {e}"),
                )
            })?;
        }
    }
    Ok(())
}

impl InsightsConfig {
    /// The Search API host.
    pub fn totango_api_url(&self, config: &Config) -> String {
        if let Some(u) = &self.totango_api_url {
            return u.trim_end_matches('/').to_owned();
        }
        match config.totango.region {
            Some(Region::Eu) => "https://api-eu1.totango.com".into(),
            _ => "https://api.totango.com".into(),
        }
    }

    /// Where snapshots and run summaries are kept.
    pub fn snapshot_path(&self, storage: &StorageUrl) -> PathBuf {
        if let Some(p) = &self.snapshot_path {
            return PathBuf::from(p);
        }
        match storage {
            StorageUrl::Sqlite(db) => db
                .parent()
                .map(|d| d.join("insights.db"))
                .unwrap_or_else(|| PathBuf::from("insights.db")),
            StorageUrl::Postgres(_) => PathBuf::from("data/insights.db"),
        }
    }
}

fn redact<S: Serializer>(secret: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

fn opt_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    crate::secret::opt_secret(d)
}

/// `Some(secret)` as text, for the few places that must send it.
pub fn expose(secret: &Option<Secret>) -> &str {
    secret.as_ref().map(Secret::expose).unwrap_or("")
}

#[cfg(test)]
mod frame_tests {
    use super::*;

    #[test]
    fn frame_ancestors_must_name_the_customers_own_org() {
        for bad in [
            DEFAULT_FRAME_ANCESTORS,
            "'self'",
            "",
            "https://*.force.com",
            "https://acme.my.salesforce.com https://*.lightning.force.com",
            "*.my.salesforce.com",
            "https://*.vf.force.com",
            "*",
            "https:",
            "https://*.com",
        ] {
            let e = check_frame_ancestors(bad).unwrap_err().to_string();
            assert!(e.contains("insights.frame_ancestors"), "{bad}: {e}");
        }
        for good in [
            "'self' https://acme.lightning.force.com https://acme.my.salesforce.com",
            "https://acme--c.vf.force.com",
            "https://*.crm.acme.example",
        ] {
            assert!(check_frame_ancestors(good).is_ok(), "{good}");
        }
    }
}
