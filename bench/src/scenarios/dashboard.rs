//! The dashboard (issue 23): a page of 100 runs, the page of a 100 MB log,
//! and 200 idle live followers.
//!
//! - `dashboard_runs_page_ms`: p50 of GET `/?limit=100` (HTML, bearer
//!   token) among 120 queued runs, timed by the client over loopback: the
//!   server-side render plus one local round trip.
//! - `dashboard_log_page_*`: one real runner (shell) prints 100 MB (quick:
//!   10 MB) of numbered lines in one step; then the coordinator's peak RSS
//!   while it serves that log's page, above its RSS just before, next to
//!   the page's size (the goal: growth no more than the page).
//! - `dashboard_sse_idle_cpu_pct_200`: 200 connections follow the runs
//!   list live (the page that re-renders every 2 s: the dearest follower)
//!   while nothing changes; the coordinator's CPU over the window.

use super::{Ctx, Figures, summary};
use crate::procs::{Coordinator, RssSampler, proc_stat};
use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const QUEUED: &str = "version: 1\nname: listed\ntasks:\n  t:\n    runs-on: { nobody: here }\n    steps: [ { run: 'true' } ]\n";
const FOLLOWERS: usize = 200;

fn get(coord: &Coordinator, path: &str) -> anyhow::Result<(u16, String)> {
    let auth = format!("Bearer {}", coord.api_token.as_deref().unwrap_or(""));
    capstan_tests::net::http_get_with(coord.http, path, &[("Authorization", &auth)])
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let coord = Coordinator::start(&ctx.dir, &[]).await?;
    let mut figures = runs_page(&coord, ctx.quick).await?;
    figures.extend(log_page(&coord, ctx).await?);
    figures.extend(idle_followers(&coord, ctx.quick).await?);
    Ok(figures)
}

async fn runs_page(coord: &Coordinator, quick: bool) -> anyhow::Result<Figures> {
    let mut client = coord.client().await?;
    for _ in 0..120 {
        Coordinator::submit(&mut client, QUEUED).await?;
    }
    let samples = if quick { 20 } else { 200 };
    let mut ms = Vec::with_capacity(samples);
    for i in 0..samples + 3 {
        let t0 = Instant::now();
        let (code, body) = tokio::task::block_in_place(|| get(coord, "/?limit=100"))?;
        let took = t0.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(code == 200, "the runs page answered {code}: {body}");
        let rows = body.matches("<tr data-run=").count();
        anyhow::ensure!(rows == 100, "the page listed {rows} runs, not 100");
        if i >= 3 {
            ms.push(took);
        }
    }
    let (p50, p99, _) = summary(&mut ms);
    println!("dashboard: a page of 100 runs: {p50:.2} ms p50, {p99:.2} ms p99 of {samples}");
    Ok(vec![
        ("dashboard_runs_page_ms".into(), p50),
        ("dashboard_runs_page_p99_ms".into(), p99),
    ])
}

async fn log_page(coord: &Coordinator, ctx: &Ctx) -> anyhow::Result<Figures> {
    let mb = if ctx.quick { 10 } else { 100 };
    let _runner = coord.start_runner("dash-0", "shell", 1)?;
    coord.wait_connected(1, Duration::from_secs(20)).await?;
    // ~100-byte numbered lines, `mb` MB in all.
    let yaml = format!(
        "version: 1\nname: biglog\ntasks:\n  t:\n    runs-on: {{ bench: dash-0 }}\n    steps:\n      - run: seq -f '%012g a line of the long log of the dashboard benchmark, numbered on the left' 1 {} \n",
        mb * 10_000
    );
    let mut client = coord.client().await?;
    let id = Coordinator::submit(&mut client, &yaml).await?;
    wait_succeeded(&mut client, &id, Duration::from_secs(300)).await?;
    let path = format!("/runs/{id}/tasks/t");
    // A first page, so what stays allocated after one is in the baseline;
    // it also counts the lines before the tail (read once, then cached).
    let t0 = Instant::now();
    tokio::task::block_in_place(|| get(coord, &path))?;
    let first = t0.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proc_stat(coord.pid())?.rss_mb;
    let sampler = RssSampler::start(vec![coord.pid()]);
    let t0 = Instant::now();
    let (code, body) = tokio::task::block_in_place(|| get(coord, &path))?;
    let took = t0.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let peak = sampler.peaks()[0].max(proc_stat(coord.pid())?.rss_mb);
    anyhow::ensure!(code == 200, "the log page answered {code}");
    anyhow::ensure!(
        body.contains("id=\"omitted\""),
        "the page did not cut the log"
    );
    let page_mb = body.len() as f64 / 1e6;
    let growth = (peak - before).max(0.0);
    println!(
        "dashboard: the page of a {mb} MB log: {page_mb:.2} MB in {took:.0} ms (the first view, which counts its lines: {first:.0} ms); coordinator RSS {before:.1} -> peak {peak:.1} MB (+{growth:.1})"
    );
    Ok(vec![
        ("dashboard_log_mb".into(), mb as f64),
        ("dashboard_log_page_mb".into(), page_mb),
        ("dashboard_log_page_ms".into(), took),
        ("dashboard_log_first_page_ms".into(), first),
        ("dashboard_log_page_rss_growth_mb".into(), growth),
    ])
}

async fn wait_succeeded(
    client: &mut capstan_proto::api::v1::pipeline_service_client::PipelineServiceClient<
        capstan_client::AuthChannel,
    >,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use capstan_proto::pipeline::v1::RunState;
    let deadline = Instant::now() + timeout;
    loop {
        let run = client
            .get_run(capstan_proto::api::v1::GetRunRequest { run_id: id.into() })
            .await?
            .into_inner();
        if run.state == RunState::Succeeded as i32 {
            return Ok(());
        }
        anyhow::ensure!(
            run.state < RunState::Succeeded as i32,
            "the log run ended {:?}",
            run.tasks.first().map(|t| &t.message)
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "the log run did not end in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn idle_followers(coord: &Coordinator, quick: bool) -> anyhow::Result<Figures> {
    let token = coord.api_token.clone().unwrap_or_default();
    let mut streams = Vec::with_capacity(FOLLOWERS);
    for _ in 0..FOLLOWERS {
        let mut s = TcpStream::connect(coord.http)?;
        write!(
            s,
            "GET /events?limit=50 HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        )?;
        streams.push(s);
    }
    // Every follower has had its first render.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = Duration::from_secs(if quick { 6 } else { 30 });
    let c0 = proc_stat(coord.pid())?.cpu_s;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let pct = (proc_stat(coord.pid())?.cpu_s - c0) / t0.elapsed().as_secs_f64() * 100.0;
    drop(streams);
    println!(
        "dashboard: {FOLLOWERS} idle followers of the runs list: {pct:.1} % of a core over {window:?}"
    );
    Ok(vec![("dashboard_sse_idle_cpu_pct_200".into(), pct)])
}
