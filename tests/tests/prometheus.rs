//! The operator's side of the metrics: deploy/prometheus/alerts.yaml
//! passes `promtool check rules` and its unit tests (`promtool test rules`,
//! each alert firing on the series that should fire it and quiet on a
//! healthy fleet), and every metric the alerts and the Grafana dashboard
//! (deploy/grafana/capstan.json) name is one a real coordinator or runner
//! exports.

use capstan_tests::metrics::samples;
use std::path::PathBuf;
use std::process::Command;

fn prometheus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
        .expect("run promtool (scripts/testbed installs Debian's prometheus)")
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let out = promtool(&["check", "rules", "alerts.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
    let out = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_wrong_expectation_fails_the_rule_tests() -> anyhow::Result<()> {
    // The unit tests can fail: the same alert expected quiet while it fires.
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        prometheus_dir().join("alerts.yaml"),
        dir.path().join("alerts.yaml"),
    )?;
    std::fs::write(
        dir.path().join("wrong_test.yaml"),
        "rule_files: [alerts.yaml]\nevaluation_interval: 30s\ntests:\n  - interval: 30s\n    \
         input_series:\n      - series: capstan_is_leader{instance=\"c1\"}\n        values: 0x10\n    \
         alert_rule_test:\n      - {eval_time: 3m, alertname: CapstanNoLeader, exp_alerts: []}\n",
    )?;
    let out = Command::new("promtool")
        .args(["test", "rules", "wrong_test.yaml"])
        .current_dir(dir.path())
        .output()?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FAILED") && stderr.contains("alertname: CapstanNoLeader"),
        "{out:?}"
    );
    Ok(())
}

