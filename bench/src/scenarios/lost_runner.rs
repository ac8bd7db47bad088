//! Lost runner: kill -9 of a real runner mid-task -> the task running again
//! on another runner.
//!
//! Two `capstan-runner` processes (shell executor, capacity 1); one run whose
//! task sleeps. Once it is running, the runner that holds it is killed with
//! SIGKILL; the figure is the time from the kill to GetRun showing the task's
//! second attempt `running` (polled every 5 ms). The coordinator requeues a
//! runner's attempts when its lease runs out (heartbeat and lease are in the
//! report: full mode uses the defaults, 1 s / 5 s; quick mode 250 ms / 1 s).
//!
//! Then the false positives: with a replacement runner, runs of short tasks
//! go through both runners while busy loops (2 per core, like `stress
//! --cpu`) load the machine; every attempt past the first of a task that no
//! runner lost is a false requeue (goal: 0).

use super::{Ctx, Figures, cores};
use crate::procs::Coordinator;
use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::TaskState;
use std::time::{Duration, Instant};

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let (hb_ms, lease_ms) = if ctx.quick { (250, 1000) } else { (1000, 5000) };
    let coord = Coordinator::start(
        &ctx.dir,
        &[
            "--heartbeat-ms".into(),
            hb_ms.to_string(),
            "--lease-ms".into(),
            lease_ms.to_string(),
        ],
    )
    .await?;
    let mut runners = [
        coord.start_runner("lost-0", "shell", 1)?,
        coord.start_runner("lost-1", "shell", 1)?,
    ];
    coord.wait_connected(2, Duration::from_secs(20)).await?;
    let mut client = coord.client().await?;
    let yaml = "version: 1\nname: lost\ntasks:\n  t:\n    steps:\n      - run: \"sleep 120\"\n";
    let id = Coordinator::submit(&mut client, yaml).await?;
    let first = wait_task(&mut client, &id, |t| {
        t.state == TaskState::Running as i32 && t.attempts == 1
    })
    .await?;
    let victim = runners
        .iter_mut()
        .find(|r| r.name == first.runner)
        .ok_or_else(|| anyhow::anyhow!("task runs on unknown runner {}", first.runner))?;
    let killed = Instant::now();
    victim.kill();
    let second = wait_task(&mut client, &id, |t| {
        t.state == TaskState::Running as i32 && t.attempts >= 2
    })
    .await?;
    let requeue = killed.elapsed().as_secs_f64();
    let _ = client
        .cancel_run(api::CancelRunRequest { run_id: id })
        .await;
    println!(
        "lost runner: kill -9 of {} mid-task -> attempt 2 running on {} after {requeue:.2} s \
         (heartbeat {hb_ms} ms, lease {lease_ms} ms), {} cores",
        first.runner,
        second.runner,
        cores()
    );
    let _replacement = coord.start_runner("lost-2", "shell", 1)?;
    coord.wait_connected(2, Duration::from_secs(20)).await?;
    let runs = if ctx.quick { 6 } else { 20 };
    let false_requeues = {
        let _load = CpuLoad::start(2 * cores())?;
        requeues_of_runs(&mut client, runs).await?
    };
    println!(
        "lost runner: {runs} runs of a 0.5 s task on 2 runners under {} busy loops: \
         {false_requeues} false requeues",
        2 * cores()
    );
    Ok(vec![
        ("lost_runner_requeue_s".into(), requeue),
        (
            "lost_runner_false_requeues_under_load".into(),
            false_requeues as f64,
        ),
        ("lost_runner_lease_s".into(), lease_ms as f64 / 1000.0),
        ("lost_runner_heartbeat_s".into(), hb_ms as f64 / 1000.0),
    ])
}

/// Submits `n` runs of one short task, waits for them all to finish, and
/// returns how many attempts beyond the first their tasks took.
async fn requeues_of_runs(
    client: &mut api::pipeline_service_client::PipelineServiceClient<capstan_client::AuthChannel>,
    n: usize,
) -> anyhow::Result<u32> {
    let yaml = "version: 1\nname: loaded\ntasks:\n  t:\n    steps:\n      - run: \"sleep 0.5\"\n";
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(Coordinator::submit(client, yaml).await?);
    }
    let mut extra = 0;
    for id in ids {
        let t = wait_task(client, &id, |t| {
            t.state == TaskState::Succeeded as i32 || t.state == TaskState::Failed as i32
        })
        .await?;
        anyhow::ensure!(
            t.state == TaskState::Succeeded as i32,
            "a run under load failed: {t:?}"
        );
        extra += t.attempts.saturating_sub(1);
    }
    Ok(extra)
}

/// Busy loops in child processes (`sh -c 'while :; do :; done'`), killed
/// when dropped.
struct CpuLoad(Vec<std::process::Child>);

impl CpuLoad {
    fn start(n: usize) -> anyhow::Result<Self> {
        // Built up in place, so a failed spawn still stops the others.
        let mut load = Self(Vec::new());
        for _ in 0..n {
            load.0.push(
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()?,
            );
        }
        Ok(load)
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_task(
    client: &mut api::pipeline_service_client::PipelineServiceClient<capstan_client::AuthChannel>,
    id: &str,
    pred: impl Fn(&api::Task) -> bool,
) -> anyhow::Result<api::Task> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = client
            .get_run(api::GetRunRequest { run_id: id.into() })
            .await?
            .into_inner();
        if let Some(t) = run.tasks.first()
            && pred(t)
        {
            return Ok(t.clone());
        }
        if Instant::now() > deadline {
            anyhow::bail!("task of run {id} did not reach the expected state: {run:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
