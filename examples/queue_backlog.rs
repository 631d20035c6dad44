//! Queues a backlog of track calls straight into a SQLite database, for the
//! delivery benchmark (`bench/delivery.sh`): the same storage call ingest
//! makes, without the HTTP in front.
//!
//! `cargo run --release --example queue_backlog -- PATH MESSAGES USERS`

use std::path::PathBuf;
use totango_destination::storage::{
    NewMessage, SqliteStorage, State, Storage, StoredJson, now_millis,
};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: queue_backlog PATH MESSAGES USERS";
    let path = PathBuf::from(args.next().expect(usage));
    let messages: usize = args.next().and_then(|v| v.parse().ok()).expect(usage);
    let users: usize = args.next().and_then(|v| v.parse().ok()).expect(usage);
    let storage = SqliteStorage::open(&path, 24 * 3600 * 1000).expect("open storage");
    let service = "SP-1234-01";
    let mut n = 0;
    while n < messages {
        let batch: Vec<NewMessage> = (n..messages.min(n + 2_000))
            .map(|i| {
                let user = format!("u-{}", i % users);
                let account = format!("acct-{}", i % 100);
                let payload = serde_json::json!({
                    "type": "track", "userId": user, "event": "Bench Event",
                    "messageId": format!("backlog-{i}"),
                    "context": {"groupId": account},
                    "properties": {"category": "Bench", "revenue": 42.99},
                });
                NewMessage {
                    source: "default".into(),
                    message_id: format!("backlog-{i}"),
                    call: "track".into(),
                    service_id: service.into(),
                    user_id: Some(user),
                    account_id: Some(account),
                    ordering_key: None,
                    payload: StoredJson::of(&payload),
                    settings: "{}".into(),
                    state: State::Pending,
                    code: None,
                    reason: None,
                    warnings: Vec::new(),
                    received_at: now_millis(),
                    set_page_category: None,
                    needs_page_category: false,
                }
            })
            .collect();
        n += batch.len();
        storage.accept(batch).await.expect("accept");
    }
    storage.close().await;
    eprintln!(
        "queued {messages} messages over {users} users in {}",
        path.display()
    );
}
