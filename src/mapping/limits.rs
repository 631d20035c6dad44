//! Totango's documented limits on what it stores (docs/mapping.md "Totango's
//! limits"). Totango answers `200` even to values it then ignores, so each
//! breach is found here: a warning kept with the message, and, as the
//! per-source setting `on_limit_breach` says, the value sent as is (`warn`),
//! cut to the limit (`truncate`, text only) or the message `rejected`.

use super::Code;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// Longest account text attribute (`sdr_o.*`), in characters.
pub const MAX_ACCOUNT_TEXT_CHARS: usize = 512;
/// Longest user text attribute (`sdr_u.*`), in characters.
pub const MAX_USER_TEXT_CHARS: usize = 255;
/// Longest account display name (`sdr_odn`), in characters.
pub const MAX_ACCOUNT_NAME_CHARS: usize = 128;
/// Attributes Totango reads as numbers: digits, no commas or currency signs.
pub const NUMBER_ATTRIBUTES: [&str; 1] = ["Contract Value"];
/// Attributes Totango reads as ISO 8601 dates.
pub const DATE_ATTRIBUTES: [&str; 3] = [
    "Create Date",
    "Contract Renewal Date",
    "Contract Start Date",
];

/// What a breach does (setting `on_limit_breach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// Warn and send the value as is.
    #[default]
    Warn,
    /// Warn, and cut text to its limit; other breaches are sent as is.
    Truncate,
    /// The message is `rejected` with the first breach's code.
    Reject,
}

impl LimitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitMode::Warn => "warn",
            LimitMode::Truncate => "truncate",
            LimitMode::Reject => "reject",
        }
    }
}

/// One of Totango's documented limits; its name labels the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitRule {
    AccountText,
    UserText,
    AccountName,
    Number,
    Date,
    AccountId,
}

impl LimitRule {
    pub const ALL: [LimitRule; 6] = [
        LimitRule::AccountText,
        LimitRule::UserText,
        LimitRule::AccountName,
        LimitRule::Number,
        LimitRule::Date,
        LimitRule::AccountId,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitRule::AccountText => "account_text",
            LimitRule::UserText => "user_text",
            LimitRule::AccountName => "account_name",
            LimitRule::Number => "number",
            LimitRule::Date => "date",
            LimitRule::AccountId => "account_id",
        }
    }

    /// The code of a message rejected for this rule (`limit_<rule>`).
    pub fn code(self) -> Code {
        match self {
            LimitRule::AccountText => Code::LimitAccountText,
            LimitRule::UserText => Code::LimitUserText,
            LimitRule::AccountName => Code::LimitAccountName,
            LimitRule::Number => Code::LimitNumber,
            LimitRule::Date => Code::LimitDate,
            LimitRule::AccountId => Code::LimitAccountId,
        }
    }
}

/// One breach: its rule and what is wrong, naming the field
/// (`sdr_o.notes: 600 characters; …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub rule: LimitRule,
    pub message: String,
}

/// Checks the account ID and every parameter of `requests`; records each
/// breach in `breaches` and its warning in `warnings`. In `truncate` mode
/// text over its limit is cut to it, at a character boundary.
pub(super) fn check(
    account_field: &str,
    account: &str,
    requests: &mut [IndexMap<String, String>],
    mode: LimitMode,
    warnings: &mut Vec<String>,
    breaches: &mut Vec<Breach>,
) {
    let mut found = |breach: Breach, truncated: Option<usize>| {
        let what = match (mode, truncated) {
            (LimitMode::Reject, _) => "message rejected".to_owned(),
            (LimitMode::Truncate, Some(max)) => format!("truncated to {max} characters"),
            (LimitMode::Truncate, None) => "sent as is (only text can be truncated)".to_owned(),
            (LimitMode::Warn, _) => "sent as is".to_owned(),
        };
        warnings.push(format!("{}; {what}", breach.message));
        breaches.push(breach);
    };
    if let Some(bad) = account.chars().find(|c| !is_id_char(*c)) {
        found(
            Breach {
                rule: LimitRule::AccountId,
                message: format!(
                    "{account_field}: {:?} holds {bad:?}; Totango account IDs are letters, digits, _ and -",
                    shorten(account)
                ),
            },
            None,
        );
    }
    for params in requests {
        for (key, value) in params.iter_mut() {
            let Some((rule, max)) = text_rule(key) else {
                if let Some(breach) = format_breach(key, value) {
                    found(breach, None);
                }
                continue;
            };
            let chars = value.chars().count();
            if chars <= max {
                continue;
            }
            let what = match rule {
                LimitRule::AccountName => "account names",
                LimitRule::AccountText => "account text attributes",
                _ => "user text attributes",
            };
            let breach = Breach {
                rule,
                message: format!(
                    "{key}: {chars} characters; Totango keeps {what} to at most {max}"
                ),
            };
            if mode == LimitMode::Truncate {
                truncate_chars(value, max);
                found(breach, Some(max));
            } else {
                found(breach, None);
            }
        }
    }
}

