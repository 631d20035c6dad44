//! A source's privacy rules (docs/privacy.md), applied to each message at
//! ingest before it is translated or stored: event filters (allow or deny by
//! call type and event name) and PII rules (drop, or replace by its
//! HMAC-SHA256, a named trait or property). Pure functions of the message:
//! `config` builds the rules and names their settings, `ingest` and the
//! `translate` command apply them.

#[cfg(test)]
mod tests;

use crate::secret::Secret;
use crate::segment::CallType;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

/// Every rule of one source. The default (no rule) lets every message
/// through unchanged.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub filters: Filters,
    pub pii: Vec<PiiRule>,
    /// The HMAC key of `hash` rules (`privacy.hmac_secret`); set whenever a
    /// rule hashes.
    pub hmac_key: Option<Secret>,
    /// A `delete` from this source also suppresses the user
    /// (`privacy.suppress_on_delete`, or the source's own).
    pub suppress_on_delete: bool,
}

/// A message the filters keep out: the setting of the rule and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub reason: String,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty() && self.pii.is_empty()
    }

    /// Applies the PII rules to `message` (any JSON: a message that is not
    /// valid Segment is still stored as `rejected`, so it is rewritten too),
    /// then the filters. `Err`: the message is filtered out.
    pub fn apply(&self, message: &mut Value) -> Result<(), Denied> {
        for rule in &self.pii {
            rule.apply(message, self.hmac_key.as_ref());
        }
        let call = message
            .get("type")
            .and_then(Value::as_str)
            .and_then(CallType::parse);
        let Some(call) = call else {
            // Not a call: left to validation, which rejects it.
            return Ok(());
        };
        let event = match call {
            CallType::Track => message.get("event").and_then(Value::as_str),
            _ => None,
        };
        self.filters.check(call, event)
    }
}

/// A setting's value with the name of the setting it came from
/// (`privacy.filters.deny_events[1]`), which a filtered message's reason names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named<T> {
    pub setting: String,
    pub value: T,
}

/// Allow and deny lists. A message passes when its call is in `allow_calls`
/// (if set) and not in `deny_calls`, and, for a track call, its event
/// matches `allow_events` (if set) and no `deny_events` pattern.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub allow_calls: Option<Named<Vec<CallType>>>,
    pub deny_calls: Vec<Named<CallType>>,
    pub allow_events: Option<Named<Vec<Glob>>>,
    pub deny_events: Vec<Named<Glob>>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.allow_calls.is_none()
            && self.deny_calls.is_empty()
            && self.allow_events.is_none()
            && self.deny_events.is_empty()
    }

    /// Whether a `call` (with its track `event`) passes.
    pub fn check(&self, call: CallType, event: Option<&str>) -> Result<(), Denied> {
        if let Some(allow) = &self.allow_calls {
            if !allow.value.contains(&call) {
                return Err(Denied {
                    reason: format!("{} calls are not in {}", call.as_str(), allow.setting),
                });
            }
        }
        if let Some(deny) = self.deny_calls.iter().find(|d| d.value == call) {
            return Err(Denied {
                reason: format!("{} calls are denied by {}", call.as_str(), deny.setting),
            });
        }
        if call != CallType::Track {
            return Ok(());
        }
        // A track call without an event is left to validation (rejected).
        let Some(event) = event else {
            return Ok(());
        };
        if let Some(allow) = &self.allow_events {
            if !allow.value.iter().any(|g| g.matches(event)) {
                return Err(Denied {
                    reason: format!("event {event:?} matches no pattern of {}", allow.setting),
                });
            }
        }
        if let Some(deny) = self.deny_events.iter().find(|d| d.value.matches(event)) {
            return Err(Denied {
                reason: format!(
                    "event {event:?} is denied by {} ({:?})",
                    deny.setting,
                    deny.value.as_str()
                ),
            });
        }
        Ok(())
    }
}

