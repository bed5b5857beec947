//! `flotilla`: the command-line front end. It runs the host agent (`up`,
//! `agent`), builds images locally (`image build`), and drives an agent over
//! its HTTP API for everything else.

mod args;
mod client;
mod commands;
mod output;
mod units;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::client::CliError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            report(&e, json);
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(cli: &Cli) {
    let default = match cli.command {
        Command::Up(_) | Command::Agent(_) | Command::Control(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// One clear line, then a hint when there is one; with `--json`, also the
/// error body on standard output for scripts.
fn report(e: &anyhow::Error, json: bool) {
    if json {
        let (code, message, hint) = match e.downcast_ref::<CliError>() {
            Some(c) => (c.code.clone(), c.message.clone(), c.hint.clone()),
            None => (None, format!("{e:#}"), None),
        };
        let body =
            serde_json::json!({ "error": { "code": code, "message": message, "hint": hint } });
        println!("{body}");
    }
    if let Some(cli) = e.downcast_ref::<CliError>() {
        eprintln!("error: {}", cli.message);
        if let Some(h) = &cli.hint {
            eprintln!("hint: {h}");
        }
        return;
    }
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    eprintln!("error: {}", chain.join(": "));
}
