//! The `[auth]` section and `[[sources]]`: write keys, the webhook secret,
//! open mode's hosts, and what each key may do from a browser (origins,
//! calls, rate per client address). Validated into the [`Sources`] ingest
//! looks keys up in.

use super::{Config, ConfigError};
use crate::mapping::{Settings, SettingsError, SettingsPatch};
use crate::secret::{Scalar, Secret};
use crate::segment::CallType;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Write keys accepted with the default `[totango]` settings.
    #[serde(default, deserialize_with = "comma_list")]
    pub write_keys: Vec<Secret>,
    /// Shared secret for `/webhook` signatures (`X-Signature`).
    #[serde(default, deserialize_with = "crate::secret::opt_secret")]
    pub webhook_secret: Option<Secret>,
    /// Also accept a `/webhook` array signed by its first element only
    /// (Segment's batched Actions). The other elements are then not
    /// authenticated; see docs/security.md.
    #[serde(default)]
    pub webhook_first_element_signature: bool,
    /// Allow starting without any write key on a non-loopback address.
    #[serde(default)]
    pub allow_open: bool,
    /// In open mode (no write key), the `Host` names ingest accepts besides
    /// the loopback ones (`localhost`, `127.0.0.1`, `[::1]`): a host name or
    /// address, with `:port` to accept that port only. Others get `421`
    /// (a DNS-rebinding page cannot post events to an open server).
    #[serde(default, deserialize_with = "comma_strings")]
    pub allowed_hosts: Vec<String>,
    /// Browser origins that may send with `write_keys` (exact origins such
    /// as `https://app.example.com`, or `https://*.example.com`): they get
    /// CORS answers on the Tracking API. Default none.
    #[serde(default, deserialize_with = "comma_strings")]
    pub allowed_origins: Vec<String>,
    /// Calls `write_keys` may send (identify, group, page, screen, track,
    /// alias); empty: every call.
    #[serde(default, deserialize_with = "comma_strings")]
    pub allowed_calls: Vec<String>,
    /// Requests per minute one client address may make with `write_keys`
    /// (0: no limit). Default 600 when `allowed_origins` is set, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_requests_per_minute: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Shown in logs and the operator view instead of the key.
    pub name: String,
    pub write_key: Secret,
    /// Overrides of the default `[totango]` settings for this key.
    #[serde(default)]
    pub totango: SettingsPatch,
    /// Browser origins that may send with this key (see `auth.allowed_origins`).
    #[serde(default, deserialize_with = "comma_strings")]
    pub allowed_origins: Vec<String>,
    /// Calls this key may send; empty: every call.
    #[serde(default, deserialize_with = "comma_strings")]
    pub allowed_calls: Vec<String>,
    /// Requests per minute one client address may make with this key (0: no
    /// limit). Default 600 when `allowed_origins` is set, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_requests_per_minute: Option<u32>,
}

