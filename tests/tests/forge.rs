//! Forge integration end to end (issue 22): a real coordinator and runner,
//! the test bed's git smart-HTTP server holding the repository, webhooks
//! sent as the forges send them (signatures computed here), and a
//! recording stand-in for the forge's commit status API.

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::RunState;
use capstan_tests::forge_api::{Forge, Recorder, deliver, push_payload};
use capstan_tests::git_server::{GitServer, git};
use capstan_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const GIT_USER: &str = "capstan-bot";
const GIT_PASSWORD: &str = "forge-token-5150";
const STATUS_TOKEN: &str = "status-token-77";
const PUBLIC: &str = "http://ci.example.test";
const ZERO: &str = "0000000000000000000000000000000000000000";

const GOOD: &str = "version: 1\nname: app-ci\ntasks:\n  check:\n    steps:\n      - run: test -f .capstan.yaml && echo \"sha=${{ git.sha }} ref=${{ git.ref }}\"\n";
const FAILING: &str =
    "version: 1\nname: app-ci\ntasks:\n  check:\n    steps:\n      - run: echo broken; exit 3\n";

struct Fixture {
    work: tempfile::TempDir,
    server: GitServer,
    status: Recorder,
    cluster: TestCluster,
    tree: PathBuf,
}

fn commit(tree: &Path, server: &GitServer, files: &[(&str, &str)], message: &str) -> String {
    for (path, text) in files {
        std::fs::write(tree.join(path), text).unwrap();
    }
    git(tree, &["add", "-A"]);
    git(tree, &["commit", "-q", "--allow-empty", "-m", message]);
    git(
        tree,
        &["push", "-q", &server.url_with_auth("demo/app"), "HEAD:main"],
    );
    git(tree, &["rev-parse", "HEAD"])
}

impl Fixture {
    async fn new() -> Fixture {
        let work = tempfile::tempdir().unwrap();
        let server = GitServer::start(GIT_USER, GIT_PASSWORD).unwrap();
        server.create_repo("demo/app").unwrap();
        let tree = work.path().join("app");
        std::fs::create_dir_all(&tree).unwrap();
        git(&tree, &["init", "-q"]);
        let secrets = work.path().join("secrets.toml");
        std::fs::write(
            &secrets,
            format!("git = {{ username = \"{GIT_USER}\", password = \"{GIT_PASSWORD}\" }}\n"),
        )
        .unwrap();
        let cluster = TestCluster::builder()
            .executor("shell")
            .coordinator_args(&["--public-url", PUBLIC])
            .runner_args(&[
                "--secrets-file",
                &secrets.display().to_string(),
                "--git-credentials",
                "git",
            ])
            .start()
            .await
            .unwrap();
        Fixture {
            work,
            server,
            status: Recorder::start().unwrap(),
            cluster,
            tree,
        }
    }

    /// `capstan repo add app ...`; returns the webhook secret (the last word).
    fn add_repo(&self, forge: &str, extra: &[&str]) -> String {
        let url = self.server.url_with_auth("demo/app");
        let api = self.status.url();
        let mut args = vec![
            "repo",
            "add",
            "app",
            "--url",
            &url,
            "--branches",
            "main,release/*",
            "--forge",
            forge,
            "--api-url",
            &api,
            "--status-token",
            STATUS_TOKEN,
        ];
        args.extend_from_slice(extra);
        let out = self.cluster.cli(&args);
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let secret = stdout.split_whitespace().last().unwrap().to_string();
        assert_eq!(secret.len(), 43, "{stdout}");
        secret
    }

    fn url(&self) -> String {
        self.server.url("demo/app")
    }

    fn hook(
        &self,
        forge: Forge,
        delivery: &str,
        secret: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        deliver(self.cluster.replicas[0].http, forge, delivery, secret, body).unwrap()
    }

