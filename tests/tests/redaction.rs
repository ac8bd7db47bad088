//! A password in a repository URL (`capstan submit --repo
//! http://bob:PASSWORD@host/r.git`) reaches no output channel: not the
//! CLI's output, not either daemon's log, not the run the API returns,
//! not a span or span event exported over OTLP, not the task's log, and
//! not the coordinator's data dir (the stored run has it sealed).

use capstan_tests::git_server::{GitServer, git};
use capstan_tests::otlp::OtlpReceiver;
use capstan_tests::*;
use std::time::Duration;

const PASSWORD: &str = "pw-Zq81xv-redact";

fn assert_clean(channel: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD),
        "the URL's password leaked into {channel}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_in_the_repo_url_reaches_no_output() -> anyhow::Result<()> {
    let server = GitServer::start("bob", PASSWORD)?;
    server.create_repo("demo/app")?;
    let work = tempfile::tempdir()?;
    let dir = work.path().join("app");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("README"), "hi\n")?;
    git(&dir, &["init", "-q"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "seed"]);
    git(
        &dir,
        &["push", "-q", &server.url_with_auth("demo/app"), "HEAD:main"],
    );
    let sha = git(&dir, &["rev-parse", "HEAD"]);
    let with_auth = server.url_with_auth("demo/app");
    assert!(with_auth.contains(PASSWORD), "{with_auth}");
    // A repository that does not exist: the refused checkout's error
    // message quotes the URL too.
    let missing = with_auth.replace("demo/app", "demo/none");

    let receiver = OtlpReceiver::start().await?;
    let c = TestCluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await?;
    let file = work.path().join("p.yaml");
    std::fs::write(
        &file,
        "version: 1\nname: redact\ntasks:\n  t:\n    steps: [ { run: 'cat README; echo \"${{ git.repo }}\"' } ]\n",
    )?;
    let file = file.display().to_string();
    let mut cli_out = String::new();
    let mut ids = Vec::new();
    for repo in [&with_auth, &missing] {
        let out = c.cli(&["submit", &file, "--repo", repo, "--rev", &sha]);
        assert!(out.status.success(), "{out:?}");
        ids.push(String::from_utf8(out.stdout)?.trim().to_string());
        cli_out.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let (good, bad) = (&ids[0], &ids[1]);
    let run = c.wait_done(good, Duration::from_secs(30)).await?;
    assert_eq!(
        run_state(&run),
        capstan_proto::pipeline::v1::RunState::Succeeded,
        "{run:#?}\n{cli_out}\n{}",
        c.all_logs()
    );
    assert_eq!(run.repo, with_auth.replace(PASSWORD, "***"));
    let failed = c.wait_done(bad, Duration::from_secs(60)).await?;
    let message = &task(&failed, "t").message;
    assert!(
        message.contains("bob:***@"),
        "the failure names the URL, redacted: {message}"
    );
    for id in [good, bad] {
        for args in [
            vec!["status", id.as_str(), "-o", "json"],
            vec!["status", id.as_str()],
            vec!["logs", id.as_str(), "--follow"],
        ] {
            let out = c.cli(&args);
            cli_out.push_str(&String::from_utf8_lossy(&out.stdout));
            cli_out.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        assert_clean(
            "the run the API returns",
            &format!("{:?}", c.get_run(id).await?),
        );
        assert_clean(
            "the task log",
            &String::from_utf8_lossy(&c.task_log(id, "t").await?),
        );
    }
    assert!(
        cli_out.contains("bob:***@"),
        "the CLI shows the URL, redacted:\n{cli_out}"
    );
    assert_clean("the CLI's output", &cli_out);
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter().filter(|s| s.name == "run").count() >= 2
                && s.iter().any(|s| s.name == "git.checkout" && s.is_error())
        })
        .await?;
    let checkout = spans
        .iter()
        .find(|s| s.name == "git.checkout")
        .expect("waited for");
    assert!(
        checkout
            .attr("capstan.repo")
            .is_some_and(|r| r.contains("bob:***@")),
        "{checkout:#?}"
    );
    for s in &spans {
        assert_clean(&format!("the span {}", s.name), &s.raw);
    }
    let logs = c.all_logs();
    assert!(
        logs.contains("bob:***@"),
        "the daemons log the URL, redacted:\n{logs}"
    );
    assert_clean("the daemons' logs", &logs);
    // At rest: the coordinator's store holds the password sealed, and no
    // other file of its data dir (or its logs) holds it in clear.
    for entry in walk(&c.data_dir()) {
        let bytes = std::fs::read(&entry)?;
        assert!(
            !bytes
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "the URL's password is in clear in {}",
            entry.display()
        );
    }
    Ok(())
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty(), "no file in {}", dir.display());
    files
}
