//! The Segment → Totango mapping of `spec/mapping.md`: a pure function from a
//! message, its settings and the user's latest page category to one outcome.
//!
//! No I/O and no hidden state: the server supplies the remembered page category.

pub mod limits;
mod sent;
mod settings;
pub mod values;

pub use limits::{Breach, LimitMode, LimitRule};
pub use sent::Sets;
pub use settings::{Region, Settings, SettingsError, SettingsPatch};

use crate::segment::{CallType, Message, ParseError, scalar_text};
use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{Map, Value};
use values::{flatten_into, normalise_create_date, scalar_or_array_text};

/// Longest account or user ID Totango accepts, in bytes.
pub const MAX_ID_BYTES: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Send,
    Filtered,
    Unsupported,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Send => "send",
            Outcome::Filtered => "filtered",
            Outcome::Unsupported => "unsupported",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Searchable reason codes for outcomes other than `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    IntegrationDisabled,
    NoPageActivity,
    UnsupportedCall,
    MissingGroupId,
    MissingUserId,
    MissingEvent,
    InvalidId,
    InvalidField,
    MissingType,
    UnknownType,
    InvalidMessage,
    /// A filter of the source's privacy rules keeps the message out.
    FilteredByRule,
    /// A breach of one of Totango's limits, with `on_limit_breach = "reject"`.
    LimitAccountText,
    LimitUserText,
    LimitAccountName,
    LimitNumber,
    LimitDate,
    LimitAccountId,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::IntegrationDisabled => "integration_disabled",
            Code::NoPageActivity => "no_page_activity",
            Code::UnsupportedCall => "unsupported_call",
            Code::MissingGroupId => "missing_group_id",
            Code::MissingUserId => "missing_user_id",
            Code::MissingEvent => "missing_event",
            Code::InvalidId => "invalid_id",
            Code::InvalidField => "invalid_field",
            Code::MissingType => "missing_type",
            Code::UnknownType => "unknown_type",
            Code::InvalidMessage => "invalid_message",
            Code::FilteredByRule => "filtered_by_rule",
            Code::LimitAccountText => "limit_account_text",
            Code::LimitUserText => "limit_user_text",
            Code::LimitAccountName => "limit_account_name",
            Code::LimitNumber => "limit_number",
            Code::LimitDate => "limit_date",
            Code::LimitAccountId => "limit_account_id",
        }
    }
}

/// One Totango pixel request: its parameters in sending order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TotangoRequest {
    pub params: IndexMap<String, String>,
}

impl TotangoRequest {
    /// `application/x-www-form-urlencoded` query (space → `+`).
    pub fn query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.params.iter())
            .finish()
    }

    /// `{base}/pixel.gif/`, the path every request goes to.
    pub fn pixel_url(base_url: &str) -> String {
        format!("{}/pixel.gif/", base_url.trim_end_matches('/'))
    }

    /// The full URL to GET.
    pub fn url(&self, base_url: &str) -> String {
        format!("{}?{}", Self::pixel_url(base_url), self.query())
    }
}

/// The result of translating one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub outcome: Outcome,
    pub code: Option<Code>,
    pub message: Option<String>,
    pub warnings: Vec<String>,
    pub requests: Vec<TotangoRequest>,
    /// The rule of each breach of Totango's limits, whatever the mode
    /// (counted at ingest); their warnings are in `warnings`.
    pub breaches: Vec<LimitRule>,
}

impl Translation {
    /// The `translate` command's output (http-api.md), one JSON object.
    pub fn to_json(&self, base_url: &str) -> Value {
        serde_json::json!({
            "outcome": self.outcome,
            "code": self.code,
            "message": self.message,
            "warnings": self.warnings,
            "requests": self.requests.iter().map(|r| serde_json::json!({
                "method": "GET",
                "url": TotangoRequest::pixel_url(base_url),
                "params": r.params,
            })).collect::<Vec<_>>(),
        })
    }

    fn send(requests: Vec<TotangoRequest>, warnings: Vec<String>) -> Self {
        Translation {
            outcome: Outcome::Send,
            code: None,
            message: None,
            warnings,
            requests,
            breaches: Vec::new(),
        }
    }

    fn not_sent(outcome: Outcome, code: Code, message: String) -> Self {
        Translation {
            outcome,
            code: Some(code),
            message: Some(message),
            warnings: Vec::new(),
            requests: Vec::new(),
            breaches: Vec::new(),
        }
    }

    fn rejected(code: Code, message: String) -> Self {
        Self::not_sent(Outcome::Rejected, code, message)
    }
}

/// Translates a JSON value: parse errors become `rejected` (or `unsupported`
/// for an unknown call type).
pub fn translate_value(
    value: &Value,
    settings: &Settings,
    latest_page_category: Option<&str>,
) -> Translation {
    match Message::from_value(value) {
        Ok(msg) => translate(&msg, settings, latest_page_category),
        Err(ParseError::UnknownType(t)) => Translation::not_sent(
            Outcome::Unsupported,
            Code::UnsupportedCall,
            format!("type: {t:?} calls are not supported by Totango"),
        ),
        Err(e @ ParseError::MissingType) => Translation::rejected(Code::MissingType, e.to_string()),
        Err(e) => Translation::rejected(Code::InvalidField, e.to_string()),
    }
}

/// Translates one message. `latest_page_category` is the category of this
/// user's latest page call, used by track calls without `properties.category`.
pub fn translate(
    msg: &Message,
    settings: &Settings,
    latest_page_category: Option<&str>,
) -> Translation {
    if !totango_enabled(&msg.integrations) {
        return Translation::not_sent(
            Outcome::Filtered,
            Code::IntegrationDisabled,
            "integrations: Totango is disabled for this message".into(),
        );
    }
    if matches!(
        msg.call,
        CallType::Screen | CallType::Alias | CallType::Delete
    ) {
        return Translation::not_sent(
            Outcome::Unsupported,
            Code::UnsupportedCall,
            format!("type: {} calls are not supported by Totango", msg.call),
        );
    }
    let ids = match Ids::of(msg) {
        Ok(ids) => ids,
        Err(t) => return t,
    };
    let mut warnings = Vec::new();
    let mut breaches = Vec::new();
    let base = |ids: &Ids| {
        let mut p = IndexMap::new();
        p.insert("sdr_s".to_owned(), settings.service_id.clone());
        p.insert("sdr_o".to_owned(), ids.account.clone());
        p
    };
    let mut requests = match msg.call {
        CallType::Identify => {
            let mut p = base(&ids);
            p.insert("sdr_u".into(), ids.user.clone().unwrap_or_default());
            let mut attrs = Vec::new();
            let traits = identify_traits(msg);
            attributes(
                "sdr_u",
                "traits",
                &traits,
                &mut attrs,
                &mut warnings,
                &mut breaches,
            );
            p.extend(attrs);
            vec![p]
        }
        CallType::Group => vec![group_params(
            msg,
            &ids,
            base(&ids),
            &mut warnings,
            &mut breaches,
        )],
        CallType::Page => {
            let activities = page_activities(msg, settings);
            if activities.is_empty() {
                return Translation::not_sent(
                    Outcome::Filtered,
                    Code::NoPageActivity,
                    "page: no activity to send (no name or category, or page tracking is off)"
                        .into(),
                );
            }
            let module = page_category(msg).unwrap_or_else(|| settings.default_module.clone());
            activities
                .into_iter()
                .map(|activity| activity_params(base(&ids), &ids, activity, module.clone()))
                .collect()
        }
        CallType::Track => {
            let Some(event) = msg.event.clone() else {
                return Translation::rejected(
                    Code::MissingEvent,
                    "event: missing or empty; a track call needs an event name".into(),
                );
            };
            let module = track_category(msg)
                .or_else(|| latest_page_category.map(str::to_owned))
                .unwrap_or_else(|| settings.default_module.clone());
            vec![activity_params(base(&ids), &ids, event, module)]
        }
        CallType::Screen | CallType::Alias | CallType::Delete => unreachable!("handled above"),
    };
    let account_field = if msg.call == CallType::Group {
        "groupId"
    } else {
        "context.groupId"
    };
    let mode = settings.on_limit_breach;
    limits::check(
        account_field,
        &ids.account,
        &mut requests,
        mode,
        &mut warnings,
        &mut breaches,
    );
    if let (LimitMode::Reject, Some(first)) = (mode, breaches.first()) {
        let more = match breaches.len() - 1 {
            0 => String::new(),
            n => format!("; {n} more in the warnings"),
        };
        return Translation {
            outcome: Outcome::Rejected,
            code: Some(first.rule.code()),
            message: Some(format!(
                "{} (on_limit_breach = \"reject\"){more}",
                first.message
            )),
            warnings,
            requests: Vec::new(),
            breaches: breaches.iter().map(|b| b.rule).collect(),
        };
    }
    if let Some(token) = &settings.api_token {
        for p in &mut requests {
            p.insert("api-token".into(), token.clone());
        }
    }
    let mut t = Translation::send(
        requests
            .into_iter()
            .map(|params| TotangoRequest { params })
            .collect(),
        warnings,
    );
    t.breaches = breaches.iter().map(|b| b.rule).collect();
    t
}

/// The category a page call makes the user's "latest page category": the
/// `category` field or `properties.category`. `None` for a page without one.
pub fn page_category(msg: &Message) -> Option<String> {
    msg.category.clone().or_else(|| {
        msg.properties
            .get("category")
            .and_then(|v| scalar_text(v).ok().flatten())
    })
}

/// The key under which a message's attribute updates keep acceptance order:
/// a user's identify traits (`u:{userId}`) or an account's group traits
/// (`o:{groupId}`). Activities (page, track) and anything else carry no
/// attributes and need no order: `None`.
pub fn ordering_key(msg: &Message) -> Option<String> {
    match msg.call {
        CallType::Identify => msg.user_id.as_ref().map(|u| format!("u:{u}")),
        CallType::Group => msg.group_id.as_ref().map(|g| format!("o:{g}")),
        _ => None,
    }
}

/// Whether a track call's module comes from the user's latest page category
/// (it has no `properties.category` of its own).
pub fn track_uses_page_category(msg: &Message) -> bool {
    msg.call == CallType::Track && track_category(msg).is_none()
}

fn track_category(msg: &Message) -> Option<String> {
    msg.properties
        .get("category")
        .and_then(|v| scalar_text(v).ok().flatten())
}

/// Segment semantics of the `integrations` object for the Totango destination.
fn totango_enabled(integrations: &Map<String, Value>) -> bool {
    match integrations.get("Totango") {
        Some(Value::Bool(false)) => false,
        Some(Value::Null) | None => !matches!(integrations.get("All"), Some(Value::Bool(false))),
        Some(_) => true,
    }
}

struct Ids {
    account: String,
    user: Option<String>,
}

impl Ids {
    fn of(msg: &Message) -> Result<Ids, Translation> {
        let (account, account_field) = if msg.call == CallType::Group {
            (msg.group_id.clone(), "groupId")
        } else {
            let gid = msg
                .context_group_id()
                .map_err(|e| Translation::rejected(Code::InvalidField, e.to_string()))?;
            (gid, "context.groupId")
        };
        let Some(account) = account else {
            return Err(Translation::rejected(
                Code::MissingGroupId,
                format!(
                    "{account_field}: missing or empty; Totango needs an account ID for every call"
                ),
            ));
        };
        check_id(account_field, &account)?;
        if msg.user_id.is_none() && msg.call != CallType::Group {
            return Err(Translation::rejected(
                Code::MissingUserId,
                "userId: missing or empty; Totango tracks identified users only (anonymousId is not used)".into(),
            ));
        }
        if let Some(user) = &msg.user_id {
            check_id("userId", user)?;
        }
        Ok(Ids {
            account,
            user: msg.user_id.clone(),
        })
    }
}

fn check_id(field: &str, id: &str) -> Result<(), Translation> {
    if id.len() > MAX_ID_BYTES {
        return Err(Translation::rejected(
            Code::InvalidId,
            format!(
                "{field}: {} bytes long; Totango accepts at most {MAX_ID_BYTES}",
                id.len()
            ),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Translation::rejected(
            Code::InvalidId,
            format!("{field}: holds control characters"),
        ));
    }
    Ok(())
}

/// Identify's traits: top-level `traits`, then the keys of `context.traits`
/// that the top level lacks (RudderStack's SDKs send them only there). The
/// create date is taken from `context.traits` only when the top level has none.
fn identify_traits(msg: &Message) -> std::borrow::Cow<'_, Map<String, Value>> {
    let Some(Value::Object(extra)) = msg.context.get("traits") else {
        return std::borrow::Cow::Borrowed(&msg.traits);
    };
    if extra.is_empty() {
        return std::borrow::Cow::Borrowed(&msg.traits);
    }
    let top_has_date = CREATE_DATE_KEYS.iter().any(|k| msg.traits.contains_key(*k));
    let mut merged = msg.traits.clone();
    for (key, value) in extra {
        if merged.contains_key(key) || (top_has_date && CREATE_DATE_KEYS.contains(&key.as_str())) {
            continue;
        }
        merged.insert(key.clone(), value.clone());
    }
    std::borrow::Cow::Owned(merged)
}

/// Keys that carry the create date, in order of precedence.
const CREATE_DATE_KEYS: [&str; 3] = ["Create Date", "created", "createdAt"];

/// Traits as `{prefix}.<key>` attributes, with `id` dropped and the create
/// date normalised. Group-only keys are taken out by the caller first. A
/// create date that is not a date is a breach of the `date` limit.
fn attributes(
    prefix: &str,
    field: &str,
    traits: &Map<String, Value>,
    out: &mut Vec<(String, String)>,
    warnings: &mut Vec<String>,
    breaches: &mut Vec<Breach>,
) {
    // The create date goes where its trait stood, so attributes keep trait order.
    let created = CREATE_DATE_KEYS
        .iter()
        .find_map(|k| traits.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)));
    for (key, value) in traits {
        if Some(key.as_str()) == created.map(|(k, _)| k) {
            match normalise_create_date(value) {
                Some(date) => out.push((format!("{prefix}.Create Date"), date)),
                None => {
                    let message = format!(
                        "{field}.{key}: {value} is not a date; {prefix}.Create Date not sent"
                    );
                    warnings.push(message.clone());
                    breaches.push(Breach {
                        rule: LimitRule::Date,
                        message,
                    });
                }
            }
            continue;
        }
        if key == "id" || CREATE_DATE_KEYS.contains(&key.as_str()) {
            continue;
        }
        flatten_into(&format!("{prefix}.{key}"), value, out);
    }
}

fn group_params(
    msg: &Message,
    ids: &Ids,
    mut p: IndexMap<String, String>,
    warnings: &mut Vec<String>,
    breaches: &mut Vec<Breach>,
) -> IndexMap<String, String> {
    let text = |k: &str| msg.traits.get(k).and_then(scalar_or_array_text);
    if let Some(name) = text("name") {
        p.insert("sdr_odn".into(), name);
    }
    if let Some(user) = &ids.user {
        p.insert("sdr_u".into(), user.clone());
    }
    let mut rest = msg.traits.clone();
    for k in ["name", "plan", "Status"] {
        // shift_remove keeps the other traits in their order.
        rest.shift_remove(k);
    }
    let mut attrs = Vec::new();
    attributes("sdr_o", "traits", &rest, &mut attrs, warnings, breaches);
    p.extend(attrs);
    let status = text("Status")
        .or_else(|| text("plan"))
        .unwrap_or_else(|| "Free".into());
    p.insert("sdr_o.Status".into(), status);
    if let Some(Value::Object(options)) = msg.integrations.get("Totango") {
        for (option, param) in [
            ("parent", "sdr_o.parent_id"),
            ("product", "sdr_o.product_id"),
        ] {
            let id = options
                .get(option)
                .and_then(|o| o.get("id"))
                .and_then(|v| scalar_text(v).ok().flatten());
            if let Some(id) = id {
                p.insert(param.into(), id);
            }
        }
    }
    p
}

fn page_activities(msg: &Message, settings: &Settings) -> Vec<String> {
    let category = page_category(msg);
    let name = msg.name.clone().or_else(|| {
        msg.properties
            .get("name")
            .and_then(|v| scalar_text(v).ok().flatten())
    });
    let mut activities = Vec::new();
    if settings.track_categorized_pages {
        if let Some(c) = &category {
            activities.push(format!("Viewed {c} Page"));
        }
    }
    if settings.track_named_pages {
        if let Some(n) = &name {
            let full = match &category {
                Some(c) => format!("{c} {n}"),
                None => n.clone(),
            };
            activities.push(format!("Viewed {full} Page"));
        }
    }
    activities
}

fn activity_params(
    mut p: IndexMap<String, String>,
    ids: &Ids,
    activity: String,
    module: String,
) -> IndexMap<String, String> {
    p.insert("sdr_u".into(), ids.user.clone().unwrap_or_default());
    p.insert("sdr_a".into(), activity);
    p.insert("sdr_m".into(), module);
    p
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod limits_tests;
