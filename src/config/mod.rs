//! Typed configuration: defaults → TOML file → `TD_` environment variables
//! (nesting with `__`), validated at start with messages that name the setting.

mod delivery;
pub mod insights;
mod limits;
mod storage;

pub use delivery::DeliveryConfig;
pub use limits::LimitsConfig;
use limits::{
    default_batch_body, default_inflight, default_prefix_v4, default_prefix_v6,
    default_uncredentialed_grace,
};
pub use storage::{StorageConfig, StorageUrl, parse_storage_url, redact_storage_url};

use crate::mapping::{Settings, SettingsError, SettingsPatch};
use crate::secret::{Scalar, Secret};
use crate::segment::CallType;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    pub storage: StorageConfig,
    /// Default Totango settings (mapping.md), used by write keys without their own.
    pub totango: SettingsPatch,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub delivery: DeliveryConfig,
    pub limits: LimitsConfig,
    /// Extra write keys, each with its own Totango settings (one server, several services).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Account insights: Totango → Salesforce, and the widget.
    #[serde(default)]
    pub insights: insights::InsightsConfig,
}

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

/// Shortest `admin.token` accepted.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 12;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token for the admin API and the operator page. Unset: one is
    /// generated at first start and kept in `token_file`.
    #[serde(default, deserialize_with = "crate::secret::opt_secret")]
    pub token: Option<Secret>,
    /// Where the generated token is kept; default `admin-token` beside the
    /// SQLite database (`data/admin-token` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
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

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            storage: StorageConfig {
                url: "sqlite://data/totango-destination.db".into(),
                dedupe_window_secs: 24 * 3600,
                retention_secs: 7 * 24 * 3600,
                refused_retention_secs: 24 * 3600,
                max_backlog_messages: 2_000_000,
                max_backlog_bytes: 2 * 1024 * 1024 * 1024,
                max_refused_bytes: 256 * 1024 * 1024,
                min_free_disk_bytes: 512 * 1024 * 1024,
                lease_secs: 600,
                heartbeat_secs: 3,
                replica_timeout_secs: 15,
                pool_size: 8,
            },
            totango: SettingsPatch::default(),
            auth: AuthConfig::default(),
            admin: AdminConfig::default(),
            delivery: DeliveryConfig {
                retry_base_ms: 1_000,
                retry_max_ms: 300_000,
                max_retry_age_secs: 4 * 3600,
                concurrency: 64,
                min_concurrency: 4,
                max_concurrency: 1024,
                request_timeout_ms: 10_000,
            },
            limits: LimitsConfig {
                max_message_bytes: 32 * 1024,
                max_body_bytes: 500 * 1024,
                max_batch_body_bytes: default_batch_body(),
                max_request_stored_bytes: 8 * 1024 * 1024,
                max_batch_messages: 2_500,
                header_read_timeout_ms: 10_000,
                body_read_timeout_ms: 30_000,
                min_body_bytes_per_sec: 16 * 1024,
                max_connections: 1_024,
                max_connections_per_client: 256,
                client_prefix_v4: default_prefix_v4(),
                client_prefix_v6: default_prefix_v6(),
                max_inflight_body_bytes: default_inflight(),
                uncredentialed_body_grace_ms: default_uncredentialed_grace(),
            },
            sources: Vec::new(),
            insights: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(String),
    #[error("{setting}: {reason}")]
    Invalid { setting: String, reason: String },
}

impl ConfigError {
    fn invalid(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// Validated, ready-to-use configuration.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub config: Config,
    pub listen: SocketAddr,
    pub storage: StorageUrl,
    /// Write keys and their sources. Empty means "accept any key" (open).
    pub sources: Sources,
    /// Settings for requests without a configured key (open mode, unsigned webhooks).
    pub default_source: Source,
}

impl Runtime {
    /// The settings of the source named `name` (as configured now) with a
    /// request's own overrides applied. Unknown names get the defaults.
    pub fn settings_for(
        &self,
        name: &str,
        overrides: &SettingsPatch,
    ) -> Result<Settings, SettingsError> {
        let base = self
            .sources
            .values()
            .find(|s| s.name == name)
            .unwrap_or(&self.default_source);
        base.settings.merged(overrides).resolve()
    }

