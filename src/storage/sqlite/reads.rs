//! Reads (operator view, stats), on their own connection beside the writer.

use super::bulk_index::{By, ids};
use crate::storage::*;

pub(super) const SELECT_MESSAGE: &str = "SELECT m.id, m.message_id, m.source, m.call, m.service_id, m.user_id, \
    m.account_id, m.state, m.code, m.reason, m.payload, m.requests, m.sent, m.attempts, \
    m.last_status, m.last_body, m.last_error, m.received_at, m.updated_at, q.next_attempt_at, \
    m.warnings \
    FROM messages m LEFT JOIN queue q ON q.message = m.id";

pub(super) fn stored_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let json = |i: usize| -> rusqlite::Result<Option<serde_json::Value>> {
        Ok(r.get::<_, Option<String>>(i)?
            .and_then(|s| serde_json::from_str(&s).ok()))
    };
    let last_status: Option<i64> = r.get(14)?;
    let last_body: Option<String> = r.get(15)?;
    let last_error: Option<String> = r.get(16)?;
    let last_response = (last_status.is_some() || last_body.is_some() || last_error.is_some())
        .then(|| LastResponse {
            status: last_status.map(|s| s as u16),
            body: last_body,
            error: last_error,
        });
    let state: String = r.get(7)?;
    Ok(StoredMessage {
        id: r.get(0)?,
        message_id: r.get(1)?,
        source: r.get(2)?,
        call: r.get(3)?,
        service_id: r.get(4)?,
        user_id: r.get(5)?,
        account_id: r.get(6)?,
        state: State::parse(&state).unwrap_or(State::Pending),
        code: r.get(8)?,
        reason: r.get(9)?,
        payload: json(10)?.unwrap_or_default(),
        requests: json(11)?,
        sent: r.get(12)?,
        attempts: r.get(13)?,
        last_response,
        received_at: r.get(17)?,
        updated_at: r.get(18)?,
        next_attempt_at: r.get(19)?,
        warnings: json(20)?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
    })
}

/// SQL conditions (on `messages m`) and their parameters for a filter.
pub(super) fn where_clause(f: &MessageFilter) -> (String, Vec<Box<dyn rusqlite::ToSql + Send>>) {
    let mut conds = vec!["1 = 1".to_owned()];
    let mut args: Vec<Box<dyn rusqlite::ToSql + Send>> = Vec::new();
    let mut add = |cond: &str, arg: Box<dyn rusqlite::ToSql + Send>| {
        conds.push(cond.to_owned());
        args.push(arg);
    };
    if let Some(id) = f.id {
        add("m.id = ?", Box::new(id));
    }
    if let Some(s) = f.state {
        add("m.state = ?", Box::new(s.as_str()));
    }
    if let Some(before) = f.before {
        add("m.id < ?", Box::new(before));
    }
    // `ids` names the entity twice: bound twice.
    for (by, v) in [
        (By::MessageId, &f.message_id),
        (By::User, &f.user_id),
        (By::Account, &f.account_id),
    ] {
        if let Some(v) = v {
            conds.push(format!("m.id IN ({})", ids(by, "?")));
            args.push(Box::new(v.clone()));
            args.push(Box::new(v.clone()));
        }
    }
    (conds.join(" AND "), args)
}
