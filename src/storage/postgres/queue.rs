//! The queue's SQL: acceptance with dedupe, claims, reports, replays and
//! pruning. Each function runs on a connection the caller put in a
//! transaction (or autocommit, for single statements) and batches its work
//! into a few statements whatever the number of messages.
//!
//! Per-key ordering across replicas: a queued message is the head of its key
//! (the only claimable one) when nothing of its key was queued before it, and
//! the next message becomes head when the head leaves the queue. Enqueue and
//! dequeue of one key must therefore not interleave between transactions.
//! They take a row lock on the key's row in `td_keys` (an upsert, so the row
//! is created on first use), in sorted key order so two transactions never
//! wait on each other crosswise, and hold it until commit; the head
//! decision is then made by a later statement, whose snapshot (READ
//! COMMITTED) sees everything the previous holder committed. Row locks live
//! in the tuples, so a batch of thousands of keys cannot exhaust the lock
//! table the way as many advisory locks could. Dequeue deletes a key's row
//! when the key has nothing left queued; pruning removes rows left by rolled
//! back work. The unique index `td_queue_one_head` backs all this up.

use super::super::entity::EntityWrites;
use super::super::{
    Acceptance, ClaimBatch, Claimed, Disposition, EMPTY_JSON, MessageFilter, Millis, NewMessage,
    PAYLOAD_DROPPED, PAYLOAD_NOT_KEPT, PayloadRetention, REFUSED_STATES, RefusedBudget, Report,
    State, StorageError, day_of, privacy,
};
use super::reads::{Arg, bind_args, where_clause};
use super::text::{pg_text, pg_text_opt, text_key};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

/// The database clock in milliseconds since the Unix epoch.
pub const CLOCK_MS: &str = "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint";
/// The transaction's start on the database clock, in milliseconds.
const TX_NOW_MS: &str = "floor(extract(epoch FROM now()) * 1000)::bigint";
/// The `LISTEN/NOTIFY` channel of "work may be claimable".
pub const CHANNEL: &str = "td_work";

// The busy statements' text, built once (sqlx finds its prepared statement
// by this text at every call).
static ACCEPT_SQL: LazyLock<String> = LazyLock::new(accept_sql);
static CLAIM_SQL: LazyLock<String> = LazyLock::new(claim_sql);
static REPORT_SQL: LazyLock<String> = LazyLock::new(report_sql);
/// Remembers a batch's new (source, messageId digest) pairs, as
/// `INSERT … RETURNING`, and in the same round trip reads which of its
/// users are suppressed (rows without a source).
static DEDUPE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH fresh AS ( \
            INSERT INTO td_dedupe (source, message_key, accepted_at) \
            SELECT s, m, {TX_NOW_MS} FROM unnest($1::text[], $2::text[]) AS t(s, m) \
            ORDER BY s, m \
            ON CONFLICT (source, message_key) DO UPDATE SET accepted_at = EXCLUDED.accepted_at \
            WHERE td_dedupe.accepted_at < EXCLUDED.accepted_at - $3 \
            RETURNING source, message_key) \
         SELECT source, message_key FROM fresh \
         UNION ALL \
         SELECT NULL, user_id FROM td_suppressions WHERE user_key = ANY($4::text[])"
    )
});
/// Most dead messages one replay call queues again (keeps the transaction short).
const REPLAY_MAX: i64 = 10_000;
/// Most old messages deleted by one prune, to keep each transaction short.
pub const PRUNE_CHUNK: i64 = 2_000;
/// Most expired dedupe entries deleted by one prune.
const PRUNE_DEDUPE_CHUNK: i64 = 20_000;
/// Held by the replica that prunes (`pg_try_advisory_xact_lock`); "tdprune".
const PRUNE_LOCK: i64 = 0x0074_6470_7275_6e65;

/// What one accept did.
pub struct Accepted {
    pub acceptances: Vec<Acceptance>,
    /// Whether it queued anything (wake delivery).
    pub queued: bool,
}

/// Locks the ordering keys (see the module comment) until the transaction ends.
pub async fn lock_keys(conn: &mut PgConnection, keys: Vec<String>) -> Result<(), StorageError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut keys = keys;
    keys.sort_unstable();
    keys.dedup();
    sqlx::query(
        "INSERT INTO td_keys (ordering_key) SELECT k FROM unnest($1::text[]) AS t(k) ORDER BY k \
         ON CONFLICT (ordering_key) DO UPDATE SET ordering_key = EXCLUDED.ordering_key",
    )
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// Queues messages (ascending ids) behind what their keys already hold, due
/// at `due` (per message). The keys must be locked.
const ENQUEUE_HEAD: &str = "ordering_key IS NULL OR (\
    row_number() OVER (PARTITION BY ordering_key ORDER BY id) = 1 \
    AND NOT EXISTS (SELECT 1 FROM td_queue q WHERE q.ordering_key = i.ordering_key))";

