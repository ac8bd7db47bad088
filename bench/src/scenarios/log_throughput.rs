//! Log throughput: one step writes a big log to stdout; bytes per second from
//! the runner, through the coordinator, to a client following the log.
//!
//! Real processes: a coordinator and one `capstan-runner` (shell executor);
//! the step is `yes 0123456789abcdefghij | head -c BYTES` (21-byte lines, as
//! in the Buildbot harness). A `ReadLogs(follow)` client opened right after
//! `SubmitRun` counts the bytes; the figure is bytes / (submit -> last byte
//! received), in MB = 10^6 bytes. The RSS of the coordinator and the runner is
//! sampled every 100 ms (peak), and VmHWM read at the end.
//!
//! Then a 2 MB log of numbered lines (`seq -f`, 40-byte lines): its bytes on
//! disk once the coordinator sealed it, as a share of its raw size
//! (`log_at_rest_pct`; issue 28's goal: at most 25 %).

use super::{Ctx, Figures, cores};
use crate::procs::{Coordinator, RssSampler, proc_stat};
use capstan_proto::api::v1 as api;
use std::time::{Duration, Instant};

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let bytes: u64 = if ctx.quick { 32 << 20 } else { 1 << 30 };
    let coord = Coordinator::start(&ctx.dir, &[]).await?;
    let runner = coord.start_runner("log-0", "shell", 1)?;
    coord.wait_connected(1, Duration::from_secs(20)).await?;
    let base_c = proc_stat(coord.pid())?;
    let base_r = proc_stat(runner.pid())?;
    let sampler = RssSampler::start(vec![coord.pid(), runner.pid()]);
    let mut client = coord.client().await?;
    let yaml = format!(
        "version: 1\nname: biglog\ntasks:\n  t:\n    timeout: 30m\n    steps:\n      - run: \"yes 0123456789abcdefghij | head -c {bytes}\"\n"
    );
    let start = Instant::now();
    let id = Coordinator::submit(&mut client, &yaml).await?;
    let mut stream = client
        .read_logs(api::ReadLogsRequest {
            run_id: id.clone(),
            task: String::new(),
            follow: true,
        })
        .await?
        .into_inner();
    let mut got = 0u64;
    let mut first = None;
    while let Some(chunk) = stream.message().await? {
        if first.is_none() && !chunk.data.is_empty() {
            first = Some(start.elapsed());
        }
        got += chunk.data.len() as u64;
    }
    let elapsed = start.elapsed();
    super::pickup::wait_finished(&mut client, &id).await?;
    // The runner puts a `$ command` line before a step's output.
    if got < bytes || got > bytes + 4096 {
        anyhow::bail!("the follower got {got} bytes, the step wrote {bytes} (plus a header line)");
    }
    let peaks = sampler.peaks();
    let (end_c, end_r) = (proc_stat(coord.pid())?, proc_stat(runner.pid())?);
    let mb = bytes as f64 / 1e6;
    let rate = mb / elapsed.as_secs_f64();
    let cpu_c = (end_c.cpu_s - base_c.cpu_s) / (bytes as f64 / 1e9);
    let cpu_r = (end_r.cpu_s - base_r.cpu_s) / (bytes as f64 / 1e9);
    println!(
        "log throughput: {mb:.0} MB through 1 shell runner -> coordinator -> follower, {} cores: \
         {rate:.1} MB/s ({:.2} s; first byte after {:.0} ms); RSS coordinator {:.1} -> peak {:.1} MB \
         (VmHWM {:.1}), runner {:.1} -> peak {:.1} MB (VmHWM {:.1}); CPU s per GB: coordinator \
         {cpu_c:.2}, runner {cpu_r:.2}",
        cores(),
        elapsed.as_secs_f64(),
        first.unwrap_or_default().as_secs_f64() * 1e3,
        base_c.rss_mb,
        peaks[0],
        end_c.hwm_mb,
        base_r.rss_mb,
        peaks[1],
        end_r.hwm_mb,
    );
    let at_rest = at_rest_pct(&coord, &mut client).await?;
    Ok(vec![
        ("log_at_rest_pct".into(), at_rest),
        ("log_mb_per_s".into(), rate),
        ("log_mb".into(), mb),
        ("log_coordinator_rss_start_mb".into(), base_c.rss_mb),
        (
            "log_coordinator_peak_rss_mb".into(),
            peaks[0].max(end_c.hwm_mb),
        ),
        ("log_runner_rss_start_mb".into(), base_r.rss_mb),
        ("log_runner_peak_rss_mb".into(), peaks[1].max(end_r.hwm_mb)),
        ("log_coordinator_cpu_s_per_gb".into(), cpu_c),
        ("log_runner_cpu_s_per_gb".into(), cpu_r),
    ])
}

/// Bytes on disk of a sealed 2 MB log of numbered lines, in % of its size.
async fn at_rest_pct(
    coord: &Coordinator,
    client: &mut capstan_proto::api::v1::pipeline_service_client::PipelineServiceClient<
        capstan_client::AuthChannel,
    >,
) -> anyhow::Result<f64> {
    let yaml = "version: 1\nname: numbered\ntasks:\n  t:\n    steps:\n      - run: \"seq -f '%08g a numbered line of a log' 1 52000\"\n";
    let id = Coordinator::submit(client, yaml).await?;
    let run = super::pickup::wait_finished(client, &id).await?;
    let task = run
        .tasks
        .first()
        .ok_or_else(|| anyhow::anyhow!("no task"))?;
    let logs = coord.dir.join("data").join("logs");
    let sealed = logs.join(format!("{}.logz", task.attempt_id));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sealed.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} not sealed in 30 s",
            sealed.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let raw = client
        .get_run(api::GetRunRequest { run_id: id })
        .await?
        .into_inner()
        .tasks[0]
        .history[0]
        .log_bytes;
    let stored = std::fs::metadata(&sealed)?.len();
    let pct = stored as f64 * 100.0 / raw as f64;
    println!(
        "log at rest: {raw} bytes of numbered lines take {stored} on disk sealed ({pct:.1} %)"
    );
    Ok(pct)
}
