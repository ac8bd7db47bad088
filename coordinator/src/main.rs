//! `capstan-coordinator`: init logging and tracing, parse flags, load config, call `run`.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = capstan_coordinator::config::Args::parse();
    let format = args.log_format.unwrap_or_default();
    let telemetry = match capstan_telemetry::init("capstan-coordinator", "info", format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("capstan-coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = match args.command.take() {
        Some(command) => capstan_coordinator::admin::run(args, command).await,
        None => main_inner(args).await,
    };
    // After the coordinator stopped (SIGTERM included): its last spans.
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capstan-coordinator: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn main_inner(args: capstan_coordinator::config::Args) -> anyhow::Result<()> {
    let settings = args.settings()?;
    if settings.coordinator.tls.is_none() {
        // Only with --insecure (settings refuse it otherwise): say so loudly.
        for (addr, flag) in [
            (settings.listen, "--listen"),
            (settings.http_listen, "--http-listen"),
        ] {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "--insecure: serving plaintext on {addr} ({flag}) beyond this host; tokens \
                     and runner secrets cross the network in clear"
                );
            }
        }
    }
    let grpc = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", settings.listen))?;
    let http = tokio::net::TcpListener::bind(settings.http_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (--http-listen): {e}",
                settings.http_listen
            )
        })?;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
    capstan_coordinator::run(settings.coordinator, grpc, Some(http), shutdown).await
}
