//! Network faults between Capstan's own containers (issue 25): a fleet of
//! 3 etcd members, 3 coordinators and 2 runners from the locally built
//! images (`deploy/images/build`) on a private network, cut apart with
//! iptables inside the containers' network namespaces.
//!
//! Every scenario checks that every run finished, that no step ran twice
//! where its runner stayed reachable, and that every log holds exactly the
//! bytes the step printed (each attempt a gapless prefix, the last one
//! whole).

use capstan_proto::api::v1 as api;
use capstan_proto::ids::RunId;
use capstan_proto::pipeline::v1::RunState;
use capstan_tests::faults::Proxy;
use capstan_tests::fleet::checks::{attempts_in_log, counting_pipeline, expected_lines, marks};
use capstan_tests::fleet::{Fleet, docker};
use capstan_tests::{eventually, run_state, task};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

async fn fleet() -> anyhow::Result<Fleet> {
    Fleet::start(3, 3, 2, 4).await
}

async fn submit(f: &Fleet, yaml: &str) -> anyhow::Result<String> {
    let request = api::SubmitRunRequest {
        pipeline_yaml: yaml.into(),
        file_name: "fleet.yaml".into(),
        ..Default::default()
    };
    Ok(f.client().await?.submit_run(request).await?.to_string())
}

/// Submits `runs` one-task counting runs (`PREFIX-i`, `lines` lines
/// `every_ms` apart); their ids in order.
async fn submit_counting(
    f: &Fleet,
    prefix: &str,
    runs: usize,
    lines: u32,
    every_ms: u32,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(runs);
    for i in 0..runs {
        let yaml = counting_pipeline(&format!("{prefix}-{i}"), 1, lines, every_ms);
        ids.push(submit(f, &yaml).await?);
    }
    Ok(ids)
}

async fn get_run(f: &Fleet, id: &str) -> anyhow::Result<api::Run> {
    Ok(f.client().await?.get_run(&RunId::from_string(id)).await?)
}

/// Waits until `pred` holds for the run (polling through any coordinator).
async fn wait_run(
    f: &Fleet,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&api::Run) -> bool,
) -> anyhow::Result<api::Run> {
    eventually(
        timeout,
        Duration::from_millis(200),
        async || Ok(get_run(f, id).await.ok().filter(|r| pred(r))),
        || {
            format!(
                "run {id} did not get there in {timeout:?}\n{}",
                f.all_logs()
            )
        },
    )
    .await
}

fn all_running(r: &api::Run) -> bool {
    r.tasks
        .iter()
        .all(|t| !t.attempt_id.is_empty() && !t.runner.is_empty())
}

async fn task_log(f: &Fleet, id: &str, t: &str) -> anyhow::Result<String> {
    let mut stream = f
        .client()
        .await?
        .read_logs(&RunId::from_string(id), Some(t), false)
        .await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(String::from_utf8(out)?)
}

/// The checks every scenario makes on a finished run of counting tasks.
/// `may_repeat` names the tasks whose runner was cut off from every
/// coordinator (their steps may have started twice, never finished twice).
async fn check_run(
    f: &Fleet,
    id: &str,
    lines: u32,
    may_repeat: &[String],
) -> anyhow::Result<api::Run> {
    let run = wait_run(f, id, Duration::from_secs(90), capstan_tests::is_finished).await?;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{run:#?}\n{}",
        f.all_logs()
    );
    for t in &run.tasks {
        let name = &t.name;
        let started = marks(f.shared(), "start", id, name);
        let done = marks(f.shared(), "done", id, name);
        assert_eq!(
            done.len(),
            1,
            "task {name} finished {done:?}\n{}",
            f.all_logs()
        );
        if !may_repeat.contains(name) {
            assert_eq!(
                started.len(),
                1,
                "task {name} started on {started:?} though its runner stayed reachable\n{}",
                f.all_logs()
            );
        }
        let log = task_log(f, id, name).await?;
        let attempts = attempts_in_log(&log, name, &expected_lines(name, lines))
            .map_err(|e| anyhow::anyhow!("log of {name}: {e}\n{log}"))?;
        assert_eq!(
            attempts.last().copied(),
            Some(lines as usize),
            "log of {name}: {attempts:?}\n{log}"
        );
        assert!(
            attempts.len() <= started.len(),
            "log of {name} has {attempts:?}, steps started {started:?}"
        );
        if !may_repeat.contains(name) {
            assert_eq!(attempts, vec![lines as usize], "log of {name}\n{log}");
        }
    }
    Ok(run)
}