/// The statement that stores a batch (`$1`..`$15`: one array per column,
/// in batch order): messages, their outcomes and the queue rows of those
/// to deliver; when it queued any, it also tells the other replicas
/// (`NOTIFY`, sent at commit and dropped with a rolled-back savepoint), so
/// no round trip of its own is needed. Public so that tests can check its
/// plan.
pub fn accept_sql() -> String {
    format!(
        "WITH input AS MATERIALIZED ( \
            SELECT nextval('td_messages_id_seq') AS id, t.* FROM ( \
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
                    $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                    $11::text[], $12::bigint[], $13::text[], $14::text[], $15::text[]) \
                WITH ORDINALITY AS t(message_id, source, call, service_id, user_id, \
                    account_id, state, code, reason, payload, settings, received_at, \
                    ordering_key, warnings, page_category, ord) \
                ORDER BY ord) t), \
         inserted AS ( \
            INSERT INTO td_messages (id, message_id, source, call, service_id, user_id, \
                account_id, payload, settings, received_at, ordering_key, warnings, \
                page_category) \
            SELECT id, message_id, source, call, service_id, user_id, account_id, payload, \
                settings, received_at, ordering_key, warnings, page_category \
            FROM input ORDER BY id), \
         outcomes AS ( \
            INSERT INTO td_outcomes (id, state, code, reason, updated_at) \
            SELECT id, state, code, reason, received_at FROM input ORDER BY id), \
         queued AS ( \
            INSERT INTO td_queue (message, ordering_key, next_attempt_at, enqueued_at, head, \
                size) \
            SELECT id, ordering_key, least(received_at, {TX_NOW_MS}), \
                least(received_at, {TX_NOW_MS}), {ENQUEUE_HEAD}, {size} \
            FROM input i WHERE state = 'pending' ORDER BY id \
            RETURNING seq) \
         SELECT id, (SELECT count(*) FROM queued), \
            (SELECT count(*) FROM (SELECT pg_notify('{CHANNEL}', '') FROM queued LIMIT 1) n) \
         FROM input ORDER BY ord",
        size = own_size_sql("i.")
    )
}

