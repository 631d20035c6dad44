//! The `[privacy]` section: what a user deletion does, how long payloads
//! are kept by outcome, and event filters and PII rules of every source, of
//! one source by name (`[privacy.sources.NAME]`), and the HMAC secret of
//! `hash` rules. Validated into each [`Source`](super::Source)'s
//! [`Rules`]; docs/privacy.md says what they do.

use super::ConfigError;
use crate::rules::{Filters, Glob, Named, PiiAction, PiiPath, PiiRule, Rules};
use crate::secret::{Scalar, Secret};
use crate::segment::CallType;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Shortest `privacy.hmac_secret` accepted: a short key makes hashed
/// values easy to reverse by trying likely ones.
pub const MIN_HMAC_SECRET_CHARS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// A Segment `delete` also suppresses the user: its later messages are
    /// recorded as `suppressed`, without payload, never delivered, until
    /// the suppression is lifted (`TD_PRIVACY__SUPPRESS_ON_DELETE`).
    #[serde(default)]
    pub suppress_on_delete: bool,
    /// How long a delivered message keeps its payload (and settings,
    /// translated requests, Totango's answer), seconds; 0: as long as the
    /// message is kept (`storage.retention_secs`).
    #[serde(default = "default_delivered_payload")]
    pub delivered_payload_secs: u64,
    /// The same for rejected, duplicate, filtered, unsupported messages.
    #[serde(default = "default_refused_payload")]
    pub refused_payload_secs: u64,
    /// The same for dead messages; a dead message without its payload can
    /// no longer be replayed.
    #[serde(default = "default_dead_payload")]
    pub dead_payload_secs: u64,
    /// Key of the HMAC-SHA256 that `hash` rules put in place of a value;
    /// required when a rule hashes.
    #[serde(default, deserialize_with = "crate::secret::opt_secret")]
    pub hmac_secret: Option<Secret>,
    /// Filters of every source.
    #[serde(default)]
    pub filters: FiltersConfig,
    /// PII rules of every source.
    #[serde(default, deserialize_with = "pii_rules")]
    pub pii: Vec<PiiRuleConfig>,
    /// Rules of one source, by its name (`default`: `auth.write_keys` and
    /// open mode; otherwise a `[[sources]]` name), added to those above.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceRulesConfig>,
}

fn default_delivered_payload() -> u64 {
    24 * 3600
}

fn default_refused_payload() -> u64 {
    3600
}

fn default_dead_payload() -> u64 {
    7 * 24 * 3600
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            suppress_on_delete: false,
            delivered_payload_secs: default_delivered_payload(),
            refused_payload_secs: default_refused_payload(),
            dead_payload_secs: default_dead_payload(),
            hmac_secret: None,
            filters: FiltersConfig::default(),
            pii: Vec::new(),
            sources: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRulesConfig {
    /// This source's own `privacy.suppress_on_delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress_on_delete: Option<bool>,
    #[serde(default)]
    pub filters: FiltersConfig,
    #[serde(default, deserialize_with = "pii_rules")]
    pub pii: Vec<PiiRuleConfig>,
}

/// Allow and deny lists (each a list, or text separated by commas).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FiltersConfig {
    /// Only these calls pass (identify, group, page, screen, track, alias);
    /// empty: every call.
    #[serde(default, deserialize_with = "super::auth::comma_strings")]
    pub allow_calls: Vec<String>,
    /// These calls are filtered.
    #[serde(default, deserialize_with = "super::auth::comma_strings")]
    pub deny_calls: Vec<String>,
    /// Only track events matching one of these patterns pass; empty: every event.
    #[serde(default, deserialize_with = "super::auth::comma_strings")]
    pub allow_events: Vec<String>,
    /// Track events matching one of these patterns are filtered.
    #[serde(default, deserialize_with = "super::auth::comma_strings")]
    pub deny_events: Vec<String>,
}

/// `{ path = "traits.email", action = "hash" }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PiiRuleConfig {
    pub path: String,
    pub action: String,
}

/// A list of `{ path, action }` tables, or text `path=action, path=action`
/// (handy in a `TD_` variable).
fn pii_rules<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PiiRuleConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(Scalar),
        Rules(Vec<PiiRuleConfig>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::Rules(rules) => rules,
        Raw::Text(text) => text
            .0
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                let (path, action) = item.split_once('=').ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "{item:?}: expected path=action (traits.email=hash), or a list of \
                         {{ path, action }} tables"
                    ))
                })?;
                Ok(PiiRuleConfig {
                    path: path.trim().to_owned(),
                    action: action.trim().to_owned(),
                })
            })
            .collect::<Result<_, D::Error>>()?,
    })
}

