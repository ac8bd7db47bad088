//! Leader failover: three coordinators on a three-node etcd cluster (the
//! test harness's `TestCluster` with replicas on etcd, real processes), one `fake` runner. Each round
//! kills the leader with SIGKILL and measures the time from the kill to the
//! first task dispatched after it: a run submitted right after the kill (to
//! every replica in turn, every 20 ms, until one accepts it) reaching
//! `running`. The killed replica is restarted before the next round, so
//! there are always three. Every run of every round must succeed (each task
//! sleeps 2 s, so later kills hit runs still in flight): the report counts
//! the ones that did not (`failover_runs_lost`, goal 0).
//! Goal (issue 24): max <= 1.5 s with the default flags; the standbys end
//! a dead leader's term instead of waiting out its lease.

use super::{Ctx, Figures, Skip, cores, summary};
use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::TestCluster;
use std::time::{Duration, Instant};

/// One task of the fake executor sleeping 2 s (its `sleep` takes milliseconds).
const PIPELINE: &str =
    "version: 1\nname: failover\ntasks:\n  t:\n    steps: [ { run: \"sleep 2000\" } ]\n";

/// Submits through whichever replica accepts, retrying every 20 ms.
async fn submit_anywhere(c: &TestCluster, deadline: Instant) -> anyhow::Result<String> {
    loop {
        for url in c.urls() {
            let Ok(Ok(channel)) =
                tokio::time::timeout(Duration::from_millis(300), c.admin_channel(&url)).await
            else {
                continue;
            };
            let mut client = api::pipeline_service_client::PipelineServiceClient::new(channel);
            let req = api::SubmitRunRequest {
                pipeline_yaml: PIPELINE.into(),
                file_name: "failover.yaml".into(),
                ..Default::default()
            };
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(500), client.submit_run(req)).await
            {
                return Ok(r.into_inner().run_id);
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("no replica accepted a run within 30 s of the kill");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    if std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(Skip("etcd is not installed (scripts/testbed up installs it)".into()).into());
    }
    let kills = if ctx.quick { 2 } else { 10 };
    // The product's default flags (election TTL 5 s, attempt lease), as
    // issue 24 asks. Rounds now come every ~0.5 s and each run's task takes
    // 2 s, so capacity 8: runs still in flight never hold the slot the next
    // round's task needs (with 2 every other round waited for one).
    let mut c = TestCluster::builder()
        .replicas(3)
        .etcd()
        // The harness's own defaults are shorter than the product's.
        .election_ttl_ms(5000)
        .lease_ms(5000)
        .heartbeat_ms(1000)
        .runners(1)
        .capacity(8)
        .executor("fake")
        .start()
        .await?;
    let ttl_ms = c.election_ttl_ms() as f64;
    let mut runs = Vec::new();
    let mut took = Vec::new();
    for round in 0..kills {
        let (leader, _) = c.wait_leader(Duration::from_secs(30)).await?;
        let killed = Instant::now();
        c.kill_replica(leader);
        let id = submit_anywhere(&c, killed + Duration::from_secs(30)).await?;
        c.wait_run(&id, Duration::from_secs(60), |r| {
            r.tasks
                .first()
                .is_some_and(|t| t.state == TaskState::Running as i32)
        })
        .await?;
        let s = killed.elapsed().as_secs_f64();
        println!(
            "failover: round {round}: first task dispatched {s:.2} s after kill -9 of replica {leader}"
        );
        took.push(s);
        runs.push(id);
        c.start_replica(leader).await?;
    }
    // Every run must succeed, whatever leader it started under.
    let mut lost = 0;
    for id in &runs {
        let run = c
            .wait_done(id, Duration::from_secs(60))
            .await
            .unwrap_or_default();
        if run.state != RunState::Succeeded as i32 {
            println!(
                "failover: run {id} ended {:?}",
                RunState::try_from(run.state)
            );
            lost += 1;
        }
    }
    let (p50, _, max) = summary(&mut took);
    println!(
        "failover: {kills} kills of the leader, lease TTL {:.1} s: first task after p50 {p50:.2} s, max {max:.2} s; runs lost {lost}; {} cores",
        ttl_ms / 1000.0,
        cores()
    );
    Ok(vec![
        ("failover_kills".into(), kills as f64),
        ("failover_lease_ttl_s".into(), ttl_ms / 1000.0),
        ("failover_first_task_p50_s".into(), p50),
        ("failover_first_task_max_s".into(), max),
        ("failover_runs_lost".into(), lost as f64),
    ])
}
