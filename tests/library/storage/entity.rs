//! Issue 19 item 4, storage side (both backends): what a delivery report's
//! accepted requests set is kept per account and per user (the last value
//! of each attribute, activities per day), stale and unaccepted requests
//! set nothing, erasing a user erases the user's rows, and long ids work.

use crate::support::backends::Backend;
use serde_json::{Value, json};
use totango_destination::storage::{
    Claimed, DailyActivity, Disposition, EntityAttribute, EntityKind, Erase, NewMessage, Report,
    Storage, day_of, now_millis,
};

/// A pending message of `call` for `account` and `user`, ordered by `key`.
fn message(message_id: &str, call: &str, account: &str, user: &str) -> NewMessage {
    NewMessage {
        call: call.to_owned(),
        service_id: "SP-1".to_owned(),
        user_id: Some(user.to_owned()),
        account_id: Some(account.to_owned()),
        ordering_key: match call {
            "group" => Some(format!("o:{account}")),
            "identify" => Some(format!("u:{user}")),
            _ => None,
        },
        payload: json!({"type": call, "messageId": message_id})
            .to_string()
            .into(),
        ..super::msg(message_id, "")
    }
}

/// Totango requests as the mapping makes them (`Vec<TotangoRequest>` JSON).
fn requests(params: &[&[(&str, &str)]]) -> String {
    let list: Vec<Value> = params
        .iter()
        .map(|p| {
            let map: serde_json::Map<String, Value> = p
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
                .collect();
            json!({ "params": map })
        })
        .collect();
    Value::Array(list).to_string()
}

fn report(c: &Claimed, requests: Option<String>, sent: u32, disposition: Disposition) -> Report {
    Report {
        id: c.id,
        lease: c.lease,
        requests,
        sent,
        attempted: true,
        disposition,
        last: None,
        settings: None,
    }
}

/// Accepts one message and claims it.
async fn claimed(s: &dyn Storage, m: NewMessage) -> Claimed {
    let message_id = m.message_id.clone();
    s.accept(vec![m]).await.expect("accept");
    let batch = s.claim(10).await.expect("claim");
    let mut found: Vec<Claimed> = batch.messages;
    assert_eq!(found.len(), 1, "only {message_id} is queued");
    found.remove(0)
}

/// Accepts, claims and reports one message as delivered with `requests`.
async fn deliver(s: &dyn Storage, m: NewMessage, reqs: &[&[(&str, &str)]]) -> i64 {
    let c = claimed(s, m).await;
    let n = reqs.len() as u32;
    let stale = s
        .report(vec![report(
            &c,
            Some(requests(reqs)),
            n,
            Disposition::Delivered,
        )])
        .await
        .expect("report");
    assert!(stale.is_empty());
    c.id
}

fn values(attributes: &[EntityAttribute]) -> Vec<(&str, &str)> {
    attributes
        .iter()
        .map(|a| (a.name.as_str(), a.value.as_str()))
        .collect()
}

