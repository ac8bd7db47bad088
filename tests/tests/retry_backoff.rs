//! Infrastructure retries wait a jittered exponential backoff: measured on
//! a real coordinator and runner (fake executor, a step that cannot
//! start), shown by `capstan status` while the task waits, and recorded as
//! a `retry` event on the next attempt's dispatch span.

use capstan_proto::pipeline::v1::RunState;
use capstan_tests::otlp::OtlpReceiver;
use capstan_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn infra_retries_back_off_visibly_in_status_and_trace() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    // Waits: retry 1 in [200, 400] ms, 2 in [400, 800], 3 in [400, 800] (capped).
    let c = TestCluster::builder()
        .executor("fake")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .coordinator_args(&[
            "--infra-retry-backoff-ms",
            "400",
            "--infra-retry-backoff-max-ms",
            "800",
        ])
        .start()
        .await?;
    let id = c
        .submit("version: 1\nname: b\ntasks:\n  t:\n    steps: [ { run: fail-start } ]\n")
        .await?;
    // While it waits, `capstan status` says so.
    c.wait_run(&id, Duration::from_secs(20), |r| {
        task(r, "t").message.contains("retrying in")
    })
    .await?;
    let out = c.cli(&["status", &id]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("retrying in"), "{status}");

    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}");
    let t = task(&run, "t");
    assert_eq!(t.attempts, 4, "{run:#?}");
    assert!(
        t.message
            .contains("gave up after 4 infrastructure failures"),
        "{}",
        t.message
    );
    // Each attempt starts at least the jitter's floor after the last ended,
    // and not much later than its ceiling.
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter().filter(|s| s.name == "task.dispatch").count() >= 4
        })
        .await?;
    let mut dispatches: Vec<_> = spans.iter().filter(|s| s.name == "task.dispatch").collect();
    dispatches.sort_by_key(|s| s.attr("capstan.attempt.number").map(str::to_owned));
    let retries: Vec<_> = dispatches
        .iter()
        .filter(|s| s.raw.contains("name: \"retry\""))
        .collect();
    assert_eq!(
        retries.len(),
        3,
        "a retry event on attempts 2, 3 and 4: {dispatches:#?}"
    );
    for s in &retries {
        assert!(
            s.raw.contains("retrying in"),
            "the event says how long it waited: {s:#?}"
        );
    }
    // A dispatch span starts when its attempt was queued: after the backoff.
    let start_ms = |raw: &str| -> u64 {
        let at = raw.find("start_time_unix_nano: ").expect("a start time") + 22;
        let digits: String = raw[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>().expect("nanoseconds") / 1_000_000
    };
    let starts: Vec<u64> = dispatches.iter().map(|s| start_ms(&s.raw)).collect();
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("dispatch gaps between attempts: {gaps:?} ms");
    for (k, floor) in [(0usize, 200u64), (1, 400), (2, 400)] {
        let gap = starts[k + 1] - starts[k];
        assert!(
            gap >= floor,
            "retry {} came {gap} ms after attempt {}, under its {floor} ms floor",
            k + 1,
            k + 1
        );
        assert!(
            gap < floor * 2 + 1000,
            "retry {} came {gap} ms after attempt {}",
            k + 1,
            k + 1
        );
    }
    let total: u64 = run.finished_at_ms.saturating_sub(run.created_at_ms) as u64;
    // At least 200 + 400 + 400 ms of waiting; at most 400 + 800 + 800 and
    // a margin for four attempts on a loaded machine.
    assert!(total >= 1000, "the retries waited only {total} ms in all");
    assert!(total < 2000 + 3000, "the retries took {total} ms");
    Ok(())
}
