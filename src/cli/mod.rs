//! The command line: `serve`, `migrate`, `translate`, `check-config`,
//! `admin-link`, `insights …` (in `insights.rs`).

mod insights;

use crate::config::{Config, Runtime, StorageUrl};
use crate::mapping::{Code, Outcome, SettingsPatch, Translation, translate_value};
use crate::storage::SqliteStorage;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "totango-destination",
    version,
    about = "Segment-compatible destination server for Totango"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: ingest, durable queue, delivery to Totango.
    Serve {
        /// TOML configuration file (see config/totango-destination.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides `listen` and TD_LISTEN).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Bring the configured storage's schema up to date (`serve` also does
    /// this at start) and print its schema version.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the operator page's login link (the admin token from the
    /// configuration or its token file; generated when there is none yet).
    AdminLink {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Read one Segment message (JSON) on stdin and print what would be sent to Totango.
    Translate {
        /// Totango settings as a JSON object with mapping.md's snake_case names,
        /// e.g. '{"service_id":"SP-1234-01"}'.
        #[arg(long)]
        settings: Option<String>,
        /// Also apply a configuration: its Totango settings (under --settings)
        /// and the privacy rules (filters, PII) of the source --source names.
        #[arg(long)]
        config: Option<PathBuf>,
        /// With --config: the source whose settings and rules apply
        /// (`default`: auth.write_keys and open mode; or a [[sources]] name).
        #[arg(long, requires = "config", default_value = "default")]
        source: String,
    },
    /// Account insights: sync Totango insights to Salesforce, sign widget links.
    Insights {
        #[command(subcommand)]
        command: insights::InsightsCommand,
    },
}

/// Parses the arguments and runs the command; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Translate {
            settings,
            config,
            source,
        } => translate(settings.as_deref(), config.as_deref(), &source),
        Command::Serve { config, listen } => serve(config.as_deref(), listen),
        Command::Migrate { config } => migrate(config.as_deref()),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::AdminLink { config } => admin_link(config.as_deref()),
        Command::Insights { command } => insights::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn translate(
    settings: Option<&str>,
    config: Option<&Path>,
    source: &str,
) -> anyhow::Result<ExitCode> {
    let patch = match settings {
        None => SettingsPatch::default(),
        Some(text) => {
            let v: serde_json::Value =
                serde_json::from_str(text).context("--settings is not JSON")?;
            SettingsPatch::from_json(&v).context("--settings")?
        }
    };
    let runtime = config.map(|path| load(Some(path), None)).transpose()?;
    let source = match &runtime {
        None => None,
        Some(runtime) => Some(runtime.source_named(source).with_context(|| {
            format!("--source: no source is named {source:?} in the configuration")
        })?),
    };
    let settings = match source {
        None => patch.resolve().context("--settings")?,
        Some(s) => s.settings.merged(&patch).resolve().context("settings")?,
    };
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    let mut message: serde_json::Value = match serde_json::from_slice(&input) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        Ok(_) => {
            eprintln!("error: stdin must hold one JSON object (a Segment message)");
            return Ok(ExitCode::from(1));
        }
        Err(e) => {
            eprintln!("error: stdin is not JSON: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    // As ingest does: the PII rules rewrite the message, then the filters.
    let denied = source.and_then(|s| s.rules.apply(&mut message).err());
    let mut translation = match denied {
        Some(denied) => Translation {
            outcome: Outcome::Filtered,
            code: Some(Code::FilteredByRule),
            message: Some(denied.reason),
            warnings: Vec::new(),
            requests: Vec::new(),
            breaches: Vec::new(),
        },
        None => translate_value(&message, &settings, None),
    };
    translation.warnings.extend(settings.warnings());
    println!("{}", translation.to_json(settings.base_url()));
    Ok(ExitCode::SUCCESS)
}

fn load(path: Option<&Path>, listen: Option<String>) -> anyhow::Result<Runtime> {
    let mut config = Config::load(path).context("invalid configuration")?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    config.validate().context("invalid configuration")
}

fn check_config(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let runtime = load(path, None)?;
    print!("{}", runtime.config.redacted_toml());
    Ok(ExitCode::SUCCESS)
}

fn migrate(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let runtime = load(path, None)?;
    let version = match &runtime.storage {
        StorageUrl::Sqlite(file) => {
            SqliteStorage::migrate(file).with_context(|| format!("migrating {}", file.display()))?
        }
        StorageUrl::Postgres(url) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            i64::from(
                rt.block_on(crate::storage::postgres::migrate(url))
                    .context("migrating the PostgreSQL database")?,
            )
        }
    };
    println!("storage schema version {version}");
    Ok(ExitCode::SUCCESS)
}

fn admin_link(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let runtime = load(path, None)?;
    let (admin, _) = crate::web::auth::AdminAuth::load(&runtime)?;
    let host = if runtime.listen.ip().is_unspecified() {
        std::net::SocketAddr::new([127, 0, 0, 1].into(), runtime.listen.port())
    } else {
        runtime.listen
    };
    println!("{}", admin.login_link(&format!("http://{host}")));
    Ok(ExitCode::SUCCESS)
}

fn serve(path: Option<&Path>, listen: Option<String>) -> anyhow::Result<ExitCode> {
    crate::telemetry::init();
    let runtime = load(path, listen)?;
    if runtime.sources.is_empty() {
        tracing::warn!(
            "NO WRITE KEYS CONFIGURED: every request is accepted whatever its key. \
             Set TD_AUTH__WRITE_KEYS before exposing this server."
        );
    }
    if runtime.config.totango.service_id.is_none() && runtime.config.sources.is_empty() {
        tracing::warn!(
            "totango.service_id is not set (TD_TOTANGO__SERVICE_ID): only requests that carry \
             a serviceId in X-Segment-Settings can be accepted"
        );
    }
    // Settings that look wrong are said once here, not on every message.
    for warning in runtime.settings_warnings() {
        tracing::warn!("{warning}");
    }
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(runtime.listen)
            .await
            .with_context(|| format!("listen: cannot bind {}", runtime.listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        crate::server::run(runtime, listener, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("signal received");
    shutdown.cancel();
}