    /// Warnings about configured settings that are accepted but look wrong
    /// (a service ID outside Totango's usual pattern), once per source.
    pub fn settings_warnings(&self) -> Vec<String> {
        let mut sources: Vec<&Source> = vec![&self.default_source];
        sources.extend(self.sources.values());
        let mut out: Vec<String> = Vec::new();
        for s in sources {
            if let Ok(settings) = s.settings.resolve() {
                for w in settings.warnings() {
                    let w = format!("source {:?}: {w}", s.name);
                    if !out.contains(&w) {
                        out.push(w);
                    }
                }
            }
        }
        out
    }
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
    pub access: Access,
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

impl Config {
    /// Loads defaults, then the TOML file (when given), then `TD_` variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError::Load(format!(
                    "--config: {} does not exist",
                    p.display()
                )));
            }
            fig = fig.merge(Toml::file(p));
        }
        // TD_LOG_FORMAT and the like belong to telemetry, not here.
        // TD_LOG_FORMAT belongs to telemetry; TD_KEEP_SCREENSHOT to a test.
        let env = Env::prefixed("TD_")
            .split("__")
            .ignore(&["LOG_FORMAT", "KEEP_SCREENSHOT"]);
        fig.merge(env).extract().map_err(|e| {
            let setting = e.path.join(".");
            let reason = e.kind.to_string();
            if setting.is_empty() {
                ConfigError::Load(e.to_string())
            } else {
                ConfigError::Invalid { setting, reason }
            }
        })
    }

    /// Checks every setting and builds the runtime view.
    pub fn validate(self) -> Result<Runtime, ConfigError> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:8080", self.listen),
            )
        })?;
        let storage = parse_storage_url(&self.storage.url)?;
        if let Some(t) = &self.admin.token {
            if t.expose().chars().count() < MIN_ADMIN_TOKEN_CHARS {
                return Err(ConfigError::invalid(
                    "admin.token",
                    format!(
                        "must be at least {MIN_ADMIN_TOKEN_CHARS} characters (a random value, \
                         e.g. `openssl rand -hex 32`)"
                    ),
                ));
            }
        }
        let d = &self.delivery;
        if d.retry_base_ms == 0 {
            return Err(ConfigError::invalid(
                "delivery.retry_base_ms",
                "must be at least 1",
            ));
        }
        if d.retry_max_ms < d.retry_base_ms {
            return Err(ConfigError::invalid(
                "delivery.retry_max_ms",
                "must be at least delivery.retry_base_ms",
            ));
        }
        if d.max_concurrency == 0 || d.max_concurrency > 10_000 {
            return Err(ConfigError::invalid(
                "delivery.max_concurrency",
                "must be between 1 and 10000",
            ));
        }
        if d.min_concurrency == 0 || d.min_concurrency > d.max_concurrency {
            return Err(ConfigError::invalid(
                "delivery.min_concurrency",
                format!(
                    "must be between 1 and delivery.max_concurrency ({})",
                    d.max_concurrency
                ),
            ));
        }
        if d.concurrency < d.min_concurrency || d.concurrency > d.max_concurrency {
            return Err(ConfigError::invalid(
                "delivery.concurrency",
                format!(
                    "must be between delivery.min_concurrency ({}) and delivery.max_concurrency ({}); \
                     it is the starting point of the adaptive concurrency",
                    d.min_concurrency, d.max_concurrency
                ),
            ));
        }
        if d.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "delivery.request_timeout_ms",
                "must be at least 1",
            ));
        }
        // A lease must outlive one delivery (a few requests, each up to the
        // timeout), or a slow but live delivery loses its message to another.
        let min_lease = d.request_timeout_ms.saturating_mul(3).div_ceil(1000).max(1);
        if self.storage.lease_secs < min_lease {
            return Err(ConfigError::invalid(
                "storage.lease_secs",
                format!(
                    "must be at least {min_lease} (three times delivery.request_timeout_ms, in seconds)"
                ),
            ));
        }
        if self.storage.heartbeat_secs == 0 {
            return Err(ConfigError::invalid(
                "storage.heartbeat_secs",
                "must be at least 1",
            ));
        }
        // Three missed heartbeats before a replica is judged gone, so one slow
        // write does not cost a live replica its work.
        let min_timeout = self.storage.heartbeat_secs.saturating_mul(3);
        if self.storage.replica_timeout_secs < min_timeout {
            return Err(ConfigError::invalid(
                "storage.replica_timeout_secs",
                format!("must be at least {min_timeout} (three times storage.heartbeat_secs)"),
            ));
        }
        if !(1..=1000).contains(&self.storage.pool_size) {
            return Err(ConfigError::invalid(
                "storage.pool_size",
                "must be between 1 and 1000",
            ));
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_batch_body_bytes", l.max_batch_body_bytes),
            (
                "limits.max_request_stored_bytes",
                l.max_request_stored_bytes,
            ),
            ("limits.max_batch_messages", l.max_batch_messages),
            ("limits.max_connections", l.max_connections),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(name, "must be at least 1"));
            }
        }
        if l.max_request_stored_bytes < l.max_batch_body_bytes {
            return Err(ConfigError::invalid(
                "limits.max_request_stored_bytes",
                format!(
                    "must be at least limits.max_batch_body_bytes ({}), or a full batch \
                     could not be stored",
                    l.max_batch_body_bytes
                ),
            ));
        }
        let largest_body = l.max_body_bytes.max(l.max_batch_body_bytes);
        if l.max_inflight_body_bytes < largest_body {
            return Err(ConfigError::invalid(
                "limits.max_inflight_body_bytes",
                format!(
                    "must be at least limits.max_body_bytes and limits.max_batch_body_bytes \
                     ({largest_body}), or no full body could be read"
                ),
            ));
        }
        if !(1..=32).contains(&l.client_prefix_v4) {
            return Err(ConfigError::invalid(
                "limits.client_prefix_v4",
                "must be between 1 and 32 (bits of an IPv4 address)",
            ));
        }
        if !(1..=128).contains(&l.client_prefix_v6) {
            return Err(ConfigError::invalid(
                "limits.client_prefix_v6",
                "must be between 1 and 128 (bits of an IPv6 address)",
            ));
        }
        if l.uncredentialed_body_grace_ms == 0 {
            return Err(ConfigError::invalid(
                "limits.uncredentialed_body_grace_ms",
                "must be at least 1 (limits.body_read_timeout_ms caps it)",
            ));
        }
        for (i, host) in self.auth.allowed_hosts.iter().enumerate() {
            if let Err(why) = check_allowed_host(host) {
                return Err(ConfigError::invalid(
                    format!("auth.allowed_hosts[{i}]"),
                    format!("{host:?}: {why}"),
                ));
            }
        }
        let check = |setting: &str, patch: &SettingsPatch| -> Result<Settings, ConfigError> {
            patch
                .resolve()
                .map_err(|SettingsError { setting: s, reason }| {
                    ConfigError::invalid(format!("{setting}.{s}"), reason)
                })
        };
        let mut sources = Sources::default();
        let a = &self.auth;
        let default_source = Source {
            name: "default".into(),
            settings: self.totango.clone(),
            access: Access::parse(
                "auth",
                &a.allowed_origins,
                &a.allowed_calls,
                a.client_requests_per_minute,
            )?,
        };
        if !a.allowed_origins.is_empty() && a.write_keys.is_empty() {
            // Open mode keeps refusing every cross-site browser request.
            return Err(ConfigError::invalid(
                "auth.allowed_origins",
                "applies to auth.write_keys, and none is set: a browser source needs a write key",
            ));
        }
        for key in &self.auth.write_keys {
            if key.is_empty() {
                return Err(ConfigError::invalid(
                    "auth.write_keys",
                    "holds an empty key",
                ));
            }
            sources.insert(key, default_source.clone());
        }
        if !self.auth.write_keys.is_empty() && self.totango.service_id.is_none() {
            // Keys with default settings need a service ID, unless Segment sends it
            // in X-Segment-Settings; checked per request then.
            tracing::warn!(
                "totango.service_id is not set: messages need a serviceId in X-Segment-Settings"
            );
        }
        if self.totango.service_id.is_some() {
            check("totango", &self.totango)?;
        }
        let mut names = std::collections::HashSet::from(["default"]);
        for (i, s) in self.sources.iter().enumerate() {
            let merged = self.totango.merged(&s.totango);
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
                check(&format!("{at}.totango"), &merged)?;
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
                    settings: merged,
                    access,
                },
            );
            if !fresh {
                return Err(ConfigError::invalid(
                    format!("{at}.write_key"),
                    "is configured twice",
                ));
            }
        }
        insights::validate(&self)?;
        if sources.is_empty() && !listen.ip().is_loopback() && !self.auth.allow_open {
            return Err(ConfigError::invalid(
                "auth.write_keys",
                format!(
                    "no write key is configured and {listen} is not a loopback address; \
                     set TD_AUTH__WRITE_KEYS, or TD_AUTH__ALLOW_OPEN=true to accept any key"
                ),
            ));
        }
        Ok(Runtime {
            config: self,
            listen,
            storage,
            sources,
            default_source,
        })
    }

    /// The configuration as TOML. Secrets are a type that serialises as
    /// `[redacted]`, and endpoint URLs lose their credentials.
    pub fn redacted_toml(&self) -> String {
        toml_string(self)
    }
}

