//! The operator's side of the metrics: deploy/prometheus/alerts.yaml
//! passes `promtool check rules` and its unit tests (`promtool test rules`,
//! each alert firing on the series that should fire it and quiet on a
//! healthy fleet), and every metric the alerts and the Grafana dashboard
//! (deploy/grafana/capstan.json) name is one a real coordinator or runner
//! exports.

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
    assert!(text.contains("SUCCESS: 8 rules found"), "{text}");
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
