//! Image pulls end to end: the real binaries, the real Docker Engine and
//! the test bed's own registry with auth on loopback (an image is pushed
//! there first; nothing is ever pulled from anywhere else). Pull with the
//! task's credentials and with the runner's registry map, bad and missing
//! credentials, `never` with a missing image, and an image the runner's
//! `--docker-allowed-images` refuses.

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::testbed::{Cleanup, Testbed, remove_image, testbed};
use capstan_tests::*;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Pushes the test image to the test bed's registry as `name` (with a
/// login of its own, in a config dir of its own), then removes the local
/// tag so a task has to pull it.
fn push_to_registry(tb: &Testbed, name: &str, config: &std::path::Path) {
    let config = config.display().to_string();
    let mut login = Command::new("docker")
        .args(["--config", &config, "login", &tb.registry, "-u", &tb.user])
        .arg("--password-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker CLI");
    login
        .stdin
        .take()
        .unwrap()
        .write_all(tb.password.as_bytes())
        .unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(out.status.success(), "docker login: {out:?}");
    let ok = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {out:?}");
    };
    ok(&["tag", &tb.image, name]);
    ok(&["--config", &config, "push", name]);
    remove_image(name);
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_with_good_bad_and_missing_credentials_and_refuses_what_is_not_allowed()
-> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("pulls");
    let label = cleanup.label();
    let work = tempfile::tempdir()?;
    let pulled = format!("{}/capstan-e2e/pull-{}:1", tb.registry, std::process::id());
    push_to_registry(&tb, &pulled, work.path());
    let secrets = work.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        format!(
            "registry = {{ username = \"{}\", password = \"{}\" }}\nwrong = {{ username = \"{}\", password = \"not-it\" }}\n",
            tb.user, tb.password, tb.user
        ),
    )?;
    let allowed = format!("{}/capstan-e2e/*,{}", tb.registry, tb.image);
    let mapped = format!("{}=registry", tb.registry);
    let secrets_arg = secrets.display().to_string();
    let c = TestCluster::builder()
        .executor("docker")
        .runner_args(&[
            "--secrets-file",
            &secrets_arg,
            "--docker-labels",
            &label,
            "--docker-allowed-images",
            &allowed,
            "--docker-pull-credentials",
            &mapped,
            // The runner's own default, which the test harness turns off.
            "--docker-pull",
            "if-not-present",
        ])
        .start()
        .await?;
    let yaml = |task: &str| {
        let steps = if task.contains("    steps:") {
            ""
        } else {
            "    steps:\n      - run: echo ran-in-the-image\n"
        };
        format!("version: 1\nname: pulls\ntasks:\n  t:\n{task}{steps}")
    };
    // Every log and message of every run, to check no password is in any.
    let said = std::sync::Mutex::new(String::new());
    let run_one = async |task: String| -> anyhow::Result<(api::Run, String)> {
        let id = c.submit(&yaml(&task)).await?;
        let run = c.wait_done(&id, Duration::from_secs(60)).await?;
        let log = String::from_utf8(c.task_log(&id, "t").await?)?;
        if let Ok(mut said) = said.lock() {
            said.push_str(&log);
            said.push_str(&format!("{run:?}"));
        }
        Ok((run, log))
    };

    // The task's own credentials, pull always: pulled, with progress, and
    // the digest in the log and in the task's outputs.
    let (run, log) = run_one(format!(
        "    image: {pulled}\n    pull: always\n    pull-credentials: registry\n"
    ))
    .await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    assert!(
        log.contains(&format!(
            "pulling {pulled} from {} with secret `registry`",
            tb.registry
        )),
        "{log}"
    );
    let repo = pulled.trim_end_matches(":1");
    let digest = task(&run, "t")
        .outputs
        .get("steps.1.image")
        .cloned()
        .unwrap_or_default();
    assert!(
        digest.starts_with(&format!("{repo}@sha256:")),
        "{digest}\n{log}"
    );
    let engine = Command::new("docker")
        .args(["image", "inspect", "-f", "{{json .RepoDigests}}", &pulled])
        .output()?;
    assert!(
        String::from_utf8_lossy(&engine.stdout).contains(&digest),
        "the engine's record of the pulled image has {digest}: {engine:?}"
    );
    assert!(
        log.contains(&format!("image {pulled} is {digest}")),
        "{log}"
    );
    assert!(log.lines().any(|l| l == "ran-in-the-image"), "{log}");

    // The runner's registry map when the task names no credentials.
    remove_image(&pulled);
    let (run, log) = run_one(format!("    image: {pulled}\n")).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("with secret `registry`"), "{log}");

    // A service's image and a build's base image are pulled the same way,
    // into the service's section of the log and into the build step's.
    let base = pulled.replace(":1", ":base");
    push_to_registry(&tb, &base, work.path());
    remove_image(&pulled);
    let built = format!("capstan-e2e/built-{}:1", std::process::id());
    let (run, log) = run_one(format!(
        "    image: {image}\n    pull-credentials: registry\n    services:\n      svc:\n        image: {pulled}\n        command: [sleep, \"60\"]\n    steps:\n      - run: printf 'FROM {base}\\n' > Dockerfile\n      - build: {{ context: ., dockerfile: Dockerfile, tag: \"{built}\" }}\n",
        image = tb.image
    ))
    .await?;
    remove_image(&built);
    remove_image(&base);
    eprintln!("the log of a service's and a base image's pulls:\n{log}");
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    let section = log.find("--- service svc (").unwrap_or(0);
    assert!(section > 0, "{log}");
    let pulling = |image: &str| format!("pulling {image} from {}", tb.registry);
    assert!(
        log[section..].contains(&pulling(&pulled)),
        "the service's pull:\n{log}"
    );
    assert!(
        log[..section].contains(&format!("building {built}"))
            && log[..section].contains(&pulling(&base)),
        "the build, with its base image's pull:\n{log}"
    );

    // Bad credentials: the registry's refusal, naming the secret.
    let (run, log) = run_one(format!(
        "    image: {pulled}\n    pull: always\n    pull-credentials: wrong\n"
    ))
    .await?;
    assert_eq!(task_state(&run, "t"), TaskState::Failed, "{run:#?}\n{log}");
    let message = &task(&run, "t").message;
    assert!(
        message.contains(&format!(
            "pulling image `{pulled}` from {} failed",
            tb.registry
        )) && message.contains("check the login in secret `wrong`"),
        "{message}"
    );
    eprintln!("bad credentials: {message}");
    assert!(!log.lines().any(|l| l == "ran-in-the-image"), "{log}");

    // `never` with a missing image: a clear failure, nothing pulled.
    remove_image(&pulled);
    let (run, log) = run_one(format!("    image: {pulled}\n    pull: never\n")).await?;
    assert_eq!(task_state(&run, "t"), TaskState::Failed, "{run:#?}\n{log}");
    let message = &task(&run, "t").message;
    assert!(message.contains("the pull policy is `never`"), "{message}");
    assert!(!log.contains("pulling"), "{log}");

    // An image the runner does not allow: refused before any pull.
    let refused = format!("{}/elsewhere/busybox:1", tb.registry);
    let (run, log) = run_one(format!("    image: {refused}\n")).await?;
    assert_eq!(task_state(&run, "t"), TaskState::Failed, "{run:#?}\n{log}");
    let message = &task(&run, "t").message;
    assert!(
        message.contains(&format!("image `{refused}` is not allowed on runner"))
            && message.contains("--docker-allowed-images"),
        "{message}"
    );
    assert!(!log.contains("pulling"), "{log}");

    // The allowed list holds for a build's base image too.
    let (run, log) = run_one(format!(
        "    image: {image}\n    steps:\n      - run: printf 'FROM {refused}\\n' > Dockerfile\n      - build: {{ context: ., dockerfile: Dockerfile, tag: \"capstan-e2e/never-built:1\" }}\n",
        image = tb.image
    ))
    .await?;
    assert_eq!(task_state(&run, "t"), TaskState::Failed, "{run:#?}\n{log}");
    let message = &task(&run, "t").message;
    assert!(
        message.contains("Dockerfile:1: base image: image `") && message.contains("is not allowed"),
        "{message}"
    );
    assert!(!log.contains("pulling"), "{log}");

    let said = said.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(!said.is_empty());
    assert!(
        !said.contains(&tb.password) && !said.contains("not-it"),
        "a registry password reached a log or a message"
    );
    remove_image(&pulled);
    cleanup
        .wait("nothing left", Duration::from_secs(10), |c| {
            c.leftovers().is_empty()
        })
        .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_without_the_registrys_login_says_how_to_give_one() -> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("pulls-nologin");
    let label = cleanup.label();
    let work = tempfile::tempdir()?;
    let pulled = format!(
        "{}/capstan-e2e/nologin-{}:1",
        tb.registry,
        std::process::id()
    );
    push_to_registry(&tb, &pulled, work.path());
    let c = TestCluster::builder()
        .executor("docker")
        .runner_args(&["--docker-labels", &label, "--docker-pull", "if-not-present"])
        .start()
        .await?;
    let yaml = format!(
        "version: 1\nname: nologin\ntasks:\n  t:\n    image: {pulled}\n    steps: [ {{ run: echo x }} ]\n"
    );
    let id = c.submit(&yaml).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(task_state(&run, "t"), TaskState::Failed, "{run:#?}");
    let message = &task(&run, "t").message;
    assert!(
        message.contains("the registry wants a login")
            && message.contains("pull-credentials:")
            && message.contains("--docker-pull-credentials"),
        "{message}"
    );
    remove_image(&pulled);
    cleanup
        .wait("nothing left", Duration::from_secs(10), |c| {
            c.leftovers().is_empty()
        })
        .await;
    Ok(())
}
