//! Container step overhead: a one-step task on the docker executor, through
//! the whole of Capstan (SubmitRun -> offer -> workspace volume -> step
//! container -> logs acknowledged -> run succeeded, seen by WatchRun), against
//! a bare `docker run --rm --network none IMAGE true` of the same image, in
//! the same process and interleaved (bare, capstan, bare, ...) so engine
//! drift hits both alike. Goal: median overhead <= 50 ms.
//!
//! Needs the test bed (`scripts/testbed up`): a Docker Engine and the image
//! `capstan-test/busybox:1` (or `CAPSTAN_TEST_IMAGE`). Nothing is pulled.

use super::{cores, summary};
use crate::procs::Coordinator;
use anyhow::{Context, bail};
use std::process::Command;
use std::time::{Duration, Instant};

const WARMUP: usize = 2;

fn image() -> String {
    std::env::var("CAPSTAN_TEST_IMAGE").unwrap_or_else(|_| "capstan-test/busybox:1".into())
}

fn bare_docker_run(image: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", image, "true"])
        .output()
        .context("running the docker CLI")?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "docker run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

pub(crate) async fn run(quick: bool) -> anyhow::Result<Vec<(String, f64)>> {
    let runs = if quick { 10 } else { 40 };
    let image = image();
    let present = Command::new("docker")
        .args(["image", "inspect", &image])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        bail!("no Docker Engine or no image {image}: run scripts/testbed up");
    }
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[]).await?;
    let _runner = coord.start_runner("container-0", "docker", 1)?;
    coord.wait_connected(1, Duration::from_secs(20)).await?;
    let mut client = coord.client().await?;
    let yaml = format!(
        "version: 1\nname: container\ntasks:\n  t:\n    image: {image}\n    steps:\n      - run: \"true\"\n"
    );
    let (mut bare, mut capstan) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for i in 0..WARMUP + runs {
        let b = tokio::task::spawn_blocking({
            let image = image.clone();
            move || bare_docker_run(&image)
        })
        .await??;
        let start = Instant::now();
        let id = Coordinator::submit(&mut client, &yaml).await?;
        super::pickup::wait_finished(&mut client, &id).await?;
        let c = start.elapsed().as_secs_f64() * 1e3;
        if i >= WARMUP {
            bare.push(b);
            capstan.push(c);
        }
    }
    let overhead: Vec<f64> = capstan.iter().zip(&bare).map(|(c, b)| c - b).collect();
    let (bare_p50, bare_p99, _) = summary(&mut bare);
    let (cap_p50, cap_p99, _) = summary(&mut capstan);
    let mut overhead = overhead;
    let (over_p50, over_p99, _) = summary(&mut overhead);
    let ratio = cap_p50 / bare_p50;
    println!(
        "container: {runs} runs, {} cores: bare docker run p50 {bare_p50:.1} ms, capstan task p50 {cap_p50:.1} ms, \
         overhead p50 {over_p50:.1} ms (goal <= 50), ratio {ratio:.2}",
        cores()
    );
    Ok(vec![
        ("container_bare_docker_run_p50_ms".into(), bare_p50),
        ("container_bare_docker_run_p99_ms".into(), bare_p99),
        ("container_capstan_p50_ms".into(), cap_p50),
        ("container_capstan_p99_ms".into(), cap_p99),
        ("container_overhead_p50_ms".into(), over_p50),
        ("container_overhead_p99_ms".into(), over_p99),
        ("container_overhead_ratio".into(), ratio),
        ("container_runs".into(), runs as f64),
    ])
}