    async fn runs(&self) -> Vec<api::Run> {
        let mut c = self.cluster.client().await.unwrap();
        c.list_runs(api::ListRunsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs
    }

    /// The statuses posted for `sha`, once `n` of them arrived.
    async fn statuses(&self, sha: &str, n: usize) -> Vec<capstan_tests::forge_api::Recorded> {
        self.statuses_until(sha, &format!("{n} statuses"), |s| s.len() >= n)
            .await
    }

    /// The statuses posted for `sha` once `done` holds of them.
    async fn statuses_until(
        &self,
        sha: &str,
        what: &str,
        done: impl Fn(&[capstan_tests::forge_api::Recorded]) -> bool,
    ) -> Vec<capstan_tests::forge_api::Recorded> {
        let got = poll_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            async || {
                let for_sha: Vec<_> = self
                    .status
                    .requests()
                    .into_iter()
                    .filter(|r| r.path.ends_with(sha))
                    .collect();
                Ok(done(&for_sha).then_some(for_sha))
            },
        )
        .await
        .unwrap();
        got.unwrap_or_else(|| {
            panic!(
                "{what} for {sha}: {:#?}\n{}",
                self.status.requests(),
                self.cluster.all_logs()
            )
        })
    }
}

/// `family{result="<result>"}` in the coordinator's scrape (0 when absent).
fn counted(f: &Fixture, family: &str, result: &str) -> f64 {
    let (code, body) = f.cluster.http_get("/metrics").expect("scrape /metrics");
    assert_eq!(code, 200, "{body}");
    let series = format!("{family}{{result=\"{result}\"}}");
    capstan_tests::metrics::samples(&body)
        .get(&series)
        .copied()
        .unwrap_or(0.0)
}

fn run_id(v: &serde_json::Value) -> String {
    v["runs"][0]["run"]
        .as_str()
        .unwrap_or_else(|| panic!("no run in {v}"))
        .to_string()
}

