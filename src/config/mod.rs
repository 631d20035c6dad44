//! Typed configuration: defaults → TOML file → `TD_` environment variables
//! (nesting with `__`), validated at start with messages that name the setting.

mod auth;
mod delivery;
pub mod insights;
mod limits;
mod privacy;
mod storage;

pub use auth::{
    Access, AuthConfig, BROWSER_REQUESTS_PER_MINUTE, OriginPattern, Source, SourceConfig, Sources,
};
pub use delivery::DeliveryConfig;
pub use limits::LimitsConfig;
use limits::{
    default_batch_body, default_inflight, default_prefix_v4, default_prefix_v6,
    default_uncredentialed_grace,
};
pub use privacy::{
    FiltersConfig, MIN_HMAC_SECRET_CHARS, PiiRuleConfig, PrivacyConfig, SourceRulesConfig,
};
pub use storage::{StorageConfig, StorageUrl, parse_storage_url, redact_storage_url};

use crate::mapping::{Settings, SettingsError, SettingsPatch};
use crate::secret::Secret;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
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
    /// User deletion, payload retention, event filters, PII rules and
    /// their HMAC secret (docs/privacy.md).
    #[serde(default)]
    pub privacy: PrivacyConfig,
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
                history_retention_secs: 8 * 24 * 3600,
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
                max_concurrency: 2048,
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
            privacy: PrivacyConfig::default(),
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
    /// The source named `name` (`default`: `auth.write_keys` and open mode).
    pub fn source_named(&self, name: &str) -> Option<&Source> {
        if name == self.default_source.name {
            return Some(&self.default_source);
        }
        self.sources.values().find(|s| s.name == name)
    }

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
        base.settings_with(overrides)
            .map(std::borrow::Cow::into_owned)
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
        if self.storage.history_retention_secs < storage::MIN_HISTORY_RETENTION_SECS {
            return Err(ConfigError::invalid(
                "storage.history_retention_secs",
                format!(
                    "must be at least {} (an hour: the operator page's shortest chart)",
                    storage::MIN_HISTORY_RETENTION_SECS
                ),
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
        let (sources, default_source) = auth::sources(&self)?;
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
            assert_eq!(c.delivery.max_concurrency, 2048);
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
            jail.set_env("TD_STORAGE__HISTORY_RETENTION_SECS", "60");
            let e = Config::load(None).unwrap().validate().unwrap_err();
            assert!(
                e.to_string().starts_with("storage.history_retention_secs"),
                "{e}"
            );
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
