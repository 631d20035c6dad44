//! Per-source Totango settings (mapping.md "Settings"), with defaults and validation.

use super::limits::LimitMode;
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::fmt;
use url::Url;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    #[default]
    Us,
    Eu,
    Test,
}

impl Region {
    pub fn endpoint(self) -> &'static str {
        match self {
            Region::Us => "https://sdr.totango.com",
            Region::Eu => "https://sdr-eu1.totango.com",
            Region::Test => "https://sdr-test.totango.com",
        }
    }
}

/// Effective settings for one message. Build with [`SettingsPatch::resolve`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub service_id: String,
    pub region: Region,
    /// Explicit endpoint override (proxies, tests); `None` means "from region".
    pub endpoint: Option<String>,
    pub api_token: Option<String>,
    pub track_named_pages: bool,
    pub track_categorized_pages: bool,
    pub default_module: String,
    pub disable_heartbeat: bool,
    /// What a breach of Totango's documented limits does.
    #[serde(default)]
    pub on_limit_breach: LimitMode,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("service_id", &self.service_id)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("api_token", &self.api_token.as_ref().map(|_| "[redacted]"))
            .field("track_named_pages", &self.track_named_pages)
            .field("track_categorized_pages", &self.track_categorized_pages)
            .field("default_module", &self.default_module)
            .field("disable_heartbeat", &self.disable_heartbeat)
            .field("on_limit_breach", &self.on_limit_breach)
            .finish()
    }
}

impl Settings {
    /// The base URL requests go to, without a trailing slash.
    pub fn base_url(&self) -> &str {
        self.endpoint
            .as_deref()
            .unwrap_or(self.region.endpoint())
            .trim_end_matches('/')
    }

    /// Warnings about settings that are accepted but look wrong.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !looks_like_service_id(&self.service_id) {
            w.push(format!(
                "service_id: {:?} does not look like a Totango service ID (SP-1234-01)",
                self.service_id
            ));
        }
        w
    }
}

/// `^SP-\d{4,5}-\d{2}$` without a regex engine.
fn looks_like_service_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("SP-") else {
        return false;
    };
    let Some((mid, tail)) = rest.split_once('-') else {
        return false;
    };
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    (4..=5).contains(&mid.len()) && digits(mid) && tail.len() == 2 && digits(tail)
}

/// A partial set of settings, as found in configuration, `--settings`, or the
/// `X-Segment-Settings` header (which uses Segment's camelCase names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    #[serde(
        default,
        alias = "serviceId",
        deserialize_with = "lenient_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
    /// May hold credentials (`https://user:pass@proxy`): serialised without them.
    #[serde(
        default,
        deserialize_with = "lenient_text",
        serialize_with = "redacted_url",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint: Option<String>,
    #[serde(
        default,
        alias = "apiToken",
        deserialize_with = "crate::secret::opt_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_token: Option<Secret>,
    #[serde(
        default,
        alias = "trackNamedPages",
        skip_serializing_if = "Option::is_none"
    )]
    pub track_named_pages: Option<bool>,
    #[serde(
        default,
        alias = "trackCategorizedPages",
        skip_serializing_if = "Option::is_none"
    )]
    pub track_categorized_pages: Option<bool>,
    #[serde(
        default,
        alias = "defaultModule",
        deserialize_with = "lenient_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub default_module: Option<String>,
    #[serde(
        default,
        alias = "disableHeartbeat",
        skip_serializing_if = "Option::is_none"
    )]
    pub disable_heartbeat: Option<bool>,
    /// `warn`, `truncate` or `reject`: configuration only (never taken from
    /// X-Segment-Settings, so a sender cannot loosen the operator's choice).
    #[serde(
        default,
        alias = "onLimitBreach",
        skip_serializing_if = "Option::is_none"
    )]
    pub on_limit_breach: Option<LimitMode>,
}

/// Text settings also accept numbers (a numeric token or service ID from an
/// environment variable); the value never appears in the error.
fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    url.as_deref().map(crate::secret::redact_url).serialize(s)
}