/// Stores a batch: dedupes by (source, messageId) within `window_ms`, applies
/// page categories in batch order and queues `Pending` messages.
pub async fn accept(
    conn: &mut PgConnection,
    batch: &[&NewMessage],
    window_ms: Millis,
    max_refused_bytes: u64,
) -> Result<Accepted, StorageError> {
    if batch.is_empty() {
        return Ok(Accepted {
            acceptances: Vec::new(),
            queued: false,
        });
    }
    let sources: Vec<Cow<str>> = batch.iter().map(|m| pg_text(&m.source)).collect();
    let message_ids: Vec<Cow<str>> = batch.iter().map(|m| pg_text(&m.message_id)).collect();
    // The dedupe table holds digests of messageIds, not the ids.
    let message_keys: Vec<String> = batch.iter().map(|m| text_key(&m.message_id)).collect();

    // The first of a (source, messageId) in the batch asks the dedupe table;
    // the later ones are duplicates of it whatever it is.
    let mut first_of: HashMap<(&str, &str), usize> = HashMap::new();
    let mut later = vec![false; batch.len()];
    for i in 0..batch.len() {
        let key = (sources[i].as_ref(), message_keys[i].as_str());
        match first_of.entry(key) {
            Entry::Occupied(_) => later[i] = true,
            Entry::Vacant(v) => {
                v.insert(i);
            }
        }
    }
    let (first_sources, first_ids): (Vec<&str>, Vec<&str>) = first_of.keys().copied().unzip();
    // New, or accepted longer ago than the window: (re)remembered now. The
    // insert is sorted so concurrent batches lock dedupe rows in one order.
    let user_keys = super::privacy::user_keys(batch);
    let mut fresh: HashSet<usize> = HashSet::new();
    let mut suppressed: HashSet<String> = HashSet::new();
    let rows = sqlx::query(&DEDUPE_SQL)
        .bind(&first_sources)
        .bind(&first_ids)
        .bind(window_ms)
        .bind(&user_keys)
        .fetch_all(&mut *conn)
        .await?;
    for r in rows {
        let source: Option<String> = r.try_get(0)?;
        let value: String = r.try_get(1)?;
        match source {
            Some(source) => {
                if let Some(&i) = first_of.get(&(source.as_str(), value.as_str())) {
                    fresh.insert(i);
                }
            }
            None => {
                suppressed.insert(value);
            }
        }
    }
    let duplicate: Vec<bool> = (0..batch.len())
        .map(|i| later[i] || !fresh.contains(&i))
        .collect();
    // Messages of suppressed users are recorded without payload, not queued.
    let suppress: Vec<bool> = (0..batch.len())
        .map(|i| {
            !duplicate[i]
                && batch[i]
                    .user_id
                    .as_ref()
                    .is_some_and(|u| suppressed.contains(pg_text(u).as_ref()))
        })
        .collect();
    let untouched: Vec<bool> = (0..batch.len())
        .map(|i| duplicate[i] || suppress[i])
        .collect();

    let page_categories = page_categories(conn, batch, &untouched).await?;

    let keys: Vec<String> = batch
        .iter()
        .zip(&untouched)
        .filter(|(m, skip)| !**skip && m.state == State::Pending)
        .filter_map(|(m, _)| m.ordering_key.as_deref().map(text_key))
        .collect();
    lock_keys(conn, keys).await?;

    // Refused messages count against storage.max_refused_bytes; the row
    // lock orders the transactions that store some.
    let any_refused = batch
        .iter()
        .zip(&untouched)
        .any(|(m, skip)| *skip || m.state.is_refused());
    let mut refused = if any_refused {
        let used: i64 =
            sqlx::query_scalar("SELECT bytes FROM td_usage WHERE name = 'refused' FOR UPDATE")
                .fetch_optional(&mut *conn)
                .await?
                .unwrap_or(0);
        Some(RefusedBudget::new(used, max_refused_bytes))
    } else {
        None
    };

    let n = batch.len();
    let mut calls = Vec::with_capacity(n);
    let mut services = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut accounts = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut codes = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut settings = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut ordering_keys = Vec::with_capacity(n);
    let mut warnings = Vec::with_capacity(n);
    for ((m, dup), suppress) in batch.iter().zip(&duplicate).zip(&suppress) {
        let (state, code, reason) = if *suppress {
            (
                State::Suppressed,
                Some(Cow::Borrowed(privacy::SUPPRESSED)),
                None,
            )
        } else if *dup {
            (
                State::Duplicate,
                Some(Cow::Borrowed("duplicate")),
                Some(Cow::Owned(
                    pg_text(&format!(
                        "messageId {:?} was already accepted",
                        m.message_id
                    ))
                    .into_owned(),
                )),
            )
        } else {
            (m.state, pg_text_opt(&m.code), pg_text_opt(&m.reason))
        };
        calls.push(pg_text(&m.call));
        services.push(pg_text(&m.service_id));
        users.push(pg_text_opt(&m.user_id));
        accounts.push(pg_text_opt(&m.account_id));
        states.push(state.as_str());
        codes.push(code);
        reasons.push(reason);
        let mut notes = Cow::Borrowed(&m.warnings);
        let (payload, setting) = if *suppress {
            notes = Cow::Owned(Vec::new());
            if let Some(budget) = refused.as_mut() {
                budget.keep(EMPTY_JSON, EMPTY_JSON, &m.message_id);
            }
            (EMPTY_JSON, EMPTY_JSON)
        } else {
            match refused.as_mut().filter(|_| state.is_refused()) {
                Some(budget) => budget
                    .keep(&m.payload, &m.settings, &m.message_id)
                    .unwrap_or_else(|| {
                        notes.to_mut().push(PAYLOAD_NOT_KEPT.to_owned());
                        (EMPTY_JSON, EMPTY_JSON)
                    }),
                None => (m.payload.as_str(), m.settings.as_str()),
            }
        };
        payloads.push(pg_text(payload));
        settings.push(pg_text(setting));
        received.push(m.received_at);
        ordering_keys.push(m.ordering_key.as_deref().map(text_key));
        warnings.push((!notes.is_empty()).then(|| serde_json::json!(notes).to_string()));
    }
    // Ids are drawn in batch order, once per message (the CTE is
    // materialized), so one id goes to the message, its outcome and its
    // queue row.
    let rows = sqlx::query(&ACCEPT_SQL)
        .bind(&message_ids)
        .bind(&sources)
        .bind(&calls)
        .bind(&services)
        .bind(&users)
        .bind(&accounts)
        .bind(&states)
        .bind(&codes)
        .bind(&reasons)
        .bind(&payloads)
        .bind(&settings)
        .bind(&received)
        .bind(&ordering_keys)
        .bind(&warnings)
        .bind(&page_categories)
        .fetch_all(&mut *conn)
        .await?;
    if rows.len() != n {
        return Err(StorageError::Corrupt(
            format!("stored {} of {n} messages", rows.len()).into(),
        ));
    }
    if let Some(budget) = refused.filter(|b| b.added != 0) {
        sqlx::query("UPDATE td_usage SET bytes = bytes + $1 WHERE name = 'refused'")
            .bind(budget.added)
            .execute(&mut *conn)
            .await?;
    }
    let mut queued = false;
    let mut acceptances = Vec::with_capacity(n);
    // Rows come in batch order.
    for (row, dup) in rows.iter().zip(&duplicate) {
        let id: i64 = row.try_get(0)?;
        queued |= row.try_get::<i64, _>(1)? > 0;
        acceptances.push(if *dup {
            Acceptance::Duplicate { id }
        } else {
            Acceptance::Stored { id }
        });
    }
    Ok(Accepted {
        acceptances,
        queued,
    })
}

