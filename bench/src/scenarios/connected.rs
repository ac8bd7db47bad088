//! Connected runners: N lightweight runners (10,000; quick: 500) connected to
//! one coordinator and heart-beating at its idle interval (default 5 s; 1 s while running), 100 per
//! HTTP/2 connection. Measures the coordinator's RSS and CPU (utime + stime
//! from /proc over an idle window), then a burst of N single-task runs
//! dispatched across them (one slot each).

use super::{Ctx, Figures, cores};
use crate::fleet::{Fleet, FleetConfig};
use crate::procs::{Coordinator, proc_stat};
use std::time::{Duration, Instant};

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let (n, idle) = if ctx.quick {
        (500, Duration::from_secs(3))
    } else {
        (10_000, Duration::from_secs(10))
    };
    let n = ctx.connected_runners.unwrap_or(n);
    let coord = Coordinator::start(&ctx.dir, &[]).await?;
    let base = proc_stat(coord.pid())?;
    let start = Instant::now();
    let fleet = Fleet::start(FleetConfig {
        url: coord.url(),
        ca_cert: coord.ca.clone(),
        token: coord.token.clone(),
        count: n,
        capacity: 1,
        per_conn: 100,
        name_prefix: "c".into(),
    })
    .await?;
    let connect = start.elapsed();
    // Let registration and attach work settle before the idle window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hb0 = fleet
        .counters
        .heartbeats
        .load(std::sync::atomic::Ordering::Relaxed);
    let s0 = proc_stat(coord.pid())?;
    tokio::time::sleep(idle).await;
    let s1 = proc_stat(coord.pid())?;
    let hb = fleet
        .counters
        .heartbeats
        .load(std::sync::atomic::Ordering::Relaxed)
        - hb0;
    let cpu_pct = (s1.cpu_s - s0.cpu_s) / idle.as_secs_f64() * 100.0;
    let hb_rate = hb as f64 / idle.as_secs_f64();
    println!(
        "connected runners: {n} lightweight runners (100 per HTTP/2 connection), {} cores: \
         connected in {:.1} s; coordinator RSS {:.1} MB (empty: {:.1} MB), idle CPU {cpu_pct:.1} % of one \
         core at {hb_rate:.0} heartbeats/s",
        cores(),
        connect.as_secs_f64(),
        s1.rss_mb,
        base.rss_mb
    );

    let start = Instant::now();
    super::throughput::submit_all(&coord, n).await?;
    super::throughput::wait_all(&coord, &fleet, n).await?;
    let burst = start.elapsed();
    let after = proc_stat(coord.pid())?;
    fleet.stop().await;
    println!(
        "connected runners: burst of {n} tasks over {n} runners done in {:.2} s ({:.0} tasks/s); \
         coordinator RSS after {:.1} MB",
        burst.as_secs_f64(),
        n as f64 / burst.as_secs_f64(),
        after.rss_mb
    );
    Ok(vec![
        ("connected_runners".into(), n as f64),
        ("coordinator_rss_mb_10k_runners".into(), s1.rss_mb),
        ("coordinator_idle_cpu_pct_10k_runners".into(), cpu_pct),
        ("connected_heartbeats_per_s".into(), hb_rate),
        ("connected_connect_s".into(), connect.as_secs_f64()),
        ("burst_10k_tasks_s".into(), burst.as_secs_f64()),
        (
            "burst_10k_tasks_per_s".into(),
            n as f64 / burst.as_secs_f64(),
        ),
        ("coordinator_rss_mb_after_burst".into(), after.rss_mb),
    ])
}