fn lenient_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s)),
        serde_json::Value::Number(n) => Ok(Some(n.to_string())),
        _ => Err(serde::de::Error::custom("expected text")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct SettingsError {
    pub setting: String,
    pub reason: String,
}

impl SettingsError {
    fn new(setting: &str, reason: impl Into<String>) -> Self {
        SettingsError {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// Longest `service_id` accepted, in UTF-8 bytes: it is part of ordering
/// keys and of the page-category key, both indexed.
pub const MAX_SERVICE_ID_BYTES: usize = 256;

impl SettingsPatch {
    /// Parses a JSON object of settings; unknown names are an error naming them.
    pub fn from_json(v: &serde_json::Value) -> Result<SettingsPatch, SettingsError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let reason = e.into_inner().to_string();
            SettingsError::new(if path == "." { "settings" } else { &path }, reason)
        })
    }

    /// JSON for storage: like serialising, but with the API token itself
    /// (serialising redacts it). Stored settings are never shown.
    pub fn to_stored_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("settings serialise");
        if let (Some(t), Some(obj)) = (&self.api_token, v.as_object_mut()) {
            obj.insert("api_token".into(), t.expose().into());
        }
        v.to_string()
    }

    /// `self` without the API token (for messages that will not be sent again).
    pub fn without_token(&self) -> SettingsPatch {
        SettingsPatch {
            api_token: None,
            ..self.clone()
        }
    }

    /// `self` with every field that `over` sets replaced.
    pub fn merged(&self, over: &SettingsPatch) -> SettingsPatch {
        SettingsPatch {
            service_id: over.service_id.clone().or_else(|| self.service_id.clone()),
            region: over.region.or(self.region),
            endpoint: over.endpoint.clone().or_else(|| self.endpoint.clone()),
            api_token: over.api_token.clone().or_else(|| self.api_token.clone()),
            track_named_pages: over.track_named_pages.or(self.track_named_pages),
            track_categorized_pages: over
                .track_categorized_pages
                .or(self.track_categorized_pages),
            default_module: over
                .default_module
                .clone()
                .or_else(|| self.default_module.clone()),
            disable_heartbeat: over.disable_heartbeat.or(self.disable_heartbeat),
            on_limit_breach: over.on_limit_breach.or(self.on_limit_breach),
        }
    }

    /// Applies defaults and validates. `service_id` is required.
    pub fn resolve(&self) -> Result<Settings, SettingsError> {
        let service_id = self
            .service_id
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                SettingsError::new(
                    "service_id",
                    "required (your Totango service ID, like SP-1234-01)",
                )
            })?
            .to_owned();
        if service_id.len() > MAX_SERVICE_ID_BYTES {
            return Err(SettingsError::new(
                "service_id",
                format!(
                    "{} bytes long; a service ID is at most {MAX_SERVICE_ID_BYTES} bytes",
                    service_id.len()
                ),
            ));
        }
        let endpoint = match self.endpoint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(e) => {
                let url = Url::parse(e)
                    .map_err(|err| SettingsError::new("endpoint", format!("not a URL: {err}")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(SettingsError::new(
                        "endpoint",
                        "must be an absolute http:// or https:// URL",
                    ));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(SettingsError::new(
                        "endpoint",
                        "must not have a query or fragment",
                    ));
                }
                Some(e.trim_end_matches('/').to_owned())
            }
        };
        let default_module = match self.default_module.as_deref() {
            None => "Application".to_owned(),
            Some(m) if m.trim().is_empty() => {
                return Err(SettingsError::new("default_module", "must not be empty"));
            }
            Some(m) => m.to_owned(),
        };
        Ok(Settings {
            service_id,
            region: self.region.unwrap_or_default(),
            endpoint,
            api_token: self
                .api_token
                .as_ref()
                .map(|t| t.expose().to_owned())
                .filter(|t| !t.is_empty()),
            track_named_pages: self.track_named_pages.unwrap_or(true),
            track_categorized_pages: self.track_categorized_pages.unwrap_or(true),
            default_module,
            disable_heartbeat: self.disable_heartbeat.unwrap_or(false),
            on_limit_breach: self.on_limit_breach.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(v: serde_json::Value) -> SettingsPatch {
        SettingsPatch::from_json(&v).unwrap()
    }

    #[test]
    fn defaults() {
        let s = patch(json!({"service_id": "SP-1234-01"}))
            .resolve()
            .unwrap();
        assert_eq!(s.region, Region::Us);
        assert_eq!(s.base_url(), "https://sdr.totango.com");
        assert!(s.track_named_pages && s.track_categorized_pages);
        assert_eq!(s.default_module, "Application");
        assert!(!s.disable_heartbeat);
        assert_eq!(s.on_limit_breach, LimitMode::Warn);
        assert_eq!(s.api_token, None);
        assert!(s.warnings().is_empty());
    }

    #[test]
    fn region_hosts_and_endpoint_override() {
        let eu = patch(json!({"service_id": "SP-1234-01", "region": "eu"}))
            .resolve()
            .unwrap();
        assert_eq!(eu.base_url(), "https://sdr-eu1.totango.com");
        let test = patch(json!({"service_id": "SP-1234-01", "region": "test"}))
            .resolve()
            .unwrap();
        assert_eq!(test.base_url(), "https://sdr-test.totango.com");
        let over =
            patch(json!({"service_id": "SP-1", "region": "eu", "endpoint": "http://127.0.0.1:9/"}))
                .resolve()
                .unwrap();
        assert_eq!(over.base_url(), "http://127.0.0.1:9");
    }

    #[test]
    fn overlong_service_id_is_refused() {
        let long = "S".repeat(MAX_SERVICE_ID_BYTES + 1);
        let e = patch(json!({"service_id": long})).resolve().unwrap_err();
        assert_eq!(e.setting, "service_id");
        let fits = "S".repeat(MAX_SERVICE_ID_BYTES);
        assert!(patch(json!({"service_id": fits})).resolve().is_ok());
    }

    #[test]
    fn camel_case_names_are_accepted() {
        let s = patch(json!({"serviceId": "SP-12345-01", "trackNamedPages": false,
            "trackCategorizedPages": false, "disableHeartbeat": true, "defaultModule": "Core",
            "apiToken": "t"}))
        .resolve()
        .unwrap();
        assert_eq!(s.service_id, "SP-12345-01");
        assert!(!s.track_named_pages && !s.track_categorized_pages && s.disable_heartbeat);
        assert_eq!(s.default_module, "Core");
        assert_eq!(s.api_token.as_deref(), Some("t"));
    }

    #[test]
    fn validation_names_the_setting() {
        assert_eq!(
            SettingsPatch::default().resolve().unwrap_err().setting,
            "service_id"
        );
        let e = patch(json!({"service_id": "SP-1234-01", "endpoint": "ftp://x"}))
            .resolve()
            .unwrap_err();
        assert_eq!(e.setting, "endpoint");
        let e = patch(json!({"service_id": "SP-1234-01", "default_module": " "}))
            .resolve()
            .unwrap_err();
        assert_eq!(e.setting, "default_module");
        let e = SettingsPatch::from_json(&json!({"region": "mars"})).unwrap_err();
        assert_eq!(e.setting, "region");
        let e = SettingsPatch::from_json(&json!({"on_limit_breach": "drop"})).unwrap_err();
        assert_eq!(e.setting, "on_limit_breach");
        assert!(e.reason.contains("truncate"), "{e}");
        let e = SettingsPatch::from_json(&json!({"service_ld": "x"})).unwrap_err();
        assert!(e.reason.contains("service_ld"), "{e}");
    }

    #[test]
    fn odd_service_id_warns_but_is_accepted() {
        let s = patch(json!({"service_id": "my-service"}))
            .resolve()
            .unwrap();
        assert_eq!(s.warnings().len(), 1);
        for ok in ["SP-1234-01", "SP-12345-99"] {
            assert!(looks_like_service_id(ok), "{ok}");
        }
        for bad in [
            "SP-123-01",
            "SP-123456-01",
            "SP-1234-1",
            "sp-1234-01",
            "SP-12a4-01",
        ] {
            assert!(!looks_like_service_id(bad), "{bad}");
        }
    }

    #[test]
    fn merge_prefers_the_overlay() {
        let base = patch(json!({"service_id": "SP-1111-01", "default_module": "A"}));
        let over = patch(json!({"serviceId": "SP-2222-02"}));
        let m = base.merged(&over);
        assert_eq!(m.service_id.as_deref(), Some("SP-2222-02"));
        assert_eq!(m.default_module.as_deref(), Some("A"));
    }

    #[test]
    fn numbers_are_text_for_text_settings() {
        let s =
            patch(json!({"service_id": "SP-1234-01", "api_token": 123456, "default_module": 2024}))
                .resolve()
                .unwrap();
        assert_eq!(s.api_token.as_deref(), Some("123456"));
        assert_eq!(s.default_module, "2024");
        let e = SettingsPatch::from_json(&json!({"api_token": {"secret": "x"}})).unwrap_err();
        assert!(!e.to_string().contains("secret\""), "{e}");
    }

    #[test]
    fn debug_redacts_the_token() {
        let s = patch(json!({"service_id": "SP-1234-01", "api_token": "s3cret"}))
            .resolve()
            .unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn stored_json_keeps_the_token_and_serialising_does_not() {
        let p = patch(json!({"service_id": "SP-1234-01", "api_token": "s3cret",
            "endpoint": "https://u:pw@proxy.test"}));
        assert!(!serde_json::to_string(&p).unwrap().contains("s3cret"));
        let stored = p.to_stored_json();
        assert!(stored.contains("s3cret"), "{stored}");
        let back = SettingsPatch::from_json(&serde_json::from_str(&stored).unwrap()).unwrap();
        assert_eq!(back.resolve().unwrap().api_token.as_deref(), Some("s3cret"));
        assert!(!p.without_token().to_stored_json().contains("s3cret"));
    }
}