/// An event name pattern: `*` stands for any run of characters (none
/// included), `?` for one character; everything else matches itself, case
/// included. A pattern without `*` or `?` is an exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn parse(pattern: &str) -> Result<Glob, &'static str> {
        if pattern.is_empty() {
            return Err("an empty pattern matches nothing; remove it");
        }
        Ok(Glob(pattern.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, text: &str) -> bool {
        let pattern: Vec<char> = self.0.chars().collect();
        let text: Vec<char> = text.chars().collect();
        // Iterative matching with one backtrack point (the latest `*`):
        // linear in practice, never exponential.
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pattern.get(p) {
                Some('*') => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(&c) if c == '?' || c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|c| *c == '*')
    }
}

/// What a PII rule does to the value at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiAction {
    /// Removes the key.
    Drop,
    /// Replaces the value by the lowercase hex HMAC-SHA256 of it under
    /// `privacy.hmac_secret` (see [`hash_value`]).
    Hash,
}

impl PiiAction {
    pub fn parse(text: &str) -> Option<PiiAction> {
        match text {
            "drop" => Some(PiiAction::Drop),
            "hash" => Some(PiiAction::Hash),
            _ => None,
        }
    }
}

/// Where a rule's path starts: the object Segment puts such values in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// `traits` (identify, group) and `context.traits` (any call).
    Traits,
    /// `properties` (track, page, screen).
    Properties,
}

/// A dotted path such as `traits.email` or `properties.address.street`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiiPath {
    root: Root,
    keys: Vec<String>,
    text: String,
}

impl PiiPath {
    pub fn parse(text: &str) -> Result<PiiPath, &'static str> {
        let mut parts = text.split('.');
        let root = match parts.next() {
            Some("traits") => Root::Traits,
            Some("properties") => Root::Properties,
            _ => {
                return Err(
                    "expected a dotted path starting with traits. or properties. (traits.email, \
                     properties.address.street)",
                );
            }
        };
        let keys: Vec<String> = parts.map(str::to_owned).collect();
        if keys.is_empty() || keys.iter().any(String::is_empty) {
            return Err(
                "expected key names after traits. or properties., separated by single dots",
            );
        }
        Ok(PiiPath {
            root,
            keys,
            text: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// One PII rule: `action` on the value at `path`.
#[derive(Debug, Clone)]
pub struct PiiRule {
    /// The rule's setting (`privacy.pii[0]`).
    pub setting: String,
    pub path: PiiPath,
    pub action: PiiAction,
}

impl PiiRule {
    fn apply(&self, message: &mut Value, key: Option<&Secret>) {
        let objects: &[&[&str]] = match self.path.root {
            Root::Traits => &[&["traits"], &["context", "traits"]],
            Root::Properties => &[&["properties"]],
        };
        for at in objects {
            let Some(object) = object_at(message, at) else {
                continue;
            };
            let (last, parents) = self.path.keys.split_last().expect("a path has keys");
            let Some(parent) = parents
                .iter()
                .try_fold(object, |o, k| o.get_mut(k).and_then(Value::as_object_mut))
            else {
                continue;
            };
            match self.action {
                PiiAction::Drop => {
                    parent.shift_remove(last);
                }
                PiiAction::Hash => {
                    let key =
                        key.expect("validated: privacy.hmac_secret is set when a rule hashes");
                    if let Some(value) = parent.get_mut(last) {
                        if let Some(hex) = hash_value(key, value) {
                            *value = Value::String(hex);
                        }
                    }
                }
            }
        }
    }
}

/// The object at `path` in `message`, if each step is an object.
fn object_at<'a>(message: &'a mut Value, path: &[&str]) -> Option<&'a mut Map<String, Value>> {
    path.iter()
        .try_fold(message, |v, k| v.get_mut(*k))?
        .as_object_mut()
}

/// What a `hash` rule puts in place of `value`: the lowercase hex
/// HMAC-SHA256, under `key`, of a string's UTF-8 text, or of the compact JSON
/// text of a number, boolean, array or object (`42`, `true`, `["a"]`);
/// `None` for `null`, which is left as it is.
pub fn hash_value(key: &Secret, value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(hmac_hex(key, text.as_bytes()))
}

/// Lowercase hex HMAC-SHA256 of `bytes` under `key`.
pub fn hmac_hex(key: &Secret, bytes: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()).expect("HMAC takes any key length");
    mac.update(bytes);
    hex::encode(mac.finalize().into_bytes())
}
