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
use capstan_tests::fleet::checks::{attempts_in_log, counting_pipeline, expected_lines, marks};
use capstan_tests::fleet::{Fleet, docker};
use capstan_tests::{eventually, run_state, task};
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