/// Checks `[auth]` and `[[sources]]` (with the `[totango]` settings each
/// key sends with) and builds the write keys' sources: the default source
/// (`auth`'s keys, `[totango]` as is) and the source of every key.
pub(super) fn sources(config: &Config) -> Result<(Sources, Source), ConfigError> {
    for (i, host) in config.auth.allowed_hosts.iter().enumerate() {
        if let Err(why) = check_allowed_host(host) {
            return Err(ConfigError::invalid(
                format!("auth.allowed_hosts[{i}]"),
                format!("{host:?}: {why}"),
            ));
        }
    }
    let mut sources = Sources::default();
    let a = &config.auth;
    let default_source = Source {
        name: "default".into(),
        resolved: config.totango.resolve().ok(),
        settings: config.totango.clone(),
        access: Access::parse(
            "auth",
            &a.allowed_origins,
            &a.allowed_calls,
            a.client_requests_per_minute,
        )?,
        rules: super::privacy::rules_for(&config.privacy, "default")?,
    };
    if !a.allowed_origins.is_empty() && a.write_keys.is_empty() {
        // Open mode keeps refusing every cross-site browser request.
        return Err(ConfigError::invalid(
            "auth.allowed_origins",
            "applies to auth.write_keys, and none is set: a browser source needs a write key",
        ));
    }
    for key in &config.auth.write_keys {
        if key.is_empty() {
            return Err(ConfigError::invalid(
                "auth.write_keys",
                "holds an empty key",
            ));
        }
        sources.insert(key, default_source.clone());
    }
    if !config.auth.write_keys.is_empty() && config.totango.service_id.is_none() {
        // Keys with default settings need a service ID, unless Segment sends it
        // in X-Segment-Settings; checked per request then.
        tracing::warn!(
            "totango.service_id is not set: messages need a serviceId in X-Segment-Settings"
        );
    }
    // `[totango]` is every key's base: checked here, before the sources
    // that merge their own settings over it.
    if config.totango.service_id.is_some() {
        resolve("totango", &config.totango)?;
    }
    let mut names = std::collections::HashSet::from(["default"]);
    for (i, s) in config.sources.iter().enumerate() {
        let merged = config.totango.merged(&s.totango);
        let at = format!("sources[{i}]");
        if !names.insert(s.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!("{:?} is used twice (\"default\" is reserved)", s.name),
            ));
        }
        if s.write_key.is_empty() {
            return Err(ConfigError::invalid(
                format!("{at}.write_key"),
                "must not be empty",
            ));
        }
        if merged.service_id.is_some() {
            resolve(&format!("{at}.totango"), &merged)?;
        }
        let access = Access::parse(
            &at,
            &s.allowed_origins,
            &s.allowed_calls,
            s.client_requests_per_minute,
        )?;
        let fresh = sources.insert(
            &s.write_key,
            Source {
                name: s.name.clone(),
                resolved: merged.resolve().ok(),
                settings: merged,
                access,
                rules: super::privacy::rules_for(&config.privacy, &s.name)?,
            },
        );
        if !fresh {
            return Err(ConfigError::invalid(
                format!("{at}.write_key"),
                "is configured twice",
            ));
        }
    }
    let names: Vec<&str> = names.into_iter().collect();
    super::privacy::check(&config.privacy, &names)?;
    Ok((sources, default_source))
}

/// `patch` resolved, or the error naming `setting` and the field.
fn resolve(setting: &str, patch: &SettingsPatch) -> Result<Settings, ConfigError> {
    patch
        .resolve()
        .map_err(|SettingsError { setting: s, reason }| {
            ConfigError::invalid(format!("{setting}.{s}"), reason)
        })
}

/// The configured write keys, looked up in constant time: every key is
/// compared (as a SHA-256 digest, so lengths do not show either).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    keys: Vec<([u8; 32], Source)>,
}

impl Sources {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The source of write key `key`, if configured.
    pub fn find(&self, key: &str) -> Option<&Source> {
        use subtle::ConstantTimeEq;
        let given = crate::secret::digest(key.as_bytes());
        let mut found = None;
        for (digest, source) in &self.keys {
            if bool::from(digest.ct_eq(&given)) {
                found = Some(source);
            }
        }
        found
    }

    pub fn values(&self) -> impl Iterator<Item = &Source> {
        self.keys.iter().map(|(_, s)| s)
    }

    fn insert(&mut self, key: &Secret, source: Source) -> bool {
        let digest = crate::secret::digest(key.expose().as_bytes());
        if self.keys.iter().any(|(d, _)| *d == digest) {
            return false;
        }
        self.keys.push((digest, source));
        true
    }
}

/// A configured write key's name and settings (not yet resolved: headers may
/// add to them per request).
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub settings: SettingsPatch,
    /// `settings` resolved once, for the requests that bring no overrides
    /// (`None`: they cannot be resolved alone, e.g. no service ID yet).
    pub resolved: Option<Settings>,
    pub access: Access,
    /// Event filters and PII rules (`[privacy]`), applied before storage.
    pub rules: std::sync::Arc<crate::rules::Rules>,
}

impl Source {
    /// The settings with a request's overrides applied (resolved once when
    /// it brings none).
    pub fn settings_with(
        &self,
        overrides: &SettingsPatch,
    ) -> Result<std::borrow::Cow<'_, Settings>, SettingsError> {
        match &self.resolved {
            Some(settings) if *overrides == SettingsPatch::default() => {
                Ok(std::borrow::Cow::Borrowed(settings))
            }
            _ => self
                .settings
                .merged(overrides)
                .resolve()
                .map(std::borrow::Cow::Owned),
        }
    }
}