/// The length rule of a text parameter, `None` for ids, activities and
/// attributes Totango reads as numbers or dates.
fn text_rule(key: &str) -> Option<(LimitRule, usize)> {
    if key == "sdr_odn" {
        return Some((LimitRule::AccountName, MAX_ACCOUNT_NAME_CHARS));
    }
    let (rule, max, name) = if let Some(name) = key.strip_prefix("sdr_o.") {
        (LimitRule::AccountText, MAX_ACCOUNT_TEXT_CHARS, name)
    } else if let Some(name) = key.strip_prefix("sdr_u.") {
        (LimitRule::UserText, MAX_USER_TEXT_CHARS, name)
    } else {
        return None;
    };
    if NUMBER_ATTRIBUTES.contains(&name) || DATE_ATTRIBUTES.contains(&name) {
        return None;
    }
    Some((rule, max))
}

/// A number or date attribute whose value Totango cannot read.
fn format_breach(key: &str, value: &str) -> Option<Breach> {
    let name = key
        .strip_prefix("sdr_o.")
        .or_else(|| key.strip_prefix("sdr_u."))?;
    if NUMBER_ATTRIBUTES.contains(&name) && !is_plain_number(value) {
        return Some(Breach {
            rule: LimitRule::Number,
            message: format!(
                "{key}: {:?} is not a plain number; Totango takes digits without commas or currency signs",
                shorten(value)
            ),
        });
    }
    if DATE_ATTRIBUTES.contains(&name) && !super::values::is_iso_date(value) {
        return Some(Breach {
            rule: LimitRule::Date,
            message: format!(
                "{key}: {:?} is not an ISO 8601 date; Totango takes dates like 2024-05-01 or 2024-05-01T10:20:30Z",
                shorten(value)
            ),
        });
    }
    None
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// `-?digits(.digits)?(e[+-]?digits)?`: what JSON numbers print as.
pub fn is_plain_number(s: &str) -> bool {
    fn digits(s: &str) -> (usize, &str) {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        (n, &s[n..])
    }
    let s = s.strip_prefix('-').unwrap_or(s);
    let (n, mut rest) = digits(s);
    if n == 0 {
        return false;
    }
    if let Some(frac) = rest.strip_prefix('.') {
        let (n, r) = digits(frac);
        if n == 0 {
            return false;
        }
        rest = r;
    }
    if let Some(exp) = rest.strip_prefix(['e', 'E']) {
        let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        let (n, r) = digits(exp);
        if n == 0 {
            return false;
        }
        rest = r;
    }
    rest.is_empty()
}

/// Cuts `s` to at most `max` characters.
pub fn truncate_chars(s: &mut String, max: usize) {
    if let Some((at, _)) = s.char_indices().nth(max) {
        s.truncate(at);
    }
}

/// A value as quoted in a warning: at most 64 characters.
fn shorten(value: &str) -> String {
    let mut s = value.to_owned();
    if s.chars().count() > 64 {
        truncate_chars(&mut s, 64);
        s.push('…');
    }
    s
}
