//! Webhook receipt -> first task running (issue 22), on an idle fleet.
//!
//! One real `capstan-runner` (shell executor, capacity 1) and a repository
//! registered by its `file://` URL, whose pipeline's only step is
//! `date +%s%N > FILE`. Each sample is a signed Gitea push delivery (a new
//! delivery id for the same commit, so the pipeline file is in the
//! coordinator's cache after the first) timed from the clock read before
//! the POST to the stamp. A second repository on the tests' git
//! smart-HTTP server gets a new commit per sample; its deliveries measure
//! the uncached fetch of the pipeline file at the pushed SHA (the
//! handler's `fetch_ms`, and the whole answer).

use super::{Ctx, Figures, summary};
use crate::procs::{Coordinator, epoch_ns};
use capstan_proto::api::v1 as api;
use capstan_tests::forge_api::{Forge, deliver, push_payload};
use capstan_tests::git_server::{GitServer, git};
use std::path::Path;
use std::time::{Duration, Instant};

const WARMUP: usize = 3;

async fn add_repo(coord: &Coordinator, name: &str, url: &str) -> anyhow::Result<String> {
    let mut repos = api::repo_service_client::RepoServiceClient::new(coord.channel().await?);
    let made = repos
        .add_repo(api::AddRepoRequest {
            name: name.into(),
            url: url.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(made.webhook_secret)
}

fn commit(tree: &Path, text: &str) -> String {
    std::fs::write(tree.join(".capstan.yaml"), text).expect("write the pipeline file");
    git(tree, &["add", "-A"]);
    git(tree, &["commit", "-q", "--allow-empty", "-m", "bench"]);
    git(tree, &["rev-parse", "HEAD"])
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    let samples = if ctx.quick { 20 } else { 200 };
    let coord = Coordinator::start(&ctx.dir, &[]).await?;
    let _runner = coord.start_runner("webhook-0", "shell", 1)?;
    coord.wait_connected(1, Duration::from_secs(20)).await?;
    let stamps = ctx.dir.join("stamps");
    std::fs::create_dir_all(&stamps)?;
    let tree = ctx.dir.join("local-repo");
    std::fs::create_dir_all(&tree)?;
    git(&tree, &["init", "-q", "-b", "main"]);
    let yaml = format!(
        "version: 1\nname: hook\ntasks:\n  t:\n    steps:\n      - run: date +%s%N > {}/${{{{ run.id }}}}\n",
        stamps.display()
    );
    let sha = commit(&tree, &yaml);
    let url = format!("file://{}", tree.display());
    let secret = add_repo(&coord, "local", &url).await?;
    let body = push_payload(Forge::Gitea, &url, "refs/heads/main", &sha, &sha);
    let mut client = coord.client().await?;
    let mut cached = Vec::new();
    for i in 0..WARMUP + samples {
        let t0 = epoch_ns();
        let (code, v) = deliver(coord.http, Forge::Gitea, &format!("b-{i}"), &secret, &body)?;
        anyhow::ensure!(code == 202, "webhook answered {code}: {v}");
        let run = v["runs"][0]["run"].as_str().unwrap_or("").to_string();
        let stamp = stamps.join(&run);
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&stamp)
                && !t.trim().is_empty()
            {
                break t;
            }
            anyhow::ensure!(Instant::now() < deadline, "run {run} never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let ns: i128 = text.trim().parse()?;
        if i >= WARMUP {
            cached.push((ns - t0) as f64 / 1e6);
        }
        // The fleet is idle at the next delivery.
        while client
            .get_run(api::GetRunRequest {
                run_id: run.clone(),
            })
            .await?
            .into_inner()
            .finished_at_ms
            == 0
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (p50, p99, max) = summary(&mut cached);
    println!(
        "webhook: {samples} deliveries, pipeline file cached: receipt -> first task running p50 {p50:.2} ms, \
         p99 {p99:.2} ms, max {max:.2} ms (goal <= 20 ms)"
    );
    let (f50, a50) = uncached(ctx, &coord, if ctx.quick { 5 } else { 30 }).await?;
    println!(
        "webhook: uncached fetch of the pipeline file over smart HTTP: p50 {f50:.2} ms (whole answer p50 {a50:.2} ms)"
    );
    Ok(vec![
        ("webhook_pickup_p50_ms".into(), p50),
        ("webhook_pickup_p99_ms".into(), p99),
        ("webhook_pickup_max_ms".into(), max),
        ("webhook_samples".into(), samples as f64),
        ("webhook_uncached_fetch_p50_ms".into(), f50),
        ("webhook_uncached_answer_p50_ms".into(), a50),
    ])
}

/// (fetch p50, whole answer p50) of `n` pushes to a smart-HTTP repository.
async fn uncached(ctx: &Ctx, coord: &Coordinator, n: usize) -> anyhow::Result<(f64, f64)> {
    let server = GitServer::start("bench", "bench-pw")?;
    server.create_repo("bench/app")?;
    let tree = ctx.dir.join("http-repo");
    std::fs::create_dir_all(&tree)?;
    git(&tree, &["init", "-q", "-b", "main"]);
    // The runner has no login for this server: its runs fail at checkout
    // (cheaply); only the coordinator's fetch is measured.
    let secret = add_repo(coord, "remote", &server.url_with_auth("bench/app")).await?;
    let (mut fetch, mut answer) = (Vec::new(), Vec::new());
    for i in 0..n {
        let sha = commit(
            &tree,
            &format!("version: 1\nname: remote\ntasks:\n  t:\n    steps:\n      - run: echo {i}\n"),
        );
        git(
            &tree,
            &[
                "push",
                "-q",
                &server.url_with_auth("bench/app"),
                "HEAD:main",
            ],
        );
        let body = push_payload(
            Forge::Gitea,
            &server.url("bench/app"),
            "refs/heads/main",
            &sha,
            &sha,
        );
        let t0 = Instant::now();
        let (code, v) = deliver(coord.http, Forge::Gitea, &format!("u-{i}"), &secret, &body)?;
        answer.push(t0.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(code == 202, "webhook answered {code}: {v}");
        anyhow::ensure!(v["runs"][0]["pipeline_cached"] == false, "{v}");
        fetch.push(v["runs"][0]["fetch_ms"].as_f64().unwrap_or(f64::NAN));
    }
    Ok((summary(&mut fetch).0, summary(&mut answer).0))
}