/// The `capstan_*` names the alerts and the dashboard use.
fn names_operators_use() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for file in [
        prometheus_dir().join("alerts.yaml"),
        prometheus_dir().join("../grafana/capstan.json"),
    ] {
        let text = std::fs::read_to_string(&file).expect("read the alert and dashboard files");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("capstan_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// The names in `wanted` no sample of `scrapes` carries (a histogram's
/// name counts as present through its `_bucket`, `_sum` and `_count`).
fn missing<'a>(
    wanted: impl IntoIterator<Item = &'a String>,
    scrapes: &[&std::collections::BTreeMap<String, f64>],
) -> Vec<String> {
    wanted
        .into_iter()
        .filter(|name| {
            !scrapes.iter().any(|s| {
                s.keys().any(|series| {
                    let sample = series.split('{').next().unwrap_or("");
                    sample == name.as_str()
                        || sample
                            .strip_prefix(name.as_str())
                            .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))
                })
            })
        })
        .cloned()
        .collect()
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check_metrics(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (scripts/testbed installs Debian's prometheus)");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    if out.status.success() && out.stdout.is_empty() && out.stderr.is_empty() {
        return Ok(());
    }
    Err(format!(
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
fn a_name_no_scrape_has_is_reported_by_name_and_promtool_flags_a_bad_exposition() {
    let scrape = samples(
        "# HELP capstan_queue_depth x\n# TYPE capstan_queue_depth gauge\ncapstan_queue_depth 0\n\
         capstan_pickup_latency_seconds_bucket{le=\"+Inf\"} 1\n",
    );
    let wanted: Vec<String> = [
        "capstan_queue_depth",
        "capstan_pickup_latency_seconds_bucket",
        "capstan_pickup_latency_seconds",
        "capstan_is_leader",
        "capstan_queue",
    ]
    .map(String::from)
    .into();
    assert_eq!(
        missing(&wanted, &[&scrape]),
        ["capstan_is_leader", "capstan_queue"]
    );
    // A counter without HELP and `_total`, and a unit that is not a base unit.
    let bad = "# TYPE capstan_runs counter\ncapstan_runs 1\n# HELP capstan_wait_ms w\n\
               # TYPE capstan_wait_ms gauge\ncapstan_wait_ms 3\n";
    let e = promtool_check_metrics(bad).unwrap_err();
    assert!(
        e.contains("capstan_runs") && e.contains("capstan_wait_ms"),
        "{e}"
    );
}

/// Waits until `cond` holds of replica 0's or the runner's scrape.
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    cond: impl Fn(&std::collections::BTreeMap<String, f64>) -> bool,
) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (code, _, body) = capstan_tests::net::http_get_full(addr, "/metrics", "")?;
        if code == 200 && cond(&samples(&body)) {
            return Ok(body);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{what} did not hold in 20 s; last scrape:\n{body}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn pipeline(name: &str, tasks: &str) -> String {
    format!("version: 1\nname: {name}\ntasks:\n{tasks}")
}

/// A real coordinator and runners (fake executor): runs that succeed, fail
/// (with a skipped dependent), retry a script, give up on infrastructure,
/// are cancelled, and lose their runner; then both daemons' `/metrics`
/// pass `promtool check metrics`, carry every name the alerts and the
/// dashboard use, and count what happened.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_outcomes_and_carry_every_name_operators_use() -> anyhow::Result<()> {
    use capstan_proto::pipeline::v1 as api;
    use capstan_tests::*;
    use std::time::Duration;
    let receiver = capstan_tests::otlp::OtlpReceiver::start().await?;
    let mut c = TestCluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .runners(0)
        .executor("fake")
        .lease_ms(1000)
        .coordinator_args(&["--infra-retry-backoff-ms", "50"])
        .start()
        .await?;
    // A runner lost mid-task: its attempt is requeued when its lease ends.
    c.start_runner("doomed")?;
    c.wait_runners_connected(1, Duration::from_secs(20)).await?;
    let lost = c
        .submit(&pipeline(
            "lost",
            "  t:\n    steps: [ { run: 'sleep 2000' } ]\n",
        ))
        .await?;
    c.wait_run(&lost, Duration::from_secs(20), |r| {
        task_state(r, "t") == api::TaskState::Running
    })
    .await?;
    c.kill_runner("doomed");
    let runner_http = capstan_tests::net::free_addr();
    let mut cmd = c.runner_command("metered", &c.token.clone());
    cmd.args(["--http-listen", &runner_http.to_string()]);
    c.runners.push(Proc::spawn(cmd, c.dir(), "metered")?);
    let run = c.wait_done(&lost, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), api::RunState::Succeeded, "{run:#?}");
    // The run's span records the requeue and its reason.
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter()
                .any(|s| s.name == "run" && s.attr("capstan.run.id") == Some(lost.as_str()))
        })
        .await?;
    let run_span = spans
        .iter()
        .find(|s| s.name == "run" && s.attr("capstan.run.id") == Some(lost.as_str()))
        .expect("waited for");
    assert!(
        run_span.raw.contains("name: \"requeue\"") && run_span.raw.contains("runner_lost"),
        "no requeue event with its reason on {run_span:#?}"
    );

    let runs = [
        ("ok", "  t:\n    steps: [ { run: 'echo fine' } ]\n"),
        (
            "fails",
            "  t:\n    steps: [ { run: 'exit 3' } ]\n  after:\n    needs: [t]\n    steps: [ { run: 'echo never' } ]\n",
        ),
        (
            "retried",
            "  t:\n    retries: 1\n    steps: [ { run: 'exit 1' } ]\n",
        ),
        ("infra", "  t:\n    steps: [ { run: 'fail-start' } ]\n"),
    ];
    for (name, tasks) in runs {
        let id = c.submit(&pipeline(name, tasks)).await?;
        c.wait_done(&id, Duration::from_secs(30)).await?;
    }
    let hung = c
        .submit(&pipeline(
            "cancelled",
            "  t:\n    steps: [ { run: hang } ]\n",
        ))
        .await?;
    c.wait_run(&hung, Duration::from_secs(20), |r| {
        task_state(r, "t") == api::TaskState::Running
    })
    .await?;
    let out = c.cli(&["cancel", &hung]);
    assert!(out.status.success(), "{out:?}");
    c.wait_done(&hung, Duration::from_secs(20)).await?;

    let coordinator_http = c.replicas[0].http;
    let expected: &[(&str, f64)] = &[
        ("capstan_runs_submitted_total", 6.0),
        ("capstan_runs_finished_total{outcome=\"succeeded\"}", 2.0),
        ("capstan_runs_finished_total{outcome=\"failed\"}", 2.0),
        ("capstan_runs_finished_total{outcome=\"infra_failed\"}", 1.0),
        ("capstan_runs_finished_total{outcome=\"cancelled\"}", 1.0),
        ("capstan_tasks_finished_total{outcome=\"succeeded\"}", 2.0),
        ("capstan_tasks_finished_total{outcome=\"failed\"}", 2.0),
        (
            "capstan_tasks_finished_total{outcome=\"infra_failed\"}",
            1.0,
        ),
        ("capstan_tasks_finished_total{outcome=\"cancelled\"}", 1.0),
        ("capstan_tasks_finished_total{outcome=\"skipped\"}", 1.0),
        ("capstan_task_retries_total{class=\"script\"}", 1.0),
        // Three executor errors retried, and the lost runner's attempt.
        ("capstan_task_retries_total{class=\"infra\"}", 4.0),
        ("capstan_task_requeues_total{reason=\"runner_lost\"}", 1.0),
        ("capstan_queue_depth", 0.0),
        ("capstan_is_leader", 1.0),
        ("capstan_leader_changes_total", 1.0),
    ];
    let coordinator = scrape_until(coordinator_http, "the outcome counters", |s| {
        expected.iter().all(|(k, v)| s.get(*k) == Some(v))
    })
    .await
    .map_err(|e| {
        let wanted: Vec<String> = expected.iter().map(|(k, v)| format!("{k} {v}")).collect();
        e.context(format!("expected:\n{}", wanted.join("\n")))
    })?;
    let cs = samples(&coordinator);
    for positive in [
        "capstan_leader_epoch",
        "capstan_store_commit_seconds_count",
        "capstan_pickup_latency_seconds_count",
        "capstan_task_duration_seconds_count",
        "capstan_log_bytes_total",
        "capstan_log_store_bytes",
        "capstan_log_store_free_bytes",
        "capstan_runners_connected",
    ] {
        assert!(
            cs.get(positive).is_some_and(|v| *v > 0.0),
            "{positive} not above 0:\n{coordinator}"
        );
    }
    let runner = scrape_until(runner_http, "the runner's idle slot and acked log", |s| {
        s.get("capstan_runner_slots{state=\"free\"}") == Some(&1.0)
            && s.get("capstan_runner_slots{state=\"busy\"}") == Some(&0.0)
            && s.get("capstan_runner_log_spool_bytes") == Some(&0.0)
            && s.get("capstan_runner_step_duration_seconds_count{kind=\"run\"}")
                .is_some_and(|n| *n >= 6.0)
    })
    .await?;
    let rs = samples(&runner);
    promtool_check_metrics(&coordinator).map_err(anyhow::Error::msg)?;
    promtool_check_metrics(&runner).map_err(anyhow::Error::msg)?;
    let absent = missing(&names_operators_use(), &[&cs, &rs]);
    assert!(
        absent.is_empty(),
        "named in alerts.yaml or capstan.json but exported by neither daemon: {absent:?}"
    );

    // Prometheus's own Accept header gets OpenMetrics.
    let accept =
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
    for addr in [coordinator_http, runner_http] {
        let (code, head, body) = capstan_tests::net::http_get_full(addr, "/metrics", accept)?;
        assert_eq!(code, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (_, head, _) = capstan_tests::net::http_get_full(addr, "/metrics", "")?;
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    }
    assert_eq!(capstan_tests::http_get(runner_http, "/healthz")?.0, 200);

    // The coordinator restarts: the runner's control stream reconnects.
    c.kill_replica(0);
    c.start_replica(0).await?;
    scrape_until(runner_http, "one reconnect", |s| {
        s.get("capstan_runner_reconnects_total") == Some(&1.0)
    })
    .await?;
    Ok(())
}

