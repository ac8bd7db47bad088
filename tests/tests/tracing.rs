//! OpenTelemetry trace export (README "Tracing"): the real coordinator and
//! runner export to an OTLP receiver on loopback ([`capstan_tests::otlp`]).

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::git_server::git;
use capstan_tests::otlp::{OtlpReceiver, ReceivedSpan};
use capstan_tests::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Two tasks of two steps each; the last step fails.
const TRACED: &str = r#"
version: 1
name: traced
tasks:
  build:
    steps:
      - name: compile
        run: echo compiling
      - name: package
        run: echo packaging
  check:
    needs: [build]
    steps:
      - name: lint
        run: echo linting
      - name: unit
        run: exit 3
"#;

/// A cluster exporting to `receiver`, batches sent every `delay_ms`.
fn traced_cluster(receiver: &OtlpReceiver, delay_ms: u64) -> Builder {
    TestCluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", &delay_ms.to_string())
}

/// The spans of the run `id`'s trace, keyed by span id, and its `run` span.
fn trace_of(spans: &[ReceivedSpan], id: &str) -> (HashMap<String, ReceivedSpan>, ReceivedSpan) {
    let run = spans
        .iter()
        .find(|s| s.name == "run" && s.attr("capstan.run.id") == Some(id))
        .unwrap_or_else(|| panic!("no run span for {id} in {spans:#?}"))
        .clone();
    let trace = spans
        .iter()
        .filter(|s| s.trace_id == run.trace_id)
        .map(|s| (s.span_id.clone(), s.clone()))
        .collect();
    (trace, run)
}