/// The page category each message stores, deciding them in batch order and
/// recording the memory the batch leaves: a message reads the category as it
/// stands after the earlier messages, before its own change. Duplicates
/// neither read nor change it.
async fn page_categories(
    conn: &mut PgConnection,
    batch: &[&NewMessage],
    duplicate: &[bool],
) -> Result<Vec<Option<String>>, StorageError> {
    // A user is known by the digest of service and userId (the table's key)
    // and keeps both for readers of the table.
    type User = (String, String, String);
    let user_of = |i: usize| -> Option<User> {
        let m = batch[i];
        let user = m.user_id.as_deref().filter(|_| !duplicate[i])?;
        let (service, user) = (pg_text(&m.service_id), pg_text(user));
        Some((
            text_key(&format!("{service}\u{1f}{user}")),
            service.into_owned(),
            user.into_owned(),
        ))
    };
    let readers: Vec<User> = (0..batch.len())
        .filter(|&i| batch[i].needs_page_category)
        .filter_map(user_of)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut memory: HashMap<User, Option<String>> = HashMap::new();
    if !readers.is_empty() {
        let keys: Vec<&str> = readers.iter().map(|u| u.0.as_str()).collect();
        // Locked (existing rows), so a concurrent batch of the same user on
        // another replica applies its pages before or after this one.
        let rows = sqlx::query(
            "SELECT p.user_key, p.category FROM td_page_categories p \
             WHERE p.user_key = ANY($1::text[]) ORDER BY p.user_key FOR UPDATE OF p",
        )
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
        let mut found: HashMap<String, String> = HashMap::new();
        for row in rows {
            found.insert(row.try_get(0)?, row.try_get(1)?);
        }
        for user in readers {
            let category = found.get(&user.0).cloned();
            memory.insert(user, category);
        }
    }
    let mut stored = Vec::with_capacity(batch.len());
    let mut changed: HashMap<User, Option<String>> = HashMap::new();
    for (i, m) in batch.iter().enumerate() {
        let Some(user) = user_of(i) else {
            stored.push(None);
            continue;
        };
        stored.push(if m.needs_page_category {
            memory.get(&user).cloned().flatten()
        } else {
            None
        });
        if let Some(set) = &m.set_page_category {
            let set = pg_text_opt(set).map(Cow::into_owned);
            memory.insert(user.clone(), set.clone());
            changed.insert(user, set);
        }
    }
    if !changed.is_empty() {
        let mut changed: Vec<(User, Option<String>)> = changed.into_iter().collect();
        changed.sort_unstable();
        let (mut set_k, mut set_s, mut set_u, mut set_c) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut del_k = Vec::new();
        for ((key, service, user), category) in changed {
            match category {
                Some(c) => {
                    set_k.push(key);
                    set_s.push(service);
                    set_u.push(user);
                    set_c.push(c);
                }
                None => del_k.push(key),
            }
        }
        sqlx::query(
            "WITH remembered AS ( \
                INSERT INTO td_page_categories (user_key, service_id, user_id, category) \
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
                ON CONFLICT (user_key) DO UPDATE SET category = EXCLUDED.category \
                RETURNING 1), \
             forgotten AS ( \
                DELETE FROM td_page_categories p WHERE p.user_key = ANY($5::text[]) RETURNING 1) \
             SELECT (SELECT count(*) FROM remembered), (SELECT count(*) FROM forgotten)",
        )
        .bind(&set_k)
        .bind(&set_s)
        .bind(&set_u)
        .bind(&set_c)
        .bind(&del_k)
        .execute(&mut *conn)
        .await?;
    }
    Ok(stored)
}

/// SQL: what a message's row stores of its own (payload, settings,
/// messageId in UTF-8, as `storage::refused_size` counts them); `row` is the
/// table's alias with its dot, or "".
pub(super) fn own_size_sql(row: &str) -> String {
    own_size_of(&format!("{row}settings"), row)
}

/// [`own_size_sql`] with the settings given as an SQL expression.
fn own_size_of(settings: &str, row: &str) -> String {
    format!("octet_length({row}payload) + octet_length({settings}) + octet_length({row}message_id)")
}

/// SQL: what a queued message stores (`td_queue.size`): `own` (its own
/// bytes, as [`own_size_sql`] counts them), translated requests and last
/// answer; `outcome` is the outcome's alias with its dot.
pub(super) fn queued_size_sql(own: &str, outcome: &str) -> String {
    format!(
        "{own} + COALESCE(octet_length({outcome}requests), 0) \
            + COALESCE(octet_length({outcome}last_body), 0)"
    )
}

/// SQL: what the row counts in `td_usage` when it is refused, else
/// `otherwise`; `outcome` and `row` are the aliases (with their dots) of the
/// outcome and of the message (or both of `td_message_view`).
pub(super) fn refused_size_sql(outcome: &str, row: &str, otherwise: &str) -> String {
    format!(
        "CASE WHEN {outcome}state IN {REFUSED_STATES} THEN {} ELSE {otherwise} END",
        own_size_sql(row)
    )
}

/// Not held: never claimed, released, or claimed before replicas had ids
/// (version 1) and run out. A replica's claim is held while the replica
/// lives (`replica.rs` gives back the claims of gone ones).
const CLAIMABLE: &str =
    "(q.lease IS NULL OR (q.replica IS NULL AND q.leased_until <= (SELECT t FROM now)))";

/// The claim statement: `$1` the most messages, `$2` the lease in ms, `$3`
/// the replica. Public so that tests can check its plan.
pub fn claim_sql() -> String {
    format!(
        "WITH now AS (SELECT {CLOCK_MS} AS t), \
         picked AS ( \
            SELECT q.seq FROM td_queue q \
            WHERE q.head AND q.next_attempt_at <= (SELECT t FROM now) \
                AND {CLAIMABLE} \
            ORDER BY q.next_attempt_at, q.seq LIMIT $1 \
            FOR UPDATE SKIP LOCKED), \
         leased AS ( \
            UPDATE td_queue q SET leased_until = (SELECT t FROM now) + $2, \
                lease = nextval('td_lease'), replica = $3 \
            FROM picked WHERE q.seq = picked.seq \
            RETURNING q.seq, q.message, q.lease, q.enqueued_at) \
         SELECT due.next_due, c.* FROM ( \
            SELECT min(q.next_attempt_at) AS next_due FROM td_queue q \
            WHERE q.head AND q.next_attempt_at > (SELECT t FROM now) \
                AND {CLAIMABLE}) due \
         LEFT JOIN ( \
            SELECT l.seq, m.id, l.lease, m.source, m.payload, m.settings, m.requests, m.sent, \
                m.attempts, m.received_at, l.enqueued_at, m.page_category \
            FROM leased l JOIN td_message_view m ON m.id = l.message) c ON true \
         ORDER BY c.seq"
    )
}