/// Scenario 2: a runner cut off from every coordinator mid-step. Its
/// attempts are requeued after the runner lease and finish elsewhere; once
/// the partition heals, its stale step is killed (it never finishes) and
/// its late reports change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn runner_partitioned_mid_step_is_requeued_and_its_stale_step_killed() -> anyhow::Result<()> {
    let f = fleet().await?;
    let lines = 150; // 15 s a step
    let id = submit(&f, &counting_pipeline("runner-cut", 2, lines, 100)).await?;
    let run = wait_run(&f, &id, Duration::from_secs(30), all_running).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim_name = task(&run, "t0").runner.clone();
    let victim = f
        .runners
        .iter()
        .find(|r| r.ends_with(&victim_name))
        .expect("runner container")
        .clone();
    let stale: Vec<(String, String)> = run
        .tasks
        .iter()
        .filter(|t| t.runner == victim_name)
        .map(|t| (t.name.clone(), t.attempt_id.clone()))
        .collect();
    docker::cut(&victim, &f.ips(&f.coordinators))?;
    let cut_at = Instant::now();
    // Requeued after the lease, onto the runner that still answers.
    let moved = wait_run(&f, &id, Duration::from_secs(30), |r| {
        stale.iter().all(|(t, a)| {
            let now = task(r, t);
            &now.attempt_id != a && !now.attempt_id.is_empty() && now.runner != victim_name
        })
    })
    .await?;
    let requeued_after = cut_at.elapsed();
    // The lease runs from the runner's last heartbeat, up to one interval
    // before the cut.
    let lease = Duration::from_millis(f.timings.lease_ms - f.timings.heartbeat_ms);
    assert!(
        requeued_after >= lease,
        "requeued after {requeued_after:?}, inside the lease: {moved:#?}"
    );
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(cut_at.elapsed())).await;
    docker::heal(&victim)?;
    let healed_at = Instant::now();
    let names: Vec<String> = stale.iter().map(|(t, _)| t.clone()).collect();
    let run = check_run(&f, &id, lines, &names).await?;
    for (t, stale_attempt) in &stale {
        let started = marks(f.shared(), "start", &id, t);
        assert_eq!(started.len(), 2, "task {t} started on {started:?}");
        let done = marks(f.shared(), "done", &id, t);
        assert_ne!(
            done,
            vec![victim_name.clone()],
            "the stale step of {t} ran to its end"
        );
        assert_ne!(
            &task(&run, t).attempt_id,
            stale_attempt,
            "the late report of {t} was taken"
        );
    }
    // The stale steps were killed, not left running: nothing of them is
    // still alive in the runner, well before they would have ended.
    assert!(healed_at.elapsed() < Duration::from_secs(30));
    let ps = docker::docker(&["exec", &victim, "ps", "-o", "args"])?;
    assert!(
        !ps.contains("sleep 0.100"),
        "stale steps still run in {victim}:\n{ps}"
    );
    eprintln!("fleet: runner cut: requeued after {requeued_after:?}");
    Ok(())
}

