//! Partitions that send no RST, made with the loopback fault proxy
//! (`capstan_tests::faults`) between runners and coordinators (issue 25):
//! a partitioned leader must cost no step a second execution, and a
//! superseded attempt's late report and late log lines are refused.

use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::faults::Proxy;
use capstan_tests::*;
use std::time::{Duration, Instant};

/// One task whose step runs `secs` seconds and then appends a line to
/// `DIR/done-<run>`: a step run twice leaves two lines.
fn slow_step(dir: &std::path::Path, secs: u32) -> String {
    format!(
        "version: 1\nname: part\ntasks:\n  t:\n    steps:\n      - run: |\n          sleep {secs}\n          echo x >> {}/done-${{{{ run.id }}}}\n",
        dir.display()
    )
}

/// Lines of `name` in the runner log that say `what`.
fn log_lines(c: &TestCluster, name: &str, what: &str) -> Vec<String> {
    c.process_log(name)
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

/// Scenario A: 3 replicas on etcd, 2 runners reaching each replica through
/// its own stalling proxy. While four runs of a 7 s step are in flight the
/// leader is cut off from everything: its proxy stalls (the runners' links
/// go silent, no RST) and the process is stopped (it loses etcd). The
/// runners notice within their watchdog bound, find the new leader and
/// re-attach inside its grace: every run succeeds and every step ran once.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_cut_off_from_everything_costs_no_step_a_second_run() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .replicas(3)
        .etcd()
        // The defaults of a real deployment (issue 25 measured these).
        .heartbeat_ms(1000)
        .lease_ms(5000)
        .runners(0)
        .capacity(2)
        .executor("shell")
        .start()
        .await?;
    let mut proxies = Vec::new();
    for r in &c.replicas {
        proxies.push(Proxy::start(r.grpc).await?);
    }
    let urls: Vec<String> = proxies.iter().map(Proxy::url).collect();
    c.start_runner_via("r0", &urls)?;
    c.start_runner_via("r1", &urls)?;
    c.wait_runners_connected(2, Duration::from_secs(30)).await?;
    let marks = tempfile::tempdir()?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(c.submit(&slow_step(marks.path(), 7)).await?);
    }
    for id in &ids {
        c.wait_run(id, Duration::from_secs(30), |r| {
            task_state(r, "t") == TaskState::Running
        })
        .await?;
    }
    let (old, old_epoch) = c.wait_leader(Duration::from_secs(10)).await?;
    let cut = Instant::now();
    let cut_at = time_of_day_now();
    proxies[old].stall();
    c.pause(old);
    let (_, new_epoch) = c
        .wait_new_leader(Some(old), Duration::from_secs(20))
        .await?;
    let elected = cut.elapsed();
    assert!(new_epoch > old_epoch, "epochs {old_epoch} -> {new_epoch}");
    for id in &ids {
        let run = c.wait_done(id, Duration::from_secs(60)).await?;
        assert_eq!(
            run_state(&run),
            RunState::Succeeded,
            "{run:#?}\n{}",
            c.all_logs()
        );
        assert_eq!(task(&run, "t").attempts, 1, "requeued: {run:#?}");
    }
    let done = cut.elapsed();
    c.resume(old);
    proxies[old].resume();
    for id in &ids {
        let lines = std::fs::read_to_string(marks.path().join(format!("done-{id}")))?;
        assert_eq!(
            lines.lines().count(),
            1,
            "run {id}: the step ran {} times\n{}",
            lines.lines().count(),
            c.all_logs()
        );
    }
    let grace = c.lease() + capstan_proto::liveness::reattach_grace(c.heartbeat());
    println!(
        "leader cut off: new leader after {} ms, all 4 runs done after {} ms; \
         the new leader requeues an attempt not re-attached {} ms after it loads",
        elapsed_ms(elected),
        elapsed_ms(done),
        grace.as_millis()
    );
    for r in ["r0", "r1"] {
        let noticed = after(&log_lines(&c, r, "answered no heartbeat"), cut_at);
        let reattached = after(&log_lines(&c, r, "welcomed by coordinator"), cut_at);
        println!(
            "{r}: noticed the silent leader {} ms after the cut, re-attached {} ms after it",
            noticed.map_or(-1, |s| (s * 1000.0) as i64),
            reattached.map_or(-1, |s| (s * 1000.0) as i64),
        );
    }
    Ok(())
}

/// UTC seconds since midnight now.
fn time_of_day_now() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs_f64() % 86_400.0
}