/// Two replicas on etcd: the leader reports `capstan_is_leader 1` and its
/// epoch, the follower 0; etcd requests are timed; after kill -9 of the
/// leader the other replica leads, counts the change and a newer epoch.
#[tokio::test(flavor = "multi_thread")]
async fn leader_and_etcd_metrics_follow_a_leader_kill() -> anyhow::Result<()> {
    use capstan_tests::*;
    use std::time::Duration;
    let mut c = TestCluster::builder()
        .replicas(2)
        .etcd()
        .election_ttl_ms(2000)
        .runners(0)
        .start()
        .await?;
    let (leader, epoch) = c.wait_leader(Duration::from_secs(20)).await?;
    let follower = 1 - leader;
    let (lead_http, follow_http) = (c.replicas[leader].http, c.replicas[follower].http);
    let before = scrape_until(lead_http, "the leader's gauges", |s| {
        s.get("capstan_is_leader") == Some(&1.0)
            && s.get("capstan_leader_epoch") == Some(&(epoch as f64))
            && s.get("capstan_leader_changes_total") == Some(&1.0)
            && s.get("capstan_etcd_request_seconds_count")
                .is_some_and(|n| *n > 0.0)
    })
    .await?;
    promtool_check_metrics(&before).map_err(anyhow::Error::msg)?;
    scrape_until(follow_http, "the follower's gauges", |s| {
        s.get("capstan_is_leader") == Some(&0.0)
            && s.get("capstan_leader_changes_total") == Some(&0.0)
    })
    .await?;
    c.kill_replica(leader);
    let (now, new_epoch) = c
        .wait_new_leader(Some(leader), Duration::from_secs(30))
        .await?;
    assert_eq!(now, follower);
    assert!(new_epoch > epoch);
    let after = scrape_until(follow_http, "the new leader's gauges", |s| {
        s.get("capstan_is_leader") == Some(&1.0)
            && s.get("capstan_leader_epoch") == Some(&(new_epoch as f64))
            && s.get("capstan_leader_changes_total") == Some(&1.0)
    })
    .await?;
    // Requests to etcd kept being timed on the survivor.
    let s = samples(&after);
    assert!(
        s.get("capstan_etcd_request_seconds_count")
            .is_some_and(|n| *n > 0.0),
        "{after}"
    );
    Ok(())
}