/// Begins the busy transactions (accept, claim, report) with how their
/// statements are planned: planned once per connection and kept
/// (planning each call was ~30% of their statement time, more than the
/// claim's execution), and only with index lookups and nested loops, the
/// right shape for a batch of keys against tables of any size, so that a plan
/// made while the tables are small stays right when they are large (the
/// connections otherwise plan every call: `force_custom_plan`). No bitmap
/// scans: the claim must read `td_queue_claimable` in its order, which stops
/// at the limit and marks the entries of rows already claimed or delivered as
/// dead for the next scan, where a bitmap scan reads every entry up to now,
/// and every row version they point to, at each claim (27,000 entries, 6 of a
/// claim's 8 ms, ten seconds into a load).
pub const BEGIN_HOT: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
    SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;";

/// Begins a busy transaction ([`BEGIN_HOT`], one round trip).
pub async fn begin_hot(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StorageError> {
    Ok(pool.begin_with(BEGIN_HOT).await?)
}

/// Leases up to `limit` due heads on the database clock for `replica`. One
/// statement, in a transaction begun with [`BEGIN_HOT`], which commits it.
pub async fn claim(
    conn: &mut PgConnection,
    limit: usize,
    lease_ms: Millis,
    replica: i64,
) -> Result<ClaimBatch, StorageError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = sqlx::query(&CLAIM_SQL)
        .bind(limit)
        .bind(lease_ms)
        .bind(replica)
        .fetch_all(conn)
        .await?;
    let mut batch = ClaimBatch::default();
    for row in rows {
        batch.next_due = row.try_get(0)?;
        let Some(id) = row.try_get::<Option<i64>, _>(2)? else {
            continue;
        };
        batch.messages.push(Claimed {
            id,
            lease: row.try_get(3)?,
            source: row.try_get(4)?,
            payload: row.try_get::<String, _>(5)?.into(),
            settings: row.try_get::<String, _>(6)?.into(),
            requests: row.try_get(7)?,
            sent: count(row.try_get(8)?),
            attempts: count(row.try_get(9)?),
            received_at: row.try_get(10)?,
            retry_from: row.try_get(11)?,
            latest_page_category: row.try_get(12)?,
        });
    }
    Ok(batch)
}

pub fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// What a report did.
pub struct Reported {
    /// The ids of the reports ignored (their lease was not current), in order.
    pub stale: Vec<i64>,
    /// A key's next message became claimable (other replicas care).
    pub promoted: bool,
}

/// The statement that records a batch of reports (`$1`..`$14`: one array
/// per field) whose lease is current. Public so that tests can check its plan.
pub fn report_sql() -> String {
    format!(
        "WITH r AS ( \
            SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], \
                $5::bigint[], $6::text[], $7::text[], $8::text[], $9::bool[], $10::int[], \
                $11::text[], $12::text[], $13::text[], $14::bigint[]) \
            AS r(id, lease, requests, sent, attempted, state, code, reason, has_last, status, \
                body, error, settings, next_attempt_at)), \
         valid AS ( \
            SELECT q.seq, q.ordering_key, s.sent AS sent_before, r.* FROM td_queue q \
            JOIN r ON q.message = r.id AND q.lease = r.lease \
            JOIN td_outcomes s ON s.id = r.id FOR UPDATE OF q), \
         kept_settings AS ( \
            UPDATE td_messages d SET settings = v.settings \
            FROM valid v WHERE d.id = v.id AND v.settings IS NOT NULL), \
         updated AS ( \
            UPDATE td_outcomes m SET requests = COALESCE(v.requests, m.requests), \
                sent = v.sent, attempts = m.attempts + v.attempted, state = v.state, \
                code = v.code, reason = v.reason, \
                last_status = CASE WHEN v.has_last THEN v.status ELSE m.last_status END, \
                last_body = CASE WHEN v.has_last THEN v.body ELSE m.last_body END, \
                last_error = CASE WHEN v.has_last THEN v.error ELSE m.last_error END, \
                updated_at = {CLOCK_MS} \
            FROM valid v JOIN td_messages d ON d.id = v.id \
            WHERE m.id = v.id RETURNING m.id, v.lease, v.sent_before, \
                CASE WHEN v.sent > v.sent_before AND v.requests IS NULL THEN m.requests END \
                AS requests, {size} AS size), \
         retried AS ( \
            UPDATE td_queue q SET next_attempt_at = v.next_attempt_at, leased_until = 0, \
                lease = NULL, replica = NULL, size = u.size \
            FROM valid v JOIN updated u ON u.id = v.id \
            WHERE q.seq = v.seq AND v.next_attempt_at IS NOT NULL \
            RETURNING q.seq), \
         dequeued AS ( \
            DELETE FROM td_queue q USING valid v \
            WHERE q.seq = v.seq AND v.next_attempt_at IS NULL \
            RETURNING q.ordering_key) \
         SELECT ARRAY(SELECT id FROM updated), ARRAY(SELECT lease FROM updated), \
            ARRAY(SELECT DISTINCT ordering_key FROM dequeued WHERE ordering_key IS NOT NULL), \
            ARRAY(SELECT sent_before FROM updated), ARRAY(SELECT requests FROM updated)",
        // The settings this report keeps, if any, count instead of the old ones.
        size = queued_size_sql(&own_size_of("COALESCE(v.settings, d.settings)", "d."), "m.")
    )
}

