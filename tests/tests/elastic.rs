//! Elastic fleets (issue 26): ephemeral runners take exactly one task,
//! deregister and exit 0; a single-use registration token registers one
//! runner, with its own labels, and is refused after; a crashed ephemeral
//! runner's task is requeued and its record dropped. Real coordinator,
//! runner and CLI processes (shell executor).

use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::*;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A run of one task for the `pool=eph` runners, printing `marker`.
fn pooled(marker: &str, secs: u32) -> String {
    format!(
        "version: 1\nname: eph\ntasks:\n  t:\n    runs-on: [pool=eph]\n    steps: \
         [ {{ run: \"echo {marker}; sleep {secs}\" }} ]\n"
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `capstan runner-token create --ephemeral ...` with the admin token.
fn runner_token(c: &TestCluster, extra: &[&str]) -> String {
    let mut args = vec!["runner-token", "create", "--ephemeral"];
    args.extend_from_slice(extra);
    let out = c.cli(&args);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("capstan_reg_"), "{out:?}");
    token
}

/// A shell-executor runner `name` of `c` with `token` and `labels`.
fn runner(c: &TestCluster, name: &str, token: &str, labels: &str) -> Command {
    let mut cmd = Command::new(bin("capstan-runner"));
    cmd.args(["--coordinator", &c.url()])
        .args(["--registration-token", token])
        .args(["--name", name, "--labels", labels, "--executor", "shell"])
        .arg("--work-dir")
        .arg(c.dir().join(format!("work-{name}")))
        .env("RUST_LOG", "info");
    cmd
}

/// An ephemeral runner `name` registering with `token`, asking for labels
/// `pool=other` (a single-use token's own labels must win).
fn spawn_ephemeral(c: &TestCluster, name: &str, token: &str) -> anyhow::Result<Child> {
    let mut cmd = runner(c, name, token, "pool=other");
    cmd.arg("--ephemeral")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(c.dir().join(format!("{name}.log")))?);
    Ok(cmd.spawn()?)
}