async fn latest_value_wins_per_attribute(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let s: &dyn Storage = s.storage.as_ref();
    let before = now_millis();
    let first = deliver(
        s,
        message("g1", "group", "acme", "u1"),
        &[&[
            ("sdr_s", "SP-1"),
            ("sdr_o", "acme"),
            ("sdr_odn", "Acme"),
            ("sdr_u", "u1"),
            ("sdr_o.Tier", "1"),
            ("sdr_o.Status", "Free"),
        ]],
    )
    .await;
    let second = deliver(
        s,
        message("g2", "group", "acme", "u1"),
        &[&[
            ("sdr_s", "SP-1"),
            ("sdr_o", "acme"),
            ("sdr_o.Status", "Paying"),
        ]],
    )
    .await;
    // Retried: translated on the first attempt (not accepted), sent on the
    // second from the stored requests (the report carries none then).
    let c = claimed(s, message("g3", "group", "acme", "u1")).await;
    let renamed = requests(&[&[
        ("sdr_s", "SP-1"),
        ("sdr_o", "acme"),
        ("sdr_odn", "Acme Inc"),
    ]]);
    let retry = Disposition::Retry {
        next_attempt_at: now_millis(),
    };
    s.report(vec![report(&c, Some(renamed), 0, retry)])
        .await
        .unwrap();
    let after_retry = s.entity_attributes(EntityKind::Account, "acme").await;
    assert!(
        values(&after_retry.unwrap()).contains(&("sdr_odn", "Acme")),
        "a request Totango did not accept sets nothing"
    );
    let g3 = s.claim(10).await.unwrap().messages.remove(0);
    assert_eq!((g3.id, g3.sent), (c.id, 0));
    s.report(vec![report(&g3, None, 1, Disposition::Delivered)])
        .await
        .unwrap();
    // A dead message that sent nothing, and a stale report, set nothing.
    let c = claimed(s, message("g4", "group", "acme", "u1")).await;
    let dead = requests(&[&[
        ("sdr_s", "SP-1"),
        ("sdr_o", "acme"),
        ("sdr_o.Status", "Dead"),
    ]]);
    let mut stale = report(&c, Some(dead.clone()), 1, Disposition::Delivered);
    stale.lease += 1_000;
    assert_eq!(s.report(vec![stale]).await.unwrap(), vec![c.id]);
    let gone = Disposition::Dead {
        code: "rejected_by_totango".to_owned(),
        reason: "HTTP 400".to_owned(),
    };
    s.report(vec![report(&c, Some(dead), 0, gone)])
        .await
        .unwrap();

    let got = s
        .entity_attributes(EntityKind::Account, "acme")
        .await
        .unwrap();
    assert_eq!(
        values(&got),
        vec![
            ("sdr_o.Status", "Paying"),
            ("sdr_o.Tier", "1"),
            ("sdr_odn", "Acme Inc"),
        ],
        "{got:?}"
    );
    let by_name = |n: &str| got.iter().find(|a| a.name == n).unwrap();
    assert_eq!(by_name("sdr_o.Tier").message, first);
    assert_eq!(by_name("sdr_o.Status").message, second);
    assert_eq!(by_name("sdr_odn").message, g3.id);
    let now = now_millis();
    for a in &got {
        assert_eq!(a.service_id, "SP-1");
        assert!(
            a.sent_at >= before - 5_000 && a.sent_at <= now + 5_000,
            "{a:?}"
        );
    }
    // Group calls set no user attributes; an unknown entity has none.
    assert!(
        s.entity_attributes(EntityKind::User, "u1")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.entity_attributes(EntityKind::Account, "acm")
            .await
            .unwrap()
            .is_empty()
    );

    deliver(
        s,
        message("i1", "identify", "acme", "u1"),
        &[&[
            ("sdr_s", "SP-1"),
            ("sdr_o", "acme"),
            ("sdr_u", "u1"),
            ("sdr_u.email", "ann@acme.example"),
        ]],
    )
    .await;
    let user = s.entity_attributes(EntityKind::User, "u1").await.unwrap();
    assert_eq!(values(&user), vec![("sdr_u.email", "ann@acme.example")]);
    assert_eq!(
        s.entity_attributes(EntityKind::Account, "acme")
            .await
            .unwrap()
            .len(),
        3,
        "an identify sets no account attribute"
    );
}