/// What a key may do beyond server-to-server sending: browser origins, the
/// calls it may send, and its rate per client address.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Origins that get CORS answers (empty: no browser may send).
    pub origins: Vec<OriginPattern>,
    /// Calls the key may send (`None`: every call).
    pub calls: Option<Vec<CallType>>,
    /// Requests per minute per client address (0: no limit).
    pub client_requests_per_minute: u32,
}

/// Default `client_requests_per_minute` of a key that browsers may use.
pub const BROWSER_REQUESTS_PER_MINUTE: u32 = 600;

impl Access {
    /// Whether a browser page of `origin` may send with this key.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins.iter().any(|p| p.matches(origin))
    }

    pub fn allows_call(&self, call: CallType) -> bool {
        self.calls.as_ref().is_none_or(|c| c.contains(&call))
    }

    /// Parses the three settings of `at` (`auth` or `sources[i]`).
    fn parse(
        at: &str,
        origins: &[String],
        calls: &[String],
        per_minute: Option<u32>,
    ) -> Result<Access, ConfigError> {
        let origins = origins
            .iter()
            .enumerate()
            .map(|(i, o)| {
                OriginPattern::parse(o).map_err(|why| {
                    ConfigError::invalid(
                        format!("{at}.allowed_origins[{i}]"),
                        format!("{o:?}: {why}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let calls = if calls.is_empty() {
            None
        } else {
            let parsed = calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    CallType::parse(c)
                        .filter(|c| *c != CallType::Delete)
                        .ok_or_else(|| {
                            ConfigError::invalid(
                                format!("{at}.allowed_calls[{i}]"),
                                format!(
                                    "{c:?}: expected identify, group, page, screen, track or alias"
                                ),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(parsed)
        };
        let default_rate = if origins.is_empty() {
            0
        } else {
            BROWSER_REQUESTS_PER_MINUTE
        };
        Ok(Access {
            origins,
            calls,
            client_requests_per_minute: per_minute.unwrap_or(default_rate),
        })
    }
}

/// An `allowed_origins` entry: `scheme://host[:port]`, where the host may
/// start with `*.` (any subdomain, not the domain itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// Lowercase; without the `*.` of a wildcard.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<OriginPattern, &'static str> {
        let (wildcard, origin) = match text.split_once("://*.") {
            Some((scheme, rest)) => (true, format!("{scheme}://{rest}")),
            None => (false, text.to_owned()),
        };
        let parsed = Origin::parse(&origin).ok_or(
            "expected an origin like https://app.example.com or https://*.example.com \
             (scheme, host and optional port; no path)",
        )?;
        if wildcard && !parsed.host.contains('.') {
            return Err("a wildcard needs a domain with a dot after it (https://*.example.com)");
        }
        Ok(OriginPattern {
            scheme: parsed.scheme,
            host: parsed.host,
            wildcard,
            port: parsed.port,
        })
    }

    /// Whether the `Origin` header value `origin` matches.
    pub fn matches(&self, origin: &str) -> bool {
        let Some(o) = Origin::parse(origin) else {
            return false;
        };
        if o.scheme != self.scheme || o.port != self.port {
            return false;
        }
        if self.wildcard {
            o.host
                .strip_suffix(&self.host)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
        } else {
            o.host == self.host
        }
    }
}

/// A serialised origin (`scheme://host[:port]`), normalised: lowercase, and
/// without the scheme's default port.
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    fn parse(text: &str) -> Option<Origin> {
        let (scheme, rest) = text.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let authority: axum::http::uri::Authority = rest.parse().ok()?;
        // An origin is scheme, host and port only: no user info, path or query.
        if authority.as_str() != rest || rest.contains('@') || rest.is_empty() {
            return None;
        }
        let host = authority.host().to_ascii_lowercase();
        let valid = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
        if !valid || host.is_empty() || host.starts_with('.') || host.ends_with('.') {
            return None;
        }
        let port = authority.port_u16().filter(|p| *p != default_port);
        Some(Origin { scheme, host, port })
    }
}

/// A string, a number or a comma-separated list → list of secrets.
fn comma_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(Scalar),
        Many(Vec<Scalar>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => {
            s.0.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::from)
                .collect()
        }
        Raw::Many(v) => v.into_iter().map(|s| Secret::new(s.0)).collect(),
    })
}

/// A string (comma-separated) or a list → list of strings.
pub(super) fn comma_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(Scalar),
        Many(Vec<Scalar>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => {
            s.0.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }
        Raw::Many(v) => v.into_iter().map(|s| s.0.trim().to_owned()).collect(),
    })
}

