//! `CAPSTAN_LOG_FORMAT=json`: both daemons write one JSON object a line,
//! and the lines logged inside a run's spans carry that run's trace and
//! span ids, as exported over OTLP.

use capstan_tests::otlp::OtlpReceiver;
use capstan_tests::*;
use std::collections::HashSet;
use std::time::Duration;

/// Every line of `log` as JSON; a line that is not is an error naming it.
fn json_lines(name: &str, log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}: a log line that is not JSON ({e}): {l}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_parse_and_link_to_exported_spans() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let c = TestCluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("CAPSTAN_LOG_FORMAT", "json")
        .start()
        .await?;
    let id = c
        .submit("version: 1\nname: j\ntasks:\n  t:\n    steps: [ { run: 'echo hi' }, { run: 'exit 2' } ]\n")
        .await?;
    c.wait_done(&id, Duration::from_secs(30)).await?;
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter().any(|s| s.name == "run") && s.iter().any(|s| s.service == "capstan-runner")
        })
        .await?;
    let run = spans
        .iter()
        .find(|s| s.name == "run" && s.attr("capstan.run.id") == Some(id.as_str()))
        .expect("the run span");
    let exported: HashSet<(&str, &str)> = spans
        .iter()
        .map(|s| (s.trace_id.as_str(), s.span_id.as_str()))
        .collect();
    for name in ["coordinator", "runner-0"] {
        let lines = json_lines(name, &c.process_log(name));
        assert!(!lines.is_empty(), "{name} logged nothing");
        for l in &lines {
            for key in ["timestamp", "level", "target", "message", "fields"] {
                assert!(l.get(key).is_some(), "{name}: no `{key}` in {l}");
            }
        }
        let linked: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l.get("trace_id").is_some())
            .collect();
        assert!(
            !linked.is_empty(),
            "{name}: no line carries a trace id:\n{}",
            c.process_log(name)
        );
        for l in &linked {
            let pair = (
                l["trace_id"].as_str().unwrap_or(""),
                l["span_id"].as_str().unwrap_or(""),
            );
            assert!(
                exported.contains(&pair),
                "{name}: a line's span was never exported: {l}\n{spans:#?}"
            );
        }
        if name == "runner-0" {
            assert!(
                linked
                    .iter()
                    .any(|l| l["trace_id"] == run.trace_id.as_str()),
                "no runner line in the run's trace {}:\n{}",
                run.trace_id,
                c.process_log(name)
            );
        }
    }
    Ok(())
}