fn activity(account: &str, user: &str, name: &str) -> Vec<(String, String)> {
    [
        ("sdr_s", "SP-1"),
        ("sdr_o", account),
        ("sdr_u", user),
        ("sdr_a", name),
        ("sdr_m", "Reports"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

fn borrowed(p: &[(String, String)]) -> Vec<(&str, &str)> {
    p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn activities_are_counted_per_day(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let s: &dyn Storage = s.storage.as_ref();
    let today = day_of(now_millis());
    // A page of two activities: the first accepted, then the second on retry.
    let (a1, a2) = (
        activity("acme", "u1", "Viewed Reports Page"),
        activity("acme", "u1", "Viewed Reports Dashboard Page"),
    );
    let page = requests(&[&borrowed(&a1), &borrowed(&a2)]);
    let c = claimed(s, message("p1", "page", "acme", "u1")).await;
    let retry = Disposition::Retry {
        next_attempt_at: now_millis(),
    };
    s.report(vec![report(&c, Some(page), 1, retry)])
        .await
        .unwrap();
    let c = s.claim(10).await.unwrap().messages.remove(0);
    assert_eq!(c.sent, 1);
    s.report(vec![report(&c, None, 2, Disposition::Delivered)])
        .await
        .unwrap();
    let t = activity("acme", "u2", "Created Report");
    deliver(s, message("t1", "track", "acme", "u2"), &[&borrowed(&t)]).await;
    // A dead track sent nothing.
    let c = claimed(s, message("t2", "track", "acme", "u2")).await;
    let dead = Disposition::Dead {
        code: "rejected_by_totango".to_owned(),
        reason: "HTTP 400".to_owned(),
    };
    let t = requests(&[&borrowed(&t)]);
    s.report(vec![report(&c, Some(t), 0, dead)]).await.unwrap();

    let day = day_of(now_millis());
    let on = |n: u64| {
        move |got: &[DailyActivity]| {
            got.len() == 1 && (got[0].day == today || got[0].day == day) && got[0].activities == n
        }
    };
    let account = s
        .entity_activity(EntityKind::Account, "acme", today - 29)
        .await
        .unwrap();
    assert!(on(3)(&account), "{account:?}");
    let u1 = s
        .entity_activity(EntityKind::User, "u1", today - 29)
        .await
        .unwrap();
    assert!(on(2)(&u1), "{u1:?}");
    let u2 = s
        .entity_activity(EntityKind::User, "u2", today - 29)
        .await
        .unwrap();
    assert!(on(1)(&u2), "{u2:?}");
    assert!(
        s.entity_activity(EntityKind::Account, "acme", day + 1)
            .await
            .unwrap()
            .is_empty(),
        "days before `since_day` are left out"
    );
    // Activities set no attributes.
    assert!(
        s.entity_attributes(EntityKind::Account, "acme")
            .await
            .unwrap()
            .is_empty()
    );
}

async fn erasing_a_user_erases_its_rows(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let s: &dyn Storage = s.storage.as_ref();
    for (n, user) in ["u1", "u2"].into_iter().enumerate() {
        let email = format!("{user}@acme.example");
        deliver(
            s,
            message(&format!("i{n}"), "identify", "acme", user),
            &[&[
                ("sdr_s", "SP-1"),
                ("sdr_o", "acme"),
                ("sdr_u", user),
                ("sdr_u.email", &email),
            ]],
        )
        .await;
        let t = activity("acme", user, "Created Report");
        deliver(
            s,
            message(&format!("t{n}"), "track", "acme", user),
            &[&borrowed(&t)],
        )
        .await;
    }
    deliver(
        s,
        message("g1", "group", "acme", "u1"),
        &[&[("sdr_s", "SP-1"), ("sdr_o", "acme"), ("sdr_odn", "Acme")]],
    )
    .await;
    let since = day_of(now_millis()) - 1;
    assert_eq!(
        s.entity_attributes(EntityKind::User, "u1")
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.entity_activity(EntityKind::User, "u1", since)
            .await
            .unwrap()
            .len(),
        1
    );

    s.erase_user(Erase {
        user_id: "u1".to_owned(),
        suppress: false,
        reason: "test".to_owned(),
    })
    .await
    .expect("erase");

    assert!(
        s.entity_attributes(EntityKind::User, "u1")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.entity_activity(EntityKind::User, "u1", since)
            .await
            .unwrap()
            .is_empty()
    );
    // Other users and the account keep theirs.
    let u2 = s.entity_attributes(EntityKind::User, "u2").await.unwrap();
    assert_eq!(values(&u2), vec![("sdr_u.email", "u2@acme.example")]);
    assert_eq!(
        s.entity_activity(EntityKind::User, "u2", since)
            .await
            .unwrap()[0]
            .activities,
        1
    );
    assert_eq!(
        values(
            &s.entity_attributes(EntityKind::Account, "acme")
                .await
                .unwrap()
        ),
        vec![("sdr_odn", "Acme")]
    );
}

/// Text of `n` bytes that differs from other such texts only at its end.
fn long(prefix: &str, n: usize) -> String {
    format!("{prefix}{}", "x".repeat(n - prefix.len()))
}

async fn long_ids_and_names_work(b: Backend) {
    let Some(s) = b.open(crate::support::backends::options()).await else {
        return;
    };
    let s: &dyn Storage = s.storage.as_ref();
    let (account, user) = (long("acct-", 20_000), long("user-", 20_000));
    let (name, other) = (
        format!("sdr_o.{}", long("a", 20_000)),
        format!("sdr_o.{}", long("b", 20_000)),
    );
    let value = long("v", 20_000);
    deliver(
        s,
        message("g1", "group", &account, &user),
        &[&[
            ("sdr_s", "SP-1"),
            ("sdr_o", &account),
            ("sdr_u", &user),
            (&name, &value),
            (&other, "2"),
        ]],
    )
    .await;
    deliver(
        s,
        message("i1", "identify", &account, &user),
        &[&[
            ("sdr_s", "SP-1"),
            ("sdr_o", &account),
            ("sdr_u", &user),
            ("sdr_u.email", "ann@acme.example"),
        ]],
    )
    .await;
    let t = activity(&account, &user, "Created Report");
    deliver(s, message("t1", "track", &account, &user), &[&borrowed(&t)]).await;

    let got = s
        .entity_attributes(EntityKind::Account, &account)
        .await
        .expect("attributes of a long account id");
    assert_eq!(
        values(&got),
        vec![(name.as_str(), value.as_str()), (other.as_str(), "2")]
    );
    let got = s.entity_attributes(EntityKind::User, &user).await.unwrap();
    assert_eq!(values(&got), vec![("sdr_u.email", "ann@acme.example")]);
    let since = day_of(now_millis()) - 1;
    let got = s
        .entity_activity(EntityKind::Account, &account, since)
        .await
        .unwrap();
    assert_eq!(got.iter().map(|d| d.activities).sum::<u64>(), 1);
    // A prefix of the id is another entity.
    assert!(
        s.entity_attributes(EntityKind::Account, &account[..19_999])
            .await
            .unwrap()
            .is_empty()
    );
    s.erase_user(Erase {
        user_id: user.clone(),
        suppress: false,
        reason: "test".to_owned(),
    })
    .await
    .unwrap();
    assert!(
        s.entity_attributes(EntityKind::User, &user)
            .await
            .unwrap()
            .is_empty()
    );
}

crate::on_backends!(
    latest_value_wins_per_attribute,
    activities_are_counted_per_day,
    erasing_a_user_erases_its_rows,
    long_ids_and_names_work,
);