/// Seconds from `cut` to the first of the log `lines` (tracing's
/// `2026-12-07T01:01:49.113076Z ...`) stamped after it.
fn after(lines: &[String], cut: f64) -> Option<f64> {
    lines.iter().find_map(|l| {
        let t = l.get(11..26)?;
        let mut parts = t.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        let since = (h * 3600.0 + m * 60.0 + s - cut).rem_euclid(86_400.0);
        (since < 3600.0).then_some(since)
    })
}

fn elapsed_ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Scenario B: a runner stalled from the coordinator mid-step past its
/// lease. Its attempt is requeued and runs on another runner; after the
/// stall ends the stale runner's late report and the lines its step wrote
/// meanwhile are refused: the task's log holds the stale attempt's lines
/// only up to the cut, then the winning attempt's.
#[tokio::test(flavor = "multi_thread")]
async fn a_runner_stalled_past_its_lease_has_its_late_report_and_log_refused() -> anyhow::Result<()>
{
    let mut c = TestCluster::builder()
        .lease_ms(3000)
        .runners(0)
        .capacity(1)
        .executor("shell")
        .start()
        .await?;
    let proxy = Proxy::start(c.replicas[0].grpc).await?;
    c.start_runner_via("stale", &[proxy.url()])?;
    c.wait_runners_connected(1, Duration::from_secs(30)).await?;
    let marks = tempfile::tempdir()?;
    let all = marks.path().join("all");
    let yaml = format!(
        "version: 1\nname: b\ntasks:\n  t:\n    steps:\n      - run: |\n          for i in $(seq 1 20); do echo \"line-$i $PWD\" | tee -a {}; sleep 0.4; done\n",
        all.display()
    );
    let id = c.submit(&yaml).await?;
    c.wait_run(&id, Duration::from_secs(30), |r| {
        task_state(r, "t") == TaskState::Running
    })
    .await?;
    // Some lines reached the coordinator before the cut.
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let log = c.task_log(&id, "t").await.unwrap_or_default();
            Ok(String::from_utf8_lossy(&log)
                .contains("line-3 ")
                .then_some(()))
        },
        || {
            format!(
                "no line of the step reached the coordinator\n{}",
                c.all_logs()
            )
        },
    )
    .await?;
    proxy.stall();
    let cut = Instant::now();
    // What the coordinator holds of the stale attempt once nothing more
    // can arrive (the proxy holds what was in flight).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_cut = String::from_utf8(c.task_log(&id, "t").await?)?;
    let stale_dir = at_cut
        .lines()
        .find_map(|l| l.strip_prefix("line-1 "))
        .map(str::to_owned)
        .expect("the stale attempt's first line");
    c.start_runner("fresh")?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let requeued = cut.elapsed();
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    assert_eq!(task(&run, "t").attempts, 2, "{run:#?}");
    proxy.resume();
    // The stale runner comes back: it is welcomed again and told its
    // attempt is gone.
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || Ok((log_lines(&c, "stale", "welcomed by coordinator").len() >= 2).then_some(())),
        || format!("the stale runner did not come back\n{}", c.all_logs()),
    )
    .await?;
    // Its step ran on during the cut: it wrote lines the coordinator
    // never had.
    let written = std::fs::read_to_string(&all)?;
    let stale_written = written.lines().filter(|l| l.ends_with(&stale_dir)).count();
    let stale_at_cut = at_cut.lines().filter(|l| l.ends_with(&stale_dir)).count();
    assert!(
        stale_written > stale_at_cut,
        "the stale step wrote nothing after the cut ({stale_written} lines)"
    );
    // Give its shipper time to try.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    let stale_in_log = log.lines().filter(|l| l.ends_with(&stale_dir)).count();
    assert_eq!(
        stale_in_log,
        stale_at_cut,
        "late lines of the superseded attempt were appended:\n{log}\n{}",
        c.all_logs()
    );
    let winner: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("line-") && !l.ends_with(&stale_dir))
        .collect();
    assert_eq!(winner.len(), 20, "the winning attempt's lines: {log}");
    let run = c.get_run(&id).await?;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "the late report changed the run: {run:#?}"
    );
    assert_eq!(task(&run, "t").attempts, 2, "{run:#?}");
    println!(
        "runner stalled: run done on the other runner {} ms after the cut; \
         {stale_written} lines written by the stale attempt, {stale_in_log} in the log",
        requeued.as_millis()
    );
    Ok(())
}