fn toml_string(c: &Config) -> String {
    toml::to_string(c).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
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
fn comma_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
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
// figment's Jail closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_match_the_spec() {
        Jail::expect_with(|_| {
            let c = Config::load(None).unwrap();
            assert_eq!(c.listen, "127.0.0.1:8080");
            assert_eq!(c.storage.url, "sqlite://data/totango-destination.db");
            assert_eq!(
                (
                    c.delivery.retry_base_ms,
                    c.delivery.retry_max_ms,
                    c.delivery.max_retry_age_secs
                ),
                (1000, 300_000, 14_400)
            );
            assert_eq!(c.delivery.concurrency, 64);
            assert_eq!(c.delivery.min_concurrency, 4);
            assert_eq!(c.delivery.max_concurrency, 1024);
            assert_eq!(c.limits.max_message_bytes, 32 * 1024);
            assert_eq!(c.limits.max_body_bytes, 500 * 1024);
            assert_eq!(c.limits.max_batch_body_bytes, 4 * 1024 * 1024);
            assert_eq!(c.limits.max_batch_messages, 2500);
            let rt = c.validate().unwrap();
            assert!(rt.sources.is_empty());
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "td.toml",
                r#"
                listen = "127.0.0.1:9000"
                [totango]
                service_id = "SP-1111-01"
                default_module = "Core"
                [[sources]]
                name = "eu-app"
                write_key = "k-eu"
                totango = { service_id = "SP-2222-02", region = "eu" }
                "#,
            )?;
            jail.set_env("TD_TOTANGO__SERVICE_ID", "SP-3126-05");
            jail.set_env("TD_AUTH__WRITE_KEYS", "a, 123 ,b");
            jail.set_env("TD_DELIVERY__RETRY_BASE_MS", "50");
            jail.set_env("TD_TOTANGO__TRACK_NAMED_PAGES", "false");
            jail.set_env("TD_LOG_FORMAT", "json");
            let c = Config::load(Some(Path::new("td.toml"))).unwrap();
            assert_eq!(c.listen, "127.0.0.1:9000");
            assert_eq!(c.totango.service_id.as_deref(), Some("SP-3126-05"));
            assert_eq!(c.totango.default_module.as_deref(), Some("Core"));
            assert_eq!(c.totango.track_named_pages, Some(false));
            let keys: Vec<&str> = c.auth.write_keys.iter().map(Secret::expose).collect();
            assert_eq!(keys, ["a", "123", "b"]);
            assert_eq!(c.delivery.retry_base_ms, 50);
            let rt = c.validate().unwrap();
            assert_eq!(rt.sources.len(), 4);
            let eu = rt.sources.find("k-eu").unwrap();
            assert_eq!(eu.name, "eu-app");
            let eu = eu.settings.resolve().unwrap();
            assert_eq!(eu.service_id, "SP-2222-02");
            assert_eq!(eu.default_module, "Core", "inherits the defaults");
            assert_eq!(
                rt.sources
                    .find("123")
                    .unwrap()
                    .settings
                    .resolve()
                    .unwrap()
                    .service_id,
                "SP-3126-05"
            );
            Ok(())
        });
    }

    #[test]
    fn invalid_settings_are_named() {
        Jail::expect_with(|jail| {
            jail.set_env("TD_DELIVERY__CONCURRENCY", "many");
            let e = Config::load(None).unwrap_err();
            assert!(e.to_string().starts_with("delivery.concurrency"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_DELIVERY__MIN_CONCURRENCY", "8");
            jail.set_env("TD_DELIVERY__CONCURRENCY", "4");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with("delivery.concurrency"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_DELIVERY__MAX_CONCURRENCY", "0");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with("delivery.max_concurrency"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_TOTANGO__REGION", "mars");
            jail.set_env("TD_TOTANGO__SERVICE_ID", "SP-1234-01");
            let e = Config::load(None).unwrap_err();
            assert!(e.to_string().starts_with("totango.region"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_STORAGE__URL", "mysql://x");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with("storage.url"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_TOTANGO__SERVICE_ID", "SP-1234-01");
            jail.set_env("TD_TOTANGO__ENDPOINT", "not a url");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with("totango.endpoint"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_LISTEN", "nowhere");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with("listen"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_STORAGE__HEARTBEAT_SECS", "0");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with("storage.heartbeat_secs"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_STORAGE__HEARTBEAT_SECS", "5");
            jail.set_env("TD_STORAGE__REPLICA_TIMEOUT_SECS", "14");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(
                e.to_string().starts_with("storage.replica_timeout_secs")
                    && e.to_string().contains("at least 15"),
                "{e}"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TD_STORAGE__HEARTBEAT_SECS", "1");
            jail.set_env("TD_STORAGE__REPLICA_TIMEOUT_SECS", "3");
            let config = Config::load(None).unwrap();
            assert_eq!(
                (
                    config.storage.heartbeat_secs,
                    config.storage.replica_timeout_secs
                ),
                (1, 3)
            );
            config.validate().unwrap();
            Ok(())
        });
    }

    #[test]
    fn refuses_to_start_open_on_a_public_address() {
        Jail::expect_with(|jail| {
            jail.set_env("TD_LISTEN", "0.0.0.0:8080");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with("auth.write_keys"), "{e}");
            jail.set_env("TD_AUTH__ALLOW_OPEN", "true");
            assert!(Config::load(None).unwrap().validate().is_ok());
            jail.set_env("TD_AUTH__ALLOW_OPEN", "false");
            jail.set_env("TD_AUTH__WRITE_KEYS", "k1");
            assert!(Config::load(None).unwrap().validate().is_ok());
            Ok(())
        });
    }

    #[test]
    fn redaction_hides_every_secret() {
        Jail::expect_with(|jail| {
            jail.set_env("TD_TOTANGO__API_TOKEN", "tok-secret");
            jail.set_env("TD_AUTH__WRITE_KEYS", "key-secret");
            jail.set_env("TD_AUTH__WEBHOOK_SECRET", "hook-secret");
            jail.set_env("TD_ADMIN__TOKEN", "admin-secret");
            let text = Config::load(None).unwrap().redacted_toml();
            for secret in ["tok-secret", "key-secret", "hook-secret", "admin-secret"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("[redacted]"));
            assert!(text.contains("listen = \"127.0.0.1:8080\""), "{text}");
            Ok(())
        });
    }
}

#[cfg(test)]
mod transport_settings {
    use super::*;

    #[test]
    fn allowed_hosts_and_limits_are_validated_naming_the_setting() {
        let invalid = |c: Config| {
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mut c = Config::default();
        c.auth.allowed_hosts = vec!["td.internal".into(), "http://td.example/".into()];
        assert!(invalid(c).starts_with("auth.allowed_hosts[1]"));
        let mut c = Config::default();
        c.auth.allowed_hosts = vec!["td.internal:8080".into(), "[::1]:9".into()];
        assert!(c.validate().is_ok());
        let mut c = Config::default();
        c.limits.max_inflight_body_bytes = c.limits.max_body_bytes - 1;
        assert!(invalid(c).starts_with("limits.max_inflight_body_bytes"));
        let mut c = Config::default();
        c.limits.max_inflight_body_bytes = c.limits.max_batch_body_bytes - 1;
        assert!(invalid(c).starts_with("limits.max_inflight_body_bytes"));
        let mut c = Config::default();
        c.limits.max_batch_body_bytes = 0;
        assert!(invalid(c).starts_with("limits.max_batch_body_bytes"));
        let mut c = Config::default();
        c.limits.client_prefix_v6 = 129;
        assert!(invalid(c).starts_with("limits.client_prefix_v6"));
        let mut c = Config::default();
        c.limits.client_prefix_v4 = 0;
        assert!(invalid(c).starts_with("limits.client_prefix_v4"));
        let mut c = Config::default();
        c.limits.uncredentialed_body_grace_ms = 0;
        assert!(invalid(c).starts_with("limits.uncredentialed_body_grace_ms"));
    }
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