#[tokio::test]
async fn a_push_runs_at_the_pushed_sha_and_reports_pending_then_success() {
    let f = Fixture::new().await;
    let secret = f.add_repo("gitea", &[]);
    let base = commit(&f.tree, &f.server, &[(".capstan.yaml", GOOD)], "first");
    let sha = commit(&f.tree, &f.server, &[("README", "x")], "second");
    let body = push_payload(Forge::Gitea, &f.url(), "refs/heads/main", &base, &sha);
    let (code, v) = f.hook(Forge::Gitea, "d-1", &secret, &body);
    assert_eq!(code, 202, "{v}\n{}", f.cluster.all_logs());
    assert_eq!(v["runs"][0]["new"], true, "{v}");
    let id = run_id(&v);
    let run = f
        .cluster
        .wait_done(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{run:#?}\n{}",
        f.cluster.all_logs()
    );
    assert_eq!(
        (run.rev.as_str(), run.repo.as_str()),
        (sha.as_str(), f.url().as_str())
    );
    assert_eq!(run.submitted_by, "hook:app");
    let log = String::from_utf8(f.cluster.task_log(&id, "check").await.unwrap()).unwrap();
    assert!(
        log.contains(&format!("sha={sha} ref=refs/heads/main")),
        "{log}"
    );

    let posted = f.statuses(&sha, 2).await;
    let path = format!("/api/v1/repos/demo/app/statuses/{sha}");
    for p in &posted {
        assert_eq!(
            (p.method.as_str(), p.path.as_str()),
            ("POST", path.as_str())
        );
        assert_eq!(
            p.header("authorization"),
            Some(&*format!("token {STATUS_TOKEN}"))
        );
        assert_eq!(p.body["context"], "capstan/app-ci");
        assert_eq!(p.body["target_url"], format!("{PUBLIC}/runs/{id}"));
    }
    let states: Vec<_> = posted
        .iter()
        .map(|p| p.body["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["pending", "success"]);

    // A redelivery queues nothing and posts nothing.
    let before = f.runs().await.len();
    let (code, again) = f.hook(Forge::Gitea, "d-1", &secret, &body);
    assert_eq!(code, 202, "{again}");
    assert_eq!(
        (run_id(&again), again["runs"][0]["new"].clone()),
        (id.clone(), serde_json::json!(false))
    );
    assert_eq!(again["runs"][0]["pipeline_cached"], true, "{again}");
    // A wrong signature: 401, nothing queued.
    let (code, bad) = f.hook(Forge::Gitea, "d-2", "not-the-secret", &body);
    assert_eq!(code, 401, "{bad}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.runs().await.len(), before);
    assert_eq!(f.status.requests().len(), 2, "{:#?}", f.status.requests());
    let log = f.cluster.process_log("coordinator");
    assert!(
        log.contains("webhook refused") && log.contains("status=401"),
        "{log}"
    );
    assert!(!log.contains(&secret) && !log.contains(STATUS_TOKEN) && !log.contains(GIT_PASSWORD));
    drop(f.work);
}

#[tokio::test]
async fn a_failing_pipeline_reports_failure_and_github_and_gitlab_shapes_work() {
    let f = Fixture::new().await;
    let secret = f.add_repo("github", &[]);
    let sha = commit(&f.tree, &f.server, &[(".capstan.yaml", FAILING)], "broken");
    let body = push_payload(Forge::Github, &f.url(), "refs/heads/main", ZERO, &sha);
    // The forge's first answers are errors: the poster retries.
    f.status.answer_next(&[503, 502]);
    let (code, v) = f.hook(Forge::Github, "gh-1", &secret, &body);
    assert_eq!(code, 202, "{v}");
    let run = f
        .cluster
        .wait_done(&run_id(&v), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(run_state(&run), RunState::Failed);
    let posted = f.statuses(&sha, 4).await;
    assert_eq!(posted[0].path, format!("/repos/demo/app/statuses/{sha}"));
    assert_eq!(
        posted[0].header("authorization"),
        Some(&*format!("Bearer {STATUS_TOKEN}"))
    );
    let states: Vec<_> = posted
        .iter()
        .map(|p| p.body["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states,
        ["pending", "pending", "pending", "failure"],
        "two 5xx retried"
    );
    assert!(
        posted[3].body["description"]
            .as_str()
            .unwrap()
            .contains("check"),
        "{:?}",
        posted[3].body
    );

    // GitLab: its token header, its path and state names.
    let out = f.cluster.cli(&["repo", "remove", "app"]);
    assert!(out.status.success(), "{out:?}");
    let secret = f.add_repo("gitlab", &[]);
    let sha = commit(&f.tree, &f.server, &[(".capstan.yaml", GOOD)], "fixed");
    git(
        &f.tree,
        &[
            "push",
            "-q",
            &f.server.url_with_auth("demo/app"),
            "HEAD:release/1",
        ],
    );
    let body = push_payload(Forge::Gitlab, &f.url(), "refs/heads/release/1", ZERO, &sha);
    let (code, v) = f.hook(Forge::Gitlab, "gl-1", "wrong", &body);
    assert_eq!(code, 401, "{v}");
    let (code, v) = f.hook(Forge::Gitlab, "gl-1", &secret, &body);
    assert_eq!(code, 202, "{v}");
    let run = f
        .cluster
        .wait_done(&run_id(&v), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(run_state(&run), RunState::Succeeded);
    // pending, maybe running, then success: each is posted by the run's
    // watch, so the last one may still be on its way.
    let posted = f
        .statuses_until(&sha, "a success status", |s| {
            s.last().is_some_and(|r| r.body["state"] == "success")
        })
        .await;
    assert!(posted.len() >= 2, "{posted:#?}");
    assert_eq!(
        posted[0].path,
        format!("/api/v4/projects/demo%2Fapp/statuses/{sha}")
    );
    assert_eq!(posted[0].header("private-token"), Some(STATUS_TOKEN));
    assert_eq!(posted[0].body["name"], "capstan/app-ci");
    assert_eq!(posted.last().unwrap().body["state"], "success");
}

#[tokio::test]
async fn every_refused_webhook_has_its_status_and_queues_nothing() {
    let f = Fixture::new().await;
    let secret = f.add_repo("gitea", &[]);
    let good = commit(&f.tree, &f.server, &[(".capstan.yaml", GOOD)], "good");
    let hook = |delivery: &str, body: &str| f.hook(Forge::Gitea, delivery, &secret, body);
    let payload =
        |git_ref: &str, after: &str| push_payload(Forge::Gitea, &f.url(), git_ref, ZERO, after);

    let (code, v) = hook("m-1", "{not json");
    assert_eq!(code, 400, "{v}");
    let other = push_payload(
        Forge::Gitea,
        "http://127.0.0.1:1/nobody/else.git",
        "refs/heads/main",
        ZERO,
        &good,
    );
    let (code, v) = hook("m-2", &other);
    assert_eq!(code, 404, "{v}");
    let (code, v) = hook("m-3", &payload("refs/heads/feature/x", &good));
    assert_eq!(code, 202, "{v}");
    assert!(v["message"].as_str().unwrap().starts_with("ignored"), "{v}");
    let (code, v) = hook(
        "m-4",
        &push_payload(Forge::Gitea, &f.url(), "refs/heads/main", &good, ZERO),
    );
    assert_eq!(
        (code, v["message"].as_str().unwrap().contains("deleted")),
        (202, true),
        "{v}"
    );
    let (code, v) = hook("", &payload("refs/heads/main", &good));
    assert_eq!(code, 400, "{v}");
    let missing = commit(&f.tree, &f.server, &[], "no pipeline");
    git(&f.tree, &["rm", "-q", ".capstan.yaml"]);
    let missing_file = commit(&f.tree, &f.server, &[], "pipeline removed");
    let (code, v) = hook("m-5", &payload("refs/heads/main", &missing_file));
    assert_eq!(code, 422, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("has no file .capstan.yaml"),
        "{v}"
    );
    let invalid = commit(
        &f.tree,
        &f.server,
        &[(
            ".capstan.yaml",
            "version: 1\nname: app-ci\ntasks:\n  t:\n    stepz: []\n",
        )],
        "invalid",
    );
    let (code, v) = hook("m-6", &payload("refs/heads/main", &invalid));
    assert_eq!(code, 422, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains(".capstan.yaml:5:"),
        "{v}"
    );
    let posted = f.statuses(&invalid, 1).await;
    assert_eq!(posted[0].body["state"], "failure");
    assert!(
        posted[0].body["description"]
            .as_str()
            .unwrap()
            .contains("stepz"),
        "{:?}",
        posted[0].body
    );
    let _ = missing;
    assert!(f.runs().await.is_empty(), "nothing was queued");
    // A ping answers; another event is ignored.
    let (code, _) = capstan_tests::forge_api::post(
        f.cluster.replicas[0].http,
        "/hooks/github",
        &[("X-GitHub-Event", "ping".into())],
        "{}",
    )
    .unwrap();
    assert_eq!(code, 200);
    // Every answer was a log line.
    let log = f.cluster.process_log("coordinator");
    for status in ["status=400", "status=404", "status=422", "status=202"] {
        assert!(log.contains(status), "{status} missing in\n{log}");
    }
    // repo list shows no secret; remove makes the webhook unknown.
    let out = f.cluster.cli(&["-o", "json", "repo", "list"]);
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(
        listed.contains("\"name\": \"app\"") || listed.contains("\"name\":\"app\""),
        "{listed}"
    );
    assert!(
        !listed.contains(&secret)
            && !listed.contains(STATUS_TOKEN)
            && !listed.contains(GIT_PASSWORD),
        "{listed}"
    );
    assert!(f.cluster.cli(&["repo", "remove", "app"]).status.success());
    let (code, v) = hook("m-7", &payload("refs/heads/main", &good));
    assert_eq!(code, 404, "{v}");
    // Counted by result: 400, 404, 400, 422, 422, 404 refused; two 202s
    // and the ping accepted; one failure status posted.
    let count = |result: &str| counted(&f, "capstan_webhook_deliveries_total", result);
    assert_eq!(
        (count("refused"), count("accepted"), count("failed")),
        (6.0, 3.0, 0.0)
    );
    assert_eq!(counted(&f, "capstan_commit_statuses_total", "posted"), 1.0);
    // Without an admin token the API refuses.
    let out = f.cluster.cli_with_token(None, &["repo", "list"]);
    assert!(!out.status.success());
}

#[tokio::test]
async fn a_forge_outage_never_holds_a_run_and_is_given_up_after_the_bound() {
    let f = Fixture::new().await;
    let secret = f.add_repo("gitea", &[]);
    let sha = commit(
        &f.tree,
        &f.server,
        &[(".capstan.yaml", GOOD)],
        "during an outage",
    );
    // Five 503s: the pending status is tried 5 times (0.5+1+2+4 s apart),
    // then given up; a 401 for the next is not retried.
    f.status.answer_next(&[503, 503, 503, 503, 503, 401]);
    let body = push_payload(Forge::Gitea, &f.url(), "refs/heads/main", ZERO, &sha);
    let started = std::time::Instant::now();
    let (code, v) = f.hook(Forge::Gitea, "o-1", &secret, &body);
    assert_eq!(code, 202, "{v}");
    let run = f
        .cluster
        .wait_done(&run_id(&v), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(run_state(&run), RunState::Succeeded);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the run waited for the forge: {:?}",
        started.elapsed()
    );
    let posted = f.statuses(&sha, 6).await;
    let states: Vec<_> = posted
        .iter()
        .map(|p| p.body["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states,
        ["pending"; 5]
            .iter()
            .chain(&["success"])
            .copied()
            .collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        f.status.requests().len(),
        6,
        "the refused status was not retried"
    );
    let log = f.cluster.process_log("coordinator");
    assert!(log.contains("giving up on the commit status"), "{log}");
    assert!(log.contains("the forge refused the commit status"), "{log}");
    let count = |result: &str| counted(&f, "capstan_commit_statuses_total", result);
    assert_eq!(
        (count("failed"), count("refused"), count("posted")),
        (1.0, 1.0, 0.0),
        "the pending status given up, the success refused"
    );
    assert_eq!(
        counted(&f, "capstan_webhook_deliveries_total", "accepted"),
        1.0
    );
}

#[tokio::test]
async fn schedules_in_the_pipeline_file_start_runs_after_the_push() {
    let f = Fixture::new().await;
    let secret = f.add_repo("gitea", &[]);
    let yaml = format!("{GOOD}schedules:\n  - cron: \"*/2 * * * * *\"\n");
    let sha = commit(&f.tree, &f.server, &[(".capstan.yaml", &yaml)], "nightly");
    let body = push_payload(Forge::Gitea, &f.url(), "refs/heads/main", ZERO, &sha);
    let (code, v) = f.hook(Forge::Gitea, "s-1", &secret, &body);
    assert_eq!(code, 202, "{v}");
    let scheduled = poll_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        async || {
            let runs = f.runs().await;
            let done: Vec<_> = runs
                .into_iter()
                .filter(|r| r.submitted_by == "schedule:app" && run_state(r) == RunState::Succeeded)
                .collect();
            Ok((done.len() >= 2).then_some(done))
        },
    )
    .await
    .unwrap()
    .unwrap_or_else(|| panic!("no scheduled runs\n{}", f.cluster.all_logs()));
    for r in &scheduled {
        assert_eq!(r.rev, sha);
    }
    assert!(f.cluster.cli(&["repo", "remove", "app"]).status.success());
}