/// Scenario 1: the leader partitioned from the etcd members (runners and
/// peers still reach it). It stops leading within its election lease,
/// another coordinator takes over, the runs in flight finish once each, and
/// after healing the old leader rejoins as a follower naming the new one.
///
/// Not here (found with this harness, a product bug to fix first): the
/// leader cut off together with one etcd member, the two sides split 2/3
/// and 1+1. The other coordinators whose campaign call waits on that
/// minority member never learn they won; no leader is elected.
#[tokio::test(flavor = "multi_thread")]
async fn leader_partitioned_from_etcd_steps_down_and_rejoins() -> anyhow::Result<()> {
    let f = fleet().await?;
    let lines = 80; // 8 s a step
    let id = submit(&f, &counting_pipeline("etcd-cut", 2, lines, 100)).await?;
    wait_run(&f, &id, Duration::from_secs(30), all_running).await?;
    let (old, old_epoch) = f.wait_leader(Duration::from_secs(10)).await?;
    docker::cut(&old, &f.ips(&f.etcd))?;
    let cut_at = Instant::now();
    let stepped_down = eventually(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            // `/readyz`, not the API: the API's token check reads etcd,
            // which the cut coordinator cannot.
            let leads = f
                .readyz(&old)
                .is_ok_and(|(status, body)| status == 200 && body.starts_with("ready: leader"));
            Ok((!leads).then(|| cut_at.elapsed()))
        },
        || format!("{old} still leads\n{}", f.all_logs()),
    )
    .await?;
    let ttl = Duration::from_millis(f.timings.election_ttl_ms);
    assert!(
        stepped_down <= ttl + Duration::from_millis(1500),
        "{old} led {stepped_down:?} after losing etcd (lease {ttl:?})"
    );
    let (new, new_epoch) = f
        .wait_new_leader(Some(&old), Duration::from_secs(20))
        .await?;
    let took_over = cut_at.elapsed();
    assert!(new_epoch > old_epoch, "epochs {old_epoch} -> {new_epoch}");
    check_run(&f, &id, lines, &[]).await?;
    docker::heal(&old)?;
    // Back as a follower that points at the new leader.
    let new_url = f.url(&new);
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(200),
        async || {
            Ok(f.ask(&old)
                .await
                .ok()
                .filter(|r| !r.is_leader && r.leader == new_url))
        },
        || {
            format!(
                "{old} did not rejoin as a follower of {new}\n{}",
                f.all_logs()
            )
        },
    )
    .await?;
    let out = f.cli(&["cluster", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["leader"], new_url.as_str(), "{v}");
    let again = submit(&f, &counting_pipeline("after-heal", 1, 5, 10)).await?;
    check_run(&f, &again, 5, &[]).await?;
    eprintln!(
        "fleet: etcd cut: stepped down after {stepped_down:?}, new leader after {took_over:?}"
    );
    Ok(())
}

/// Scenario 6: 200 ms each way and 5 % packet loss on the only runner's
/// link while it runs 12 steps of 2000 lines each: every log byte-exact (no
/// duplicated or lost chunk), no attempt requeued.
///
/// This kernel has no netem: a DNAT rule in the runner's namespace sends
/// its connections to each coordinator through a delaying proxy on the
/// host (leader hints keep working: the runner still dials the
/// coordinators' addresses), and iptables `statistic` drops 5 % of the
/// packets on its `eth0` both ways.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_lossy_runner_link_keeps_logs_exact_and_requeues_nothing() -> anyhow::Result<()> {
    let f = Fleet::start(3, 3, 1, 4).await?;
    let runner = &f.runners[0];
    let gateway: IpAddr = f.gateway().parse()?;
    let mut proxies = Vec::new();
    for c in &f.coordinators {
        let to: SocketAddr = format!("{}:7700", f.ip(c)).parse()?;
        let proxy = Proxy::start_on(gateway, to).await?;
        proxy.delay(Duration::from_millis(200));
        docker::redirect(runner, to, proxy.addr())?;
        proxies.push(proxy);
    }
    // The connections made before the DNAT rule still go direct: drop
    // those (a DNAT'd packet no longer matches), so the runner's watchdog
    // ends them and it reconnects through the proxies.
    docker::cut(runner, &f.ips(&f.coordinators))?;
    docker::lossy(runner, 0.05)?;
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || Ok((proxies.iter().map(Proxy::accepted).sum::<usize>() >= 2).then_some(())),
        || {
            format!(
                "{runner} did not reconnect through the proxies\n{}",
                f.all_logs()
            )
        },
    )
    .await?;
    f.wait_runners(1, Duration::from_secs(30)).await?;
    let lines = 2000;
    let started = Instant::now();
    let ids = submit_counting(&f, "lossy", 12, lines, 1).await?;
    for id in &ids {
        check_run(&f, id, lines, &[]).await?;
    }
    let lost = docker::lost_packets(runner)?;
    assert!(lost > 0, "the loss rules dropped no packet");
    eprintln!(
        "fleet: 200 ms + 5 % loss: 12 runs x {lines} lines in {:?}, {} connections through the proxies, {lost} packets dropped",
        started.elapsed(),
        proxies.iter().map(Proxy::accepted).sum::<usize>()
    );
    Ok(())
}