/// Records results of the reports whose lease is current, in at most three
/// statements; the rest are ignored. Runs in a transaction.
pub async fn report(conn: &mut PgConnection, all: &[Report]) -> Result<Reported, StorageError> {
    // At most one report per (message, lease) can apply: the first; a second
    // one carries a lease the first has released.
    let mut seen = HashSet::new();
    let reports: Vec<&Report> = all
        .iter()
        .filter(|r| seen.insert((r.id, r.lease)))
        .collect();
    let n = reports.len();
    let (mut ids, mut leases) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut requests, mut sent, mut attempted) = (Vec::new(), Vec::new(), Vec::new());
    let (mut states, mut codes, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
    let (mut has_last, mut statuses, mut bodies, mut errors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut settings, mut next) = (Vec::new(), Vec::new());
    let (mut dequeue_ids, mut dequeue_leases) = (Vec::new(), Vec::new());
    for r in reports {
        let (state, code, reason) = r.disposition.outcome();
        let (code, reason) = (code.map(pg_text), reason.map(pg_text));
        let next_attempt_at = match r.disposition {
            Disposition::Retry { next_attempt_at } => Some(next_attempt_at),
            _ => None,
        };
        if next_attempt_at.is_none() {
            dequeue_ids.push(r.id);
            dequeue_leases.push(r.lease);
        }
        ids.push(r.id);
        leases.push(r.lease);
        requests.push(pg_text_opt(&r.requests));
        sent.push(i64::from(r.sent));
        attempted.push(i64::from(r.attempted));
        states.push(state.as_str());
        codes.push(code);
        reasons.push(reason);
        has_last.push(r.last.is_some());
        let last = r.last.as_ref();
        statuses.push(last.and_then(|l| l.status).map(i32::from));
        bodies.push(last.and_then(|l| l.body.as_deref()).map(pg_text));
        errors.push(last.and_then(|l| l.error.as_deref()).map(pg_text));
        settings.push(pg_text_opt(&r.settings));
        next.push(next_attempt_at);
    }
    if !dequeue_ids.is_empty() {
        // The keys whose head may leave the queue.
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT q.ordering_key FROM td_queue q \
             JOIN unnest($1::bigint[], $2::bigint[]) AS r(id, lease) \
                ON q.message = r.id AND q.lease = r.lease \
             WHERE q.ordering_key IS NOT NULL",
        )
        .bind(&dequeue_ids)
        .bind(&dequeue_leases)
        .fetch_all(&mut *conn)
        .await?;
        lock_keys(conn, keys).await?;
    }
    let row = sqlx::query(&REPORT_SQL)
        .bind(&ids)
        .bind(&leases)
        .bind(&requests)
        .bind(&sent)
        .bind(&attempted)
        .bind(&states)
        .bind(&codes)
        .bind(&reasons)
        .bind(&has_last)
        .bind(&statuses)
        .bind(&bodies)
        .bind(&errors)
        .bind(&settings)
        .bind(&next)
        .fetch_one(&mut *conn)
        .await?;
    let applied_ids: Vec<i64> = row.try_get(0)?;
    let applied_leases: Vec<i64> = row.try_get(1)?;
    let dequeued_keys: Vec<String> = row.try_get(2)?;
    let sent_before: Vec<i64> = row.try_get(3)?;
    let stored_requests: Vec<Option<String>> = row.try_get(4)?;
    let promoted = if dequeued_keys.is_empty() {
        false
    } else {
        promote(conn, &dequeued_keys).await?
    };
    // What the accepted requests set, for the per-entity views.
    let first: HashMap<(i64, i64), &Report> =
        all.iter().rev().map(|r| ((r.id, r.lease), r)).collect();
    let mut entities = EntityWrites::default();
    let today = day_of(super::super::now_millis());
    for (i, key) in applied_ids.iter().zip(&applied_leases).enumerate() {
        let Some(r) = first.get(&(*key.0, *key.1)) else {
            continue;
        };
        let before = count(sent_before.get(i).copied().unwrap_or_default());
        let stored = stored_requests.get(i).and_then(Option::as_deref);
        if let Some(requests) = r.requests.as_deref().or(stored) {
            entities.add(r.id, requests, before, r.sent, today);
        }
    }
    if !entities.is_empty() {
        super::entity::write(conn, &entities).await?;
    }
    // Each applied (message, lease) answers its first report; every other
    // report is stale.
    let mut applied: HashSet<(i64, i64)> = applied_ids.into_iter().zip(applied_leases).collect();
    let stale = all
        .iter()
        .filter(|r| !applied.remove(&(r.id, r.lease)))
        .map(|r| r.id)
        .collect();
    Ok(Reported { stale, promoted })
}