/// The rules of the source named `name` (`default` for `auth.write_keys`
/// and open mode): `[privacy]`'s, with `[privacy.sources.NAME]`'s added. A
/// source's allow list replaces the global one; its deny lists add to the
/// global ones; its PII rule for a path replaces the global rule for it.
pub(super) fn rules_for(privacy: &PrivacyConfig, name: &str) -> Result<Arc<Rules>, ConfigError> {
    let mut filters = parse_filters("privacy.filters", &privacy.filters)?;
    let mut pii = parse_pii("privacy.pii", &privacy.pii)?;
    if let Some(own) = privacy.sources.get(name) {
        let at = format!("privacy.sources.{name}");
        let mine = parse_filters(&format!("{at}.filters"), &own.filters)?;
        if mine.allow_calls.is_some() {
            filters.allow_calls = mine.allow_calls;
        }
        if mine.allow_events.is_some() {
            filters.allow_events = mine.allow_events;
        }
        filters.deny_calls.extend(mine.deny_calls);
        filters.deny_events.extend(mine.deny_events);
        for rule in parse_pii(&format!("{at}.pii"), &own.pii)? {
            pii.retain(|r| r.path != rule.path);
            pii.push(rule);
        }
    }
    let hashes = pii.iter().find(|r| r.action == PiiAction::Hash);
    let hmac_key = match (hashes, &privacy.hmac_secret) {
        (None, _) => None,
        (Some(rule), None) => {
            return Err(ConfigError::invalid(
                "privacy.hmac_secret",
                format!(
                    "is required: {} hashes {} (set a random value, e.g. `openssl rand -hex 32`)",
                    rule.setting,
                    rule.path.as_str()
                ),
            ));
        }
        (Some(_), Some(key)) => Some(key.clone()),
    };
    let suppress_on_delete = privacy
        .sources
        .get(name)
        .and_then(|own| own.suppress_on_delete)
        .unwrap_or(privacy.suppress_on_delete);
    Ok(Arc::new(Rules {
        filters,
        pii,
        hmac_key,
        suppress_on_delete,
    }))
}

/// Checks what applies to no particular source: the secret's length, and
/// that each `[privacy.sources.NAME]` names a source.
pub(super) fn check(privacy: &PrivacyConfig, names: &[&str]) -> Result<(), ConfigError> {
    if let Some(secret) = &privacy.hmac_secret {
        if secret.expose().chars().count() < MIN_HMAC_SECRET_CHARS {
            return Err(ConfigError::invalid(
                "privacy.hmac_secret",
                format!(
                    "must be at least {MIN_HMAC_SECRET_CHARS} characters (a random value, e.g. \
                     `openssl rand -hex 32`)"
                ),
            ));
        }
    }
    for name in privacy.sources.keys() {
        if !names.contains(&name.as_str()) {
            return Err(ConfigError::invalid(
                format!("privacy.sources.{name}"),
                format!(
                    "no source is named {name:?}: expected \"default\" (auth.write_keys and open \
                     mode) or the name of a [[sources]] entry"
                ),
            ));
        }
    }
    Ok(())
}

fn parse_filters(at: &str, config: &FiltersConfig) -> Result<Filters, ConfigError> {
    let calls = |name: &str, list: &[String]| -> Result<Vec<Named<CallType>>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, c)| {
                let setting = format!("{at}.{name}[{i}]");
                match CallType::parse(c).filter(|c| *c != CallType::Delete) {
                    Some(call) => Ok(Named {
                        setting,
                        value: call,
                    }),
                    None => Err(ConfigError::invalid(
                        setting,
                        format!("{c:?}: expected identify, group, page, screen, track or alias"),
                    )),
                }
            })
            .collect()
    };
    let events = |name: &str, list: &[String]| -> Result<Vec<Named<Glob>>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, p)| {
                let setting = format!("{at}.{name}[{i}]");
                match Glob::parse(p) {
                    Ok(glob) => Ok(Named {
                        setting,
                        value: glob,
                    }),
                    Err(why) => Err(ConfigError::invalid(setting, why)),
                }
            })
            .collect()
    };
    Ok(Filters {
        allow_calls: allow(
            at,
            "allow_calls",
            calls("allow_calls", &config.allow_calls)?,
        ),
        deny_calls: calls("deny_calls", &config.deny_calls)?,
        allow_events: allow(
            at,
            "allow_events",
            events("allow_events", &config.allow_events)?,
        ),
        deny_events: events("deny_events", &config.deny_events)?,
    })
}

/// An allow list as one rule (a filtered message's reason names the list);
/// `None` when empty.
fn allow<T>(at: &str, name: &str, list: Vec<Named<T>>) -> Option<Named<Vec<T>>> {
    (!list.is_empty()).then(|| Named {
        setting: format!("{at}.{name}"),
        value: list.into_iter().map(|n| n.value).collect(),
    })
}

