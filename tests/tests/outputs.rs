//! Typed outputs between tasks end to end: a `run` step writes
//! `$CAPSTAN_OUTPUT` on one runner, a task that needs it uses
//! `${{ tasks.NAME.outputs.KEY }}` (a user output and a built-in one) on
//! another runner, with its own workspace; a missing output fails the
//! dependent at dispatch, naming the task and the key (a `finally` task
//! gets the empty string instead); an output holding a runner secret
//! never leaves the runner. Docker executor, the real binaries and Docker
//! Engine of `scripts/testbed up`.

use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::testbed::{Cleanup, testbed};
use capstan_tests::*;
use std::time::Duration;

/// A runner secret's value, which a task's output must not carry.
const CANARY: &str = "outputs-canary-value-7";

#[tokio::test(flavor = "multi_thread")]
async fn a_tasks_outputs_reach_the_tasks_that_need_it_on_another_runner() -> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("outputs");
    let label = cleanup.label();
    let work = tempfile::tempdir()?;
    let secrets = work.path().join("secrets.toml");
    std::fs::write(&secrets, format!("canary = \"{CANARY}\"\n"))?;
    let secrets_arg = secrets.display().to_string();
    let c = TestCluster::builder()
        .executor("docker")
        .runners(2)
        .runner_args(&["--secrets-file", &secrets_arg, "--docker-labels", &label])
        .start()
        .await?;
    let yaml = format!(
        r#"
version: 1
name: outputs
tasks:
  make:
    image: {image}
    runs-on: {{ index: "0" }}
    steps:
      - run: |
          echo "version=1.2.$((40 + 2))" >> "$CAPSTAN_OUTPUT"
          printf 'notes<<END\nit'"'"'s "two"\nlines; $(not run)\nEND\n' >> "$CAPSTAN_OUTPUT"
          echo "digest=not-mine" >> "$CAPSTAN_OUTPUT"
          echo "leak=token {CANARY} inside" >> "$CAPSTAN_OUTPUT"
  use:
    needs: [make]
    image: {image}
    runs-on: {{ index: "1" }}
    env: {{ VERSION: "v${{{{ tasks.make.outputs.version }}}}" }}
    steps:
      - run: |
          echo "env $VERSION"
          echo "script ${{{{ tasks.make.outputs.version }}}}"
          echo "notes ${{{{ tasks.make.outputs.notes }}}}"
          echo "image ${{{{ tasks.make.outputs.steps.1.image }}}}"
          test ! -e "$CAPSTAN_OUTPUT" && echo "own workspace"
  missing:
    needs: [make]
    image: {image}
    steps:
      - run: echo "${{{{ tasks.make.outputs.nope }}}}"
  tidy:
    needs: [make]
    finally: true
    image: {image}
    steps:
      - run: echo "tidy [${{{{ tasks.make.outputs.nope }}}}] [${{{{ tasks.make.outputs.leak }}}}]"
"#,
        image = tb.image
    );
    let id = c.submit(&yaml).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let make_log = String::from_utf8(c.task_log(&id, "make").await?)?;
    let use_log = String::from_utf8(c.task_log(&id, "use").await?)?;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}");
    assert_eq!(task_state(&run, "make"), TaskState::Succeeded, "{make_log}");
    assert_eq!(task_state(&run, "use"), TaskState::Succeeded, "{use_log}");
    assert_ne!(task(&run, "make").runner, task(&run, "use").runner);
    let tidy_log = String::from_utf8(c.task_log(&id, "tidy").await?)?;
    assert_eq!(task_state(&run, "tidy"), TaskState::Succeeded, "{tidy_log}");
    assert!(tidy_log.contains("tidy [] []\n"), "{tidy_log}");

    let outputs = &task(&run, "make").outputs;
    assert_eq!(outputs.get("version").map(String::as_str), Some("1.2.42"));
    assert!(
        !outputs.contains_key("digest"),
        "a user output does not replace the runner's: {outputs:?}"
    );
    assert!(
        make_log.contains("`digest` is an output the runner records itself: ignored"),
        "{make_log}"
    );
    assert!(!outputs.contains_key("leak"), "{outputs:?}");
    assert!(
        make_log.contains("warning: skip output `leak` since it may contain a secret"),
        "{make_log}"
    );
    assert!(!make_log.contains(CANARY), "{make_log}");
    for want in [
        "env v1.2.42\n",
        "script 1.2.42\n",
        "notes it's \"two\"\nlines; $(not run)\n",
        &format!("image {}", outputs["steps.1.image"]),
        "own workspace\n",
    ] {
        assert!(use_log.contains(want), "{want:?} not in\n{use_log}");
    }

    let missing = task(&run, "missing");
    assert_eq!(task_state(&run, "missing"), TaskState::Failed, "{run:#?}");
    assert_eq!(missing.attempts, 0, "failed at dispatch, never offered");
    assert!(
        missing.message.contains(
            "`${{ tasks.make.outputs.nope }}`: task `make` did not produce output `nope`"
        ) && missing.message.contains("version"),
        "{}",
        missing.message
    );
    cleanup
        .wait("nothing left", Duration::from_secs(10), |c| {
            c.leftovers().is_empty()
        })
        .await;
    Ok(())
}
