//! Pickup latency: submit -> the step's process is running, on an idle fleet.
//!
//! One real `capstan-runner` (shell executor, capacity 1). Each run's only
//! step is `date +%s%N > FILE`; the figure is that stamp minus the wall clock
//! taken just before `SubmitRun` (same host, same CLOCK_REALTIME). Runs go one
//! at a time: the next is submitted after the previous ended plus a 10 ms
//! gap, so the fleet is idle at every submit. It therefore includes the
//! SubmitRun round trip, the group commit, the offer, accept, workspace setup
//! and the fork/exec of `sh` and `date`.

use super::{Ctx, Figures, cores, file_create_ms, summary};
use crate::procs::{Coordinator, epoch_ns};
use anyhow::Context;
use capstan_proto::api::v1 as api;
use std::time::Duration;

const WARMUP: usize = 3;

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let runs = if ctx.quick { 30 } else { 200 };
    let coord = Coordinator::start(&ctx.dir, &[]).await?;
    let _runner = coord.start_runner("pickup-0", "shell", 1)?;
    coord.wait_connected(1, Duration::from_secs(20)).await?;
    let stamps = ctx.dir.join("stamps");
    std::fs::create_dir_all(&stamps)?;
    let create_ms = file_create_ms(&stamps.join("probe"), 50)?;
    let [mut samples] =
        measure([(coord.url(), coord.api_token.clone())], None, stamps, runs).await?;
    let (p50, p99, max) = summary(&mut samples);
    println!(
        "pickup: {runs} runs, 1 shell runner, {} cores: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms \
         (creating a file beside the stamps: {create_ms:.3} ms)",
        cores()
    );
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
        ("pickup_file_create_ms".into(), create_ms),
        ("pickup_offer_p50_ms".into(), o50),
        ("pickup_offer_p99_ms".into(), o99),
    ])
}

/// The pickup of [`run`] (one real shell runner) with TLS on the
/// coordinator's ports: the submit, the offer and the report all cross TLS.
/// A plaintext coordinator runs beside it and the submits alternate
/// between the two (as `pickup-ab` does), so the difference is TLS's and
/// not the VM's drift between two sequential scenarios. Both carry the
/// admin token: the coordinator has no mode without token checks (every
/// client call is authenticated by design); the token check's own cost
/// needs `pickup-ab` against a build from before tokens.
pub(crate) async fn run_tls(ctx: &Ctx) -> anyhow::Result<Figures> {
    let runs = if ctx.quick { 30 } else { 200 };
    let coord = Coordinator::start_tls(&ctx.dir.join("tls"), &[]).await?;
    let plain = Coordinator::start(&ctx.dir.join("plain"), &[]).await?;
    let _runners = [
        coord.start_runner("pickup-tls-0", "shell", 1)?,
        plain.start_runner("pickup-plain-0", "shell", 1)?,
    ];
    coord.wait_connected(1, Duration::from_secs(20)).await?;
    plain.wait_connected(1, Duration::from_secs(20)).await?;
    let stamps = ctx.dir.join("stamps");
    std::fs::create_dir_all(&stamps)?;
    let [mut samples, mut plain_samples] = measure(
        [
            (coord.url(), coord.api_token.clone()),
            (plain.url(), plain.api_token.clone()),
        ],
        coord.ca.clone(),
        stamps,
        runs,
    )
    .await?;
    let (p50, p99, max) = summary(&mut samples);
    let (q50, q99, _) = summary(&mut plain_samples);
    println!(
        "pickup-tls: {runs} runs over TLS + token, 1 shell runner: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; \
         alternating with plaintext + token: p50 {q50:.2} ms, p99 {q99:.2} ms; TLS costs {:+.2} ms of p50 (goal <= 0.3 ms)",
        p50 - q50
    );
    Ok(vec![
        ("pickup_tls_p50_ms".into(), p50),
        ("pickup_tls_p99_ms".into(), p99),
        ("pickup_tls_max_ms".into(), max),
        ("pickup_tls_plain_p50_ms".into(), q50),
        ("pickup_tls_plain_p99_ms".into(), q99),
        ("pickup_tls_cost_p50_ms".into(), p50 - q50),
    ])
}

