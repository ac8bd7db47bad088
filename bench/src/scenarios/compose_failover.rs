//! Leader failover on the compose cluster (`deploy/compose`: 3 etcd, 3
//! coordinators, 2 docker-executor runners, all in containers, TLS, mTLS and
//! tokens on), driven from the host through the published ports as a user
//! would. Two faults, 10 [1] rounds each: the leader's container killed
//! (`docker kill`), and the leader's container cut off the cluster network
//! (`docker network disconnect`: from etcd, its peers, the runners and the
//! host at once, so it is told nothing). Each round measures the time from
//! the fault to the first task dispatched after it: a run submitted through
//! the host's client to the other coordinators' ports (every 50 ms until a
//! leader accepts it) reaching `running`. The container is then restored
//! (started again, or connected again under its service name) and the
//! cluster awaited: three coordinators published, both runners connected.
//! Every run must succeed (`compose_failover_runs_lost`). Election TTL 3 s,
//! as in the `failover` scenario; the images are `deploy/images/build`'s
//! (tag `CAPSTAN_FLEET_TAG`, default `dev`).

use super::{Ctx, Figures, Skip, cores, summary};
use capstan_proto::api::v1 as api;
use capstan_proto::ids::RunId;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::compose::ComposeCluster;
use std::process::Command;
use std::time::{Duration, Instant};

const TTL_MS: u64 = 3000;

/// One task, one container step of the test bed's image.
const PIPELINE: &str = "version: 1\nname: failover\ntasks:\n  t:\n    image: capstan-test/busybox:1\n    steps: [ { run: \"sleep 1\" } ]\n";

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Partition,
}

impl Fault {
    fn key(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Partition => "partition",
        }
    }
}

fn docker(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("docker").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why this machine cannot run the scenario, if it cannot.
fn missing() -> Option<String> {
    if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_err()
    {
        return Some("docker-compose is not installed (scripts/testbed up installs it)".into());
    }
    let tag = capstan_tests::fleet::image_tag();
    for image in ["coordinator", "runner", "etcd"] {
        let found = Command::new("docker")
            .args(["image", "inspect", &format!("capstan/{image}:{tag}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "image capstan/{image}:{tag} is missing (deploy/images/build {tag} makes it)"
            ));
        }
    }
    None
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    if let Some(why) = missing() {
        return Err(Skip(why).into());
    }
    // Quick (CI) takes one of each: a partition round costs half a minute
    // with its recovery (runners notice the silent leader late).
    let rounds = if ctx.quick { 1 } else { 10 };
    let started = Instant::now();
    let c = tokio::task::spawn_blocking(|| {
        ComposeCluster::up("bench", &[("CAPSTAN_ELECTION_TTL_MS", &TTL_MS.to_string())])
    })
    .await??;
    println!(
        "compose-failover: cluster up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut figures: Figures = vec![
        ("compose_failover_rounds".into(), rounds as f64),
        (
            "compose_failover_lease_ttl_s".into(),
            TTL_MS as f64 / 1000.0,
        ),
    ];
    let mut runs = Vec::new();
    for fault in [Fault::Kill, Fault::Partition] {
        let mut took = Vec::new();
        for round in 0..rounds {
            let (s, id) = one_round(&c, fault).await?;
            println!(
                "compose-failover: {fault:?} round {round}: first task dispatched {s:.2} s after the fault"
            );
            took.push(s);
            runs.push(id);
        }
        let (p50, _, max) = summary(&mut took);
        println!(
            "compose-failover: {rounds} x {fault:?} of the leader's container, TTL {:.1} s: first task after p50 {p50:.2} s, max {max:.2} s; {} cores",
            TTL_MS as f64 / 1000.0,
            cores()
        );
        figures.push((format!("compose_failover_{}_p50_s", fault.key()), p50));
        figures.push((format!("compose_failover_{}_max_s", fault.key()), max));
    }
    let lost = runs_lost(&c, &runs).await?;
    figures.push(("compose_failover_runs_lost".into(), lost as f64));
    let down = Instant::now();
    tokio::task::spawn_blocking(move || c.down()).await??;
    println!(
        "compose-failover: cluster removed in {:.1} s",
        down.elapsed().as_secs_f64()
    );
    Ok(figures)
}

/// One fault of the leader's container: seconds to the first task
/// dispatched after it, and that run's id. Restores the container and
/// waits for the whole cluster before it returns.
async fn one_round(c: &ComposeCluster, fault: Fault) -> anyhow::Result<(f64, RunId)> {
    let leader = c.leader_service()?;
    let container = c.container(&leader)?;
    let servers = c.live_servers();
    let network = c.network();
    let t0 = Instant::now();
    match fault {
        Fault::Kill => docker(&["kill", &container])?,
        Fault::Partition => docker(&["network", "disconnect", &network, &container])?,
    }
    let id = submit(c, &servers, t0 + Duration::from_secs(60)).await?;
    wait_dispatched(c, &servers, &id).await?;
    let s = t0.elapsed().as_secs_f64();
    match fault {
        Fault::Kill => docker(&["start", &container])?,
        Fault::Partition => docker(&[
            "network", "connect", "--alias", &leader, &network, &container,
        ])?,
    }
    let restored = Instant::now();
    wait_whole(c).await?;
    println!(
        "compose-failover: {fault:?}: cluster whole again {:.1} s after the restore",
        restored.elapsed().as_secs_f64()
    );
    Ok((s, id))
}

async fn submit(
    c: &ComposeCluster,
    servers: &[String],
    deadline: Instant,
) -> anyhow::Result<RunId> {
    loop {
        if let Ok(client) = c.client(servers, Duration::from_millis(500)).await {
            let req = api::SubmitRunRequest {
                pipeline_yaml: PIPELINE.into(),
                file_name: "failover.yaml".into(),
                ..Default::default()
            };
            if let Ok(id) = client.submit_run(req).await {
                return Ok(id);
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("no coordinator accepted a run within 60 s of the fault");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_dispatched(c: &ComposeCluster, servers: &[String], id: &RunId) -> anyhow::Result<()> {
    let client = c.client(servers, Duration::from_secs(5)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = client.get_run(id).await?;
        let state = run.tasks.first().map_or(0, |t| t.state);
        if state == TaskState::Running as i32 || state == TaskState::Succeeded as i32 {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("run {id} not dispatched within 60 s: {run:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Until three coordinators are published and both runners are connected.
async fn wait_whole(c: &ComposeCluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let servers = c.live_servers();
        if servers.len() == 3
            && let Ok(client) = c.client(&servers, Duration::from_secs(2)).await
            && let Ok(runners) = client.list_runners().await
            && runners.iter().filter(|r| r.connected).count() == 2
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the cluster did not recover within 60 s:\n{}", c.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs that did not succeed, waiting up to 60 s for each to end.
async fn runs_lost(c: &ComposeCluster, runs: &[RunId]) -> anyhow::Result<usize> {
    let client = c.client(&c.live_servers(), Duration::from_secs(5)).await?;
    let mut lost = 0;
    for id in runs {
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            let run = client.get_run(id).await?;
            if run.state >= RunState::Succeeded as i32 || Instant::now() > deadline {
                break run.state;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if state != RunState::Succeeded as i32 {
            println!(
                "compose-failover: run {id} ended {:?}",
                RunState::try_from(state)
            );
            lost += 1;
        }
    }
    Ok(lost)
}