/// An `auth.allowed_hosts` entry: what a `Host` header holds, a host name or
/// address (IPv6 in brackets) with an optional `:port`, nothing else.
fn check_allowed_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("is empty");
    }
    if host.contains("://") || host.contains('/') {
        return Err("expected a host name like td.example.com or td.example.com:8080, not a URL");
    }
    if host
        .bytes()
        .any(|b| !(b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b)))
    {
        return Err("may hold letters, digits, '-', '.', '_', ':' and IPv6 brackets only");
    }
    if host.parse::<axum::http::uri::Authority>().is_err() {
        return Err("is not a valid host[:port]");
    }
    Ok(())
}

#[cfg(test)]
mod browser_settings {
    use super::*;

    #[test]
    fn origin_patterns_match_exact_origins_and_subdomains() {
        let exact = OriginPattern::parse("https://App.Example.com").unwrap();
        assert!(exact.matches("https://app.example.com"));
        assert!(exact.matches("https://app.example.com:443"));
        assert!(!exact.matches("http://app.example.com"));
        assert!(!exact.matches("https://app.example.com:8443"));
        assert!(!exact.matches("https://evil-app.example.com"));
        assert!(!exact.matches("null"));
        let any = OriginPattern::parse("https://*.example.com").unwrap();
        assert!(any.matches("https://app.example.com"));
        assert!(any.matches("https://a.b.example.com"));
        assert!(!any.matches("https://example.com"), "not the domain itself");
        assert!(!any.matches("https://evilexample.com"));
        assert!(!any.matches("https://app.example.com.evil.net"));
        let local = OriginPattern::parse("http://127.0.0.1:3000").unwrap();
        assert!(local.matches("http://127.0.0.1:3000"));
        assert!(!local.matches("http://127.0.0.1:3001"));
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "ftp://app.example.com",
            "https://user@app.example.com",
            "https://*.com",
            "https://a.*.example.com",
            "*",
            "",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn browser_settings_are_validated_naming_the_setting() {
        let invalid = |c: Config| {
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mut c = Config::default();
        c.auth.write_keys = vec!["k".into()];
        c.auth.allowed_origins = vec!["https://app.example.com".into(), "app.example.com".into()];
        assert!(invalid(c).starts_with("auth.allowed_origins[1]"));
        let mut c = Config::default();
        c.auth.allowed_origins = vec!["https://app.example.com".into()];
        assert!(
            invalid(c).starts_with("auth.allowed_origins"),
            "open mode serves no browser"
        );
        let mut c = Config::default();
        c.auth.write_keys = vec!["k".into()];
        c.auth.allowed_calls = vec!["track".into(), "delete".into()];
        assert!(invalid(c).starts_with("auth.allowed_calls[1]"));
        let mut c = Config {
            sources: Vec::new(),
            ..Config::default()
        };
        c.sources.push(SourceConfig {
            name: "web".into(),
            write_key: "k-web".into(),
            totango: SettingsPatch::default(),
            allowed_origins: vec!["https://*.example.com".into()],
            allowed_calls: vec!["identify".into(), "track".into()],
            client_requests_per_minute: None,
        });
        let rt = c.clone().validate().unwrap();
        let web = rt.sources.find("k-web").unwrap();
        assert!(web.access.allows_origin("https://shop.example.com"));
        assert!(web.access.allows_call(CallType::Track));
        assert!(!web.access.allows_call(CallType::Group));
        assert_eq!(
            web.access.client_requests_per_minute, BROWSER_REQUESTS_PER_MINUTE,
            "a browser key is rate-limited by default"
        );
        assert!(rt.default_source.access.origins.is_empty());
        assert_eq!(rt.default_source.access.client_requests_per_minute, 0);
        c.sources[0].allowed_origins = vec!["https://*".into()];
        assert!(invalid(c).starts_with("sources[0].allowed_origins[0]"));
    }
}
