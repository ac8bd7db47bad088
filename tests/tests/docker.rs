//! End to end on the docker executor: the real binaries, the real Docker
//! Engine and the real registry of `scripts/testbed up`. These tests fail
//! (never skip) when the test bed is missing.

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::git_server::git;
use capstan_tests::testbed::{Cleanup, registry_get, remove_image, testbed};
use capstan_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A repository whose first commit has `version.txt` = "version one" and a
/// Dockerfile; the second commit changes the version. Returns (path, first sha).
fn source_repo(dir: &Path, base_image: &str) -> (PathBuf, String) {
    let repo = dir.join("source");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("version.txt"), "version one\n").unwrap();
    std::fs::write(
        repo.join("Dockerfile"),
        format!("FROM {base_image}\nCOPY version.txt /version.txt\n"),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("version.txt"), "version two\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);
    (repo, first)
}

const CANARY: &str = "sekrit-canary-value-42";

#[tokio::test(flavor = "multi_thread")]
async fn checkout_build_push_with_masked_secrets() -> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("gitops");
    let work = tempfile::tempdir()?;
    let (repo, first) = source_repo(work.path(), &tb.image);
    let secrets = work.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        format!(
            "registry = {{ username = \"{}\", password = \"{}\" }}\ncanary = \"{CANARY}\"\n",
            tb.user, tb.password
        ),
    )?;
    let secrets_arg = secrets.display().to_string();
    let label = cleanup.label();
    let c = TestCluster::builder()
        .executor("docker")
        .runner_args(&["--secrets-file", &secrets_arg, "--docker-labels", &label])
        .start()
        .await?;
    let name = format!("capstan-e2e/app-{}", std::process::id());
    let image = format!("{}/{name}", tb.registry);
    let yaml = format!(
        r#"
version: 1
name: docker-e2e
params:
  image: {image}
tasks:
  test:
    image: {base}
    steps:
      - run: |
          cat version.txt
          echo "canary {CANARY} and base64 c2Vrcml0LWNhbmFyeS12YWx1ZS00Mg=="
  image:
    needs: [test]
    steps:
      - build: {{ context: ., dockerfile: Dockerfile, tag: "${{{{ params.image }}}}:${{{{ git.sha }}}}" }}
      - push: {{ image: "${{{{ params.image }}}}:${{{{ git.sha }}}}", credentials: registry }}
"#,
        base = tb.image
    );
    let id = c
        .client()
        .await?
        .submit_run(api::SubmitRunRequest {
            pipeline_yaml: yaml,
            file_name: "docker-e2e.yaml".into(),
            repo: repo.display().to_string(),
            rev: first.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = c.wait_done(&id, Duration::from_secs(90)).await?;
    let test_log = String::from_utf8(c.task_log(&id, "test").await?)?;
    let image_log = String::from_utf8(c.task_log(&id, "image").await?)?;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{run:#?}\n{test_log}\n{image_log}\n{}",
        c.all_logs()
    );
    // The exact commit, not the branch head.
    assert!(test_log.contains("version one"), "{test_log}");
    assert!(!test_log.contains(CANARY), "{test_log}");
    assert!(
        test_log.contains("canary [MASKED] and base64 [MASKED]"),
        "{test_log}"
    );
    assert!(image_log.contains("checked out"), "{image_log}");
    let pushed = format!("pushed {image}:{first}@");
    let digest = image_log
        .lines()
        .find_map(|l| l.strip_prefix(&pushed))
        .unwrap_or_else(|| panic!("no `{pushed}` line in {image_log}"))
        .to_owned();
    assert!(digest.starts_with("sha256:"), "{digest}");
    // The digest is recorded on the task and `capstan status` shows it.
    let outputs = &task(&run, "image").outputs;
    assert_eq!(outputs.get("digest"), Some(&digest), "{outputs:?}");
    let status = c.cli(&["status", &id, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let image_task = v["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == "image"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(image_task["outputs"]["digest"], digest.as_str(), "{v}");
    let text = String::from_utf8_lossy(&c.cli(&["status", &id]).stdout).to_string();
    assert!(text.contains(&format!("image.digest: {digest}")), "{text}");

    // The registry has the tag, with that digest.
    let (code, resp) = registry_get(&tb, &format!("/v2/{name}/tags/list"));
    assert_eq!(code, 200, "{resp}");
    assert!(resp.contains(&first), "{resp}");
    let (code, resp) = registry_get(&tb, &format!("/v2/{name}/manifests/{first}"));
    assert_eq!(code, 200, "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains(&format!("docker-content-digest: {digest}")),
        "{resp}"
    );

    // Nothing of the run is left on the engine.
    assert_eq!(cleanup.leftovers(), "");
    remove_image(&format!("{image}:{first}"));
    Ok(())
}

const SLEEPER: &str = r#"
version: 1
name: sleeper
tasks:
  sleep:
    image: IMAGE
    steps:
      - run: sleep 300
"#;

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_container_and_orphans_are_reaped_after_kill_9() -> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("reap");
    let label = cleanup.label();
    let mut c = TestCluster::builder()
        .executor("docker")
        .runner_args(&["--docker-labels", &label])
        .start()
        .await?;
    let yaml = SLEEPER.replace("IMAGE", &tb.image);

    // Cancel: the step's container stops within 2 s of the runner hearing it.
    let id = c.submit(&yaml).await?;
    cleanup
        .wait("step container running", Duration::from_secs(30), |c| {
            !c.running().is_empty()
        })
        .await;
    let out = c.cli(&["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    let stopped = cleanup
        .wait(
            "container stopped after cancel",
            Duration::from_secs(5),
            |c| c.running().is_empty(),
        )
        .await;
    eprintln!("capstan cancel returned -> container stopped: {stopped:?}");
    assert!(
        stopped < Duration::from_millis(2500),
        "cancel took {stopped:?}"
    );
    let run = c.wait_done(&id, Duration::from_secs(10)).await?;
    assert_eq!(task_state(&run, "sleep"), TaskState::Cancelled);
    cleanup
        .wait("task objects removed", Duration::from_secs(10), |c| {
            c.leftovers().is_empty()
        })
        .await;

    // kill -9 of the runner leaves its container behind; the restarted
    // runner (same name, same work dir) reaps it before taking work.
    let id = c.submit(&yaml).await?;
    cleanup
        .wait("step container running", Duration::from_secs(30), |c| {
            !c.running().is_empty()
        })
        .await;
    let orphan = cleanup.running();
    c.kill_runner("runner-0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cleanup.running(), orphan, "the container outlives kill -9");
    c.start_runner("runner-0")?;
    cleanup
        .wait("orphan reaped", Duration::from_secs(20), |c| {
            !c.list(&["ps", "-a"]).contains(&orphan)
        })
        .await;
    // The requeued attempt runs on the restarted runner; cancel it too.
    let _ = c.cli(&["cancel", &id]);
    c.wait_done(&id, Duration::from_secs(30)).await?;
    cleanup
        .wait("nothing left", Duration::from_secs(10), |c| {
            c.leftovers().is_empty()
        })
        .await;
    Ok(())
}

/// The shell executor honours repo and rev too (no Docker needed).
#[tokio::test(flavor = "multi_thread")]
async fn shell_executor_checks_out_the_exact_commit() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let (repo, first) = source_repo(work.path(), "unused");
    let c = TestCluster::builder().executor("shell").start().await?;
    let yaml = "version: 1\nname: checkout\ntasks:\n  t:\n    steps:\n      - run: cat version.txt; git rev-parse HEAD\n";
    let id = c
        .client()
        .await?
        .submit_run(api::SubmitRunRequest {
            pipeline_yaml: yaml.into(),
            file_name: "checkout.yaml".into(),
            repo: repo.display().to_string(),
            rev: first.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = c.wait_done(&id, Duration::from_secs(30)).await?;
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{log}");
    assert!(log.contains("version one"), "{log}");
    assert!(log.contains(&first), "{log}");
    Ok(())
}

/// Builds `capstan-test/runner:<id>`: busybox, the runner binary and the
/// shared libraries `ldd` lists (nothing pulled; classic builder).
fn build_runner_image(dir: &Path, tag: &str, label: &str) {
    let ctx = dir.join("runner-image");
    let root = ctx.join("root");
    let binary = bin("capstan-runner");
    let ldd = Command::new("ldd").arg(&binary).output().expect("ldd");
    let mut files: Vec<PathBuf> = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    files.push(binary.clone());
    for f in &files {
        let dest = if *f == binary {
            root.join("usr/local/bin/capstan-runner")
        } else {
            root.join(f.strip_prefix("/").unwrap())
        };
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(f, &dest).unwrap();
    }
    let tb = testbed();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}\nCOPY root/ /\nLABEL {label}\nENTRYPOINT [\"/usr/local/bin/capstan-runner\"]\n",
            tb.image
        ),
    )
    .unwrap();
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(&ctx)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    assert!(out.status.success(), "building the runner image: {out:?}");
}

/// DESIGN: the docker executor works when the runner itself runs in a
/// container with only the Docker socket mounted. Its work dir lives inside
/// its own container, so any bind mount of a runner path into a step would
/// show an empty directory: the step sees the checkout only if it was copied
/// through the engine's API.
#[tokio::test(flavor = "multi_thread")]
async fn runner_in_a_container_with_the_socket_mounted() -> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("in-container");
    let label = cleanup.label();
    let work = tempfile::tempdir()?;
    let (repo, first) = source_repo(work.path(), &tb.image);
    let tag = format!("capstan-test/runner:{}", cleanup.id);
    build_runner_image(work.path(), &tag, &label);
    let c = TestCluster::builder().runners(0).start().await?;
    let repo_path = repo.display().to_string();
    // The runner container uses the host's network to reach the coordinator
    // on 127.0.0.1; its step containers get no network at all.
    let out = Command::new("docker")
        .args(["run", "-d", "--network", "host", "--label", &label])
        .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
        .args(["-v", &format!("{repo_path}:{repo_path}:ro")])
        .arg(&tag)
        .args(["--coordinator", &c.url(), "--registration-token", &c.token])
        .args([
            "--name",
            "boxed",
            "--executor",
            "docker",
            "--work-dir",
            "/work",
        ])
        .args(["--docker-labels", &label, "--docker-pull", "never"])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let container = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let logs = || {
        Command::new("docker")
            .args(["logs", &container])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
            .unwrap_or_default()
    };
    if let Err(e) = c.wait_runners_connected(1, Duration::from_secs(20)).await {
        panic!("{e}\nrunner container log:\n{}", logs());
    }
    let yaml = format!(
        "version: 1\nname: boxed\ntasks:\n  t:\n    image: {}\n    steps:\n      - run: cat version.txt; ls /workspace\n",
        tb.image
    );
    let id = c
        .client()
        .await?
        .submit_run(api::SubmitRunRequest {
            pipeline_yaml: yaml,
            file_name: "boxed.yaml".into(),
            repo: repo_path.clone(),
            rev: first,
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let log = String::from_utf8(c.task_log(&id, "t").await?)?;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{log}\nrunner container log:\n{}",
        logs()
    );
    assert!(log.contains("version one"), "{log}");
    assert!(log.contains("Dockerfile"), "{log}");
    drop(cleanup);
    remove_image(&tag);
    Ok(())
}
