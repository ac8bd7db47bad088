//! Dispatch throughput: trivial tasks completed per second by one coordinator
//! (redb store) with 50 runners x 4 slots.
//!
//! The runners are lightweight protocol clients in this process (see
//! `fleet`): they accept each offer and report it succeeded at once, so the
//! figure is the coordinator's cost per task (offer, accept, finish, three
//! state transitions, group commits), not an executor's. Two measurements, each on
//! a fresh coordinator:
//!
//! - `throughput_tasks_per_s`: N single-task runs submitted by 32 concurrent
//!   callers while the fleet runs them; N / (first submit -> every run succeeded).
//! - `throughput_drain_tasks_per_s`: the N runs are queued first, then the
//!   fleet connects; N / (fleet start -> every run succeeded): dispatch alone.
//!
//! "Every run succeeded" is confirmed with ListRuns once the fleet got N offers.
//! [`run_etcd`] does the same with the coordinator's state in etcd.

use super::{Ctx, Figures, cores};
use crate::fleet::{Fleet, FleetConfig};
use crate::procs::{Coordinator, proc_stat};
use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::RunState;
use futures::StreamExt;
use std::time::{Duration, Instant};

const RUNNERS: usize = 50;
const SLOTS: u32 = 4;
const SUBMITTERS: usize = 32;
const YAML: &str = "version: 1\nname: trivial\ntasks:\n  t:\n    steps:\n      - run: \"true\"\n";

/// The fleet of one phase; each phase's runners have names of their own,
/// since on etcd both phases share the store and a name already registered
/// is refused to the registration token alone.
fn fleet_config(coord: &Coordinator, phase: &str) -> FleetConfig {
    FleetConfig {
        url: coord.url(),
        ca_cert: coord.ca.clone(),
        token: coord.token.clone(),
        count: RUNNERS,
        capacity: SLOTS,
        per_conn: 10,
        name_prefix: format!("tp-{phase}"),
    }
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let n = if ctx.quick { 2_000 } else { 20_000 };
    let m = measure(ctx, &[], n, "redb", false).await?;
    Ok(m.figures("throughput", n))
}

/// [`run`] with TLS on the coordinator's ports (the fleet connects over
/// TLS): what TLS costs dispatch.
pub(crate) async fn run_tls(ctx: &Ctx) -> anyhow::Result<Figures> {
    let n = if ctx.quick { 2_000 } else { 20_000 };
    let m = measure(ctx, &[], n, "redb, TLS", true).await?;
    Ok(m.figures("throughput_tls", n))
}

/// The same on the etcd store: one local etcd member (not a 3-member
/// cluster: on 2 cores that would measure etcd's own replication).
pub(crate) async fn run_etcd(ctx: &Ctx) -> anyhow::Result<Figures> {
    let Some(bin) = crate::procs::etcd_bin() else {
        return Err(
            super::Skip("etcd is not installed (scripts/testbed up installs it)".into()).into(),
        );
    };
    let n = if ctx.quick { 500 } else { 5_000 };
    let etcd = crate::procs::Etcd::start(&bin, &ctx.dir.join("etcd")).await?;
    let flags = [
        "--etcd-endpoints".to_string(),
        etcd.endpoint(),
        "--etcd-prefix".to_string(),
        format!("/bench-{}/", std::process::id()),
    ];
    let m = measure(ctx, &flags, n, "etcd (1 local member)", false).await?;
    Ok(m.figures("throughput_etcd", n))
}

struct Measured {
    rate: f64,
    submit_rate: f64,
    cpu_us: f64,
    drain_rate: f64,
    drain_cpu_us: f64,
    /// ListRuns of one filtered page of 50 out of the `n` finished runs,
    /// p50 over [`QUERIES`] calls.
    list_runs_page_ms: f64,
}

/// ListRuns calls the page latency is the median of.
const QUERIES: usize = 30;

impl Measured {
    fn figures(&self, prefix: &str, n: usize) -> Figures {
        vec![
            (format!("{prefix}_tasks_per_s"), self.rate),
            (format!("{prefix}_submit_runs_per_s"), self.submit_rate),
            (format!("{prefix}_coordinator_cpu_us_per_task"), self.cpu_us),
            (format!("{prefix}_tasks"), n as f64),
            (format!("{prefix}_drain_tasks_per_s"), self.drain_rate),
            (
                format!("{prefix}_drain_coordinator_cpu_us_per_task"),
                self.drain_cpu_us,
            ),
            (
                format!("{prefix}_list_runs_page_ms"),
                self.list_runs_page_ms,
            ),
        ]
    }
}

