//! `sluice`: the one binary. Every command parses its flags here and calls into a library
//! crate; no command holds logic of its own beyond printing.
//!
//! Exit codes: 0 success, 1 failure (with a one-line reason, or the list of problems found),
//! 2 usage errors and commands not available in this build.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging();
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `SLUICE_LOG` filters them (`info,sluice_schemas=debug`), and
/// `SLUICE_LOG_FORMAT=json` makes them JSON lines.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
