//! Concurrency groups (`concurrency:` in the pipeline file, issue 22) on a
//! real coordinator and runner: a second run of a busy group waits for the
//! first, or cancels it with `cancel-in-progress: true`; other groups are
//! not held.

use capstan_proto::pipeline::v1::RunState;
use capstan_tests::*;
use std::time::Duration;

fn pipeline(group: &str, cancel: bool, sleep: f32) -> String {
    format!(
        "version: 1\nname: deploy\nconcurrency: {{ group: \"{group}\", cancel-in-progress: {cancel} }}\n\
         tasks:\n  push:\n    steps:\n      - run: sleep {sleep}\n"
    )
}

#[tokio::test]
async fn a_second_run_of_a_group_waits_for_the_first() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .executor("shell")
        .capacity(4)
        .start()
        .await?;
    let first = c.submit(&pipeline("deploy-main", false, 2.0)).await?;
    c.wait_run(&first, Duration::from_secs(20), |r| {
        run_state(r) == RunState::Running
    })
    .await?;
    let second = c.submit(&pipeline("deploy-main", false, 0.1)).await?;
    let other = c.submit(&pipeline("deploy-dev", false, 0.1)).await?;
    // Another group runs beside the first; the second of its group waits.
    let other = c.wait_done(&other, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&other), RunState::Succeeded);
    let waiting = c.get_run(&second).await?;
    assert_eq!(run_state(&waiting), RunState::Queued, "{waiting:#?}");
    assert_eq!(waiting.tasks[0].attempts, 0, "{waiting:#?}");
    let first = c.wait_done(&first, Duration::from_secs(20)).await?;
    let second = c.wait_done(&second, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&first), RunState::Succeeded);
    assert_eq!(run_state(&second), RunState::Succeeded);
    assert!(
        second.tasks[0].started_at_ms >= first.finished_at_ms,
        "the second started at {} before the first ended at {}",
        second.tasks[0].started_at_ms,
        first.finished_at_ms
    );
    Ok(())
}

#[tokio::test]
async fn cancel_in_progress_cancels_the_older_run() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .executor("shell")
        .capacity(4)
        .start()
        .await?;
    let first = c.submit(&pipeline("deploy-main", true, 30.0)).await?;
    c.wait_run(&first, Duration::from_secs(20), |r| {
        run_state(r) == RunState::Running
    })
    .await?;
    let second = c.submit(&pipeline("deploy-main", true, 0.1)).await?;
    let first = c.wait_done(&first, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&first), RunState::Cancelled, "{first:#?}");
    assert!(
        first.tasks[0]
            .message
            .contains("newer run of group `deploy-main`"),
        "{first:#?}"
    );
    let second = c.wait_done(&second, Duration::from_secs(20)).await?;
    assert_eq!(run_state(&second), RunState::Succeeded, "{second:#?}");
    Ok(())
}