/// Submits `runs` pickups (after [`WARMUP`]) to each coordinator at `urls`,
/// one at a time and alternating between them (the first one first on even
/// rounds, and so on), and returns each one's stamps minus the clock read
/// just before its `SubmitRun`, in ms.
///
/// The loop runs on a current-thread runtime of its own, on a blocking
/// thread, so reading the clock, encoding the request and writing it to the
/// socket happen on one thread, as in the Buildbot harness's synchronous
/// POST. On the bench's multi-thread runtime the request first hops to
/// another thread (tonic's buffer task on a worker), and that client-side
/// cost would be counted against the coordinator (docs/decisions.md).
async fn measure<const N: usize>(
    urls: [(String, Option<String>); N],
    ca: Option<std::path::PathBuf>,
    stamps: std::path::PathBuf,
    runs: usize,
) -> anyhow::Result<[Vec<f64>; N]> {
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut clients = Vec::with_capacity(N);
            for (url, token) in &urls {
                clients.push(connect(url, token.as_deref(), ca.as_deref()).await?);
            }
            let mut samples: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(runs));
            for i in 0..WARMUP + runs {
                for k in 0..N {
                    let arm = (i + k) % N;
                    let file = stamps.join(format!("{i}-{arm}"));
                    let ms = one_pickup(&mut clients[arm], &file).await?;
                    if i >= WARMUP {
                        samples[arm].push(ms);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok(samples)
        })
    })
    .await
    .context("the pickup loop panicked")?
}

async fn connect(
    url: &str,
    token: Option<&str>,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<Client> {
    let channel = crate::procs::endpoint(url, ca)?.connect().await?;
    Ok(Client::new(capstan_client::auth::authed(
        channel,
        capstan_client::Bearer::new(token)?,
    )))
}

type Client = api::pipeline_service_client::PipelineServiceClient<capstan_client::AuthChannel>;

/// One pickup: submits a run whose step writes `date +%s%N` to `file`,
/// waits for it, and returns the stamp minus the clock read just before
/// the submit, in ms.
async fn one_pickup(client: &mut Client, file: &std::path::Path) -> anyhow::Result<f64> {
    let yaml = format!(
        "version: 1\nname: pickup\ntasks:\n  t:\n    steps:\n      - run: \"date +%s%N > {}\"\n",
        file.display()
    );
    let before = epoch_ns();
    let id = Coordinator::submit(client, &yaml).await?;
    wait_finished(client, &id).await?;
    let stamp: i128 = std::fs::read_to_string(file)
        .with_context(|| format!("run {id} wrote no stamp"))?
        .trim()
        .parse()?;
    Ok((stamp - before) as f64 / 1e6)
}

/// Pickup of two builds side by side (`pickup-ab`): build A's coordinator and
/// runner from `$CAPSTAN_AB_BIN_DIR`, build B's from the usual place, both
/// idle at once, and submits alternating between them (A first on even
/// rounds, B first on odd), so that both see the same machine: on shared
/// VMs a p50 drifts within minutes by as much as the change being
/// measured, which two sequential runs would not tell apart.
pub(crate) async fn run_ab(ctx: &Ctx) -> anyhow::Result<Figures> {
    let a_bins = std::env::var_os("CAPSTAN_AB_BIN_DIR")
        .map(std::path::PathBuf::from)
        .context("pickup-ab compares two builds: set CAPSTAN_AB_BIN_DIR to build A's binaries")?;
    let runs = if ctx.quick { 30 } else { 300 };
    let a = Coordinator::start_from(&a_bins, &ctx.dir.join("a"), &[]).await?;
    let b = Coordinator::start(&ctx.dir.join("b"), &[]).await?;
    let _runners = [
        a.start_runner("pickup-a", "shell", 1)?,
        b.start_runner("pickup-b", "shell", 1)?,
    ];
    a.wait_connected(1, Duration::from_secs(20)).await?;
    b.wait_connected(1, Duration::from_secs(20)).await?;
    let urls = [
        (a.url(), a.api_token.clone()),
        (b.url(), b.api_token.clone()),
    ];
    let stamps = ctx.dir.join("stamps");
    std::fs::create_dir_all(&stamps)?;
    let [mut sa, mut sb] = measure(urls, None, stamps, runs).await?;
    let (a50, a99, _) = summary(&mut sa);
    let (b50, b99, _) = summary(&mut sb);
    println!(
        "pickup-ab: {runs} runs each, alternating, {} cores: A ({}) p50 {a50:.2} ms, p99 {a99:.2} ms; \
         B p50 {b50:.2} ms, p99 {b99:.2} ms; B/A p50 {:.3}",
        cores(),
        a_bins.display(),
        b50 / a50
    );
    Ok(vec![
        ("pickup_ab_a_p50_ms".into(), a50),
        ("pickup_ab_b_p50_ms".into(), b50),
    ])
}

/// The coordinator's share of pickup: SubmitRun start -> the offer arrives
/// at a lightweight runner in this process (no runner process, no fork).
async fn offer_latency(ctx: &Ctx, runs: usize) -> anyhow::Result<(f64, f64)> {
    use crate::fleet::{Fleet, FleetConfig};
    let coord = Coordinator::start(&ctx.dir.join("offer"), &[]).await?;
    let fleet = Fleet::start(FleetConfig {
        url: coord.url(),
        ca_cert: coord.ca.clone(),
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
pub(crate) async fn wait_finished(client: &mut Client, id: &str) -> anyhow::Result<api::Run> {
    use capstan_proto::pipeline::v1::RunState;
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