/// Makes the oldest queued message of each key its head where the head left,
/// and forgets keys with nothing queued. The keys must be locked.
pub async fn promote(conn: &mut PgConnection, keys: &[String]) -> Result<bool, StorageError> {
    let promoted: i64 = sqlx::query_scalar(
        "WITH first AS ( \
            SELECT f.seq, f.head FROM unnest($1::text[]) AS k(key) \
            CROSS JOIN LATERAL (SELECT seq, head FROM td_queue WHERE ordering_key = k.key \
                ORDER BY seq LIMIT 1) f), \
         promoted AS ( \
            UPDATE td_queue q SET head = true FROM first \
            WHERE q.seq = first.seq AND NOT first.head RETURNING q.seq), \
         emptied AS ( \
            DELETE FROM td_keys k WHERE k.ordering_key = ANY($1::text[]) \
                AND NOT EXISTS (SELECT 1 FROM td_queue q WHERE q.ordering_key = k.ordering_key) \
            RETURNING 1) \
         SELECT count(*) FROM promoted",
    )
    .bind(keys)
    .fetch_one(conn)
    .await?;
    Ok(promoted > 0)
}

/// Queues the dead messages matching `filter` again, behind what their keys
/// hold, with a fresh retry window. Runs in a transaction.
pub async fn replay(
    conn: &mut PgConnection,
    filter: &MessageFilter,
) -> Result<Vec<i64>, StorageError> {
    let dead = MessageFilter {
        state: Some(State::Dead),
        ..filter.clone()
    };
    let (clause, args) = where_clause(&dead, 1);
    let limit = args.len() + 1;
    let sql = format!(
        "UPDATE td_outcomes o SET state = 'pending', code = NULL, reason = NULL, \
            updated_at = {CLOCK_MS} FROM td_messages d \
         WHERE o.id IN (SELECT m.id FROM td_message_view m WHERE {clause} \
            AND m.payload <> '{{}}' ORDER BY m.id LIMIT ${limit} FOR UPDATE) \
            AND o.state = 'dead' AND d.id = o.id \
         RETURNING o.id, d.ordering_key, o.updated_at"
    );
    let mut args = args;
    args.push(Arg::Int(REPLAY_MAX));
    let mut rows: Vec<(i64, Option<String>, i64)> = bind_args(sqlx::query(&sql), args)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, sqlx::Error>>()?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    rows.sort_unstable_by_key(|r| r.0);
    lock_keys(conn, rows.iter().filter_map(|r| r.1.clone()).collect()).await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let keys: Vec<Option<String>> = rows.iter().map(|r| r.1.clone()).collect();
    let due: Vec<i64> = rows.iter().map(|r| r.2).collect();
    sqlx::query(&format!(
        "INSERT INTO td_queue (message, ordering_key, next_attempt_at, enqueued_at, head, size) \
         SELECT id, ordering_key, due, due, {ENQUEUE_HEAD}, \
            (SELECT {size} FROM td_message_view m WHERE m.id = i.id) \
         FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS i(id, ordering_key, due) \
         ORDER BY id",
        size = queued_size_sql(&own_size_sql("m."), "m.")
    ))
    .bind(&ids)
    .bind(&keys)
    .bind(&due)
    .execute(&mut *conn)
    .await?;
    Ok(ids)
}

