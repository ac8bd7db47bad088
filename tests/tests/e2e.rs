//! End to end: the three real binaries on loopback.

use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::*;
use std::time::{Duration, Instant};

const DIAMOND: &str = r#"
version: 1
name: diamond
tasks:
  a:
    steps:
      - run: echo "a ran"
  b:
    needs: [a]
    steps:
      - run: echo "b ran"
  c:
    needs: [a]
    steps:
      - run: echo "c ran" >&2
  d:
    needs: [b, c]
    steps:
      - run: echo "d ran"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn diamond_dag_on_two_runners() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(2).start().await?;
    let id = c.submit(DIAMOND).await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    for t in ["a", "b", "c", "d"] {
        assert_eq!(task_state(&run, t), TaskState::Succeeded);
        let log = String::from_utf8(c.task_log(&id, t).await?)?;
        assert!(log.contains(&format!("{t} ran")), "log of {t}: {log:?}");
    }
    // d started only after both b and c finished.
    let (b, cc, d) = (task(&run, "b"), task(&run, "c"), task(&run, "d"));
    assert!(d.started_at_ms >= b.finished_at_ms.max(cc.finished_at_ms));

    // The CLI sees the same thing.
    let out = c.cli(&["status", &id, "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["tasks"].as_array().unwrap().len(), 4);
    assert_eq!(v["tasks"][0]["attempts"], 1);
    assert!(
        v["tasks"][0]["runner"]
            .as_str()
            .unwrap()
            .starts_with("runner-")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_task_skips_its_dependents_and_cli_exits_1() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(2).start().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("fail.yaml");
    std::fs::write(
        &file,
        r#"
version: 1
name: failing
tasks:
  ok:
    steps: [ { run: "echo fine" } ]
  broken:
    steps:
      - run: |
          echo "about to fail"
          exit 3
  after:
    needs: [broken, ok]
    steps: [ { run: "echo never" } ]
  later:
    needs: [after]
    steps: [ { run: "echo never" } ]
"#,
    )?;
    let out = c.cli(&["submit", file.to_str().unwrap(), "--follow"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("about to fail"), "{stdout}");
    let runs = c
        .client()
        .await?
        .list_runs(capstan_proto::api::v1::ListRunsRequest {
            limit: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .runs;
    let run = &runs[0];
    assert_eq!(run_state(run), RunState::Failed);
    assert_eq!(task_state(run, "ok"), TaskState::Succeeded);
    assert_eq!(task_state(run, "broken"), TaskState::Failed);
    assert_eq!(task(run, "broken").exit_code, Some(3));
    assert_eq!(task_state(run, "after"), TaskState::Skipped);
    assert_eq!(task_state(run, "later"), TaskState::Skipped);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_running_step() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let marker = c.dir().join("should-not-exist");
    let id = c
        .submit(&format!(
            "version: 1\nname: long\ntasks:\n  sleepy:\n    steps:\n      - run: |\n          echo started\n          sleep 20\n          touch {}\n  next:\n    needs: [sleepy]\n    steps: [ {{ run: 'echo no' }} ]\n",
            marker.display()
        ))
        .await?;
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task_state(r, "sleepy") == TaskState::Running
    })
    .await?;
    let t0 = Instant::now();
    let out = c.cli(&["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    let run = c.wait_done(&id, Duration::from_secs(10)).await?;
    assert_eq!(run_state(&run), RunState::Cancelled);
    assert_eq!(task_state(&run, "sleepy"), TaskState::Cancelled);
    assert_eq!(task_state(&run, "next"), TaskState::Cancelled);
    // The runner frees its slot once the step is dead: a new run gets through.
    let id2 = c
        .submit(
            "version: 1\nname: after\ntasks:\n  t:\n    steps: [ { run: 'echo after-cancel' } ]\n",
        )
        .await?;
    let run2 = c.wait_done(&id2, Duration::from_secs(15)).await?;
    assert_eq!(run_state(&run2), RunState::Succeeded);
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert!(!marker.exists(), "the cancelled step kept running");
    // Cancelling again is a no-op; an unknown run is a clear error.
    assert!(c.cli(&["cancel", &id]).status.success());
    let out = c.cli(&["cancel", "run-doesnotexist"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run-doesnotexist"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn step_timeout_fails_the_task() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let id = c
        .submit("version: 1\nname: slow\ntasks:\n  t:\n    steps:\n      - run: sleep 30\n        timeout: 1s\n")
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(15)).await?;
    assert_eq!(run_state(&run), RunState::Failed);
    let t = task(&run, "t");
    assert!(t.message.contains("timed out"), "{t:#?}");
    assert!(t.finished_at_ms - t.started_at_ms < 8000, "{t:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn runner_killed_mid_step_task_finishes_on_the_other() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .runners(2)
        .lease_ms(1500)
        .start()
        .await?;
    let id = c
        .submit("version: 1\nname: lost\ntasks:\n  t:\n    steps:\n      - run: |\n          echo begin\n          sleep 2\n          echo end\n")
        .await?;
    let run = c
        .wait_run(&id, Duration::from_secs(20), |r| {
            task_state(r, "t") == TaskState::Running
        })
        .await?;
    let victim = task(&run, "t").runner.clone();
    c.kill_runner(&victim);
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    let t = task(&run, "t");
    assert_eq!(t.attempts, 2);
    assert_ne!(t.runner, victim);
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    assert!(log.contains("end"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_and_restarted_mid_run() -> anyhow::Result<()> {
    let mut c = TestCluster::builder().runners(1).start().await?;
    let id = c
        .submit("version: 1\nname: survive\ntasks:\n  count:\n    steps:\n      - run: for i in $(seq 1 40); do echo line-$i; sleep 0.05; done\n  then:\n    needs: [count]\n    steps: [ { run: 'echo then-ran' } ]\n")
        .await?;
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task_state(r, "count") == TaskState::Running
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill_replica(0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.start_replica(0).await?;
    let run = c.wait_done(&id, Duration::from_secs(40)).await?;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{run:#?}\n{}",
        c.all_logs()
    );
    assert_eq!(
        task(&run, "count").attempts,
        1,
        "the running attempt was re-attached, not rerun"
    );
    let log = String::from_utf8(c.task_log(&id, "count").await?)?;
    let expected: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    assert!(
        log.ends_with(&expected),
        "log incomplete or duplicated: {log:?}"
    );
    assert_eq!(
        log.lines().filter(|l| l.starts_with("line-")).count(),
        40,
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_registration_token_is_refused_clearly() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(0).start().await?;
    let out = c
        .runner_command("intruder", "wrong-token")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registration token"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(0).start().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "version: 1\nname: bad\ntasks:\n  a:\n    needs: [nope]\n    steps: [ { run: x } ]\n",
    )?;
    let out = c.cli(&["submit", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:5:"), "{err}");
    assert!(err.contains("nope"), "{err}");
    // Nothing reached the queue.
    let runs = c.cli(&["runs", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&runs.stdout)?;
    assert_eq!(v["runs"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(v["next"].is_null(), "{v}");

    let out = c.cli(&["status", "run-unknown"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run-unknown"));

    // Nothing listens here: exit 3.
    let out = std::process::Command::new(bin("capstan"))
        .args([
            "--server",
            &format!("http://127.0.0.1:{}", free_port()),
            "runs",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_runner() -> anyhow::Result<()> {
    let mut c = TestCluster::builder().runners(1).start().await?;
    let id = c
        .submit("version: 1\nname: drain\ntasks:\n  t:\n    steps:\n      - run: sleep 1.5; echo finished-anyway\n")
        .await?;
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task_state(r, "t") == TaskState::Running
    })
    .await?;
    let mut proc = c.terminate_runner("runner-0").expect("runner exists");
    // New work is not taken while draining.
    let id2 = c
        .submit("version: 1\nname: later\ntasks:\n  t:\n    steps: [ { run: 'echo later' } ]\n")
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    assert!(log.contains("finished-anyway"));
    let status = wait_exit(
        &mut proc.child,
        Duration::from_secs(15),
        "runner did not exit after draining",
    )
    .await?;
    assert!(status.success(), "{status}");
    let later = c.get_run(&id2).await?;
    assert_eq!(task_state(&later, "t"), TaskState::Queued);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_and_resume_from_the_cli() -> anyhow::Result<()> {
    let mut c = TestCluster::builder().runners(1).start().await?;
    c.wait_runners_connected(1, Duration::from_secs(20)).await?;
    let out = c.cli(&["drain", "runner-0"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("is draining"), "{stdout}");
    // The idle agent drains at once and exits 0.
    let status = wait_exit(
        &mut c.runners[0].child,
        Duration::from_secs(15),
        "runner did not exit after drain",
    )
    .await?;
    assert!(status.success(), "{status}");
    c.kill_runner("runner-0");

    // The drain is persisted: started again, the runner still takes nothing.
    c.start_runner("runner-0")?;
    let id = c
        .submit("version: 1\nname: after\ntasks:\n  t:\n    steps: [ { run: 'echo resumed' } ]\n")
        .await?;
    let status = wait_exit(
        &mut c.runners[0].child,
        Duration::from_secs(15),
        "a drained runner did not exit on restart",
    )
    .await?;
    assert!(status.success(), "{status}");
    assert_eq!(task_state(&c.get_run(&id).await?, "t"), TaskState::Queued);
    c.kill_runner("runner-0");

    // Resume: the runner takes work again once started.
    let out = c.cli(&["resume", "runner-0"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("takes work again once it connects"),
        "{stdout}"
    );
    let out = c.cli(&["--output", "json", "runners"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"draining\": false"),
        "{out:?}"
    );
    c.start_runner("runner-0")?;
    let run = c.wait_done(&id, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    assert!(String::from_utf8(c.task_log(&id, "t").await?)?.contains("resumed"));

    // An unknown runner is a clear error.
    let out = c.cli(&["resume", "nobody"]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no runner `nobody`"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_side_port_serves_health_and_metrics() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    assert_eq!(c.http_get("/healthz")?.0, 200);
    assert_eq!(c.http_get("/readyz")?.0, 200);
    let id = c
        .submit("version: 1\nname: m\ntasks:\n  t:\n    steps: [ { run: 'echo hi' } ]\n")
        .await?;
    c.wait_done(&id, Duration::from_secs(20)).await?;
    let (code, body) = c.http_get("/metrics")?;
    assert_eq!(code, 200);
    assert!(body.contains("capstan_runners_connected 1"), "{body}");
    assert!(body.contains("capstan_runs_submitted_total 1"), "{body}");
    assert!(
        body.contains("capstan_pickup_latency_seconds_count 1"),
        "{body}"
    );
    assert!(body.contains("capstan_log_bytes_total"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_on_labels_route_tasks() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(2).start().await?;
    // Runner i carries index=i.
    let id = c
        .submit("version: 1\nname: route\ntasks:\n  one:\n    runs-on: [index=1]\n    steps: [ { run: 'echo one' } ]\n  zero:\n    runs-on: [index=0]\n    steps: [ { run: 'echo zero' } ]\n")
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    assert_eq!(task(&run, "one").runner, "runner-1");
    assert_eq!(task(&run, "zero").runner, "runner-0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_cannot_touch_another_runners_attempt() -> anyhow::Result<()> {
    use capstan_proto::runner::v1 as rpb;
    use rpb::runner_service_client::RunnerServiceClient;
    let c = TestCluster::builder().runners(1).start().await?;
    let id = c
        .submit(
            "version: 1\nname: owned\ntasks:\n  t:\n    steps: [ { run: 'echo mine; sleep 2' } ]\n",
        )
        .await?;
    let run = c
        .wait_run(&id, Duration::from_secs(20), |r| {
            task_state(r, "t") == TaskState::Running
        })
        .await?;
    let attempt = task(&run, "t").attempt_id.clone();
    let mut rc = RunnerServiceClient::connect(c.url()).await?;
    let creds = rc
        .register(rpb::RegisterRequest {
            registration_token: c.token.clone(),
            name: "intruder".into(),
            capacity: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    // Its log chunks for that attempt are refused and nothing is written.
    let chunk = rpb::LogChunk {
        runner_id: creds.runner_id.clone(),
        runner_secret: creds.runner_secret.clone(),
        attempt_id: attempt.clone(),
        offset: 0,
        data: bytes_of("forged\n"),
        ..Default::default()
    };
    let err = rc
        .push_logs(tokio_stream::iter(vec![chunk.clone()]))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            tonic::Code::PermissionDenied,
            format!(
                "runner {} reported on attempt {attempt}, which is not assigned to it",
                creds.runner_id
            )
            .as_str()
        ),
        "{err}"
    );
    // A wrong secret is refused as unauthenticated.
    let mut bad = chunk;
    bad.runner_secret = "guess".into();
    let err = rc
        .push_logs(tokio_stream::iter(vec![bad]))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            tonic::Code::Unauthenticated,
            "runner credentials rejected: re-register the runner"
        ),
        "{err}"
    );
    // Its report that the attempt succeeded is ignored.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(rpb::RunnerMessage {
        kind: Some(rpb::runner_message::Kind::Hello(rpb::Hello {
            runner_id: creds.runner_id.clone(),
            runner_secret: creds.runner_secret.clone(),
            protocol_version: capstan_proto::PROTOCOL_VERSION,
            ..Default::default()
        })),
    })
    .await?;
    let mut down = rc
        .control(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    assert!(matches!(
        down.message().await?.and_then(|m| m.kind),
        Some(rpb::coordinator_message::Kind::Welcome(_))
    ));
    tx.send(rpb::RunnerMessage {
        kind: Some(rpb::runner_message::Kind::Finished(rpb::TaskFinished {
            attempt_id: attempt.clone(),
            outcome: rpb::AttemptOutcome::Succeeded as i32,
            ..Default::default()
        })),
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(task_state(&c.get_run(&id).await?, "t"), TaskState::Running);
    // The real owner finishes it, with its own log only.
    let run = c.wait_done(&id, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    assert!(log.contains("mine") && !log.contains("forged"), "{log}");
    // A wrong registration token is refused before anything is created.
    let err = rc
        .register(rpb::RegisterRequest {
            registration_token: "nope".into(),
            name: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    drop(tx);
    Ok(())
}

fn bytes_of(s: &str) -> tonic::codegen::Bytes {
    tonic::codegen::Bytes::copy_from_slice(s.as_bytes())
}

/// `capstan submit --idempotency-key`: the same key twice queues one run and
/// prints its id both times (a redelivered webhook, a retried script); a
/// submit without a key queues a new run.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_idempotency_key_queues_one_run() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("once.yaml");
    std::fs::write(
        &file,
        "version: 1\nname: once\ntasks:\n  t:\n    steps: [ { run: 'echo once' } ]\n",
    )?;
    let path = file.to_str().unwrap();
    let submit = |extra: &[&str]| {
        let mut args = vec!["submit", path];
        args.extend_from_slice(extra);
        let out = c.cli(&args);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let first = submit(&["--idempotency-key", "push-event-42"]);
    let again = submit(&["--idempotency-key", "push-event-42"]);
    assert_eq!(first, again);
    let other = submit(&[]);
    assert_ne!(other, first);
    let runs = c
        .client()
        .await?
        .list_runs(capstan_proto::api::v1::ListRunsRequest {
            limit: 10,
            ..Default::default()
        })
        .await?
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 2, "{runs:#?}");
    let run = c.wait_done(&first, Duration::from_secs(15)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    Ok(())
}

/// `--retention 2s`: a finished run, its record and its log file are gone a
/// little after the retention (GetRun says not found, the metrics count
/// it); a run still going is kept however old it is.
#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_finished_runs_and_their_logs() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .runners(2)
        .coordinator_args(&["--retention", "2s"])
        .start()
        .await?;
    let slow = c
        .submit("version: 1\nname: slow\ntasks:\n  t:\n    steps: [ { run: 'sleep 6; echo slow-done' } ]\n")
        .await?;
    let quick = c
        .submit("version: 1\nname: quick\ntasks:\n  t:\n    steps: [ { run: 'echo kept-for-a-while' } ]\n")
        .await?;
    let run = c.wait_done(&quick, Duration::from_secs(15)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    let log = c.task_log(&quick, "t").await?;
    assert!(String::from_utf8_lossy(&log).contains("kept-for-a-while"));
    let attempt = run.tasks[0].attempt_id.clone();
    let logs = c.data_dir().join("logs");
    // Plain while written, sealed (`.logz`) once the run ended.
    let log_exists = || {
        logs.join(format!("{attempt}.log")).exists()
            || logs.join(format!("{attempt}.logz")).exists()
    };
    assert!(log_exists(), "no log of {attempt} in {}", logs.display());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.get_run(&quick).await {
            Err(e) if format!("{e:#}").contains("not found") => break,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "the run outlived its retention");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while log_exists() {
        assert!(Instant::now() < deadline, "the log file outlived its run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Older than the retention by now, but running: kept.
    assert!(c.get_run(&slow).await.is_ok(), "a running run was deleted");
    let (_, metrics) = c.http_get("/metrics")?;
    assert!(metrics.contains("runs_deleted_total 1"), "{metrics}");
    let run = c.wait_done(&slow, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    Ok(())
}

/// Orphan logs (a crash between retention's record delete and its file
/// delete leaves them) go when the next leadership starts; the logs of runs
/// the coordinator holds, and files that are not logs, stay.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_leadership_deletes_orphan_logs_only() -> anyhow::Result<()> {
    let mut c = TestCluster::builder().runners(1).start().await?;
    let id = c
        .submit("version: 1\nname: kept\ntasks:\n  t:\n    steps: [ { run: 'echo still-here' } ]\n")
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(15)).await?;
    let logs = c.data_dir().join("logs");
    let attempt = &run.tasks[0].attempt_id;
    // Plain while written, sealed (`.logz`) once the run ended.
    let kept = || {
        logs.join(format!("{attempt}.log")).exists()
            || logs.join(format!("{attempt}.logz")).exists()
    };
    assert!(kept(), "no log of {attempt}");
    let orphan = logs.join("0192f0aa-0000-7000-8000-00000000beef.log");
    std::fs::write(&orphan, b"output of a run deleted before a crash\n")?;
    let not_a_log = logs.join("notes.txt");
    std::fs::write(&not_a_log, b"an operator's file\n")?;

    c.kill_replica(0);
    c.start_replica(0).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while orphan.exists() {
        assert!(Instant::now() < deadline, "the orphan log was not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(kept(), "the log of a run still held was deleted");
    assert!(not_a_log.exists(), "a file that is not a log was deleted");
    let log = c.task_log(&id, "t").await?;
    assert!(String::from_utf8_lossy(&log).contains("still-here"));
    Ok(())
}

/// `--max-step-log 64k`: a step that writes 1 MB keeps its first 48 KiB and
/// last 16 KiB in the log, with a line that counts what was dropped; the
/// next step's output is whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_step_past_the_log_cap_keeps_head_and_tail() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .executor("fake")
        .runner_args(&["--max-step-log", "64k"])
        .start()
        .await?;
    let id = c
        .submit(
            "version: 1\nname: cap\ntasks:\n  chatty:\n    steps:\n      - run: \"output 1000000\\necho last-line\"\n      - run: \"echo next-step-whole\"\n",
        )
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    let log = String::from_utf8(c.task_log(&id, "chatty").await?)?;
    let head = 48 * 1024;
    let tail = 16 * 1024;
    // The step's log starts with its `$ command` line.
    let produced = "$ output 1000000\n".len() + 1_000_000 + "last-line\n".len();
    let dropped = produced - head - tail;
    assert!(
        log.contains(&format!(
            "[capstan: {dropped} bytes of this step's output were dropped here: the log keeps the first {head} and the last {tail} bytes"
        )),
        "{}",
        &log[..log.len().min(2000)]
    );
    assert!(log.contains("last-line\n"), "the tail is kept");
    assert!(
        log.ends_with("next-step-whole\n"),
        "{}",
        &log[log.len().saturating_sub(300)..]
    );
    assert!(log.len() < 70 * 1024, "{} bytes", log.len());
    Ok(())
}

const MATRIX: &str = r#"version: 1
name: matrix
tasks:
  test:
    matrix:
      shard: [1, 2, 3]
      db: [pg15, pg16]
      exclude: [{shard: 3, db: pg15}]
      include: [{shard: 4, db: pg16}]
    env: {DB: "${{ matrix.db }}"}
    steps:
      - run: echo "shard ${{ matrix.shard }} on $DB"
  report:
    needs: [test]
    steps:
      - run: echo "report ran"
"#;

/// A 2x3 matrix with an exclude and an include runs as six tasks named by
/// their values on two runners, each with its own values, and the task
/// that needs the matrix starts after every one of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_matrix_fans_out_and_back_in() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(2).start().await?;
    let id = c.submit(MATRIX).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    let names: Vec<&str> = run.tasks.iter().map(|t| t.name.as_str()).collect();
    let expected = [
        ("pg15", "1"),
        ("pg15", "2"),
        ("pg16", "1"),
        ("pg16", "2"),
        ("pg16", "3"),
        ("pg16", "4"),
    ];
    let mut last_end = 0;
    for (db, shard) in expected {
        let name = format!("test[db={db},shard={shard}]");
        assert!(names.contains(&name.as_str()), "{names:?}");
        assert_eq!(task_state(&run, &name), TaskState::Succeeded);
        let log = String::from_utf8(c.task_log(&id, &name).await?)?;
        assert!(
            log.contains(&format!("shard {shard} on {db}")),
            "{name}: {log}"
        );
        last_end = last_end.max(task(&run, &name).finished_at_ms);
    }
    assert_eq!(names.len(), 7, "{names:?}");
    let report = task(&run, "report");
    assert_eq!(report.needs.len(), 6, "{:?}", report.needs);
    assert!(report.started_at_ms >= last_end);
    let out = c.cli(&["logs", &id, "--task", "test[db=pg16,shard=4]"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("shard 4 on pg16"),
        "{out:?}"
    );
    Ok(())
}
