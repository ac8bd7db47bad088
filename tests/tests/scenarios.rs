//! Scenario tests as data: every `tests/scenarios/NAME.yaml` runs on the
//! `fake` executor and must end as `NAME.expect` says (see the README there).

use capstan_tests::*;
use std::path::Path;
use std::time::Duration;

fn state_name(debug: String) -> String {
    // "Succeeded" -> "succeeded"; prost enum Debug names have no prefix.
    debug.to_lowercase()
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_fixtures_on_the_fake_executor() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .runners(2)
        .capacity(3)
        .executor("fake")
        .start()
        .await?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".yaml"))
                .map(String::from)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 8, "scenario fixtures missing: {names:?}");

    // Submit everything first: the scenarios also run concurrently.
    let mut runs = Vec::new();
    for name in &names {
        let yaml = std::fs::read_to_string(dir.join(format!("{name}.yaml")))?;
        let expect = std::fs::read_to_string(dir.join(format!("{name}.expect")))
            .map_err(|e| anyhow::anyhow!("{name}.expect: {e}"))?;
        runs.push((name.clone(), c.submit(&yaml).await?, expect));
    }
    let mut failures = Vec::new();
    for (name, id, expect) in runs {
        let run = c.wait_done(&id, Duration::from_secs(60)).await?;
        for line in expect.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, want) = line
                .split_once(':')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| anyhow::anyhow!("{name}.expect: bad line {line:?}"))?;
            let got = match key.split_once(' ') {
                None if key == "run" => state_name(format!("{:?}", run_state(&run))),
                None => state_name(format!("{:?}", task_state(&run, key))),
                Some(("attempts", t)) => task(&run, t).attempts.to_string(),
                Some(("message", t)) => {
                    let m = task(&run, t).message.clone();
                    if m.contains(want) {
                        want.to_string()
                    } else {
                        m
                    }
                }
                Some(("log", t)) => {
                    let log = String::from_utf8_lossy(&c.task_log(&id, t).await?).to_string();
                    if log.contains(want) {
                        want.to_string()
                    } else {
                        format!("(log of {} bytes without it)", log.len())
                    }
                }
                Some((other, _)) => anyhow::bail!("{name}.expect: unknown fact {other:?}"),
            };
            if got != want {
                failures.push(format!("{name}: {key}: want {want:?}, got {got:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        c.all_logs()
    );
    Ok(())
}