/// Scenario 1, two against one: the leader and the first etcd member
/// (where every coordinator's etcd client starts) cut off from the other
/// two members, both still reachable from everyone else. The old leader
/// cannot renew its lease through a member without quorum and steps down;
/// the others, campaigning on that member, must notice that it lost its
/// quorum (its watches stay open without an error) and campaign on the
/// majority. Before that check no one ever led again.
#[tokio::test(flavor = "multi_thread")]
async fn leader_and_one_etcd_member_cut_from_the_majority_hand_over() -> anyhow::Result<()> {
    let f = fleet().await?;
    let lines = 80;
    let id = submit(&f, &counting_pipeline("two-one", 2, lines, 100)).await?;
    wait_run(&f, &id, Duration::from_secs(30), all_running).await?;
    let (old, old_epoch) = f.wait_leader(Duration::from_secs(10)).await?;
    let majority = f.ips(&f.etcd[1..]);
    docker::cut(&f.etcd[0], &majority)?;
    docker::cut(&old, &majority)?;
    let cut_at = Instant::now();
    let (new, new_epoch) = f
        .wait_new_leader(Some(&old), Duration::from_secs(30))
        .await?;
    let took_over = cut_at.elapsed();
    assert!(new_epoch > old_epoch, "epochs {old_epoch} -> {new_epoch}");
    let ttl = Duration::from_millis(f.timings.election_ttl_ms);
    // The old lease runs out (one TTL), the others notice their member lost
    // its quorum and campaign on the majority, whose own raft may be
    // electing meanwhile: about three TTLs, and CI on 2 shared cores once
    // took 9.25 s of a 9 s bound, so a fourth TTL of slack (a handover
    // that never comes still fails here).
    assert!(
        took_over <= ttl * 4,
        "{new} took over {took_over:?} after the cut (lease {ttl:?})\n{}",
        f.all_logs()
    );
    check_run(&f, &id, lines, &[]).await?;
    docker::heal(&f.etcd[0])?;
    docker::heal(&old)?;
    let again = submit(&f, &counting_pipeline("two-one-after", 1, 5, 10)).await?;
    check_run(&f, &again, 5, &[]).await?;
    eprintln!("fleet: leader + 1 etcd member cut: new leader after {took_over:?}");
    Ok(())
}

/// Scenario 7: the leader cut off from everything (etcd, runners, peers;
/// the host still reaches it) while runs are in flight: every step runs
/// exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn leader_cut_from_everything_costs_no_step_a_second_execution() -> anyhow::Result<()> {
    let f = fleet().await?;
    let lines = 80; // 8 s a step
    let ids = submit_counting(&f, "cut-all", 4, lines, 100).await?;
    for id in &ids {
        wait_run(&f, id, Duration::from_secs(30), all_running).await?;
    }
    let (old, old_epoch) = f.wait_leader(Duration::from_secs(10)).await?;
    let mut others: Vec<String> = f.ips(&f.etcd);
    others.extend(f.ips(&f.runners));
    others.extend(
        f.coordinators
            .iter()
            .filter(|c| **c != old)
            .map(|c| f.ip(c)),
    );
    docker::cut(&old, &others)?;
    let cut_at = Instant::now();
    let (_, new_epoch) = f
        .wait_new_leader(Some(&old), Duration::from_secs(20))
        .await?;
    let took_over = cut_at.elapsed();
    assert!(new_epoch > old_epoch);
    for id in &ids {
        check_run(&f, id, lines, &[]).await?;
    }
    docker::heal(&old)?;
    eprintln!(
        "fleet: leader cut from all: new leader after {took_over:?}, runs done after {:?}",
        cut_at.elapsed()
    );
    Ok(())
}

/// Scenario 3: the leader frozen (`docker pause`) past its election lease
/// while a run is in flight, then thawed. Another coordinator took over;
/// the thawed one leads no more (it answers as a follower of the new
/// leader), and nothing it held from the frozen epoch shows: the run
/// finishes with every step run once.
///
/// It caught the thawed leader appending the log chunks it held to the
/// shared log dir after the new leader's (lines 2.. again mid-log); fixed
/// by re-authorizing a PushLogs stream's attempt (branch `liveness`).
#[tokio::test(flavor = "multi_thread")]
async fn leader_frozen_past_its_lease_comes_back_a_follower() -> anyhow::Result<()> {
    let f = fleet().await?;
    let lines = 80;
    let id = submit(&f, &counting_pipeline("frozen", 2, lines, 100)).await?;
    wait_run(&f, &id, Duration::from_secs(30), all_running).await?;
    let (old, old_epoch) = f.wait_leader(Duration::from_secs(10)).await?;
    docker::docker(&["pause", &old])?;
    let paused_at = Instant::now();
    let (new, new_epoch) = f
        .wait_new_leader(Some(&old), Duration::from_secs(20))
        .await?;
    assert!(new_epoch > old_epoch, "epochs {old_epoch} -> {new_epoch}");
    let past_lease = Duration::from_millis(f.timings.election_ttl_ms + f.timings.lease_ms);
    tokio::time::sleep(past_lease.saturating_sub(paused_at.elapsed())).await;
    docker::docker(&["unpause", &old])?;
    let new_url = f.url(&new);
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let leads = f
                .readyz(&old)
                .is_ok_and(|(status, body)| status == 200 && body.starts_with("ready: leader"));
            let follows = f
                .ask(&old)
                .await
                .is_ok_and(|r| !r.is_leader && r.leader == new_url);
            Ok((!leads && follows).then_some(()))
        },
        || {
            format!(
                "{old} did not come back as a follower of {new}\n{}",
                f.all_logs()
            )
        },
    )
    .await?;
    check_run(&f, &id, lines, &[]).await?;
    let (leader, epoch) = f.wait_leader(Duration::from_secs(5)).await?;
    assert_eq!(
        (leader, epoch),
        (new, new_epoch),
        "leadership moved again after the thaw"
    );
    Ok(())
}

