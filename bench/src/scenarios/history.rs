//! History at scale (issue 28): what finished runs cost a coordinator that
//! restarts. For 0, 10,000 and 100,000 [0, 1,000, 5,000] finished
//! single-task runs in its store (made by the lightweight fleet, as in
//! `throughput`), the coordinator is stopped and started again on the same
//! data dir: `history_takeover_s_N` is process start -> `/readyz` 200 and
//! an API call answered (5 ms polls; what a new leader's load costs), and
//! `history_rss_mb_N` its RSS a second later. The goal: within 10 %
//! and 20 MB of the empty case (a leader loads only unfinished runs).
//! `history_list_page_ms_N`: then a ListRuns page of 50 succeeded runs of
//! one pipeline, p50 (goal 10 ms at 100,000). `history_etcd_*`: the same
//! with the state in etcd (one local member), where the restart is a new
//! leader's takeover.

use super::throughput::{finished_runs, page_latency};
use super::{Ctx, Figures};
use crate::procs::{Coordinator, proc_stat};
use std::time::Duration;

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let sizes: &[usize] = if ctx.quick {
        &[0, 1_000, 5_000]
    } else {
        &[0, 10_000, 100_000]
    };
    let mut figures = Vec::new();
    for &n in sizes {
        figures.extend(one(ctx, n, &[], "history").await?);
    }
    // On etcd (one local member), a new leader's takeover: it reads the
    // unfinished runs only, whatever the history holds.
    let Some(bin) = crate::procs::etcd_bin() else {
        return Err(
            super::Skip("etcd is not installed (scripts/testbed up installs it)".into()).into(),
        );
    };
    let etcd = crate::procs::Etcd::start(&bin, &ctx.dir.join("history-etcd")).await?;
    for &n in sizes {
        let flags = [
            "--etcd-endpoints".to_string(),
            etcd.endpoint(),
            "--etcd-prefix".to_string(),
            format!("/history-{n}/"),
        ];
        figures.extend(one(ctx, n, &flags, "history_etcd").await?);
    }
    Ok(figures)
}

/// `n` finished runs made, then the coordinator (with `flags`) stopped and
/// started again: its time to ready and RSS, and a ListRuns page.
async fn one(ctx: &Ctx, n: usize, flags: &[String], key: &str) -> anyhow::Result<Figures> {
    let dir = ctx.dir.join(format!("{key}-{n}"));
    let coord = Coordinator::start(&dir, flags).await?;
    if n > 0 {
        finished_runs(&coord, n, &format!("{key}-{n}")).await?;
        // Archived into the history, as a long-running coordinator's are.
        wait_none_held(&coord).await?;
    }
    drop(coord);
    let again = Coordinator::start(&dir, flags).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = proc_stat(again.pid())?.rss_mb;
    let takeover = again.ready_in.as_secs_f64();
    let store = if flags.is_empty() { "redb" } else { "etcd" };
    println!(
        "history: {n} finished runs in the store ({store}): restart to ready {:.0} ms, RSS {rss:.1} MB",
        takeover * 1e3
    );
    let label = label(n);
    let mut figures = vec![
        (format!("{key}_takeover_s_{label}"), takeover),
        (format!("{key}_rss_mb_{label}"), rss),
    ];
    if n > 0 {
        let page_ms = page_latency(&again).await?;
        println!(
            "history: ListRuns page of 50 with a filter among {n} ({store}): {page_ms:.2} ms p50"
        );
        figures.push((format!("{key}_list_page_ms_{label}"), page_ms));
    }
    Ok(figures)
}

/// Waits until the coordinator holds no run in memory (`capstan_runs_held`).
async fn wait_none_held(coord: &Coordinator) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (_, body) = coord.http_get("/metrics")?;
        let held = capstan_tests::metrics::samples(&body)
            .get("capstan_runs_held")
            .copied();
        if held == Some(0.0) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "still {held:?} runs held after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `0`, `10k`, `100k` (quick: `1k`, `5k`).
fn label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}
