//! Issue 18, per-token quotas: a token's unfinished runs and their tasks
//! are bounded (`--max-queued-runs-per-token`, `--max-queued-tasks-per-token`);
//! real coordinator and CLI processes, the exact message and exit code 5,
//! another token unaffected, room again after a cancel, and the counts
//! after a coordinator restart.

use capstan_tests::*;
use std::process::Output;

fn one_task(dir: &std::path::Path, name: &str, tasks: usize) -> String {
    let mut yaml = format!("version: 1\nname: {name}\ntasks:\n");
    for i in 0..tasks {
        yaml.push_str(&format!(
            "  t{i}:\n    steps: [ {{ run: \"sleep 60000\" }} ]\n"
        ));
    }
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    file.display().to_string()
}

/// `capstan submit FILE` with `token`: the run id.
#[track_caller]
fn submit_ok(c: &TestCluster, token: &str, file: &str) -> String {
    let out = c.cli_with_token(Some(token), &["submit", file]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The CLI's refusal for a quota: exit 5 and exactly `error: <message>`.
#[track_caller]
fn assert_exhausted(out: &Output, message: &str) {
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: {message}\n"),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
}

fn runs_full(token: &str) -> String {
    format!(
        "token `{token}` has 2 unfinished runs, its limit (--max-queued-runs-per-token 2 on the \
         coordinator): wait for one to finish or cancel one (`capstan cancel RUN`)"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_past_its_quota_is_refused_until_its_runs_end() -> anyhow::Result<()> {
    let mut c = TestCluster::builder()
        .runners(0)
        .coordinator_args(&[
            "--max-queued-runs-per-token",
            "2",
            "--max-queued-tasks-per-token",
            "5",
        ])
        .start()
        .await?;
    let alice = c.create_token("alice", "submit").await?;
    let bob = c.create_token("bob", "submit").await?;
    let one = one_task(c.dir(), "one", 1);
    let five = one_task(c.dir(), "five", 5);

    let a1 = submit_ok(&c, &alice, &one);
    let a2 = submit_ok(&c, &alice, &one);
    let out = c.cli_with_token(Some(&alice), &["submit", &one]);
    assert_exhausted(&out, &runs_full("alice"));
    // Another token has its own quota.
    submit_ok(&c, &bob, &one);

    // A cancel frees a run's place.
    let out = c.cli_with_token(Some(&alice), &["cancel", &a1]);
    assert!(out.status.success(), "{out:?}");
    let a3 = submit_ok(&c, &alice, &one);
    let out = c.cli_with_token(Some(&alice), &["submit", &one]);
    assert_exhausted(&out, &runs_full("alice"));

    // The counts come from the runs: the same after a restart.
    c.kill_replica(0);
    c.start_replica(0).await?;
    let out = c.cli_with_token(Some(&alice), &["submit", &one]);
    assert_exhausted(&out, &runs_full("alice"));

    // Tasks: one run of one task left open, then 1 + 5 > 5.
    let out = c.cli_with_token(Some(&alice), &["cancel", &a2]);
    assert!(out.status.success(), "{out:?}");
    let out = c.cli_with_token(Some(&alice), &["submit", &five]);
    assert_exhausted(
        &out,
        "this run's 5 tasks would give token `alice` 6 unfinished tasks; the limit is 5 \
         (--max-queued-tasks-per-token on the coordinator): wait for runs to finish or cancel \
         some (`capstan cancel RUN`)",
    );
    let out = c.cli_with_token(Some(&alice), &["cancel", &a3]);
    assert!(out.status.success(), "{out:?}");
    submit_ok(&c, &alice, &five);
    Ok(())
}
