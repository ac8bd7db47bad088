//! High availability: three coordinators on a three-node etcd cluster.

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::*;
use std::time::{Duration, Instant};

/// Three coordinators on a three-node etcd (election TTL 5 s, attempt lease
/// 3 s) and `runners` runners of capacity 2.
async fn ha_cluster(runners: usize, executor: &str) -> anyhow::Result<TestCluster> {
    TestCluster::builder()
        .replicas(3)
        .etcd()
        .lease_ms(3000)
        .runners(runners)
        .capacity(2)
        .executor(executor)
        .start()
        .await
}

/// A pipeline whose tasks print numbered lines slowly and record each
/// completion in `DIR/done-<run>-<task>` (so a task run twice shows).
fn counting_pipeline(dir: &std::path::Path, lines: u32) -> String {
    let mut yaml = String::from("version: 1\nname: ha\ntasks:\n");
    for t in ["one", "two"] {
        yaml.push_str(&format!(
            "  {t}:\n    steps:\n      - run: |\n          for i in $(seq 1 {lines}); do echo {t}-line-$i; sleep 0.05; done\n          echo x >> {}/done-${{{{ run.id }}}}-{t}\n",
            dir.display()
        ));
    }
    yaml.push_str("  last:\n    needs: [one, two]\n    steps: [ { run: 'echo last' } ]\n");
    yaml
}

