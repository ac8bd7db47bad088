//! `if:` and `finally:` end to end on a coordinator and a shell runner: a
//! false condition skips a task without failing the run, a `finally` task
//! runs after a failure and reads the states of the tasks it needs, and
//! the run's state is decided by the other tasks.

use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::*;
use std::time::Duration;

const PIPELINE: &str = r#"version: 1
name: cond
params:
  code: "0"
  go: "no"
tasks:
  test:
    steps:
      - run: echo testing; exit ${{ params.code }}
  deploy:
    needs: [test]
    if: ${{ git.ref == 'refs/heads/main' || params.go == 'yes' }}
    steps: [run: echo deploying]
  notify:
    needs: [test]
    finally: true
    if: ${{ tasks.test.state == 'failed' }}
    steps: [run: echo "test failed"]
  cleanup:
    needs: [notify, deploy]
    finally: true
    steps: [run: echo cleaning up]
"#;

async fn submit(
    c: &TestCluster,
    code: &str,
    go: &str,
) -> anyhow::Result<capstan_proto::api::v1::Run> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("cond.yaml");
    std::fs::write(&file, PIPELINE)?;
    let out = c.cli(&[
        "submit",
        &file.display().to_string(),
        "--param",
        &format!("code={code}"),
        "--param",
        &format!("go={go}"),
        "-o",
        "json",
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| anyhow::anyhow!("{e}: {out:?}"))?;
    let id = v["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no id in {v}"))?
        .to_string();
    c.wait_done(&id, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn conditions_skip_and_finally_tasks_run_after_a_failure() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(1).start().await?;

    // The test passes: deploy's condition is false (no push ref), so is
    // notify's; cleanup runs anyway; a skip by condition fails nothing.
    let run = submit(&c, "0", "no").await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    assert_eq!(task_state(&run, "deploy"), TaskState::Skipped);
    assert!(
        task(&run, "deploy")
            .message
            .starts_with("skipped: `if` is false: "),
        "{run:#?}"
    );
    assert_eq!(task_state(&run, "notify"), TaskState::Skipped);
    assert_eq!(task_state(&run, "cleanup"), TaskState::Succeeded);

    // The test fails: deploy is skipped for it, notify (finally, its
    // condition true) and cleanup run, and the run has failed.
    let run = submit(&c, "3", "no").await?;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}");
    assert_eq!(task_state(&run, "test"), TaskState::Failed);
    assert_eq!(
        task(&run, "deploy").message,
        "skipped: `test` did not succeed"
    );
    assert_eq!(task_state(&run, "notify"), TaskState::Succeeded, "{run:#?}");
    let log = String::from_utf8(c.task_log(&run.id, "notify").await?)?;
    assert!(log.contains("test failed"), "{log}");
    assert_eq!(task_state(&run, "cleanup"), TaskState::Succeeded);
    let cleanup = task(&run, "cleanup");
    assert!(cleanup.started_at_ms >= task(&run, "notify").finished_at_ms);

    // A param makes deploy's condition true.
    let run = submit(&c, "0", "yes").await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    assert_eq!(task_state(&run, "deploy"), TaskState::Succeeded, "{run:#?}");
    let log = String::from_utf8(c.task_log(&run.id, "deploy").await?)?;
    assert!(log.contains("deploying"), "{log}");
    Ok(())
}
