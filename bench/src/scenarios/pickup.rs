//! Pickup latency: submit -> the step's process is running, on an idle fleet.
//!
//! One real `capstan-runner` (shell executor, capacity 1). Each run's only
//! step is `date +%s%N > FILE`; the figure is that stamp minus the wall clock
//! taken just before `SubmitRun` (same host, same CLOCK_REALTIME). Runs go one
//! at a time: the next is submitted after the previous ended plus a 10 ms
//! gap, so the fleet is idle at every submit. It therefore includes the
//! SubmitRun round trip, the group commit, the offer, accept, workspace setup
//! and the fork/exec of `sh` and `date`.

use super::{Ctx, Figures, cores, summary};
use crate::procs::{Coordinator, epoch_ns};
use anyhow::Context;
use capstan_shared::proto::api::v1 as api;
use std::time::Duration;

const WARMUP: usize = 3;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let runs = if ctx.quick { 30 } else { 200 };
    let coord = Coordinator::start(&ctx.dir, &[]).await?;
    let _runner = coord.start_runner("pickup-0", "shell", 1)?;
    coord.wait_connected(1, Duration::from_secs(20)).await?;
    let mut client = coord.client().await?;
    let stamps = ctx.dir.join("stamps");
    std::fs::create_dir_all(&stamps)?;
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let file = stamps.join(format!("{i}"));
        let yaml = format!(
            "version: 1\nname: pickup\ntasks:\n  t:\n    steps:\n      - run: \"date +%s%N > {}\"\n",
            file.display()
        );
        let before = epoch_ns();
        let id = Coordinator::submit(&mut client, &yaml).await?;
        wait_finished(&mut client, &id).await?;
        let stamp: i128 = std::fs::read_to_string(&file)
            .with_context(|| format!("run {id} wrote no stamp"))?
            .trim()
            .parse()?;
        if i >= WARMUP {
            samples.push((stamp - before) as f64 / 1e6);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (p50, p99, max) = summary(&mut samples);
    println!(
        "pickup: {runs} runs, 1 shell runner, {} cores: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        cores()
    );
    drop(client);
    drop(_runner);
    drop(coord);
    let (o50, o99) = offer_latency(ctx, runs).await?;
    println!(
        "pickup: of which coordinator (submit -> offer at a lightweight runner): p50 {o50:.2} ms, p99 {o99:.2} ms"
    );
    Ok(vec![
        ("pickup_p50_ms".into(), p50),
        ("pickup_p99_ms".into(), p99),
        ("pickup_max_ms".into(), max),
        ("pickup_runs".into(), runs as f64),
        ("pickup_offer_p50_ms".into(), o50),
        ("pickup_offer_p99_ms".into(), o99),
    ])
}

/// The coordinator's share of pickup: SubmitRun start -> the offer arrives
/// at a lightweight runner in this process (no runner process, no fork).
async fn offer_latency(ctx: &Ctx, runs: usize) -> anyhow::Result<(f64, f64)> {
    use crate::fleet::{Fleet, FleetConfig};
    let coord = Coordinator::start(&ctx.dir.join("offer"), &[]).await?;
    let fleet = Fleet::start(FleetConfig {
        url: coord.url(),
        token: coord.token.clone(),
        count: 1,
        capacity: 1,
        per_conn: 1,
        name_prefix: "pickup-light".into(),
    })
    .await?;
    let mut client = coord.client().await?;
    let yaml = "version: 1\nname: offer\ntasks:\n  t:\n    steps:\n      - run: \"true\"\n";
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let before = epoch_ns();
        let id = Coordinator::submit(&mut client, yaml).await?;
        wait_finished(&mut client, &id).await?;
        let at = i128::from(
            fleet
                .counters
                .last_offer_ns
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        if i >= WARMUP {
            samples.push((at - before) as f64 / 1e6);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fleet.stop().await;
    let (p50, p99, _) = summary(&mut samples);
    Ok((p50, p99))
}

/// Follows the run with WatchRun until it ends; fails unless it succeeded.
pub async fn wait_finished(
    client: &mut api::pipeline_service_client::PipelineServiceClient<tonic::transport::Channel>,
    id: &str,
) -> anyhow::Result<api::Run> {
    use capstan_shared::proto::pipeline::v1::RunState;
    let mut events = client
        .watch_run(api::WatchRunRequest { run_id: id.into() })
        .await?
        .into_inner();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), events.message())
        .await
        .context("run did not end within 60 s")??
    {
        let Some(run) = ev.run else { continue };
        match RunState::try_from(run.state) {
            Ok(RunState::Succeeded) => return Ok(run),
            Ok(RunState::Failed | RunState::Cancelled) => {
                anyhow::bail!("run {id} ended {:?}: {:?}", run.state, run.tasks)
            }
            _ => {}
        }
    }
    anyhow::bail!("WatchRun of {id} ended before the run did")
}
