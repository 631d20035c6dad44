//! What was delivered for one account or user, for the operator's pages
//! `/accounts/{id}` and `/users/{id}`: the last value sent of each attribute
//! and the activities sent per day. Both backends keep it in tables written
//! in the transaction that records a delivery report, so it outlives payload
//! retention; erasing a user erases the user's rows.
//!
//! Storage does not read Totango's parameters itself: `mapping` says what
//! each accepted request set ([`crate::mapping::Sets`]).

use super::Millis;
use crate::mapping::TotangoRequest;
use serde::Serialize;
use std::collections::HashMap;

/// How many days of activity counts are kept (older days are pruned).
pub const ACTIVITY_DAYS_KEPT: i64 = 90;

const DAY_MS: Millis = 24 * 3600 * 1000;

/// The UTC day (days since 1970-01-01) of a time.
pub fn day_of(at: Millis) -> i64 {
    at.div_euclid(DAY_MS)
}

/// An account (Segment `groupId`, Totango `sdr_o`) or a user (`userId`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntityKind {
    Account,
    User,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Account => "account",
            EntityKind::User => "user",
        }
    }
}

/// The last value sent to Totango of one attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EntityAttribute {
    /// The Totango service it was sent to.
    pub service_id: String,
    /// The parameter name as sent (`sdr_odn`, `sdr_o.Status`, `sdr_u.email`).
    pub name: String,
    /// The value as Totango received it.
    pub value: String,
    /// When Totango accepted it (storage's clock).
    pub sent_at: Millis,
    /// The message that sent it (it may have been pruned since).
    pub message: i64,
}

/// Activities sent on one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DailyActivity {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub activities: u64,
}

/// The entity rows one report batch writes: the last value per attribute
/// (a later report in the batch wins) and activity counts per entity and day.
#[derive(Debug, Default)]
pub(crate) struct EntityWrites {
    /// (kind, service, entity, name) → (value, message).
    pub attributes: HashMap<(EntityKind, String, String, String), (String, i64)>,
    /// (kind, entity, day) → activities.
    pub activity: HashMap<(EntityKind, String, i64), i64>,
}

impl EntityWrites {
    pub fn is_empty(&self) -> bool {
        self.attributes.is_empty() && self.activity.is_empty()
    }

    /// Adds what requests `from..to` of a message (its stored requests,
    /// JSON) set; Totango accepted them on `day`. Unreadable requests add
    /// nothing: the view is a convenience, never a reason to fail a report.
    pub fn add(&mut self, message: i64, requests: &str, from: u32, to: u32, day: i64) {
        if to <= from {
            return;
        }
        let Ok(requests) = serde_json::from_str::<Vec<TotangoRequest>>(requests) else {
            return;
        };
        for r in requests.iter().take(to as usize).skip(from as usize) {
            let sets = r.sets();
            let attributes = [
                (EntityKind::Account, sets.account_id, &sets.account),
                (EntityKind::User, sets.user_id, &sets.user),
            ];
            for (kind, id, values) in attributes {
                let Some(id) = id else { continue };
                for (name, value) in values {
                    self.attributes.insert(
                        (
                            kind,
                            sets.service_id.to_owned(),
                            id.to_owned(),
                            (*name).to_owned(),
                        ),
                        ((*value).to_owned(), message),
                    );
                }
                if sets.activity {
                    *self.activity.entry((kind, id.to_owned(), day)).or_default() += 1;
                }
            }
        }
    }
}