async fn measure(
    ctx: &Ctx,
    flags: &[String],
    n: usize,
    store: &str,
    tls: bool,
) -> anyhow::Result<Measured> {
    let start_coordinator = async |dir: &str| {
        let dir = ctx.dir.join(dir);
        if tls {
            Coordinator::start_tls(&dir, flags).await
        } else {
            Coordinator::start(&dir, flags).await
        }
    };
    // 1. Submit while the fleet runs.
    let coord = start_coordinator("concurrent").await?;
    let fleet = Fleet::start(fleet_config(&coord, "concurrent")).await?;
    let cpu0 = proc_stat(coord.pid())?.cpu_s;
    let start = Instant::now();
    submit_all(&coord, n).await?;
    let submitted = start.elapsed();
    wait_all(&coord, &fleet, n).await?;
    let elapsed = start.elapsed();
    let st = proc_stat(coord.pid())?;
    fleet.stop().await;
    let rate = n as f64 / elapsed.as_secs_f64();
    let cpu_us = (st.cpu_s - cpu0) * 1e6 / n as f64;
    println!(
        "throughput: {n} trivial tasks, {RUNNERS} lightweight runners x {SLOTS} slots, {store}, {} cores: \
         {rate:.0} tasks/s submitted and run concurrently (submits done after {:.2} s, all done after {:.2} s); \
         coordinator CPU {cpu_us:.0} us/task, RSS {:.1} MB",
        cores(),
        submitted.as_secs_f64(),
        elapsed.as_secs_f64(),
        st.rss_mb
    );
    let submit_rate = n as f64 / submitted.as_secs_f64();
    drop(coord);

    // 2. Queue first, then let the fleet drain it.
    let coord = start_coordinator("drain").await?;
    submit_all(&coord, n).await?;
    let cpu0 = proc_stat(coord.pid())?.cpu_s;
    let start = Instant::now();
    let fleet = Fleet::start(fleet_config(&coord, "drain")).await?;
    wait_all(&coord, &fleet, n).await?;
    let elapsed = start.elapsed();
    let st = proc_stat(coord.pid())?;
    fleet.stop().await;
    let drain_rate = n as f64 / elapsed.as_secs_f64();
    let drain_cpu_us = (st.cpu_s - cpu0) * 1e6 / n as f64;
    println!(
        "throughput: {n} queued trivial tasks drained by {RUNNERS} x {SLOTS}, {store}: {drain_rate:.0} tasks/s \
         in {:.2} s; coordinator CPU {drain_cpu_us:.0} us/task",
        elapsed.as_secs_f64()
    );
    let list_runs_page_ms = page_latency(&coord).await?;
    println!(
        "throughput: ListRuns, a page of 50 succeeded runs of one pipeline out of {n}: \
         {list_runs_page_ms:.2} ms p50 of {QUERIES}"
    );
    Ok(Measured {
        rate,
        submit_rate,
        cpu_us,
        drain_rate,
        drain_cpu_us,
        list_runs_page_ms,
    })
}

/// The median time of a filtered ListRuns page of 50, asked [`QUERIES`]
/// times (each a round trip to the coordinator on loopback).
pub(crate) async fn page_latency(coord: &Coordinator) -> anyhow::Result<f64> {
    let mut client = coord.client().await?;
    let mut times = Vec::with_capacity(QUERIES);
    for _ in 0..QUERIES {
        let start = Instant::now();
        let page = client
            .list_runs(api::ListRunsRequest {
                limit: 50,
                state: RunState::Succeeded as i32,
                pipeline: "trivial".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        times.push(start.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(page.runs.len() == 50, "a page of {} runs", page.runs.len());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `n` single-task runs submitted and run to success by a fleet of 20
/// lightweight runners of 8 slots named `name_prefix-*` (a history to
/// measure); the fleet, for more work.
pub(crate) async fn finished_runs(
    coord: &Coordinator,
    n: usize,
    name_prefix: &str,
) -> anyhow::Result<Fleet> {
    let fleet = Fleet::start(FleetConfig {
        url: coord.url(),
        ca_cert: None,
        token: coord.token.clone(),
        count: 20,
        capacity: 8,
        per_conn: 10,
        name_prefix: name_prefix.to_owned(),
    })
    .await?;
    submit_all(coord, n).await?;
    wait_all(coord, &fleet, n).await?;
    Ok(fleet)
}

/// Submits `n` single-task runs with `SUBMITTERS` calls in flight.
pub(crate) async fn submit_all(coord: &Coordinator, n: usize) -> anyhow::Result<()> {
    let client = coord.client().await?;
    let results: Vec<anyhow::Result<String>> = futures::stream::iter(0..n)
        .map(|_| {
            let mut c = client.clone();
            async move { Coordinator::submit(&mut c, YAML).await }
        })
        .buffer_unordered(SUBMITTERS)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Waits until the fleet got `n` offers and the coordinator counts `n`
/// succeeded runs (`capstan_runs_finished_total`, counted once a run's end
/// is durable). Polled on `/metrics`, not by listing the runs: a listing of
/// every finished run reads them back from the store, and every 5 ms that
/// was most of what the coordinator did during the drain.
pub(crate) async fn wait_all(coord: &Coordinator, fleet: &Fleet, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while fleet.offers() < n as u64 {
        if Instant::now() > deadline {
            anyhow::bail!("only {} of {n} tasks offered in 600 s", fleet.offers());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    loop {
        let done = succeeded(coord)?;
        if done >= n as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {done} of {n} runs succeeded in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The coordinator's count of succeeded runs.
fn succeeded(coord: &Coordinator) -> anyhow::Result<f64> {
    let (status, body) = coord.http_get("/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    let samples = capstan_tests::metrics::samples(&body);
    Ok(samples
        .get("capstan_runs_finished_total{outcome=\"succeeded\"}")
        .copied()
        .unwrap_or(0.0))
}