/// `span` descends from the span `ancestor` through received spans.
fn descends_from(
    trace: &HashMap<String, ReceivedSpan>,
    span: &ReceivedSpan,
    ancestor: &str,
) -> bool {
    let mut parent = span.parent_span_id.clone();
    for _ in 0..16 {
        if parent == ancestor {
            return true;
        }
        match trace.get(&parent) {
            Some(p) => parent = p.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

/// `steps` step spans, `attempts` attempt spans and a run span arrived.
/// (Each span is exported when it ends: an attempt's after its last step's
/// and its log's acknowledgement, the run's after the final report.)
fn arrived(spans: &[ReceivedSpan], steps: usize, attempts: usize) -> bool {
    let count = |prefix: &str| spans.iter().filter(|s| s.name.starts_with(prefix)).count();
    count("step ") >= steps && count("attempt ") >= attempts && count("run") >= 1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_is_one_trace_from_submit_to_the_last_step() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let c = traced_cluster(&receiver, 100).start().await?;
    let id = c.submit(TRACED).await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}");
    assert_eq!(task_state(&run, "check"), TaskState::Failed);

    // Exported while both processes run: the batch processor works on
    // their tokio runtimes.
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| arrived(s, 4, 2))
        .await?;
    let (trace, root) = trace_of(&spans, &id);

    assert_eq!(root.service, "capstan-coordinator");
    assert!(
        root.parent_span_id.is_empty(),
        "no submitter context: a root span"
    );
    assert_eq!(root.attr("capstan.pipeline"), Some("traced"));
    assert_eq!(root.attr("capstan.run.state"), Some("failed"));
    assert!(
        root.is_error(),
        "a failed run's span is an error: {root:#?}"
    );

    // Both services' spans are in the run's trace, and every span that
    // names the run is.
    for s in spans.iter().filter(|s| {
        s.attr("capstan.run.id") == Some(id.as_str())
            || s.attr("capstan.run.id") == Some(id.as_str())
    }) {
        assert_eq!(
            s.trace_id, root.trace_id,
            "span outside the run's trace: {s:#?}"
        );
    }
    let named = |service: &str, name: &str| -> Vec<&ReceivedSpan> {
        trace
            .values()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    };
    let dispatches = named("capstan-coordinator", "task.dispatch");
    assert_eq!(dispatches.len(), 2, "one dispatch per task: {trace:#?}");
    let attempts: Vec<&ReceivedSpan> = trace
        .values()
        .filter(|s| s.service == "capstan-runner" && s.name.starts_with("attempt "))
        .collect();
    for a in &attempts {
        assert_eq!(
            Some(a.name.as_str()),
            a.attr("capstan.task")
                .map(|t| format!("attempt {t}"))
                .as_deref()
        );
        assert!(
            a.raw.contains("IntValue(1)"),
            "capstan.attempt.number is an int: {a:#?}"
        );
    }
    for s in trace.values() {
        for noise in ["busy_ns", "idle_ns", "thread.id", "thread.name"] {
            assert!(s.attr(noise).is_none(), "{noise} on {s:#?}");
        }
    }
    assert_eq!(attempts.len(), 2, "{trace:#?}");
    for a in &attempts {
        let d = trace
            .get(&a.parent_span_id)
            .expect("an attempt's parent is received");
        assert_eq!(
            d.name, "task.dispatch",
            "the runner continues the offer's context"
        );
        assert_eq!(d.attr("capstan.task"), a.attr("capstan.task"));
    }

    let steps: Vec<&ReceivedSpan> = trace
        .values()
        .filter(|s| s.service == "capstan-runner" && s.name.starts_with("step "))
        .collect();
    for s in &steps {
        let want = format!(
            "step {} {}",
            s.attr("capstan.step.number").unwrap_or("?"),
            s.attr("capstan.step.name").unwrap_or("?")
        );
        assert_eq!(s.name, want);
        assert_ne!(
            s.attr("capstan.step.number"),
            Some("0"),
            "steps count from 1"
        );
    }
    let by_name: HashMap<&str, &ReceivedSpan> = steps
        .iter()
        .map(|s| (s.attr("capstan.step.name").unwrap_or(""), *s))
        .collect();
    assert_eq!(steps.len(), 4, "{steps:#?}");
    for s in &steps {
        assert!(
            descends_from(&trace, s, &root.span_id),
            "step span is not below the run span: {s:#?}"
        );
        assert_eq!(s.attr("capstan.step.kind"), Some("run"));
    }
    for ok in ["compile", "package", "lint"] {
        let s = by_name
            .get(ok)
            .unwrap_or_else(|| panic!("no step span {ok}: {steps:#?}"));
        assert_eq!(s.attr("capstan.step.status"), Some("STEP_STATE_SUCCEEDED"));
        assert_eq!(s.attr("capstan.step.exit_code"), Some("0"));
        assert!(!s.is_error());
    }
    let unit = by_name["unit"];
    assert_eq!(unit.attr("capstan.step.status"), Some("STEP_STATE_FAILED"));
    assert_eq!(unit.attr("capstan.step.exit_code"), Some("3"));
    assert!(unit.is_error(), "the failing step is an error: {unit:#?}");
    assert_eq!(unit.status_message, "step 2 (unit) exited with 3");
    let check = attempts
        .iter()
        .find(|a| a.attr("capstan.task") == Some("check"))
        .expect("check's attempt");
    assert!(check.is_error());
    assert_eq!(
        check.attr("capstan.attempt.outcome"),
        Some("ATTEMPT_OUTCOME_FAILED")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submitters_traceparent_becomes_the_runs_parent() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let c = traced_cluster(&receiver, 100).start().await?;
    let (trace_id, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut req = tonic::Request::new(api::SubmitRunRequest {
        pipeline_yaml: "version: 1\nname: child\ntasks:\n  t:\n    steps: [ { run: 'echo hi' } ]\n"
            .into(),
        file_name: "child.yaml".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-{parent}-01").parse()?);
    let id = c.client().await?.submit_run(req).await?.into_inner().run_id;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| arrived(s, 1, 1))
        .await?;
    let (trace, root) = trace_of(&spans, &id);
    assert_eq!(root.trace_id, trace_id);
    assert_eq!(root.parent_span_id, parent);
    assert!(!root.is_error());
    let step = trace
        .values()
        .find(|s| s.name.starts_with("step "))
        .expect("the step joined the submitter's trace");
    assert!(descends_from(&trace, step, &root.span_id));

    // The CLI passes its TRACEPARENT / TRACESTATE on.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("cli.yaml");
    std::fs::write(
        &file,
        "version: 1\nname: from-cli\ntasks:\n  t:\n    steps: [ { run: 'echo hi' } ]\n",
    )?;
    let cli_trace = "0af7651916cd43dd8448eb211c80319c";
    let out = std::process::Command::new(bin("capstan"))
        .args(["--server", &c.url(), "submit", "-o", "json"])
        .arg(&file)
        .env("CAPSTAN_TOKEN", &c.api_token)
        .env("TRACEPARENT", format!("00-{cli_trace}-b7ad6b7169203331-01"))
        .env("TRACESTATE", "ci=1")
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let cli_id = serde_json::from_slice::<serde_json::Value>(&out.stdout)?["id"]
        .as_str()
        .expect("id")
        .to_owned();
    c.wait_done(&cli_id, Duration::from_secs(30)).await?;
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter()
                .any(|s| s.name == "run" && s.attr("capstan.run.id") == Some(cli_id.as_str()))
        })
        .await?;
    let (_, root) = trace_of(&spans, &cli_id);
    assert_eq!(root.trace_id, cli_trace);
    assert_eq!(root.parent_span_id, "b7ad6b7169203331");

    // With an OTLP endpoint of its own, the CLI exports a `capstan submit`
    // span between its TRACEPARENT and the run.
    let out = std::process::Command::new(bin("capstan"))
        .args(["--server", &c.url(), "submit", "-o", "json"])
        .arg(&file)
        .env("CAPSTAN_TOKEN", &c.api_token)
        .env("TRACEPARENT", format!("00-{cli_trace}-b7ad6b7169203331-01"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let traced_id = serde_json::from_slice::<serde_json::Value>(&out.stdout)?["id"]
        .as_str()
        .expect("id")
        .to_owned();
    c.wait_done(&traced_id, Duration::from_secs(30)).await?;
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter()
                .any(|s| s.name == "run" && s.attr("capstan.run.id") == Some(traced_id.as_str()))
        })
        .await?;
    let (trace, root) = trace_of(&spans, &traced_id);
    let cli_span = trace
        .get(&root.parent_span_id)
        .unwrap_or_else(|| panic!("the run's parent was not exported: {trace:#?}"));
    assert_eq!(cli_span.name, "capstan submit");
    assert_eq!(cli_span.service, "capstan");
    assert_eq!(cli_span.trace_id, cli_trace);
    assert_eq!(cli_span.parent_span_id, "b7ad6b7169203331");

    // A malformed traceparent is ignored: the run gets a trace of its own.
    let mut req = tonic::Request::new(api::SubmitRunRequest {
        pipeline_yaml:
            "version: 1\nname: orphan\ntasks:\n  t:\n    steps: [ { run: 'echo hi' } ]\n".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", "00-not-a-trace-01".parse()?);
    let id = c.client().await?.submit_run(req).await?.into_inner().run_id;
    c.wait_done(&id, Duration::from_secs(30)).await?;
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter()
                .any(|s| s.name == "run" && s.attr("capstan.run.id") == Some(id.as_str()))
        })
        .await?;
    let (_, root) = trace_of(&spans, &id);
    assert!(root.parent_span_id.is_empty(), "{root:#?}");
    assert_ne!(root.trace_id, trace_id);
    Ok(())
}

/// A kill -9 of the leader mid-run with the default batch delay (5 s), the
/// case where a batched span would be lost: the restarted leader emits the
/// `run` span with the ids chosen at submit, and no span of the trace is an
/// orphan.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_leader_kill_the_trace_is_whole_with_no_orphan_span() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let mut c = TestCluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .start()
        .await?;
    let id = c
        .submit("version: 1\nname: survive\ntasks:\n  first:\n    steps: [ { run: 'sleep 1.5' } ]\n  second:\n    needs: [first]\n    steps: [ { name: after, run: 'echo after' } ]\n")
        .await?;
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task_state(r, "first") == TaskState::Running
    })
    .await?;
    c.kill_replica(0);
    c.start_replica(0).await?;
    let run = c.wait_done(&id, Duration::from_secs(40)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");

    // The runner's spans and run.resumed come with their batch, up to 5 s
    // after they end.
    let spans = receiver
        .wait_for(Duration::from_secs(30), |s| {
            s.iter()
                .any(|s| s.name == "run" && s.attr("capstan.run.id") == Some(id.as_str()))
                && s.iter().filter(|s| s.name.starts_with("attempt ")).count() >= 2
                && s.iter().any(|s| s.name == "run.resumed")
                && s.iter()
                    .any(|s| s.attr("capstan.step.name") == Some("after"))
        })
        .await?;
    let (trace, root) = trace_of(&spans, &id);
    let runs = spans
        .iter()
        .filter(|s| s.name == "run" && s.attr("capstan.run.id") == Some(id.as_str()))
        .count();
    assert_eq!(runs, 1, "one run span, from the leader that ended the run");
    assert!(root.parent_span_id.is_empty(), "{root:#?}");
    assert_eq!(root.attr("capstan.run.state"), Some("succeeded"));
    for s in trace.values().filter(|s| s.span_id != root.span_id) {
        assert!(
            trace.contains_key(&s.parent_span_id),
            "an orphan span (its parent never reached the collector): {s:#?}\nin {trace:#?}"
        );
    }
    let resumed = trace
        .values()
        .find(|s| s.name == "run.resumed")
        .expect("the new leader's run.resumed");
    assert_eq!(resumed.parent_span_id, root.span_id);
    for task in ["first", "second"] {
        let d = trace
            .values()
            .find(|s| s.name == "task.dispatch" && s.attr("capstan.task") == Some(task))
            .unwrap_or_else(|| panic!("{task}'s dispatch: {trace:#?}"));
        assert_eq!(d.parent_span_id, root.span_id, "{task}");
        let attempt = trace
            .values()
            .find(|s| s.parent_span_id == d.span_id)
            .unwrap_or_else(|| panic!("{task}'s attempt below its dispatch: {trace:#?}"));
        assert_eq!(attempt.name, format!("attempt {task}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_flushes_the_last_spans() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    // No periodic export within the test: only the exit flush sends spans.
    let mut c = traced_cluster(&receiver, 600_000)
        .env("OTEL_SERVICE_NAME", "fleet-a")
        .start()
        .await?;
    let id = c
        .submit("version: 1\nname: flush\ntasks:\n  t:\n    steps: [ { name: only, run: 'echo hi' } ]\n")
        .await?;
    c.wait_done(&id, Duration::from_secs(30)).await?;
    // The run's own spans are exported as they end, whatever the batch
    // delay; the batched rest only at the exit.
    let eager = receiver
        .wait_for(Duration::from_secs(5), |s| {
            s.iter().any(|s| s.name == "run") && s.iter().any(|s| s.name == "task.dispatch")
        })
        .await?;
    assert!(
        eager
            .iter()
            .all(|s| s.name == "run" || s.name == "task.dispatch"),
        "nothing batched before the exit: {eager:#?}"
    );
    let mut runner = c.terminate_runner("runner-0").expect("runner-0");
    wait_exit(
        &mut runner.child,
        Duration::from_secs(15),
        "runner did not exit after SIGTERM",
    )
    .await?;
    c.terminate_replica(0, Duration::from_secs(15))?;
    let spans = receiver
        .wait_for(Duration::from_secs(5), |s| {
            s.iter()
                .any(|s| s.attr("capstan.step.name") == Some("only"))
                && s.iter().any(|s| s.name == "run")
        })
        .await?;
    let (trace, root) = trace_of(&spans, &id);
    let step = trace
        .values()
        .find(|s| s.name.starts_with("step "))
        .expect("step");
    assert!(descends_from(&trace, step, &root.span_id));
    assert!(
        spans.iter().all(|s| s.service == "fleet-a"),
        "OTEL_SERVICE_NAME names both services: {spans:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_exported_without_an_endpoint_when_disabled_or_unsampled() -> anyhow::Result<()>
{
    let mut c = TestCluster::builder().start().await?;
    let id = c
        .submit("version: 1\nname: plain\ntasks:\n  t:\n    steps: [ { run: 'echo hi' } ]\n")
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded);
    c.terminate_replica(0, Duration::from_secs(10))?;
    for name in ["coordinator", "runner-0"] {
        let log = c.process_log(name);
        assert!(!log.contains("exporting traces"), "{name}: {log}");
    }
    // OTEL_SDK_DISABLED wins over an endpoint, and the standard sampler
    // variable is honoured.
    for (var, value) in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_TRACES_SAMPLER", "always_off"),
    ] {
        let receiver = OtlpReceiver::start().await?;
        let c = traced_cluster(&receiver, 50)
            .env(var, value)
            .start()
            .await?;
        let id = c
            .submit("version: 1\nname: plain\ntasks:\n  t:\n    steps: [ { run: 'echo hi' } ]\n")
            .await?;
        let run = c.wait_done(&id, Duration::from_secs(30)).await?;
        assert_eq!(run_state(&run), RunState::Succeeded);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            receiver.spans().is_empty(),
            "{var}: {:#?}",
            receiver.spans()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_slows_nothing_down() -> anyhow::Result<()> {
    // Accepts TCP connections (the kernel's backlog does) and never speaks
    // HTTP/2: every export hangs until its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", silent.local_addr()?);
    let mut c = TestCluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .start()
        .await?;
    let started = Instant::now();
    let id = c.submit(TRACED).await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the run took {:?}",
        started.elapsed()
    );
    // The exit's flush gives up after a bounded wait.
    let took = c.terminate_replica(0, Duration::from_secs(10))?;
    assert!(took < Duration::from_secs(6), "exit took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_endpoint_stops_the_start_with_what_to_fix() -> anyhow::Result<()> {
    let out = std::process::Command::new(bin("capstan-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && err.contains("http://127.0.0.1:4317"),
        "{err}"
    );
    Ok(())
}

/// The checkout and the GitOps steps (`set-image`, `git-push`) of a run
/// with a repository, against the harness's git server, shell executor.
#[tokio::test(flavor = "multi_thread")]
async fn checkout_and_gitops_steps_are_spans_of_the_run() -> anyhow::Result<()> {
    let (user, password) = ("capstan-bot", "trace-token-1");
    let server = capstan_tests::git_server::GitServer::start(user, password)?;
    server.create_repo("demo/mono")?;
    let work = tempfile::tempdir()?;
    let dir = work.path().join("mono");
    std::fs::create_dir_all(dir.join("k8s"))?;
    std::fs::write(
        dir.join("k8s/pod.yaml"),
        "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - name: x\n      image: reg.example/app:old\n",
    )?;
    git(&dir, &["init", "-q"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "seed"]);
    git(
        &dir,
        &[
            "push",
            "-q",
            &server.url_with_auth("demo/mono"),
            "HEAD:main",
        ],
    );
    let sha = git(&dir, &["rev-parse", "HEAD"]);
    let secrets = work.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        format!("gitops = {{ username = \"{user}\", password = \"{password}\" }}\n"),
    )?;

    let receiver = OtlpReceiver::start().await?;
    let c = traced_cluster(&receiver, 100)
        .runner_args(&[
            "--secrets-file",
            &secrets.display().to_string(),
            "--git-credentials",
            "gitops",
        ])
        .start()
        .await?;
    let id = c
        .client()
        .await?
        .submit_run(api::SubmitRunRequest {
            pipeline_yaml: "version: 1\nname: deploy\ntasks:\n  deploy:\n    steps:\n      - set-image: { files: [k8s/pod.yaml], image: \"reg.example/app:v1\" }\n      - git-push: { message: bump, credentials: gitops }\n".into(),
            file_name: "deploy.yaml".into(),
            repo: server.url("demo/mono"),
            rev: sha.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{run:#?}\n{}",
        c.all_logs()
    );

    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| arrived(s, 2, 1))
        .await?;
    let (trace, root) = trace_of(&spans, &id);
    assert_eq!(
        root.attr("capstan.repo"),
        Some(server.url("demo/mono").as_str())
    );
    assert_eq!(root.attr("capstan.commit"), Some(sha.as_str()));
    let checkout = trace
        .values()
        .find(|s| s.name == "git.checkout")
        .unwrap_or_else(|| panic!("no git.checkout span: {trace:#?}"));
    assert_eq!(checkout.attr("capstan.commit"), Some(sha.as_str()));
    assert!(!checkout.is_error());
    assert!(descends_from(&trace, checkout, &root.span_id));
    for kind in ["set-image", "git-push"] {
        let step = trace
            .values()
            .find(|s| s.name.starts_with("step ") && s.attr("capstan.step.kind") == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} step span: {trace:#?}"));
        assert_eq!(
            step.attr("capstan.step.status"),
            Some("STEP_STATE_SUCCEEDED")
        );
        assert!(descends_from(&trace, step, &root.span_id));
    }
    Ok(())
}
