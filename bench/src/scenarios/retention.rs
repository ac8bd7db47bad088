//! Retention under load (issue 28): N finished runs [quick 5,000; full
//! 100,000] expire (`--retention 10s` [40s]) while a steady load of R runs
//! a second [200; 1,000] is submitted and dispatched to the lightweight
//! fleet. A sampler reads the fleet's latest offer time every millisecond:
//! `retention_max_dispatch_gap_ms` is the longest time without an offer
//! from then until retention has deleted the backlog, `retention_baseline_gap_ms` the
//! longest before it began (the load's own spacing: the floor), and
//! `retention_delete_s` how long deleting all N took. The coordinator's
//! longest pass is `retention_max_pass_ms` (an upper bound: the bucket of
//! `capstan_retention_pass_seconds` that holds them all). Goal: no
//! dispatch pause over 50 ms.

use super::throughput::finished_runs;
use super::{Ctx, Figures};
use crate::procs::{Coordinator, epoch_ns};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The baseline window ends this long into the load (the backlog's
/// retention, 10 s at least, is not up before).
const BASELINE_END: Duration = Duration::from_millis(2500);

const YAML: &str = "version: 1\nname: load\ntasks:\n  t:\n    steps: [ { run: 'true' } ]\n";

fn deleted(coord: &Coordinator) -> u64 {
    let Ok((200, text)) = coord.http_get("/metrics") else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("capstan_runs_deleted_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// An upper bound of the longest retention pass, in ms: the smallest
/// bucket of `capstan_retention_pass_seconds` that holds every pass.
fn max_pass_ms(coord: &Coordinator) -> f64 {
    let Ok((200, text)) = coord.http_get("/metrics") else {
        return f64::NAN;
    };
    let name = "capstan_retention_pass_seconds";
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let bucket = format!("{name}_bucket");
    text.lines()
        .filter(|l| l.starts_with(&bucket))
        .filter_map(|l| {
            // `NAME_bucket(le="0.064") 9`, with braces for the parentheses.
            let (_, rest) = l.split_once("le=\"")?;
            let (le, tail) = rest.split_once('"')?;
            let n = tail.rsplit(' ').next()?;
            Some((le.parse::<f64>().ok()?, n.trim().parse::<f64>().ok()?))
        })
        .filter(|&(_, n)| count > 0.0 && n >= count)
        .map(|(le, _)| le * 1e3)
        .fold(f64::INFINITY, f64::min)
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let (n, rate, retention) = if ctx.quick {
        (5_000, 200, "10s")
    } else {
        (100_000, 1_000, "40s")
    };
    let coord = Coordinator::start(&ctx.dir, &["--retention".into(), retention.into()]).await?;
    let fleet = finished_runs(&coord, n, "retention").await?;

    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(coord.client().await?, rate, stop.clone());
    let (baseline, during) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = gaps(
        fleet.counters.clone(),
        stop.clone(),
        baseline.clone(),
        during.clone(),
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(if ctx.quick { 120 } else { 900 });
    let mut began = None;
    loop {
        let d = deleted(&coord);
        if d > 0 && began.is_none() {
            began = Some(Instant::now());
        }
        if d >= n as u64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "retention deleted {d} of {n} runs in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delete_s = began.map_or(0.0, |b| b.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let _ = sampler.await;
    fleet.stop().await;
    let (base_ms, gap_ms) = (
        baseline.load(Ordering::Relaxed) as f64 / 1e3,
        during.load(Ordering::Relaxed) as f64 / 1e3,
    );
    let pass_ms = max_pass_ms(&coord);
    println!(
        "retention: {n} expired runs deleted in {delete_s:.1} s while {rate} runs/s were dispatched: longest gap between offers {gap_ms:.1} ms (before deleting: {base_ms:.1} ms); longest pass at most {pass_ms:.1} ms"
    );
    Ok(vec![
        ("retention_runs".into(), n as f64),
        ("retention_delete_s".into(), delete_s),
        ("retention_max_dispatch_gap_ms".into(), gap_ms),
        ("retention_baseline_gap_ms".into(), base_ms),
        ("retention_max_pass_ms".into(), pass_ms),
    ])
}

type Client = capstan_proto::api::v1::pipeline_service_client::PipelineServiceClient<
    capstan_client::AuthChannel,
>;

/// `rate` single-task runs a second, in batches every 10 ms, until `stop`.
fn steady_load(client: Client, rate: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            for _ in 0..(rate / 100).max(1) {
                let mut c = client.clone();
                tokio::spawn(async move { Coordinator::submit(&mut c, YAML).await });
            }
        }
    })
}

/// Samples, every millisecond until `stop`, how long ago the fleet's
/// latest offer came: the longest in the baseline window into `baseline`,
/// after it into `during` (microseconds).
fn gaps(
    counters: Arc<crate::fleet::Counters>,
    stop: Arc<AtomicBool>,
    baseline: Arc<AtomicU64>,
    during: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The baseline: the load's first seconds, long before the backlog's
        // retention is up (it ended just before the load began); after
        // them, until the backlog is gone, deletion.
        let t0 = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let last = counters.last_offer_ns.load(Ordering::Relaxed) as i128;
            let gap_us = ((epoch_ns() - last) / 1000).max(0) as u64;
            let at = t0.elapsed();
            if at >= BASELINE_END {
                during.fetch_max(gap_us, Ordering::Relaxed);
            } else if at > Duration::from_millis(500) {
                baseline.fetch_max(gap_us, Ordering::Relaxed);
            }
        }
    })
}