/// Deletes, in chunks, expired dedupe entries, finished messages past
/// retention, ended pauses and key rows left by rolled back work, unless
/// another replica is pruning. `Some(true)`: a full chunk went, there may
/// be more; `None`: another replica holds the prune lock.
pub async fn prune(
    conn: &mut PgConnection,
    window_ms: Millis,
    retention_ms: Option<Millis>,
    refused_retention_ms: Option<Millis>,
) -> Result<Option<bool>, StorageError> {
    let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(PRUNE_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !mine {
        return Ok(None);
    }
    let now: i64 = sqlx::query_scalar(&format!("SELECT {CLOCK_MS}"))
        .fetch_one(&mut *conn)
        .await?;
    // The age conditions are repeated on the deleted row: an entry refreshed
    // by a concurrent accept is re-checked after its lock and kept.
    let dedupe = sqlx::query(
        "DELETE FROM td_dedupe d USING ( \
            SELECT source, message_key FROM td_dedupe WHERE accepted_at < $1 LIMIT $2) old \
         WHERE d.source = old.source AND d.message_key = old.message_key \
            AND d.accepted_at < $1",
    )
    .bind(now - window_ms)
    .bind(PRUNE_DEDUPE_CHUNK)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let mut more = dedupe as i64 >= PRUNE_DEDUPE_CHUNK;
    // Each delete takes what its refused rows counted off `td_usage`.
    let mut delete = async |condition: &str, before: Millis| -> Result<bool, StorageError> {
        let row = sqlx::query(&format!(
            "WITH gone AS ( \
                DELETE FROM td_outcomes o WHERE o.id IN ( \
                    SELECT id FROM td_outcomes \
                    WHERE state NOT IN ('pending', 'dead') {condition} AND updated_at < $1 \
                    LIMIT $2) \
                AND o.state NOT IN ('pending', 'dead') AND o.updated_at < $1 \
                RETURNING o.id, o.state), \
             gone_messages AS ( \
                DELETE FROM td_messages m USING gone o WHERE m.id = o.id \
                RETURNING {} AS size), \
             counted AS ( \
                UPDATE td_usage SET bytes = bytes - \
                    (SELECT COALESCE(sum(size), 0) FROM gone_messages) \
                WHERE name = 'refused' AND EXISTS (SELECT 1 FROM gone_messages WHERE size <> 0) \
                RETURNING 1) \
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM counted)",
            refused_size_sql("o.", "m.", "0")
        ))
        .bind(before)
        .bind(PRUNE_CHUNK)
        .fetch_one(&mut *conn)
        .await?;
        Ok(row.try_get::<i64, _>(0)? >= PRUNE_CHUNK)
    };
    if let Some(refused) = refused_retention_ms.or(retention_ms) {
        let condition = format!("AND state IN {REFUSED_STATES}");
        more |= delete(&condition, now - refused).await?;
    }
    if let Some(retention) = retention_ms {
        // The state condition matches the partial index td_outcomes_finished.
        more |= delete("", now - retention).await?;
    }
    sqlx::query("DELETE FROM td_paused_endpoints WHERE until < $1")
        .bind(now)
        .execute(&mut *conn)
        .await?;
    super::entity::prune(conn, now).await?;
    let keys = sqlx::query(
        "DELETE FROM td_keys k WHERE k.ordering_key IN ( \
            SELECT ordering_key FROM td_keys o WHERE NOT EXISTS ( \
                SELECT 1 FROM td_queue q WHERE q.ordering_key = o.ordering_key) LIMIT $1)",
    )
    .bind(PRUNE_CHUNK)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    more |= keys as i64 >= PRUNE_CHUNK;
    Ok(Some(more))
}

/// Drops, in chunks, the payloads of messages past their outcome's payload
/// retention, oldest change first; delivered and refused ones from where
/// the last pass stopped (`marks`). True when a full chunk went.
pub async fn drop_payloads(
    conn: &mut PgConnection,
    retention: &PayloadRetention,
    marks: &mut [Millis; 2],
) -> Result<bool, StorageError> {
    let now: i64 = sqlx::query_scalar(&format!("SELECT {CLOCK_MS}"))
        .fetch_one(&mut *conn)
        .await?;
    let groups = retention.groups();
    let note = serde_json::json!([PAYLOAD_DROPPED]).to_string();
    let sizes = own_size_sql("m.");
    let refused = refused_size_sql("", "", "NULL");
    let mut more = false;
    for (keep, condition, mark) in groups {
        let Some(keep) = keep else { continue };
        let from = mark.map_or(0, |i| marks[i]);
        let finished = if mark.is_some() {
            "state NOT IN ('pending', 'dead') AND"
        } else {
            ""
        };
        let row = sqlx::query(&format!(
            "WITH picked AS ( \
                SELECT id, updated_at, {refused} AS before \
                FROM td_message_view WHERE {finished} {condition} \
                    AND updated_at >= $1 AND updated_at < $2 AND payload <> '{{}}' \
                ORDER BY updated_at LIMIT $3 FOR UPDATE), \
             answers AS ( \
                UPDATE td_outcomes o SET requests = NULL, last_body = NULL \
                FROM picked p WHERE o.id = p.id), \
             dropped AS ( \
                UPDATE td_messages m SET payload = '{{}}', settings = '{{}}', warnings = $4 \
                FROM picked p WHERE m.id = p.id \
                RETURNING p.updated_at, p.before - ({sizes}) AS freed) \
             SELECT count(*), max(updated_at), COALESCE(sum(freed), 0)::bigint FROM dropped"
        ))
        .bind(from)
        .bind(now - keep)
        .bind(PRUNE_CHUNK)
        .bind(&note)
        .fetch_one(&mut *conn)
        .await?;
        let n: i64 = row.try_get(0)?;
        let last: Option<i64> = row.try_get(1)?;
        let freed: i64 = row.try_get(2)?;
        if freed != 0 {
            sqlx::query("UPDATE td_usage SET bytes = bytes - $1 WHERE name = 'refused'")
                .bind(freed)
                .execute(&mut *conn)
                .await?;
        }
        let full = n >= PRUNE_CHUNK;
        if let Some(i) = mark {
            marks[i] = match last {
                Some(at) if full => at,
                _ => now - keep,
            };
        }
        more |= full;
    }
    Ok(more)
}

/// Whether any message with this `messageId` is stored (any source, any
/// state), decided atomically for this transaction: a transaction-scoped
/// advisory lock on the id's hash makes concurrent checks of one id (on any
/// replica) wait for each other's commit, and the read that follows it (read
/// committed: a fresh snapshot per statement) sees what they stored.
pub async fn message_id_stored_locked(
    conn: &mut PgConnection,
    message_id: &str,
) -> Result<bool, StorageError> {
    let id = pg_text(message_id);
    sqlx::query("SELECT pg_advisory_xact_lock(7340, hashtext($1))")
        .bind(id.as_ref())
        .execute(&mut *conn)
        .await?;
    let row = sqlx::query(
        "SELECT EXISTS(SELECT 1 FROM td_messages WHERE md5(message_id) = md5($1) \
         AND message_id = $1)",
    )
    .bind(id.as_ref())
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.try_get(0)?)
}
