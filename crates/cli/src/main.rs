//! `sluice`: the one binary. Every command parses its flags here and calls into a library
//! crate; no command holds logic of its own beyond printing, with two exceptions that wire
//! several crates together and so have no one library to live in: `run` (a processor from its
//! topology entry) and `bench ingest` (the validator and the relay, measured together; its
//! COPY baseline is in `sluice_store::bench`).
//!
//! Exit codes: 0 success, 1 failure (with a one-line reason, or the list of problems found),
//! 2 usage errors and commands not available in this build.

mod bench_detection;
mod bench_executor;
mod bench_inference;
mod bench_ingest;
mod bench_project;
mod bench_query;
mod bench_replay;
mod cli;
mod commands;
mod dev;
mod dev_webhooks;
mod dlq;
mod keys;
mod ops;
mod query;
mod replay;
mod run;
mod simulate;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging();
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, outermost first, on one line; a cause whose text its parent
/// already printed (errors that show their source in their own message) is left out.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Logs go to stderr; `SLUICE_LOG` filters them (`info,sluice_schemas=debug`), and
/// `SLUICE_LOG_FORMAT=json` makes them JSON lines. Colours only on a terminal. sqlx's notices
/// ("relation ... already exists, skipping" on every migrate) and the embedded MQTT broker's
/// per-connection chatter, and ONNX Runtime's session and allocator notes, are left out unless
/// asked for.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx::postgres::notice=warn,rumqttd=off,ort=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
