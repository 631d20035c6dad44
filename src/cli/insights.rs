//! `totango-destination insights …`: one sync now (with a progress bar and
//! a summary), and signed widget links.

use crate::config::{Config, Runtime};
use crate::insights::sync::{Progress, RunOutcome, RunStatus, RunSummary};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum InsightsCommand {
    /// Sync Totango's account insights to Salesforce once, now.
    Sync {
        /// Read Totango and print what would be written; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a signed widget URL for a Totango account id, or with
    /// `--record` for a Salesforce record Id.
    Link {
        account_id: String,
        /// The id is a Salesforce record Id (`/insights/records/{id}`).
        #[arg(long)]
        record: bool,
        /// Make the link expire after this many seconds.
        #[arg(long)]
        expires_in: Option<u64>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub fn run(command: InsightsCommand) -> anyhow::Result<ExitCode> {
    match command {
        InsightsCommand::Sync { dry_run, config } => sync(config.as_deref(), dry_run),
        InsightsCommand::Link {
            account_id,
            record,
            expires_in,
            config,
        } => {
            let target = if record {
                crate::insights::Target::Record
            } else {
                crate::insights::Target::Account
            };
            link(config.as_deref(), target, &account_id, expires_in)
        }
    }
}

fn load(path: Option<&Path>) -> anyhow::Result<Runtime> {
    let config = Config::load(path).context("invalid configuration")?;
    config.validate().context("invalid configuration")
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn reading(&self, read: usize, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(read as u64);
        self.0.set_message("accounts read from Totango");
    }
    fn writing(&self, done: usize, total: usize) {
        if self.0.message() != "records sent to Salesforce" {
            self.0.reset();
            self.0.set_message("records sent to Salesforce");
        }
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }
}

fn sync(path: Option<&Path>, dry_run: bool) -> anyhow::Result<ExitCode> {
    let runtime = load(path)?;
    crate::config::insights::ready_to_sync(&runtime.config).context("invalid configuration")?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let progress = Bar(bar);
    let (outcome, audit) = rt.block_on(async {
        // The run joins the audit trail when the storage can be opened (not
        // a SQLite file a running server holds: it audits runs started with
        // `POST /api/insights/runs`).
        let storage = crate::server::open_storage(&runtime).await;
        let outcome = crate::insights::sync_and_store(&runtime, dry_run, &progress).await;
        let audit = match storage {
            Ok(storage) => {
                if let Ok(o) = &outcome {
                    let actor = crate::web::Actor {
                        who: cli_actor(),
                        address: None,
                    };
                    let detail = serde_json::json!({"dryRun": dry_run, "status": o.summary.status});
                    let count = Some(o.summary.records_updated as u64);
                    actor.record(&*storage, "insights_run", detail, count).await;
                }
                storage.close().await;
                None
            }
            Err(e) => Some(e),
        };
        (outcome, audit)
    });
    let outcome = outcome?;
    progress.0.finish_and_clear();
    if let Some(e) = audit {
        eprintln!(
            "note: this run is not in the audit trail ({e}); a running server audits the runs \
             started with POST /api/insights/runs"
        );
    }
    print_outcome(&outcome);
    Ok(if outcome.summary.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `cli:<login name>` for the audit trail.
fn cli_actor() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("USERNAME")) {
        Ok(user) if !user.is_empty() => format!("cli:{user}"),
        _ => "cli".to_owned(),
    }
}

fn print_outcome(o: &RunOutcome) {
    for r in &o.planned {
        println!("{}", serde_json::to_string(r).expect("record serializes"));
    }
    print!("{}", summary_text(&o.summary, o.planned.len()));
}

/// The summary as the CLI prints it.
pub fn summary_text(s: &RunSummary, planned: usize) -> String {
    let status = match s.status {
        RunStatus::Ok => "ok",
        RunStatus::Partial => "partial: some records failed",
        RunStatus::Stopped => "stopped",
        RunStatus::Failed => "failed",
    };
    let mut out = format!(
        "insights sync{}: {status}\n",
        if s.dry_run { " (dry run)" } else { "" }
    );
    let read = if s.truncated {
        format!(
            "{} of {} (Totango's 10,000 limit)",
            s.accounts_read, s.total_hits
        )
    } else {
        s.accounts_read.to_string()
    };
    out += &format!("  accounts read:    {read}\n");
    if s.dry_run {
        out += &format!("  records to write: {planned} (nothing written: dry run)\n");
    } else {
        out += &format!("  records updated:  {}\n", s.records_updated);
    }
    out += &format!("  records failed:   {}\n", s.records_failed);
    for f in &s.failures {
        let record = f
            .record
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        out += &format!(
            "    {}{}: {}\n",
            printable(&f.account_id),
            printable(&record),
            printable(&f.reason)
        );
    }
    if s.failures.len() < s.records_failed {
        out += &format!("    … and {} more\n", s.records_failed - s.failures.len());
    }
    out += &format!(
        "  records skipped:  {} (no linked Salesforce record)\n",
        s.records_skipped
    );
    let usage = s
        .salesforce_api_usage
        .as_deref()
        .map(|u| format!(" (Salesforce daily usage {u})"))
        .unwrap_or_default();
    out += &format!(
        "  API calls:        Totango {}, Salesforce {}{usage}\n",
        s.api_calls.totango, s.api_calls.salesforce
    );
    if let Some(m) = &s.message {
        out += &format!("  {}\n", printable(m));
    }
    out
}

/// Text from Totango or Salesforce (account ids are client-controlled) as
/// the text logs write it: control characters escaped (`\n`, `\x1b`…), so
/// it cannot forge summary lines or drive the terminal.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn link(
    path: Option<&Path>,
    target: crate::insights::Target,
    account_id: &str,
    expires_in: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let runtime = load(path)?;
    let insights = &runtime.config.insights;
    let secret = insights.widget_secret.as_ref().context(
        "insights.widget_secret is not set (TD_INSIGHTS__WIDGET_SECRET): links cannot be signed",
    )?;
    let base = insights
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", runtime.listen));
    let exp = expires_in.map(|s| chrono::Utc::now().timestamp() + s as i64);
    let sig = crate::insights::sign(secret.expose(), target, account_id, exp);
    let id: String = url::form_urlencoded::byte_serialize(account_id.as_bytes()).collect();
    let id = id.replace('+', "%20");
    let mut url = format!(
        "{}/insights/{}/{id}?sig={sig}",
        base.trim_end_matches('/'),
        target.path()
    );
    if let Some(exp) = exp {
        url += &format!("&exp={exp}");
    }
    println!("{url}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insights::sync::{ApiCalls, RecordFailure};

    #[test]
    fn summaries_escape_control_characters_in_ids_and_reasons() {
        let s = RunSummary {
            id: None,
            started_at: String::new(),
            finished_at: String::new(),
            dry_run: false,
            status: RunStatus::Partial,
            message: Some("warn\x1b[2J".into()),
            total_hits: 1,
            accounts_read: 1,
            truncated: false,
            records_updated: 0,
            records_failed: 1,
            records_skipped: 0,
            failures: vec![RecordFailure {
                account_id: "a\n  records failed:   0\x1b[31m\u{9b}".into(),
                record: Some("001\r".into()),
                reason: "bad\x07".into(),
            }],
            api_calls: ApiCalls {
                totango: 1,
                salesforce: 1,
            },
            salesforce_api_usage: None,
        };
        let text = summary_text(&s, 0);
        assert!(
            text.contains("    a\\n  records failed:   0\\x1b[31m\\u{9b} (001\\r): bad\\x07\n"),
            "{text}"
        );
        assert!(text.contains("  warn\\x1b[2J\n"), "{text}");
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
        let forged = text.lines().filter(|l| l.starts_with("  records failed:"));
        assert_eq!(forged.count(), 1, "no forged summary line: {text}");
        assert_eq!(printable("Zürich"), "Zürich");
    }
}
