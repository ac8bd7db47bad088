//! Issue 28: finished runs live in the store, not in the coordinator's
//! memory. A restart with many finished runs holds only the unfinished
//! ones (asserted on `capstan_runs_held`, what the scheduler holds), and
//! every read of a finished run still answers: the run, its log, a page of
//! `ListRuns` with filters, a repeated idempotency key, the CLI.

use capstan_proto::api::v1::{ListRunsRequest, SubmitRunRequest};
use capstan_proto::pipeline::v1::RunState;
use capstan_tests::TestCluster;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const FINISHED: usize = 40;

fn held(c: &TestCluster) -> anyhow::Result<f64> {
    held_on(c, 0)
}

/// `capstan_runs_held` of replica `i`.
fn held_on(c: &TestCluster, i: usize) -> anyhow::Result<f64> {
    let (_, body) = c.http_get_replica(i, "/metrics")?;
    let samples = capstan_tests::metrics::samples(&body);
    samples
        .get("capstan_runs_held")
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no capstan_runs_held in\n{body}"))
}

async fn wait_held(c: &TestCluster, i: usize, want: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = held_on(c, i)?;
        if now == want {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{now} runs held, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every run id a filtered listing gives, page after page of `limit`,
/// submitting a new run between two pages.
async fn list_all(
    c: &TestCluster,
    mut req: ListRunsRequest,
    arriving: &mut Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    loop {
        let page = c.client().await?.list_runs(req.clone()).await?.into_inner();
        ids.extend(page.runs.into_iter().map(|r| r.id));
        if page.next_cursor.is_empty() {
            return Ok(ids);
        }
        arriving.push(c.submit(&parked("arrives")).await?);
        req.cursor = page.next_cursor;
    }
}

/// A run submitted with the idempotency key `push-event-7`.
async fn submit_keyed(c: &TestCluster) -> anyhow::Result<String> {
    let request = SubmitRunRequest {
        pipeline_yaml:
            "version: 1\nname: keyed\ntasks:\n  t:\n    steps: [ { run: 'echo keyed' } ]\n".into(),
        idempotency_key: "push-event-7".into(),
        ..Default::default()
    };
    Ok(c.client()
        .await?
        .submit_run(request)
        .await?
        .into_inner()
        .run_id)
}

/// A run no runner takes: it stays queued.
fn parked(name: &str) -> String {
    format!(
        "version: 1\nname: {name}\ntasks:\n  t:\n    runs-on: [pool=nowhere]\n    steps: [ {{ run: 'true' }} ]\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_many_finished_runs_holds_only_the_unfinished() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .runners(2)
        .capacity(4)
        .start()
        .await?;
    let keyed = submit_keyed(&c).await?;
    let mut finished = vec![keyed.clone()];
    for i in 1..FINISHED {
        let pipeline = if i % 2 == 0 { "even" } else { "odd" };
        let yaml = format!(
            "version: 1\nname: {pipeline}\ntasks:\n  t:\n    steps: [ {{ run: 'echo line-of-{i}' }} ]\n"
        );
        finished.push(c.submit(&yaml).await?);
    }
    let parked_ids = [
        c.submit(&parked("parked")).await?,
        c.submit(&parked("parked")).await?,
    ];
    for id in &finished {
        let run = c.wait_done(id, Duration::from_secs(60)).await?;
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
    }
    wait_held(&c, 0, 2.0).await?;

    c.kill_replica(0);
    c.start_replica(0).await?;
    // Only the two queued runs were loaded.
    assert_eq!(held(&c)?, 2.0);
    let (_, body) = c.http_get("/metrics")?;
    assert!(!body.contains("capstan_runs_held 4"), "{body}");

    // A finished run and its log read back from the store.
    let old = c.get_run(&finished[5]).await?;
    assert_eq!(old.state, RunState::Succeeded as i32);
    let log = String::from_utf8(c.task_log(&finished[5], "t").await?)?;
    assert!(log.contains("line-of-5\n"), "{log}");

    // Pages of 7, newest first, every run exactly once while runs arrive.
    let mut arriving = Vec::new();
    let all = list_all(
        &c,
        ListRunsRequest {
            limit: 7,
            ..Default::default()
        },
        &mut arriving,
    )
    .await?;
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a run listed twice: {all:?}");
    let before: Vec<String> = all
        .iter()
        .filter(|id| !arriving.contains(id))
        .cloned()
        .collect();
    let mut newest_first = finished.clone();
    newest_first.extend(parked_ids.iter().cloned());
    newest_first.reverse();
    assert_eq!(before, newest_first, "the runs there before, in order");
    assert!(!arriving.is_empty());

    // Filters answer from both the held runs and the history.
    let odd = list_all(
        &c,
        ListRunsRequest {
            limit: 4,
            pipeline: "odd".into(),
            state: RunState::Succeeded as i32,
            ..Default::default()
        },
        &mut arriving,
    )
    .await?;
    assert_eq!(odd.len(), FINISHED / 2, "{odd:?}");
    let queued = c
        .client()
        .await?
        .list_runs(ListRunsRequest {
            limit: 100,
            state: RunState::Queued as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(queued.runs.len(), parked_ids.len() + arriving.len());

    // A repeat of the finished run's idempotency key names it.
    let again = submit_keyed(&c).await?;
    assert_eq!(again, keyed);

    // The CLI's filtered, paged listing, as JSON.
    let out = c.cli(&[
        "runs",
        "--state",
        "succeeded",
        "--pipeline",
        "even",
        "--limit",
        "5",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(5), "{json}");
    assert!(
        json["next"].as_str().is_some_and(|n| !n.is_empty()),
        "{json}"
    );
    // A cancel of a finished run answers it, unchanged.
    let out = c.cli(&["cancel", &finished[0]]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        c.get_run(&finished[0]).await?.state,
        RunState::Succeeded as i32
    );
    Ok(())
}

/// On etcd: a new leader loads only the unfinished runs, and reads the
/// finished ones, their logs and pages of them, from etcd.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_on_etcd_reads_the_finished_runs_it_did_not_load() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .replicas(3)
        .etcd()
        .runners(1)
        .capacity(4)
        .start()
        .await?;
    let (old, _) = c.wait_leader(Duration::from_secs(15)).await?;
    let mut ids = Vec::new();
    for i in 0..6 {
        let yaml = format!(
            "version: 1\nname: etcd-history\ntasks:\n  t:\n    steps: [ {{ run: 'echo from-etcd-{i}' }} ]\n"
        );
        ids.push(c.submit(&yaml).await?);
    }
    for id in &ids {
        let run = c.wait_done(id, Duration::from_secs(60)).await?;
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
    }
    ids.push(c.submit(&parked("parked")).await?);
    wait_held(&c, old, 1.0).await?;

    c.kill_replica(old);
    let (new, _) = c
        .wait_new_leader(Some(old), Duration::from_secs(20))
        .await?;
    wait_held(&c, new, 1.0).await?;
    let log = String::from_utf8(c.task_log(&ids[3], "t").await?)?;
    assert!(log.contains("from-etcd-3\n"), "{log}");
    let all = list_all(
        &c,
        ListRunsRequest {
            limit: 2,
            pipeline: "etcd-history".into(),
            ..Default::default()
        },
        &mut Vec::new(),
    )
    .await?;
    let mut newest_first: Vec<String> = ids[..6].to_vec();
    newest_first.reverse();
    assert_eq!(all, newest_first);
    Ok(())
}