fn expected_log(task: &str, lines: u32) -> String {
    (1..=lines).map(|i| format!("{task}-line-{i}\n")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_killed_mid_run_repeatedly_loses_nothing() -> anyhow::Result<()> {
    let mut c = ha_cluster(2, "shell").await?;
    let marks = tempfile::tempdir()?;
    for round in 0..3 {
        let id = c.submit(&counting_pipeline(marks.path(), 30)).await?;
        c.wait_run(&id, Duration::from_secs(30), |r| {
            task_state(r, "one") == TaskState::Running || task_state(r, "two") == TaskState::Running
        })
        .await?;
        let (old, old_epoch) = c.wait_leader(Duration::from_secs(10)).await?;
        c.kill_replica(old);
        let (_, new_epoch) = c
            .wait_new_leader(Some(old), Duration::from_secs(15))
            .await?;
        assert!(
            new_epoch > old_epoch,
            "round {round}: epochs {old_epoch} -> {new_epoch}"
        );
        c.start_replica(old).await?;
        let run = c.wait_done(&id, Duration::from_secs(60)).await?;
        assert_eq!(
            run_state(&run),
            RunState::Succeeded,
            "round {round}: {run:#?}\n{}",
            c.all_logs()
        );
        for t in ["one", "two"] {
            let done = std::fs::read_to_string(marks.path().join(format!("done-{id}-{t}")))?;
            assert_eq!(
                done.lines().count(),
                1,
                "round {round}: task {t} completed {} times\n{run:#?}\n{}",
                done.lines().count(),
                c.all_logs()
            );
            let log = String::from_utf8(c.task_log(&id, t).await?)?;
            let body: String = log
                .lines()
                .filter(|l| l.starts_with(&format!("{t}-line-")))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(body, expected_log(t, 30), "round {round}: log of {t}");
            assert_eq!(
                log.matches(&format!("{t}-line-1\n")).count(),
                1,
                "duplicated bytes in {log:?}"
            );
        }
    }
    // `capstan cluster -o json` names the leader, its epoch and every member.
    let out = c.cli(&["cluster", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (leader, epoch) = c.wait_leader(Duration::from_secs(5)).await?;
    assert_eq!(v["leader"], c.replicas[leader].url().as_str());
    assert_eq!(v["epoch"], epoch);
    assert_eq!(v["members"].as_array().map(Vec::len), Some(3), "{v}");
    Ok(())
}

/// What replica `follower` answers a client call with, asked directly
/// (not through the client's leader following): it must refuse.
async fn follower_refusal(c: &TestCluster, follower: usize) -> anyhow::Result<tonic::Status> {
    let mut raw = api::pipeline_service_client::PipelineServiceClient::new(
        c.admin_channel(&c.replicas[follower].url()).await?,
    );
    Ok(raw
        .list_runs(api::ListRunsRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect_err("a follower served a client call"))
}

#[tokio::test(flavor = "multi_thread")]
async fn followers_point_at_the_leader() -> anyhow::Result<()> {
    let c = ha_cluster(0, "fake").await?;
    let (leader, _) = c.wait_leader(Duration::from_secs(10)).await?;
    let follower = (leader + 1) % 3;
    let err = follower_refusal(&c, follower).await?;
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let hint = err
        .metadata()
        .get("capstan-leader")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    assert_eq!(hint, Some(c.replicas[leader].url()));
    assert!(!c.ask(follower).await?.is_leader);
    // Only the leader is ready (takes traffic); every replica is alive.
    let get = |i: usize, path: &str| http_get(c.replicas[i].http, path);
    let (status, body) = get(leader, "/readyz")?;
    assert_eq!((status, body.trim()), (200, "ready: leader"));
    let (status, body) = get(follower, "/readyz")?;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("follower"), "{body}");
    assert_eq!(get(follower, "/healthz")?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_leader_paused_past_its_lease_steps_down() -> anyhow::Result<()> {
    let c = ha_cluster(1, "shell").await?;
    let (old, old_epoch) = c.wait_leader(Duration::from_secs(10)).await?;
    c.pause(old);
    let (new, new_epoch) = c
        .wait_new_leader(Some(old), Duration::from_secs(15))
        .await?;
    assert!(new_epoch > old_epoch);
    // Work goes on under the new leader while the old one sleeps. A client
    // given every replica, the stopped one first (it accepts TCP and never
    // answers), asks them all at once and goes to the new leader.
    let mut urls = vec![c.replicas[old].url()];
    urls.extend((0..3).filter(|&i| i != old).map(|i| c.replicas[i].url()));
    let t0 = Instant::now();
    let client = capstan_client::Client::connect_with_token(&urls, Some(&c.api_token)).await?;
    assert_eq!(client.current_url(), c.replicas[new].url());
    let id = client
        .submit_run(api::SubmitRunRequest {
            pipeline_yaml:
                "version: 1\nname: s\ntasks:\n  t:\n    steps: [ { run: 'echo under-new-leader' } ]\n"
                    .into(),
            ..Default::default()
        })
        .await?;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "connect and submit took {:?} with a stopped replica first",
        t0.elapsed()
    );
    c.resume(old);
    // The old leader learns it lost: its keep-alive fails, its fenced writes fail.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.ask(old).await;
        if let Ok(r) = &r
            && !r.is_leader
        {
            assert_eq!(r.leader, c.replicas[new].url());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old leader still claims to lead: {r:?}\n{}",
            c.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = c.wait_done(id.as_str(), Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    assert_eq!(task(&run, "t").attempts, 1);
    assert_eq!(
        c.leader().await.map(|l| l.0),
        Some(new),
        "exactly one leader"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_one_etcd_member_is_no_interruption() -> anyhow::Result<()> {
    let mut c = ha_cluster(1, "shell").await?;
    let (leader, epoch) = c.wait_leader(Duration::from_secs(10)).await?;
    // The hardest member to lose: etcd's own raft leader (writes pause for
    // its re-election, about 1 s).
    let raft_leader = c.etcd().raft_leader()?;
    c.etcd().kill(raft_leader);
    let id = c
        .submit("version: 1\nname: m\ntasks:\n  t:\n    steps: [ { run: 'echo still-here' } ]\n")
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    assert_eq!(
        c.leader().await,
        Some((leader, epoch)),
        "leadership unchanged\n{}",
        c.all_logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_quorum_pauses_scheduling_and_work_resumes_after() -> anyhow::Result<()> {
    let mut c = ha_cluster(1, "shell").await?;
    let id = c
        .submit("version: 1\nname: q\ntasks:\n  long:\n    steps:\n      - run: echo begin; sleep 6; echo end\n  after:\n    needs: [long]\n    steps: [ { run: 'echo after' } ]\n")
        .await?;
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task_state(r, "long") == TaskState::Running
    })
    .await?;
    c.etcd().kill(1);
    c.etcd().kill(2);
    // Nobody leads without quorum.
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.leader().await.is_some() {
        assert!(
            Instant::now() < deadline,
            "a coordinator still leads without quorum"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.etcd().restart(1).await?;
    c.etcd().restart(2).await?;
    c.wait_leader(Duration::from_secs(30)).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    // The runner kept the step going and re-attached it: one attempt.
    assert_eq!(task(&run, "long").attempts, 1, "{run:#?}");
    let log = String::from_utf8(c.task_log(&id, "long").await?)?;
    assert!(log.contains("begin") && log.contains("end"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_hands_over_quickly() -> anyhow::Result<()> {
    let c = ha_cluster(0, "fake").await?;
    let (old, _) = c.wait_leader(Duration::from_secs(10)).await?;
    let pid = c.replicas[old].pid().expect("running");
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let (new, _) = c
        .wait_new_leader(Some(old), Duration::from_secs(10))
        .await?;
    let took = t0.elapsed();
    println!("handover after SIGTERM: {took:?} (replica {old} -> {new})");
    // The lease TTL is 5 s: a handover that waited for it would take longer.
    assert!(took < Duration::from_millis(1500), "handover took {took:?}");
    Ok(())
}

/// Coordinators that advertise addresses a client cannot reach, as
/// containers advertise names only their own network resolves (the compose
/// cluster): every hint names a dead address.
async fn unreachable_advertise_cluster() -> anyhow::Result<TestCluster> {
    TestCluster::builder()
        .replicas(3)
        .etcd()
        .runners(0)
        .tls()
        .advertise_unreachable()
        .start()
        .await
}

fn write_pipeline(dir: &std::path::Path) -> anyhow::Result<String> {
    let file = dir.join("hello.yaml");
    std::fs::write(
        &file,
        "version: 1\nname: hello\ntasks:\n  hi:\n    steps: [ { run: 'echo hi' } ]\n",
    )?;
    Ok(file.to_string_lossy().into_owned())
}

/// The CLI given every coordinator's own URL submits over TLS with a
/// token although the leader hints name unreachable addresses; a client
/// whose current coordinator stops leading reaches the new leader through
/// the URLs it was given, not the dead hinted address.
#[tokio::test(flavor = "multi_thread")]
async fn clients_reach_the_leader_through_the_given_urls_when_hints_are_unreachable()
-> anyhow::Result<()> {
    let mut c = unreachable_advertise_cluster().await?;
    let (leader, _) = c.wait_leader(Duration::from_secs(10)).await?;
    let follower = (leader + 1) % 3;
    let err = follower_refusal(&c, follower).await?;
    let hint = err.metadata().get("capstan-leader").map(|v| v.to_str());
    let dead = format!("127.77.0.{}:", leader + 1);
    assert!(
        matches!(hint, Some(Ok(h)) if h.contains(&dead)),
        "the hint names the unreachable address: {hint:?}"
    );

    let dir = tempfile::tempdir()?;
    let file = write_pipeline(dir.path())?;
    let out = c.cli(&["submit", &file]);
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8(out.stdout)?.trim().to_string();
    let status = c.cli(&["status", &id, "-o", "json"]);
    assert!(status.status.success(), "{status:?}");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(v["id"], id.as_str(), "{v}");

    // A client on the leader; the leader hands over and comes back as a
    // follower whose hint names the new leader's dead address.
    let client = c.client_with(Some(&c.api_token)).await?;
    assert_eq!(client.current_url(), c.replicas[leader].url());
    c.terminate_replica(leader, Duration::from_secs(10))?;
    let (new, _) = c
        .wait_new_leader(Some(leader), Duration::from_secs(15))
        .await?;
    c.start_replica(leader).await?;
    let run = client
        .get_run(&capstan_proto::ids::RunId::from_string(id.clone()))
        .await?;
    assert_eq!(run.id, id);
    assert_eq!(client.current_url(), c.replicas[new].url());
    Ok(())
}

/// No given URL leads and the leader's advertised address is unreachable:
/// the CLI fails (exit 3, unreachable) saying which address failed and
/// what to give instead, and queues nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_says_what_to_give_when_no_given_url_is_the_leader() -> anyhow::Result<()> {
    let c = unreachable_advertise_cluster().await?;
    let (leader, _) = c.wait_leader(Duration::from_secs(10)).await?;
    let followers: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| c.replicas[i].url())
        .collect();
    let dir = tempfile::tempdir()?;
    let file = write_pipeline(dir.path())?;
    let out = std::process::Command::new(bin("capstan"))
        .args(["--server", &followers.join(",")])
        .arg("--ca-cert")
        .arg(c.pki().expect("tls").ca_cert())
        .args(["submit", &file])
        .env("CAPSTAN_TOKEN", &c.api_token)
        .env_remove("CAPSTAN_TOKEN_FILE")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "no coordinator at {} is the leader, and the leader they name, https://127.77.0.{}:",
            followers.join(","),
            leader + 1
        )),
        "{err}"
    );
    assert!(err.contains("cannot be reached from here ("), "{err}");
    assert!(err.contains("to --server or CAPSTAN_SERVER"), "{err}");
    let runs = c.cli(&["runs", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&runs.stdout)?;
    assert_eq!(v["runs"].as_array().map(Vec::len), Some(0), "{v}");
    Ok(())
}

/// What replica `i` has logged so far.
fn replica_log(c: &TestCluster, i: usize) -> String {
    c.process_log(&c.replicas[i].name)
}

const ENDED_EARLY: &str = "ending its term early";

/// Issue 24: with the product's election TTL (5 s, renewed every second) a
/// standby ends the term of a leader whose process is gone instead of
/// waiting out its lease, and the run in flight goes on under the new one.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leaders_term_is_ended_by_a_standby_before_its_lease_runs_out()
-> anyhow::Result<()> {
    let mut c = ha_cluster(1, "shell").await?;
    assert_eq!(c.election_ttl_ms(), 5000, "the product's default TTL");
    let (old, old_epoch) = c.wait_leader(Duration::from_secs(15)).await?;
    let id = c
        .submit(
            "version: 1\nname: k\ntasks:\n  t:\n    steps: [ { run: 'sleep 2; echo after' } ]\n",
        )
        .await?;
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task(r, "t").state == TaskState::Running as i32
    })
    .await?;
    let killed = Instant::now();
    c.kill_replica(old);
    let (_, new_epoch) = c
        .wait_new_leader(Some(old), Duration::from_secs(15))
        .await?;
    let took = killed.elapsed();
    println!("new leader {took:?} after kill -9 of the leader");
    assert!(new_epoch > old_epoch);
    // The line is written by another process than the one that answers
    // as the new leader: give it a moment to reach the file.
    let mut ended = false;
    for _ in 0..50 {
        ended = (0..3)
            .filter(|&i| i != old)
            .any(|i| replica_log(&c, i).contains(ENDED_EARLY));
        if ended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "no standby ended the term\n{}", c.all_logs());
    // Renewed at most 1 s before the kill, the lease had at least 4 s left:
    // a leader this soon was not waiting for it.
    assert!(
        took < Duration::from_millis(3500),
        "new leader only {took:?} after the kill\n{}",
        c.all_logs()
    );
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{}", c.all_logs());
    Ok(())
}

/// Issue 24: a leader frozen for a second (SIGSTOP) is slow, not dead. Its
/// listening socket still completes connections, so no standby ends its
/// term: no other replica leads meanwhile, it leads on with its epoch
/// afterwards (no write of another epoch to fence), and the run in flight
/// ends after one attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_frozen_for_a_second_keeps_its_term_and_nobody_else_leads() -> anyhow::Result<()> {
    let c = ha_cluster(1, "shell").await?;
    let (old, epoch) = c.wait_leader(Duration::from_secs(15)).await?;
    let id = c
        .submit(
            "version: 1\nname: f\ntasks:\n  t:\n    steps: [ { run: 'sleep 3; echo after' } ]\n",
        )
        .await?;
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task(r, "t").state == TaskState::Running as i32
    })
    .await?;
    c.pause(old);
    let frozen = Instant::now();
    while frozen.elapsed() < Duration::from_secs(1) {
        for i in (0..3).filter(|&i| i != old) {
            if let Ok(r) = c.ask(i).await {
                assert!(
                    !r.is_leader,
                    "replica {i} leads while {old} is frozen\n{}",
                    c.all_logs()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.resume(old);
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{}", c.all_logs());
    assert_eq!(task(&run, "t").attempts, 1, "{}", c.all_logs());
    assert_eq!(c.leader().await, Some((old, epoch)), "{}", c.all_logs());
    for i in 0..3 {
        assert!(
            !replica_log(&c, i).contains(ENDED_EARLY),
            "replica {i} ended a frozen leader's term\n{}",
            c.all_logs()
        );
    }
    Ok(())
}