/// Scenario 4: etcd members killed one, then two (quorum lost), then one
/// restarted. With one member gone scheduling goes on; without quorum no
/// coordinator leads; once quorum is back a leader leads again, and the run
/// that was in flight throughout finishes with its step run once.
#[tokio::test(flavor = "multi_thread")]
async fn scheduling_pauses_only_while_etcd_has_no_quorum() -> anyhow::Result<()> {
    let f = fleet().await?;
    docker::docker(&["kill", &f.etcd[2]])?;
    let a = submit(&f, &counting_pipeline("one-member-down", 1, 5, 10)).await?;
    check_run(&f, &a, 5, &[]).await?;
    let lines = 100; // 10 s, across the quorum loss
    let b = submit(&f, &counting_pipeline("across-quorum-loss", 1, lines, 100)).await?;
    wait_run(&f, &b, Duration::from_secs(30), all_running).await?;
    docker::docker(&["kill", &f.etcd[1]])?;
    let lost_at = Instant::now();
    let leads = |c: &String| {
        f.readyz(c)
            .is_ok_and(|(status, body)| status == 200 && body.starts_with("ready: leader"))
    };
    let nobody_leads = eventually(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || Ok((!f.coordinators.iter().any(leads)).then(|| lost_at.elapsed())),
        || {
            format!(
                "a coordinator still leads without etcd quorum\n{}",
                f.all_logs()
            )
        },
    )
    .await?;
    // Still nobody a while later: no coordinator leads on a minority.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !f.coordinators.iter().any(leads),
        "a coordinator leads without quorum"
    );
    docker::docker(&["start", &f.etcd[1]])?;
    let restored_at = Instant::now();
    f.wait_leader(Duration::from_secs(30)).await?;
    let leading_after = restored_at.elapsed();
    check_run(&f, &b, lines, &[]).await?;
    let c = submit(&f, &counting_pipeline("quorum-back", 1, 5, 10)).await?;
    check_run(&f, &c, 5, &[]).await?;
    eprintln!(
        "fleet: quorum lost: no leader after {nobody_leads:?}; quorum back: leader after {leading_after:?}"
    );
    Ok(())
}

/// Scenario 5: every coordinator restarted in turn (`docker restart`,
/// SIGTERM first) while 50 runs are in flight: every run finishes and every
/// step runs once.
#[tokio::test(flavor = "multi_thread")]
async fn rolling_restart_with_50_runs_in_flight_loses_nothing() -> anyhow::Result<()> {
    let f = fleet().await?;
    let lines = 20; // 2 s a step
    let ids = submit_counting(&f, "rolling", 50, lines, 100).await?;
    let started = Instant::now();
    for c in f.coordinators.clone() {
        docker::docker(&["restart", "-t", "10", &c])?;
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(100),
            async || Ok(f.readyz(&c).is_ok().then_some(())),
            || format!("{c} did not come back\n{}", f.all_logs()),
        )
        .await?;
        f.wait_leader(Duration::from_secs(20)).await?;
    }
    let restarted_after = started.elapsed();
    for id in &ids {
        check_run(&f, id, lines, &[]).await?;
    }
    eprintln!(
        "fleet: rolling restart took {restarted_after:?}; 50 runs done after {:?}",
        started.elapsed()
    );
    Ok(())
}
