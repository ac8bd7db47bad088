//! `capstan-runner`: parse flags, init logging and tracing, load config, run the agent.

use anyhow::Context as _;
use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = capstan_runner::config::Args::parse();
    let format = args.log_format.unwrap_or_default();
    let telemetry = capstan_telemetry::init("capstan-runner", "info", format)?;
    let result = main_inner(args).await;
    // After the drain (SIGTERM included): the last attempts' spans.
    telemetry.shutdown().await;
    result
}

async fn main_inner(args: capstan_runner::config::Args) -> anyhow::Result<()> {
    let config = capstan_runner::config::load(args).context("loading configuration")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(handle_signals(shutdown.clone()));
    capstan_runner::run(config, shutdown).await
}

/// First SIGTERM/SIGINT: drain. Second: exit at once.
async fn handle_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: draining (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting without finishing running attempts");
    std::process::exit(130);
}