fn parse_pii(at: &str, config: &[PiiRuleConfig]) -> Result<Vec<PiiRule>, ConfigError> {
    let mut rules: Vec<PiiRule> = Vec::with_capacity(config.len());
    for (i, r) in config.iter().enumerate() {
        let setting = format!("{at}[{i}]");
        let path = PiiPath::parse(&r.path).map_err(|why| {
            ConfigError::invalid(format!("{setting}.path"), format!("{:?}: {why}", r.path))
        })?;
        let action = PiiAction::parse(&r.action).ok_or_else(|| {
            ConfigError::invalid(
                format!("{setting}.action"),
                format!("{:?}: expected drop or hash", r.action),
            )
        })?;
        if let Some(earlier) = rules.iter().find(|e| e.path == path) {
            return Err(ConfigError::invalid(
                format!("{setting}.path"),
                format!(
                    "{:?} already has a rule ({}); one rule per path",
                    r.path, earlier.setting
                ),
            ));
        }
        rules.push(PiiRule {
            setting,
            path,
            action,
        });
    }
    Ok(rules)
}

#[cfg(test)]
// figment's Jail closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::super::Config;
    use crate::segment::CallType;
    use figment::Jail;
    use serde_json::json;
    use std::path::Path;

    const SECRET: &str = "a-test-hmac-secret-of-32-chars!!";

    /// The error of a configuration file `toml` with the variables `env`.
    fn invalid(toml: &str, env: &[(&str, &str)]) -> String {
        let mut message = String::new();
        Jail::expect_with(|jail| {
            jail.create_file("td.toml", toml)?;
            for (k, v) in env {
                jail.set_env(k, v);
            }
            message = match Config::load(Some(Path::new("td.toml"))) {
                Err(e) => e.to_string(),
                Ok(c) => c
                    .validate()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            };
            Ok(())
        });
        message
    }

    #[test]
    fn file_rules_apply_to_every_source_and_sources_add_their_own() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "td.toml",
                r#"
                [auth]
                write_keys = ["k-default"]
                [[sources]]
                name = "web"
                write_key = "k-web"
                [privacy]
                hmac_secret = "a-test-hmac-secret-of-32-chars!!"
                filters = { deny_events = ["Debug *"], allow_calls = "identify, track, page" }
                pii = [{ path = "traits.email", action = "hash" }]
                [privacy.sources.web]
                filters = { deny_events = ["Internal*"], allow_calls = ["track"] }
                pii = [{ path = "traits.email", action = "drop" }, { path = "properties.card", action = "drop" }]
                "#,
            )?;
            let rt = Config::load(Some(Path::new("td.toml")))
                .unwrap()
                .validate()
                .unwrap();
            let default = &rt.sources.find("k-default").unwrap().rules;
            assert!(default.filters.check(CallType::Page, None).is_ok());
            assert!(default.filters.check(CallType::Group, None).is_err());
            assert!(
                default
                    .filters
                    .check(CallType::Track, Some("Debug x"))
                    .is_err()
            );
            assert!(
                default
                    .filters
                    .check(CallType::Track, Some("Internal x"))
                    .is_ok()
            );
            let mut m = json!({"type": "identify", "userId": "u", "traits": {"email": "a@b.c"}});
            default.apply(&mut m).unwrap();
            assert_eq!(m["traits"]["email"].as_str().unwrap().len(), 64);

            let web = &rt.sources.find("k-web").unwrap().rules;
            let e = web.filters.check(CallType::Page, None).unwrap_err();
            assert_eq!(
                e.reason,
                "page calls are not in privacy.sources.web.filters.allow_calls"
            );
            let e = web
                .filters
                .check(CallType::Track, Some("Debug x"))
                .unwrap_err();
            assert!(
                e.reason.contains("privacy.filters.deny_events[0]"),
                "{}",
                e.reason
            );
            let e = web
                .filters
                .check(CallType::Track, Some("Internal x"))
                .unwrap_err();
            assert!(
                e.reason
                    .contains("privacy.sources.web.filters.deny_events[0]")
            );
            let mut m = json!({
                "type": "track", "event": "Paid", "userId": "u",
                "properties": {"card": "4111", "n": 1},
                "context": {"traits": {"email": "a@b.c"}},
            });
            web.apply(&mut m).unwrap();
            assert_eq!(m["properties"], json!({"n": 1}));
            assert_eq!(
                m["context"]["traits"],
                json!({}),
                "the source's drop replaces the hash"
            );
            Ok(())
        });
    }

    #[test]
    fn environment_variables_set_rules_in_both_forms() {
        Jail::expect_with(|jail| {
            jail.create_file("td.toml", "")?;
            jail.set_env("TD_PRIVACY__HMAC_SECRET", SECRET);
            jail.set_env("TD_PRIVACY__FILTERS__DENY_EVENTS", "Debug *, Internal*");
            jail.set_env("TD_PRIVACY__FILTERS__DENY_CALLS", "alias");
            jail.set_env("TD_PRIVACY__PII", "traits.email=hash, properties.card=drop");
            let c = Config::load(Some(Path::new("td.toml"))).unwrap();
            assert_eq!(c.privacy.filters.deny_events, ["Debug *", "Internal*"]);
            assert_eq!(c.privacy.pii.len(), 2);
            assert_eq!(c.privacy.pii[1].path, "properties.card");
            assert_eq!(c.privacy.pii[1].action, "drop");
            let rt = c.validate().unwrap();
            let rules = &rt.default_source.rules;
            assert!(rules.filters.check(CallType::Alias, None).is_err());
            assert!(
                rules
                    .filters
                    .check(CallType::Track, Some("Internal"))
                    .is_err()
            );
            assert_eq!(rules.pii.len(), 2);
            jail.set_env(
                "TD_PRIVACY__PII",
                r#"[{path="traits.email",action="hash"}]"#,
            );
            jail.set_env("TD_SOURCES", r#"[{name="web",write_key="k-web"}]"#);
            jail.set_env("TD_PRIVACY__SOURCES__WEB__FILTERS__DENY_CALLS", "page");
            let c = Config::load(Some(Path::new("td.toml"))).unwrap();
            assert_eq!(c.privacy.pii.len(), 1);
            assert_eq!(c.privacy.pii[0].action, "hash");
            let rt = c.validate().unwrap();
            let web = &rt.sources.find("k-web").unwrap().rules;
            assert!(web.filters.check(CallType::Page, None).is_err());
            assert!(
                rt.default_source
                    .rules
                    .filters
                    .check(CallType::Page, None)
                    .is_ok()
            );
            Ok(())
        });
    }

    #[test]
    fn invalid_rules_are_named() {
        let pii = |v: &str| invalid("", &[("TD_PRIVACY__PII", v)]);
        let e = invalid(
            "[privacy]\npii = [{ path = \"traits.email\", action = \"hash\" }]",
            &[],
        );
        assert!(
            e.starts_with("privacy.hmac_secret: is required: privacy.pii[0] hashes"),
            "{e}"
        );
        let e = invalid("", &[("TD_PRIVACY__HMAC_SECRET", "short")]);
        assert!(
            e.starts_with("privacy.hmac_secret: must be at least 16"),
            "{e}"
        );
        let e = pii("email=hash");
        assert!(e.starts_with("privacy.pii[0].path: \"email\""), "{e}");
        let e = pii("traits.email=encrypt");
        assert!(e.starts_with("privacy.pii[0].action: \"encrypt\""), "{e}");
        let e = pii("traits.email=drop,traits.email=drop");
        assert!(e.starts_with("privacy.pii[1].path"), "{e}");
        let e = pii("traits.email");
        assert!(e.starts_with("privacy.pii"), "{e}");
        let e = invalid(
            "",
            &[("TD_PRIVACY__FILTERS__ALLOW_CALLS", "identify,delete")],
        );
        assert!(
            e.starts_with("privacy.filters.allow_calls[1]: \"delete\""),
            "{e}"
        );
        let e = invalid("[privacy.filters]\ndeny_events = [\"ok\", \"\"]", &[]);
        assert!(e.starts_with("privacy.filters.deny_events[1]"), "{e}");
        let e = invalid(
            "[privacy.sources.nowhere]\nfilters = { deny_calls = [\"page\"] }",
            &[],
        );
        assert!(
            e.starts_with("privacy.sources.nowhere: no source is named"),
            "{e}"
        );
        let e = invalid(
            "[[sources]]\nname = \"web\"\nwrite_key = \"k\"\n\
             [privacy.sources.web]\nfilters = { deny_calls = [\"pages\"] }",
            &[],
        );
        assert!(
            e.starts_with("privacy.sources.web.filters.deny_calls[0]: \"pages\""),
            "{e}"
        );
        let e = invalid("[privacy.filters]\ndeny_event = [\"x\"]", &[]);
        assert!(e.contains("deny_event"), "unknown keys are an error: {e}");
    }

    #[test]
    fn the_secret_is_redacted() {
        Jail::expect_with(|jail| {
            jail.set_env("TD_PRIVACY__HMAC_SECRET", SECRET);
            jail.set_env("TD_PRIVACY__PII", "traits.email=hash");
            let c = Config::load(None).unwrap();
            let text = c.clone().validate().unwrap().config.redacted_toml();
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains("hmac_secret = \"[redacted]\""), "{text}");
            assert!(text.contains("traits.email"), "{text}");
            Ok(())
        });
    }
}
