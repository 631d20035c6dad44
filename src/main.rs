//! Command line: `serve`, `translate`, `check-config`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Read;
use std::process::ExitCode;
use totango_destination::mapping::{SettingsPatch, translate_value};

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
    /// Read one Segment message (JSON) on stdin and print what would be sent to Totango.
    Translate {
        /// Totango settings as a JSON object with mapping.md's snake_case names,
        /// e.g. '{"service_id":"SP-1234-01"}'.
        #[arg(long)]
        settings: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Translate { settings } => translate(settings.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn translate(settings: Option<&str>) -> anyhow::Result<ExitCode> {
    let patch = match settings {
        None => SettingsPatch::default(),
        Some(text) => {
            let v: serde_json::Value =
                serde_json::from_str(text).context("--settings is not JSON")?;
            SettingsPatch::from_json(&v).context("--settings")?
        }
    };
    let settings = patch.resolve().context("--settings")?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    let message: serde_json::Value = match serde_json::from_str(&input) {
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
    let translation = translate_value(&message, &settings, None);
    println!("{}", translation.to_json(settings.base_url()));
    Ok(ExitCode::SUCCESS)
}
