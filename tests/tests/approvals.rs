//! Approval gates end to end: a task with `approval:` waits without a
//! runner until a token the gate allows approves or rejects it through the
//! CLI, or its timeout rejects it; a decision survives a leader kill.

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::*;
use std::time::Duration;

fn gated(timeout: &str) -> String {
    format!(
        "version: 1\nname: gated\ntasks:\n  build:\n    steps: [run: echo built]\n  \
         deploy:\n    needs: [build]\n    approval: {{prompt: \"bump the manifest?\"{timeout}}}\n    \
         steps: [run: echo deployed]\n  after:\n    needs: [deploy]\n    steps: [run: echo after]\n"
    )
}

/// Waits until `deploy` of run `id` is at its gate.
async fn at_gate(c: &TestCluster, id: &str) -> anyhow::Result<api::Run> {
    c.wait_run(id, Duration::from_secs(30), |r| {
        task(r, "deploy")
            .approval
            .as_ref()
            .is_some_and(|a| a.asked_at_ms > 0)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_waits_for_an_allowed_token_and_records_the_decision() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;

    // Approved.
    let id = c.submit(&gated("")).await?;
    let run = at_gate(&c, &id).await?;
    let deploy = task(&run, "deploy");
    assert_eq!(task_state(&run, "deploy"), TaskState::Waiting, "{run:#?}");
    assert_eq!(deploy.attempts, 0, "no runner holds a gated task");
    assert_eq!(deploy.message, "waiting for approval: bump the manifest?");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        task_state(&c.get_run(&id).await?, "deploy"),
        TaskState::Waiting
    );
    // A read token may not decide a gate that allows admin only.
    let reader = c.create_token("reader", "read").await?;
    let err = c
        .client_with(Some(&reader))
        .await?
        .decide_approval(
            &capstan_proto::ids::RunId::from_string(&id),
            "deploy",
            true,
            "",
        )
        .await
        .expect_err("a read token is refused");
    assert!(
        err.to_string()
            .contains("may be decided by a token with scope admin; this token has `read`"),
        "{err}"
    );
    let out = c.cli(&["approve", &id, "build"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no `approval:` gate"),
        "{out:?}"
    );
    let out = c.cli(&["approve", &id, "deploy", "--reason", "tests passed"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("approved by"),
        "{out:?}"
    );
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    let a = task(&run, "deploy").approval.clone().unwrap();
    assert!(a.decided && a.approved, "{a:?}");
    assert_eq!(a.decided_by, run.submitted_by);
    assert_eq!(a.reason, "tests passed");
    let log = String::from_utf8(c.task_log(&id, "after").await?)?;
    assert!(log.contains("after"), "{log}");
    let json = c.cli(&["status", &id, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    let tasks = v["tasks"].as_array().unwrap();
    let d = tasks.iter().find(|t| t["name"] == "deploy").unwrap();
    assert_eq!(d["approval"]["decision"]["approved"], true, "{d}");

    // Rejected: the task fails, what needs it is skipped, and the gate
    // takes no second decision.
    let id = c.submit(&gated("")).await?;
    at_gate(&c, &id).await?;
    let out = c.cli(&["reject", &id, "deploy", "--reason", "not today"]);
    assert!(out.status.success(), "{out:?}");
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Failed);
    assert_eq!(task_state(&run, "deploy"), TaskState::Failed);
    assert!(
        task(&run, "deploy").message.ends_with(": not today"),
        "{run:#?}"
    );
    assert_eq!(task_state(&run, "after"), TaskState::Skipped);
    let out = c.cli(&["approve", &id, "deploy"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was already rejected by"),
        "{out:?}"
    );

    // Timed out.
    let id = c.submit(&gated(", timeout: 1s")).await?;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(task_state(&run, "deploy"), TaskState::Failed);
    assert_eq!(
        task(&run, "deploy").message,
        "rejected by timeout: no decision within 1s"
    );
    assert_eq!(task_state(&run, "after"), TaskState::Skipped);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_survives_a_leader_kill() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .replicas(3)
        .etcd()
        .runners(1)
        .start()
        .await?;
    let id = c.submit(&gated("")).await?;
    at_gate(&c, &id).await?;
    let (old, _) = c.wait_leader(Duration::from_secs(10)).await?;
    c.kill_replica(old);
    c.wait_new_leader(Some(old), Duration::from_secs(15))
        .await?;
    let run = c.get_run(&id).await?;
    assert_eq!(task_state(&run, "deploy"), TaskState::Waiting, "{run:#?}");
    let out = c.cli(&["approve", &id, "deploy"]);
    assert!(out.status.success(), "{out:?}");
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    assert!(
        task(&run, "deploy")
            .approval
            .as_ref()
            .is_some_and(|a| a.approved)
    );
    Ok(())
}

/// Scopes include the ones before them: a gate for `submit` takes a submit
/// or an admin token, not a read one; the same decision asked twice (a
/// retried call) is answered, a different one refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_submit_gate_takes_submit_and_above_and_a_repeat_is_answered() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;
    let yaml = gated("").replace("bump the manifest?\"", "bump the manifest?\", by: [submit]");
    let id = c.submit(&yaml).await?;
    at_gate(&c, &id).await?;
    let run_id = capstan_proto::ids::RunId::from_string(&id);
    let reader = c
        .client_with(Some(&c.create_token("r", "read").await?))
        .await?;
    let err = reader
        .decide_approval(&run_id, "deploy", true, "")
        .await
        .expect_err("read is below submit");
    assert!(
        err.to_string()
            .contains("scope submit or above; this token has `read`"),
        "{err}"
    );
    let submitter = c
        .client_with(Some(&c.create_token("s", "submit").await?))
        .await?;
    submitter
        .decide_approval(&run_id, "deploy", true, "ok")
        .await?;
    let again = submitter
        .decide_approval(&run_id, "deploy", true, "ok")
        .await?;
    assert_eq!(
        task(&again, "deploy")
            .approval
            .as_ref()
            .map(|a| a.decided_by.as_str()),
        Some("s")
    );
    let err = submitter
        .decide_approval(&run_id, "deploy", false, "")
        .await
        .expect_err("a second, different decision");
    assert!(
        err.to_string().contains("was already approved by s"),
        "{err}"
    );
    let out = c.cli(&["approve", &id, "no-such-task"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no task `no-such-task`"),
        "{out:?}"
    );
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    Ok(())
}