/// The names `capstan runners -o json` lists.
fn runner_names(c: &TestCluster) -> Vec<String> {
    let out = c.cli(&["-o", "json", "runners"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("runners JSON");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|r| r["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ephemeral_runner_takes_one_task_leaves_and_its_token_is_refused_after()
-> anyhow::Result<()> {
    let c = TestCluster::builder().runners(0).start().await?;
    let token = runner_token(&c, &["--labels", "pool=eph", "--ttl", "10m"]);
    let first = c.submit(&pooled("first", 1)).await?;
    let second = c.submit(&pooled("second", 0)).await?;

    let mut eph = spawn_ephemeral(&c, "eph-1", &token)?;
    let status = wait_exit(
        &mut eph,
        Duration::from_secs(60),
        "the ephemeral runner did not exit",
    )
    .await?;
    assert!(status.success(), "{status}\n{}", c.process_log("eph-1"));
    let done = c.wait_done(&first, Duration::from_secs(10)).await?;
    assert_eq!(done.state, RunState::Succeeded as i32, "{done:?}");
    assert_eq!(done.tasks[0].runner, "eph-1");
    // It took one task only: the other waits, and the runner is gone from
    // the registry (and so from the store).
    let waiting = c.get_run(&second).await?;
    assert_eq!(
        waiting.tasks[0].state,
        TaskState::Queued as i32,
        "{waiting:?}"
    );
    assert!(!runner_names(&c).contains(&"eph-1".to_string()));

    // The token registers no second runner, and says why.
    let mut again = spawn_ephemeral(&c, "eph-2", &token)?;
    let status = wait_exit(
        &mut again,
        Duration::from_secs(15),
        "the refused runner did not exit",
    )
    .await?;
    assert!(!status.success());
    let log = c.process_log("eph-2");
    assert!(
        log.contains("already used by runner `eph-1`")
            && log.contains("capstan runner-token create --ephemeral"),
        "{log}"
    );
    assert!(
        c.process_log("coordinator")
            .contains("registration refused: single-use token")
    );

    // `--ephemeral` with the fleet's shared token: one task, then gone.
    let mut cmd = runner(&c, "eph-3", &c.token, "pool=eph");
    cmd.arg("--ephemeral");
    let mut eph3 = Proc::spawn(cmd, c.dir(), "eph-3")?;
    let status = wait_exit(
        &mut eph3.child,
        Duration::from_secs(60),
        "eph-3 did not exit",
    )
    .await?;
    assert!(status.success(), "{status}");
    let done = c.wait_done(&second, Duration::from_secs(10)).await?;
    assert_eq!(done.state, RunState::Succeeded as i32, "{done:?}");
    assert_eq!(done.tasks[0].runner, "eph-3");
    assert!(runner_names(&c).is_empty(), "{:?}", runner_names(&c));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_ephemeral_runner_s_task_is_requeued_and_its_record_dropped() -> anyhow::Result<()>
{
    let c = TestCluster::builder().runners(0).start().await?;
    let token = runner_token(&c, &["--labels", "pool=eph"]);
    let run = c.submit(&pooled("crash", 30)).await?;
    let mut eph = spawn_ephemeral(&c, "eph-crash", &token)?;
    c.wait_run(&run, Duration::from_secs(20), |r| {
        r.tasks[0].state == TaskState::Running as i32
    })
    .await?;
    eph.kill()?;
    eph.wait()?;
    // Lease expiry (2 s here) requeues the task and deletes the runner.
    poll_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let r = c.get_run(&run).await?;
            Ok((r.tasks[0].state == TaskState::Queued as i32
                && !runner_names(&c).contains(&"eph-crash".to_string()))
            .then_some(()))
        },
    )
    .await?;
    // A plain runner of the pool takes the requeued task: a second attempt.
    let _steady = Proc::spawn(
        runner(&c, "steady", &c.token, "pool=eph"),
        c.dir(),
        "steady",
    )?;
    let r = c
        .wait_run(&run, Duration::from_secs(60), |r| {
            r.tasks[0].state == TaskState::Running as i32 && r.tasks[0].runner == "steady"
        })
        .await?;
    assert_eq!(r.tasks[0].attempts, 2, "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn runner_tokens_are_refused_when_expired_asked_for_wrongly_or_without_admin()
-> anyhow::Result<()> {
    let c = TestCluster::builder().runners(0).start().await?;
    // Without --ephemeral: a usage error before any call.
    let out = c.cli(&["runner-token", "create", "--labels", "pool=eph"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("pass --ephemeral"), "{out:?}");
    // Out of range.
    let out = c.cli(&["runner-token", "create", "--ephemeral", "--ttl", "30d"]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stderr(&out).contains("--ttl must be between 1 s and 7 days"),
        "{out:?}"
    );
    // Not with a submit token.
    let submit = c.create_token("submitter", "submit").await?;
    let out = c.cli_with_token(Some(&submit), &["runner-token", "create", "--ephemeral"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // Expired: refused with the reason, and the runner stops.
    let token = runner_token(&c, &["--labels", "pool=eph", "--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut late = spawn_ephemeral(&c, "eph-late", &token)?;
    let status = wait_exit(
        &mut late,
        Duration::from_secs(15),
        "the late runner did not exit",
    )
    .await?;
    assert!(!status.success());
    assert!(
        c.process_log("eph-late")
            .contains("this registration token expired")
    );
    // A made-up one is unknown.
    let mut fake = spawn_ephemeral(&c, "eph-fake", "capstan_reg_madeup")?;
    let status = wait_exit(
        &mut fake,
        Duration::from_secs(15),
        "the fake runner did not exit",
    )
    .await?;
    assert!(!status.success());
    assert!(
        c.process_log("eph-fake")
            .contains("unknown runner registration token")
    );
    Ok(())
}

/// A run of `n` tasks for runners with `label`, each sleeping `secs`.
fn tasks_on(label: &str, n: usize, secs: u32) -> String {
    let mut yaml = "version: 1\nname: demand\ntasks:\n".to_string();
    for i in 0..n {
        yaml += &format!(
            "  t{i}:\n    runs-on: [{label}]\n    steps: [ {{ run: \"sleep {secs}\" }} ]\n"
        );
    }
    yaml
}

/// `GET /api/v1/demand...` with `token`, as JSON.
fn demand(c: &TestCluster, query: &str, token: &str) -> serde_json::Value {
    let (code, body) = c
        .http_get_auth(&format!("/api/v1/demand{query}"), Some(token))
        .expect("GET /api/v1/demand");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("demand JSON")
}

fn label_set<'a>(d: &'a serde_json::Value, labels: &str) -> &'a serde_json::Value {
    d["label_sets"]
        .as_array()
        .expect("label_sets")
        .iter()
        .find(|s| s["labels"] == labels)
        .unwrap_or_else(|| panic!("no label set {labels} in {d}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demand_endpoint_and_gauges_match_a_known_queue() -> anyhow::Result<()> {
    // One runner of pool=linux, busy with one task; two more wait for it,
    // one waits for a GPU nobody has, one for a declared pool with no
    // runner up.
    let c = TestCluster::builder()
        .labels(&["pool=linux"])
        .coordinator_args(&["--runner-pool", "zone=eu"])
        .start()
        .await?;
    let reader = c.create_token("autoscaler", "read").await?;
    let busy = c.submit(&tasks_on("pool=linux", 1, 60)).await?;
    c.wait_run(&busy, Duration::from_secs(20), |r| {
        r.tasks[0].state == TaskState::Running as i32
    })
    .await?;
    c.submit(&tasks_on("pool=linux", 2, 0)).await?;
    c.submit(&tasks_on("gpu=h100", 1, 0)).await?;
    c.submit(&tasks_on("zone=eu", 1, 0)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let d = demand(&c, "", &reader);
    assert_eq!(
        (d["queued"].as_u64(), d["running"].as_u64()),
        (Some(4), Some(1)),
        "{d}"
    );
    assert_eq!(d["unmatched_queued"], 1, "{d}");
    let linux = label_set(&d, "pool=linux");
    assert_eq!(
        (
            &linux["queued"],
            &linux["running"],
            &linux["runners"],
            &linux["free_slots"]
        ),
        (&2.into(), &1.into(), &1.into(), &0.into()),
        "{d}"
    );
    assert_eq!(linux["matchable"], true);
    assert!(
        linux["oldest_queued_seconds"].as_f64().unwrap() > 0.0,
        "{d}"
    );
    assert_eq!(label_set(&d, "gpu=h100")["matchable"], false, "{d}");
    assert_eq!(label_set(&d, "zone=eu")["matchable"], true, "{d}");

    // One pool's view, as KEDA's metrics-api scaler reads it.
    let pool = demand(&c, "?runner_labels=pool=linux,os=debian", &reader);
    assert_eq!(
        (pool["queued"].as_u64(), pool["running"].as_u64()),
        (Some(2), Some(1)),
        "{pool}"
    );
    let gpu = demand(&c, "?runner_labels=gpu=h100", &reader);
    assert_eq!(gpu["queued"], 1, "{gpu}");

    // The same figures as gauges.
    let (_, metrics) = c.http_get("/metrics")?;
    for line in [
        "capstan_demand_queued_tasks{labels=\"pool=linux\"} 2",
        "capstan_demand_running_tasks{labels=\"pool=linux\"} 1",
        "capstan_demand_unmatched_tasks{labels=\"gpu=h100\"} 1",
        "capstan_demand_queued_tasks{labels=\"zone=eu\"} 1",
        "capstan_demand_unmatched_queued_tasks 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    assert!(!metrics.contains("capstan_demand_unmatched_tasks{labels=\"zone=eu\"}"));

    // A single-use token for a GPU runner: that demand is about to be met.
    runner_token(&c, &["--labels", "gpu=h100"]);
    assert_eq!(demand(&c, "", &reader)["unmatched_queued"], 0);

    // Refusals: no token, a bad query.
    let (code, body) = c.http_get_auth("/api/v1/demand", None)?;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("needs an API token"), "{body}");
    let (code, body) = c.http_get_auth("/api/v1/demand?runner_labels=pool", Some(&reader))?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("expected k=v,k=v"), "{body}");
    Ok(())
}
