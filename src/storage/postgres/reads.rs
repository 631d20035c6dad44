//! Reads for the operator and tests: stored messages as rows, and the
//! conditions of a message filter.

use super::text::pg_text;
use super::*;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;

pub(super) const SELECT_MESSAGE: &str = "SELECT m.id, m.message_id, m.source, m.call, m.service_id, \
    m.user_id, m.account_id, m.state, m.code, m.reason, m.payload, m.requests, m.sent, \
    m.attempts, m.last_status, m.last_body, m.last_error, m.received_at, m.updated_at, \
    q.next_attempt_at, m.warnings \
    FROM td_message_view m LEFT JOIN td_queue q ON q.message = m.id";

pub(super) fn stored_message(r: &sqlx::postgres::PgRow) -> Result<StoredMessage, StorageError> {
    let json = |i: usize| -> Result<Option<serde_json::Value>, sqlx::Error> {
        Ok(r.try_get::<Option<String>, _>(i)?
            .and_then(|s| serde_json::from_str(&s).ok()))
    };
    let last_status: Option<i32> = r.try_get(14)?;
    let last_body: Option<String> = r.try_get(15)?;
    let last_error: Option<String> = r.try_get(16)?;
    let last_response = (last_status.is_some() || last_body.is_some() || last_error.is_some())
        .then(|| LastResponse {
            status: last_status.and_then(|s| u16::try_from(s).ok()),
            body: last_body,
            error: last_error,
        });
    let state: String = r.try_get(7)?;
    Ok(StoredMessage {
        id: r.try_get(0)?,
        message_id: r.try_get(1)?,
        source: r.try_get(2)?,
        call: r.try_get(3)?,
        service_id: r.try_get(4)?,
        user_id: r.try_get(5)?,
        account_id: r.try_get(6)?,
        state: State::parse(&state).ok_or_else(|| {
            StorageError::Corrupt(format!("unknown message state {state:?}").into())
        })?,
        code: r.try_get(8)?,
        reason: r.try_get(9)?,
        payload: json(10)?.unwrap_or_default(),
        requests: json(11)?,
        sent: queue::count(r.try_get(12)?),
        attempts: queue::count(r.try_get(13)?),
        last_response,
        received_at: r.try_get(17)?,
        updated_at: r.try_get(18)?,
        next_attempt_at: r.try_get(19)?,
        warnings: json(20)?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
    })
}

/// A bound value of a dynamically built statement.
pub(super) enum Arg {
    Int(i64),
    Text(String),
}

pub(super) fn bind_args<'q>(
    mut query: Query<'q, Postgres, PgArguments>,
    args: Vec<Arg>,
) -> Query<'q, Postgres, PgArguments> {
    for arg in args {
        query = match arg {
            Arg::Int(v) => query.bind(v),
            Arg::Text(v) => query.bind(v),
        };
    }
    query
}

/// SQL conditions (on `td_message_view m`) for a filter, with parameters
/// numbered from `$first`.
pub(super) fn where_clause(f: &MessageFilter, first: usize) -> (String, Vec<Arg>) {
    let mut conds = vec!["true".to_owned()];
    let mut args = Vec::new();
    let mut add = |column: &str, op: &str, arg: Arg| {
        let n = first + args.len();
        conds.push(format!("m.{column} {op} ${n}"));
        if matches!(column, "message_id" | "user_id" | "account_id") {
            // What the indexes td_messages_{message_id,user,account} hold (see schema.rs).
            conds.push(format!("md5(m.{column}) = md5(${n})"));
        }
        args.push(arg);
    };
    if let Some(id) = f.id {
        add("id", "=", Arg::Int(id));
    }
    if let Some(s) = f.state {
        add("state", "=", Arg::Text(s.as_str().to_owned()));
    }
    if let Some(v) = &f.message_id {
        add("message_id", "=", Arg::Text(pg_text(v).into_owned()));
    }
    if let Some(v) = &f.user_id {
        add("user_id", "=", Arg::Text(pg_text(v).into_owned()));
    }
    if let Some(v) = &f.account_id {
        add("account_id", "=", Arg::Text(pg_text(v).into_owned()));
    }
    if let Some(before) = f.before {
        add("id", "<", Arg::Int(before));
    }
    (conds.join(" AND "), args)
}
