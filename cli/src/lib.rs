//! The `capstan` command line.
//!
//! Layout:
//! - [`args`]: the flags and subcommands (clap derive), as fixed in DESIGN.md;
//! - [`commands`]: one module per subcommand;
//! - [`output`]: text tables and JSON of runs, runners and the cluster;
//! - [`log_printer`]: log chunks to lines (`[task] ...`), raw bytes or JSON;
//! - [`follow`]: the live view of a run (`submit --follow`, `dev`);
//! - [`exit`]: exit codes and the failures that map to them.
//!
//! Every call to the coordinator goes through [`capstan_client`].

pub mod args;
pub(crate) mod commands;
pub(crate) mod exit;
pub(crate) mod follow;
pub(crate) mod log_printer;
pub(crate) mod output;

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Runs a parsed command line to its exit code.
/// What the CLI logs on stderr unless `RUST_LOG` says otherwise.
const LOG_FILTER: &str = "warn,capstan_coordinator=error";

pub fn main(cli: args::Cli) -> ExitCode {
    // Only `capstan dev` logs much (the embedded coordinator and runner):
    // warnings go to stderr unless RUST_LOG says otherwise, except the
    // coordinator's, whose standalone-mode warning means nothing for a
    // throw-away dev data dir.
    let traced = capstan_telemetry::export_setting(|name| std::env::var(name).ok())
        .is_ok_and(|s| s == capstan_telemetry::ExportSetting::Otlp);
    if !traced {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(LOG_FILTER)),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::Exit::Failed.into();
        }
    };
    // With an OTLP endpoint, the CLI's own span (`capstan submit`) is the
    // run's parent; it is flushed before exit.
    let result = runtime.block_on(async {
        let telemetry = if traced {
            match capstan_telemetry::init("capstan", LOG_FILTER, Default::default()) {
                Ok(t) => Some(t),
                Err(e) => return Err(exit::Failure::usage(e.to_string())),
            }
        } else {
            None
        };
        let result = commands::run(cli).await;
        if let Some(t) = telemetry {
            t.shutdown().await;
        }
        result
    });
    // Do not wait on stray tasks (log readers of an interrupted follow).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(exit) => exit.into(),
        Err(failure) => {
            eprintln!("{}", failure.message);
            failure.exit.into()
        }
    }
}
