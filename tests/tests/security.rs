//! Issue 18, the steps' side: a step never sees the runner's credentials,
//! no value can inject shell through a substitution, `--rev` and `--repo`
//! are checked, and the files of both daemons are private.

use capstan_proto::pipeline::v1::RunState;
use capstan_tests::*;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

const INJECTION: &str = "main\"; echo INJECTED-$(id -un) > f; echo \"";

/// Submits `yaml` with the CLI and `args`, waits for the run: its state and
/// the log of task `t`.
async fn submit_cli(
    c: &TestCluster,
    yaml: &str,
    args: &[&str],
) -> anyhow::Result<(RunState, String)> {
    let file = c.dir().join(format!("p-{}.yaml", rand_suffix()));
    std::fs::write(&file, yaml)?;
    let mut all = vec!["submit", file.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = c.cli(&all);
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8(out.stdout)?.trim().to_owned();
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    Ok((run_state(&run), log))
}

fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_param_or_rev_value_can_inject_shell() -> anyhow::Result<()> {
    let c = TestCluster::builder().start().await?;
    let yaml = r#"
version: 1
name: inject
params: { b: x }
tasks:
  t:
    steps:
      - run: |
          echo "b=${{ params.b }}"
          echo b=${{ params.b }} in-words
          echo 'b=${{ params.b }}'
          echo "sha=${{ git.sha }}"
          if test -e f; then echo "INJECTION HAPPENED"; exit 1; fi
          echo no-f
"#;
    let param = format!("b={INJECTION}");
    let (state, log) = submit_cli(&c, yaml, &["--param", &param, "--rev", "main;touch-f"]).await?;
    assert_eq!(state, RunState::Succeeded, "{log}");
    assert!(log.contains(&format!("b={INJECTION}\n")), "{log}");
    assert!(log.contains(&format!("b={INJECTION} in-words\n")), "{log}");
    assert_eq!(log.matches(&format!("b={INJECTION}")).count(), 3, "{log}");
    assert!(log.contains("sha=main;touch-f\n"), "{log}");
    assert!(log.contains("no-f\n"), "{log}");
    let user = String::from_utf8(std::process::Command::new("id").arg("-un").output()?.stdout)?;
    assert!(!log.contains(&format!("INJECTED-{}", user.trim())), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_rev_or_repo_is_refused_by_the_cli_and_the_coordinator() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(0).start().await?;
    let file = c.dir().join("ok.yaml");
    std::fs::write(
        &file,
        "version: 1\nname: ok\ntasks:\n  t:\n    steps: [ { run: echo } ]\n",
    )?;
    let f = file.to_str().unwrap();
    for (args, message) in [
        (
            ["--rev", "main; touch f"].as_slice(),
            "error: --rev `main; touch f` is not a commit SHA or a valid ref name: it contains ' '\n",
        ),
        (
            ["--rev=--upload-pack=x"].as_slice(),
            "error: --rev `--upload-pack=x` is not a commit SHA or a valid ref name: it starts with `-`\n",
        ),
        (
            ["--repo=-oProxyCommand=x"].as_slice(),
            "error: --repo `-oProxyCommand=x` is not a repository URL: it starts with `-`\n",
        ),
    ] {
        let mut all = vec!["submit", f];
        all.extend_from_slice(args);
        let out = c.cli(&all);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert_eq!(String::from_utf8(out.stderr)?, message);
    }
    // The coordinator checks for itself (any client, not only the CLI).
    let err = c
        .client()
        .await?
        .submit_run(capstan_proto::api::v1::SubmitRunRequest {
            pipeline_yaml: std::fs::read_to_string(&file)?,
            rev: "HEAD~1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "--rev `HEAD~1` is not a commit SHA or a valid ref name: it contains `~`"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shell_step_sees_no_runner_credentials_and_they_are_masked() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .env("CAPSTAN_SECRET_REGISTRY", "registry-secret-value")
        .env("RUNNER_ONLY_VARIABLE", "runner-only-value")
        .start()
        .await?;
    let yaml = format!(
        r#"
version: 1
name: creds
tasks:
  t:
    env: {{ TASK_VAR: task-value }}
    steps:
      - run: |
          env | sort
          cat "$CAPSTAN_WORKSPACE/../../../runner.json"
          echo "token={}"
"#,
        c.token
    );
    let (state, log) = submit_cli(&c, &yaml, &[]).await?;
    assert_eq!(state, RunState::Succeeded, "{log}");
    assert!(log.contains("TASK_VAR=task-value\n"), "{log}");
    for leak in [
        "registry-secret-value",
        "runner-only-value",
        "CAPSTAN_REGISTRATION_TOKEN",
        "CAPSTAN_SECRET_",
        "RUNNER_ONLY_VARIABLE",
        c.token.as_str(),
    ] {
        assert!(!log.contains(leak), "{leak} in {log}");
    }
    // The registration token and the runner's own secret are masked.
    assert!(log.contains("token=[MASKED]\n"), "{log}");
    assert!(log.contains("\"runner_secret\": \"[MASKED]\""), "{log}");

    // Only the daemons' users may read their files.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    let work = c.dir().join("work-runner-0");
    assert_eq!(mode(&work), 0o700, "{}", work.display());
    assert_eq!(mode(&work.join("runner.json")), 0o600);
    let data = c.data_dir();
    assert_eq!(mode(&data), 0o700);
    for name in ["state.redb", "state.redb.wal"] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
    assert_eq!(mode(&data.join("logs")), 0o700);
    let mut logs = 0;
    for entry in walk(&data.join("logs")) {
        if entry.is_file() {
            assert_eq!(mode(&entry), 0o600, "{}", entry.display());
            logs += 1;
        }
    }
    assert!(logs > 0, "no task log under {}", data.display());
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// The docker executor never passed the runner's environment to a step
/// container (its env is the step's, built by the runner): keep it so.
#[tokio::test(flavor = "multi_thread")]
async fn a_docker_step_sees_no_runner_credentials() -> anyhow::Result<()> {
    let tb = capstan_tests::testbed::testbed();
    let cleanup = capstan_tests::testbed::Cleanup::new("sec-env");
    let label = cleanup.label();
    let c = TestCluster::builder()
        .executor("docker")
        .runner_args(&["--docker-labels", &label])
        .env("CAPSTAN_SECRET_REGISTRY", "registry-secret-value")
        .env("RUNNER_ONLY_VARIABLE", "runner-only-value")
        .start()
        .await?;
    let yaml = format!(
        "version: 1\nname: creds\ntasks:\n  t:\n    image: {}\n    steps:\n      - run: env | sort; echo token={}\n",
        tb.image, c.token
    );
    let id = c.submit(&yaml).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{log}");
    for leak in [
        "registry-secret-value",
        "runner-only-value",
        "CAPSTAN_REGISTRATION_TOKEN",
        "CAPSTAN_SECRET_",
        c.token.as_str(),
    ] {
        assert!(!log.contains(leak), "{leak} in {log}");
    }
    assert!(log.contains("CAPSTAN_RUN_ID="), "{log}");
    assert!(log.contains("token=[MASKED]\n"), "{log}");
    Ok(())
}
