//! GitOps write-back end to end: `set-image` and `git-push` against a real
//! git smart-HTTP server with basic auth, the registry with auth and the
//! Docker Engine of `scripts/testbed up`. Results are checked from outside
//! Capstan: the registry's HTTP API and the bare repositories on disk.
//! These tests fail (never skip) when the test bed is missing.

use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::git_server::{GitServer, git};
use capstan_tests::ssh_server::{SshServer, keygen};
use capstan_tests::testbed::{Cleanup, Testbed, registry_get, remove_image, testbed};
use capstan_tests::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const GIT_USER: &str = "capstan-bot";
const GIT_PASSWORD: &str = "gitops-token-5150";
const BOT: &str = "Capstan Bot <capstan@localhost>";

/// Removes a local image when dropped (the runner's build leaves it).
struct ImageCleanup(Vec<String>);

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        for image in &self.0 {
            remove_image(image);
        }
    }
}

/// Raw bytes of `rev:path` in a bare repository.
fn show(bare: &Path, rev: &str, path: &str) -> Vec<u8> {
    let out = Command::new("git")
        .args(["--git-dir", &bare.display().to_string()])
        .args(["show", &format!("{rev}:{path}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "git show {rev}:{path}: {out:?}");
    out.stdout
}

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/gitops")
        .join(path)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A work tree pushed to `repo` on the server; returns the work tree path.
fn seed_repo(server: &GitServer, work: &Path, repo: &str, files: &[(&str, &[u8])]) -> PathBuf {
    server.create_repo(repo).unwrap();
    let dir = work.join(format!("seed-{}", repo.replace('/', "-")));
    std::fs::create_dir_all(&dir).unwrap();
    git(&dir, &["init", "-q"]);
    for (path, bytes) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    commit_and_push(server, &dir, repo, "seed");
    dir
}

fn commit_and_push(server: &GitServer, dir: &Path, repo: &str, message: &str) -> String {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", message]);
    git(
        dir,
        &["push", "-q", &server.url_with_auth(repo), "HEAD:main"],
    );
    git(dir, &["rev-parse", "HEAD"])
}

fn bare(server: &GitServer, repo: &str) -> PathBuf {
    server.root().join(format!("{repo}.git"))
}

fn head(server: &GitServer, repo: &str) -> String {
    git(&bare(server, repo), &["rev-parse", "main"])
}

/// A git server, a secrets file with the registry login and a right and a
/// wrong git login, and a unique image repository name.
struct Fixture {
    tb: Testbed,
    cleanup: Cleanup,
    work: tempfile::TempDir,
    server: GitServer,
    secrets: String,
    /// `capstan-e2e/gitops-<test>-<pid>`
    name: String,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let tb = testbed();
        let work = tempfile::tempdir().unwrap();
        let secrets = work.path().join("secrets.toml");
        std::fs::write(
            &secrets,
            format!(
                "registry = {{ username = \"{}\", password = \"{}\" }}\n\
                 gitops = {{ username = \"{GIT_USER}\", password = \"{GIT_PASSWORD}\" }}\n\
                 gitops-wrong = {{ username = \"{GIT_USER}\", password = \"not-the-token\" }}\n",
                tb.user, tb.password
            ),
        )
        .unwrap();
        Self {
            cleanup: Cleanup::new(test),
            server: GitServer::start(GIT_USER, GIT_PASSWORD).unwrap(),
            secrets: secrets.display().to_string(),
            name: format!("capstan-e2e/gitops-{test}-{}", std::process::id()),
            tb,
            work,
        }
    }

    fn image(&self) -> String {
        format!("{}/{}", self.tb.registry, self.name)
    }

    async fn cluster(&self, executor: &str, runners: usize) -> anyhow::Result<TestCluster> {
        self.cluster_with(&self.secrets, executor, runners).await
    }

    async fn cluster_with(
        &self,
        secrets: &str,
        executor: &str,
        runners: usize,
    ) -> anyhow::Result<TestCluster> {
        let label = self.cleanup.label();
        TestCluster::builder()
            .executor(executor)
            .runners(runners)
            .runner_args(&[
                "--secrets-file",
                secrets,
                "--git-credentials",
                "gitops",
                "--docker-labels",
                &label,
            ])
            .start()
            .await
    }

    /// The sample app of examples/gitops/app as repository `demo/app`;
    /// returns its work tree and first commit.
    fn source_repo(&self) -> (PathBuf, String) {
        let dir = self.work.path().join("app");
        copy_tree(&example("app"), &dir);
        self.server.create_repo("demo/app").unwrap();
        git(&dir, &["init", "-q"]);
        // The message names the test: two tests committing the same tree in
        // one second would get one SHA, so one image, which the first to
        // finish removes under the other.
        let message = format!("sample app for {}", self.name);
        let sha = commit_and_push(&self.server, &dir, "demo/app", &message);
        (dir, sha)
    }

    /// examples/gitops/manifests as `demo/manifests`, pointing at `<image>:old`.
    fn manifests_repo(&self) -> Vec<u8> {
        let pod = std::fs::read_to_string(example("manifests/k8s/pod.yaml"))
            .unwrap()
            .replace(
                "127.0.0.1:5000/demo/sampleapp:initial",
                &format!("{}:old", self.image()),
            );
        seed_repo(
            &self.server,
            self.work.path(),
            "demo/manifests",
            &[("k8s/pod.yaml", pod.as_bytes())],
        );
        pod.into_bytes()
    }
}

async fn submit(
    c: &TestCluster,
    yaml: &str,
    params: &[(&str, &str)],
    repo: &str,
    rev: &str,
) -> anyhow::Result<String> {
    Ok(c.client()
        .await?
        .submit_run(api::SubmitRunRequest {
            pipeline_yaml: yaml.to_owned(),
            file_name: "pipeline.yaml".into(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            repo: repo.to_owned(),
            rev: rev.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id)
}

async fn logs(c: &TestCluster, id: &str, tasks: &[&str]) -> String {
    let mut out = String::new();
    for t in tasks {
        let log = c.task_log(id, t).await.unwrap_or_default();
        out.push_str(&format!("--- {t} ---\n{}", String::from_utf8_lossy(&log)));
    }
    out
}

/// The seed pipeline (examples/gitops/pipeline.yaml) for one commit: unit
/// test, lint, build and push `<repo>:<sha>`, set the image in the manifests
/// repository, commit and push as the bot.
#[tokio::test(flavor = "multi_thread")]
async fn seed_pipeline_end_to_end() -> anyhow::Result<()> {
    let f = Fixture::new("seed");
    let image = f.image();
    let (_, sha) = f.source_repo();
    let old_pod = f.manifests_repo();
    let old_head = head(&f.server, "demo/manifests");
    let _images = ImageCleanup(vec![format!("{image}:{sha}")]);
    let c = f.cluster("docker", 1).await?;
    let pipeline = std::fs::read_to_string(example("pipeline.yaml"))?;
    let manifests = f.server.url("demo/manifests");
    let id = submit(
        &c,
        &pipeline,
        &[
            ("image", &image),
            ("manifests", &manifests),
            ("base", &f.tb.image),
        ],
        &f.server.url("demo/app"),
        &sha,
    )
    .await?;
    let run = c.wait_done(&id, Duration::from_secs(120)).await?;
    let log = logs(&c, &id, &["unit-test", "lint", "image", "deploy"]).await;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{run:#?}\n{log}\n{}",
        c.all_logs()
    );
    assert!(log.contains("ok   greets by name"), "{log}");
    assert!(log.contains("lint: clean"), "{log}");

    // The registry has <repo>:<sha>, and the manifest is pinned to the
    // digest it serves (`pin: digest`, from the image task's push).
    let digest = registry_digest(&f, &sha);
    let pinned = format!("{image}:{sha}@{digest}");

    // The manifests repository's new head changes exactly the image line.
    let new_head = head(&f.server, "demo/manifests");
    assert_ne!(new_head, old_head, "{log}");
    let manifests_bare = bare(&f.server, "demo/manifests");
    assert_eq!(
        git(&manifests_bare, &["rev-parse", &format!("{new_head}^")]),
        old_head
    );
    assert_eq!(
        git(
            &manifests_bare,
            &["diff", "--name-only", &old_head, &new_head]
        ),
        "k8s/pod.yaml"
    );
    let old_text = String::from_utf8(old_pod)?;
    let old_ref = format!("{image}:old");
    assert_eq!(old_text.matches(&old_ref).count(), 1);
    let expected = old_text.replace(&old_ref, &pinned);
    let new_pod = show(&manifests_bare, &new_head, "k8s/pod.yaml");
    assert_eq!(String::from_utf8(new_pod)?, expected);
    assert_eq!(
        git(
            &manifests_bare,
            &["log", "-1", "--format=%an <%ae>|%cn <%ce>|%s"]
        ),
        format!("{BOT}|{BOT}|deploy sampleapp {sha}")
    );

    // The pushed commit is on the task.
    let outputs = &task(&run, "deploy").outputs;
    assert_eq!(outputs.get("commit"), Some(&new_head), "{outputs:?}");
    assert_eq!(outputs.get("repo"), Some(&manifests), "{outputs:?}");
    assert!(
        log.contains(&format!(
            "image: {image}:old # bumped by CI -> image: {pinned} # bumped by CI"
        )),
        "{log}"
    );
    // The git password never reaches the logs.
    assert!(!log.contains(GIT_PASSWORD), "{log}");
    Ok(())
}

/// The digest the registry serves for `<name>:<tag>`.
fn registry_digest(f: &Fixture, tag: &str) -> String {
    let (code, resp) = registry_get(&f.tb, &format!("/v2/{}/manifests/{tag}", f.name));
    assert_eq!(code, 200, "{resp}");
    resp.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("docker-content-digest")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no Docker-Content-Digest in {resp}"))
}

/// One commit, one digest: a second run of the same commit finds
/// `<image>:<sha>` in the registry and skips its build and push, keeping
/// the digest (the registry's, checked through its API); with
/// `skip-if-exists: false` both run again.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_commit_twice_keeps_one_digest() -> anyhow::Result<()> {
    let f = Fixture::new("twice");
    let image = f.image();
    let (_, sha) = f.source_repo();
    let _images = ImageCleanup(vec![format!("{image}:{sha}")]);
    let c = f.cluster("docker", 1).await?;
    let pipeline = |extra: &str| {
        format!(
            "version: 1\nname: twice\ntasks:\n  image:\n    steps:\n      \
             - build: {{ context: ., tag: \"{image}:{sha}\"{extra} }}\n      \
             - push: {{ image: \"{image}:{sha}\", credentials: registry{extra} }}\n"
        )
    };
    let mut digests = Vec::new();
    let mut logs_of = Vec::new();
    for extra in ["", "", ", skip-if-exists: false"] {
        let id = submit(&c, &pipeline(extra), &[], &f.server.url("demo/app"), &sha).await?;
        let run = c.wait_done(&id, Duration::from_secs(120)).await?;
        let log = logs(&c, &id, &["image"]).await;
        assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
        let digest = task(&run, "image").outputs.get("digest").cloned();
        let digest = digest.unwrap_or_else(|| panic!("no digest output: {run:#?}"));
        assert_eq!(registry_digest(&f, &sha), digest, "{log}");
        digests.push(digest);
        logs_of.push(log);
    }
    let pushed = format!("pushed {image}:{sha}@");
    assert!(logs_of[0].contains(&pushed), "{}", logs_of[0]);
    assert!(!logs_of[0].contains("skipped"), "{}", logs_of[0]);
    for verb in ["build", "push"] {
        assert!(
            logs_of[1].contains(&format!(
                "{image}:{sha} is already in {} as {}: {verb} skipped",
                f.tb.registry, digests[0]
            )),
            "{}",
            logs_of[1]
        );
    }
    assert!(!logs_of[1].contains(&pushed), "{}", logs_of[1]);
    assert_eq!(digests[1], digests[0], "one commit, one digest");
    // Forced: built and pushed again.
    assert!(logs_of[2].contains(&pushed), "{}", logs_of[2]);
    assert!(!logs_of[2].contains("skipped"), "{}", logs_of[2]);
    Ok(())
}

/// A failing unit test stops the pipeline before any image or commit.
#[tokio::test(flavor = "multi_thread")]
async fn failed_unit_test_makes_no_image_and_no_commit() -> anyhow::Result<()> {
    let f = Fixture::new("failing");
    let image = f.image();
    let (dir, _) = f.source_repo();
    let app = std::fs::read_to_string(dir.join("app.sh"))?;
    std::fs::write(
        dir.join("app.sh"),
        app.replace("'hello, %s\\n'", "'hi, %s\\n'"),
    )?;
    let sha = commit_and_push(&f.server, &dir, "demo/app", "break the greeting");
    f.manifests_repo();
    let old_head = head(&f.server, "demo/manifests");
    let _images = ImageCleanup(vec![format!("{image}:{sha}")]);
    let c = f.cluster("docker", 1).await?;
    let pipeline = std::fs::read_to_string(example("pipeline.yaml"))?;
    let id = submit(
        &c,
        &pipeline,
        &[
            ("image", &image),
            ("manifests", &f.server.url("demo/manifests")),
            ("base", &f.tb.image),
        ],
        &f.server.url("demo/app"),
        &sha,
    )
    .await?;
    let run = c.wait_done(&id, Duration::from_secs(120)).await?;
    let log = logs(&c, &id, &["unit-test"]).await;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}\n{log}");
    assert_eq!(task_state(&run, "unit-test"), TaskState::Failed, "{log}");
    assert!(log.contains("FAIL greets by name"), "{log}");
    assert_eq!(task_state(&run, "image"), TaskState::Skipped);
    assert_eq!(task_state(&run, "deploy"), TaskState::Skipped);
    let (code, resp) = registry_get(&f.tb, &format!("/v2/{}/manifests/{sha}", f.name));
    assert_eq!(code, 404, "{resp}");
    assert_eq!(head(&f.server, "demo/manifests"), old_head);
    Ok(())
}

const BUMP: &str = r#"
version: 1
name: bump
params:
  manifests: unset
  image: unset
  file: unset
  base: unset
  credentials: gitops
tasks:
  deploy:
    image: ${{ params.base }}
    steps:
      - set-image: { repo: "${{ params.manifests }}", files: ["${{ params.file }}"], image: "${{ params.image }}" }
      - run: sleep 2
      - git-push: { message: "bump ${{ params.file }} to ${{ params.image }}", credentials: "${{ params.credentials }}" }
"#;

fn pod(image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\nspec:\n  containers:\n    - name: x\n      image: {image}:old # pinned\n"
    )
}

/// Two runs on two runners clone the same manifests repository, edit
/// different files and push at about the same time (each waits 2 s between
/// its edit and its push): the second push is rejected, fetched, re-applied
/// and pushed; both commits land, one after the other, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn racing_pushes_both_land_in_order() -> anyhow::Result<()> {
    let f = Fixture::new("race");
    let image = f.image();
    let (a, b) = (pod(&image), pod(&image));
    seed_repo(
        &f.server,
        f.work.path(),
        "demo/manifests",
        &[("k8s/a.yaml", a.as_bytes()), ("k8s/b.yaml", b.as_bytes())],
    );
    let seed = head(&f.server, "demo/manifests");
    let c = f.cluster("docker", 2).await?;
    c.wait_runners_connected(2, Duration::from_secs(20)).await?;
    let manifests = f.server.url("demo/manifests");
    let mut ids = Vec::new();
    for file in ["a", "b"] {
        let id = submit(
            &c,
            BUMP,
            &[
                ("manifests", &manifests),
                ("file", &format!("k8s/{file}.yaml")),
                ("image", &format!("{image}:{file}")),
                ("base", &f.tb.image),
            ],
            "",
            "",
        )
        .await?;
        ids.push(id);
    }
    let mut runs = Vec::new();
    let mut all = String::new();
    for id in &ids {
        let run = c.wait_done(id, Duration::from_secs(60)).await?;
        let log = logs(&c, id, &["deploy"]).await;
        assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
        all.push_str(&log);
        runs.push(run);
    }
    let bare = bare(&f.server, "demo/manifests");
    // Both commits, one on top of the other, on top of the seed.
    let history = git(&bare, &["log", "--format=%H %s", "main"]);
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 3, "{history}\n{all}");
    assert!(lines[2].starts_with(&seed), "{history}");
    let commits: Vec<&str> = runs
        .iter()
        .map(|r| task(r, "deploy").outputs["commit"].as_str())
        .collect();
    let mut landed: Vec<&str> = lines[..2]
        .iter()
        .map(|l| l.split_once(' ').unwrap().0)
        .collect();
    landed.sort_unstable();
    let mut reported = commits.clone();
    reported.sort_unstable();
    assert_eq!(landed, reported, "{history}");
    // No lost update: both edits are in the final tree.
    assert_eq!(
        String::from_utf8(show(&bare, "main", "k8s/a.yaml"))?,
        a.replace(":old", ":a")
    );
    assert_eq!(
        String::from_utf8(show(&bare, "main", "k8s/b.yaml"))?,
        b.replace(":old", ":b")
    );
    // They really raced: the later one re-applied its edit on the new head.
    assert!(all.contains("re-applying the edit"), "{all}");
    Ok(())
}

/// `order: monotonic`: after a run of a newer commit, a run of its parent
/// makes no commit ("newer image already deployed"); a line with a
/// `# capstan: pin` comment is never touched.
#[tokio::test(flavor = "multi_thread")]
async fn monotonic_order_keeps_the_newer_image_and_pins_hold() -> anyhow::Result<()> {
    let f = Fixture::new("monotonic");
    let image = f.image();
    let src = seed_repo(
        &f.server,
        f.work.path(),
        "demo/src",
        &[("README", b"one\n")],
    );
    let older = git(&src, &["rev-parse", "HEAD"]);
    std::fs::write(src.join("README"), "two\n")?;
    let newer = commit_and_push(&f.server, &src, "demo/src", "newer");
    let pinned = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: y\nspec:\n  containers:\n    - name: y\n      image: {image}:rollback # capstan: pin\n"
    );
    seed_repo(
        &f.server,
        f.work.path(),
        "demo/manifests",
        &[
            ("k8s/a.yaml", pod(&image).as_bytes()),
            ("k8s/b.yaml", pinned.as_bytes()),
        ],
    );
    let c = f.cluster("shell", 1).await?;
    let yaml = format!(
        "version: 1\nname: mono\ntasks:\n  deploy:\n    steps:\n      \
         - set-image: {{ repo: \"{}\", files: [k8s/a.yaml, k8s/b.yaml], image: \"{image}:${{{{ git.sha }}}}\", order: monotonic }}\n      \
         - git-push: {{ message: \"deploy ${{{{ git.sha }}}}\", credentials: gitops }}\n",
        f.server.url("demo/manifests")
    );
    let src_url = f.server.url("demo/src");
    let mut logs_of = Vec::new();
    let mut heads = Vec::new();
    for rev in [&newer, &older] {
        let id = submit(&c, &yaml, &[], &src_url, rev).await?;
        let run = c.wait_done(&id, Duration::from_secs(60)).await?;
        let log = logs(&c, &id, &["deploy"]).await;
        assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
        logs_of.push(log);
        heads.push(head(&f.server, "demo/manifests"));
    }
    let bare = bare(&f.server, "demo/manifests");
    let a = String::from_utf8(show(&bare, "main", "k8s/a.yaml"))?;
    assert!(
        a.contains(&format!("image: {image}:{newer} # pinned")),
        "{a}"
    );
    assert_eq!(
        String::from_utf8(show(&bare, "main", "k8s/b.yaml"))?,
        pinned
    );
    for log in &logs_of {
        assert!(
            log.contains("k8s/b.yaml:8: left")
                && log.contains("pinned by its `# capstan: pin` comment"),
            "{log}"
        );
    }
    assert_eq!(
        heads[0], heads[1],
        "the older commit made no commit: {}",
        logs_of[1]
    );
    assert!(
        logs_of[1].contains("newer image already deployed")
            && logs_of[1].contains(&format!("built from {newer}")),
        "{}",
        logs_of[1]
    );
    assert!(logs_of[1].contains("already up to date"), "{}", logs_of[1]);
    Ok(())
}

/// The manifests live in the source repository (`set-image` without `repo`),
/// shell executor: a push with the right token lands on `main`; one with a
/// wrong token fails the task with a clear error and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn source_repo_write_back_and_rejected_push() -> anyhow::Result<()> {
    let f = Fixture::new("mono");
    let image = f.image();
    let pod_text = pod(&image);
    let dir = seed_repo(
        &f.server,
        f.work.path(),
        "demo/mono",
        &[
            ("k8s/pod.yaml", pod_text.as_bytes()),
            ("README", b"app and manifests\n"),
        ],
    );
    let sha = git(&dir, &["rev-parse", "HEAD"]);
    let url = f.server.url("demo/mono");
    let c = f.cluster("shell", 1).await?;
    let yaml = BUMP
        .replace("      - run: sleep 2\n", "")
        // No `repo`: the run's own repository.
        .replace("repo: \"${{ params.manifests }}\", ", "");
    assert!(!yaml.contains("repo:"), "{yaml}");
    let run_with = |image: String, credentials: &'static str| {
        let (c, yaml, url, sha) = (&c, &yaml, &url, &sha);
        async move {
            let params = [
                ("file", "k8s/pod.yaml"),
                ("image", image.as_str()),
                ("credentials", credentials),
            ];
            let id = submit(c, yaml, &params, url, sha).await?;
            let run = c.wait_done(&id, Duration::from_secs(60)).await?;
            let log = logs(c, &id, &["deploy"]).await;
            anyhow::Ok((run, log))
        }
    };

    let (run, log) = run_with(format!("{image}:v1"), "gitops").await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("editing the run's checkout"), "{log}");
    let new_head = head(&f.server, "demo/mono");
    assert_eq!(
        git(&bare(&f.server, "demo/mono"), &["rev-parse", "main^"]),
        sha
    );
    assert_eq!(task(&run, "deploy").outputs.get("commit"), Some(&new_head));
    assert_eq!(
        String::from_utf8(show(&bare(&f.server, "demo/mono"), "main", "k8s/pod.yaml"))?,
        pod_text.replace(":old", ":v1")
    );

    let (run, log) = run_with(format!("{image}:v2"), "gitops-wrong").await?;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}\n{log}");
    let expected = format!(
        "git push to {url} rejected: authentication failed; check the secret `gitops-wrong`"
    );
    let message = &task(&run, "deploy").message;
    assert!(message.contains(&expected), "{message}\n{log}");
    assert!(log.contains(&expected), "{log}");
    assert!(!log.contains("not-the-token"), "{log}");
    assert_eq!(head(&f.server, "demo/mono"), new_head, "nothing was pushed");
    Ok(())
}

/// A second run with the image the manifests already hold makes no commit.
#[tokio::test(flavor = "multi_thread")]
async fn already_up_to_date_makes_no_commit() -> anyhow::Result<()> {
    let f = Fixture::new("uptodate");
    let image = f.image();
    seed_repo(
        &f.server,
        f.work.path(),
        "demo/manifests",
        &[("k8s/pod.yaml", pod(&image).as_bytes())],
    );
    let c = f.cluster("shell", 1).await?;
    let yaml = BUMP.replace("      - run: sleep 2\n", "");
    let manifests = f.server.url("demo/manifests");
    let new_image = format!("{image}:v1");
    let params = [
        ("manifests", manifests.as_str()),
        ("file", "k8s/pod.yaml"),
        ("image", new_image.as_str()),
        ("base", f.tb.image.as_str()),
    ];
    let mut heads = Vec::new();
    let mut last_log = String::new();
    for _ in 0..2 {
        let id = submit(&c, &yaml, &params, "", "").await?;
        let run = c.wait_done(&id, Duration::from_secs(60)).await?;
        let log = logs(&c, &id, &["deploy"]).await;
        assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
        let h = head(&f.server, "demo/manifests");
        assert_eq!(
            task(&run, "deploy").outputs.get("commit"),
            Some(&h),
            "{log}"
        );
        heads.push(h);
        last_log = log;
    }
    assert_eq!(heads[0], heads[1], "{last_log}");
    assert!(last_log.contains("already up to date"), "{last_log}");
    let count = git(
        &bare(&f.server, "demo/manifests"),
        &["rev-list", "--count", "main"],
    );
    assert_eq!(count, "2", "seed plus one commit");
    Ok(())
}

/// `git-push` with `mode: pull-request` against the git server and the
/// recording forge stand-in (the manifests repository registered with
/// `--forge github`): the run's branch `capstan/<pipeline>/<sha>` is pushed,
/// `main` is untouched, the coordinator opens one pull request with the
/// registration's token, and a rerun of the same commit pushes nothing and
/// opens nothing new. An unregistered repository only gets the branch.
#[tokio::test(flavor = "multi_thread")]
async fn pull_request_mode_opens_one_pull_request_per_commit() -> anyhow::Result<()> {
    let f = Fixture::new("pr");
    let image = f.image();
    let src = seed_repo(&f.server, f.work.path(), "demo/src", &[("README", b"pr\n")]);
    let sha = git(&src, &["rev-parse", "HEAD"]);
    for repo in ["demo/manifests", "demo/unregistered"] {
        seed_repo(
            &f.server,
            f.work.path(),
            repo,
            &[("k8s/pod.yaml", pod(&image).as_bytes())],
        );
    }
    let main = head(&f.server, "demo/manifests");
    let forge = capstan_tests::forge_api::Recorder::start()?;
    let c = f.cluster("shell", 1).await?;
    let manifests = f.server.url("demo/manifests");
    let api_url = forge.url();
    let out = c.cli(&[
        "repo",
        "add",
        "manifests",
        "--url",
        &manifests,
        "--forge",
        "github",
        "--api-url",
        &api_url,
        "--status-token",
        "pr-token-77",
    ]);
    assert!(out.status.success(), "{out:?}");
    let yaml = |repo: &str| {
        format!(
            "version: 1\nname: promote\ntasks:\n  deploy:\n    steps:\n      \
             - set-image: {{ repo: \"{repo}\", files: [k8s/pod.yaml], image: \"{image}:${{{{ git.sha }}}}\" }}\n      \
             - git-push: {{ message: \"deploy ${{{{ git.sha }}}}\", credentials: gitops, mode: pull-request }}\n"
        )
    };
    let branch = format!("capstan/promote/deploy/{sha}");
    let src_url = f.server.url("demo/src");
    let mut pushed = Vec::new();
    for round in 0..2 {
        let id = submit(&c, &yaml(&manifests), &[], &src_url, &sha).await?;
        let run = c.wait_done(&id, Duration::from_secs(60)).await?;
        let log = logs(&c, &id, &["deploy"]).await;
        assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
        let outputs = &task(&run, "deploy").outputs;
        assert_eq!(outputs.get("branch"), Some(&branch), "{log}");
        assert_eq!(
            outputs.get("pull-request").map(String::as_str),
            Some("https://forge.test/pull/1"),
            "{log}"
        );
        let verb = ["pull request opened", "pull request already open:"][round];
        assert!(log.contains(verb), "{log}");
        pushed.push(git(
            &bare(&f.server, "demo/manifests"),
            &["rev-parse", &branch],
        ));
    }
    assert_eq!(pushed[0], pushed[1], "the rerun pushed nothing new");
    assert_eq!(head(&f.server, "demo/manifests"), main, "main untouched");
    let pod_on_branch = String::from_utf8(show(
        &bare(&f.server, "demo/manifests"),
        &branch,
        "k8s/pod.yaml",
    ))?;
    assert!(
        pod_on_branch.contains(&format!("{image}:{sha}")),
        "{pod_on_branch}"
    );
    let requests = forge.requests();
    let creates: Vec<_> = requests.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(creates.len(), 1, "{requests:#?}");
    assert_eq!(creates[0].path, "/repos/demo/manifests/pulls");
    assert_eq!(creates[0].body["head"], branch.as_str());
    assert_eq!(creates[0].body["base"], "main");
    assert_eq!(creates[0].body["title"], format!("deploy {sha}").as_str());
    assert!(
        requests
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer pr-token-77")),
        "{requests:#?}"
    );
    assert_eq!(
        requests.iter().filter(|r| r.method == "GET").count(),
        2,
        "{requests:#?}"
    );
    let scrape = c.http_get("/metrics").map(|(_, b)| b).unwrap_or_default();
    let samples = capstan_tests::metrics::samples(&scrape);
    assert_eq!(
        samples.get("capstan_pull_requests_total{result=\"opened\"}"),
        Some(&1.0)
    );
    assert_eq!(
        samples.get("capstan_pull_requests_total{result=\"existing\"}"),
        Some(&1.0)
    );

    // The forge refuses the token: the task fails saying what to check.
    forge.answer_next(&[401]);
    let id = submit(&c, &yaml(&manifests), &[], &src_url, &sha).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let message = task(&run, "deploy").message.clone();
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}");
    assert!(
        message.contains("the forge refused to look for a pull request for `manifests` (HTTP 401")
            && message.contains("--status-token"),
        "{message}"
    );
    // Only a runner holding a live attempt may ask, and only for capstan/.
    use capstan_proto::runner::v1 as rpb;
    let mut fc = rpb::forge_service_client::ForgeServiceClient::new(c.channel_to(&c.url()).await?);
    let ask = |attempt: &str, head: &str| rpb::OpenPullRequestRequest {
        runner_id: "not-a-runner".into(),
        runner_secret: "guess".into(),
        attempt_id: attempt.into(),
        repo: manifests.clone(),
        head: head.into(),
        base: "main".into(),
        title: "t".into(),
        body: String::new(),
    };
    let attempt = task(&run, "deploy").attempt_id.clone();
    let before = forge.requests().len();
    for head in [branch.as_str(), "feature/x"] {
        let err = fc
            .open_pull_request(ask(&attempt, head))
            .await
            .expect_err("a stranger is refused");
        assert!(
            matches!(
                err.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ),
            "{err:?}"
        );
    }
    assert_eq!(
        forge.requests().len(),
        before,
        "no stranger reached the forge"
    );

    let other = f.server.url("demo/unregistered");
    let id = submit(&c, &yaml(&other), &[], &src_url, &sha).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let log = logs(&c, &id, &["deploy"]).await;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    assert!(
        log.contains(&format!("no forge is registered for {other}: open a pull request from {branch} into main by hand")),
        "{log}"
    );
    git(
        &bare(&f.server, "demo/unregistered"),
        &["rev-parse", &branch],
    );
    assert_eq!(forge.requests().len(), before, "no forge was asked");
    Ok(())
}

/// `git-push` (and the source checkout) over SSH with a key from a secret, the server checked against
/// the secret's `known_hosts`: a real sshd on loopback serves the manifests
/// repository. The right key and host key push the bump as the bot; a host
/// key that differs from the listed one, a host that is not listed, a key
/// the server does not accept and a password secret for an SSH URL each
/// fail the task with an error that says what to fix, and push nothing.
#[tokio::test(flavor = "multi_thread")]
async fn ssh_push_with_a_key_from_a_secret() -> anyhow::Result<()> {
    let f = Fixture::new("ssh");
    let image = f.image();
    let pod_text = pod(&image);
    seed_repo(
        &f.server,
        f.work.path(),
        "demo/manifests",
        &[("k8s/pod.yaml", pod_text.as_bytes())],
    );
    let seed = head(&f.server, "demo/manifests");
    let client = keygen(f.work.path(), "client")?;
    let stranger = keygen(f.work.path(), "stranger")?;
    let impostor = keygen(f.work.path(), "impostor")?;
    let sshd = SshServer::start(&client.public)?;
    let known = sshd.known_hosts();
    let port = sshd.addr().port();
    // The same host name with another key: what a changed (or spoofed) host looks like.
    let changed = format!(
        "[127.0.0.1]:{port} {}",
        impostor.public.rsplit_once(' ').unwrap().0
    );
    let key = |private: &str, known_hosts: &str| serde_json::json!({ "ssh_key": private, "known_hosts": known_hosts });
    let secrets = serde_json::json!({
        // The runner's --git-credentials (source checkouts): the SSH key.
        "gitops": key(&client.private, &known),
        "password": { "username": GIT_USER, "password": GIT_PASSWORD },
        "ssh-deploy": key(&client.private, &format!("# the loopback sshd\n{known}\n")),
        "ssh-changed": key(&client.private, &changed),
        "ssh-unknown": key(&client.private, &format!("[127.0.0.1]:{} {}", port + 1, known.split_once(' ').unwrap().1)),
        "ssh-stranger": key(&stranger.private, &known),
    });
    let secrets_path = f.work.path().join("ssh-secrets.json");
    std::fs::write(&secrets_path, serde_json::to_vec_pretty(&secrets)?)?;
    let c = f
        .cluster_with(&secrets_path.display().to_string(), "shell", 1)
        .await?;
    let url = sshd.url(&bare(&f.server, "demo/manifests"));
    let yaml = BUMP.replace("      - run: sleep 2\n", "");
    let run_with = |tag: &'static str, credentials: &'static str| {
        let (c, yaml, url, image) = (&c, &yaml, &url, &image);
        async move {
            let new_image = format!("{image}:{tag}");
            let params = [
                ("manifests", url.as_str()),
                ("file", "k8s/pod.yaml"),
                ("image", new_image.as_str()),
                ("base", "unused-by-the-shell-executor"),
                ("credentials", credentials),
            ];
            let id = submit(c, yaml, &params, "", "").await?;
            let run = c.wait_done(&id, Duration::from_secs(60)).await?;
            let log = logs(c, &id, &["deploy"]).await;
            anyhow::Ok((run, log))
        }
    };

    let failures = [
        (
            "ssh-changed",
            "host key check failed: the key [127.0.0.1]:PORT offers differs from the one in the secret's `known_hosts`",
        ),
        (
            "ssh-unknown",
            "host key check failed: [127.0.0.1]:PORT is not in the secret's `known_hosts`; add the output of `ssh-keyscan -p PORT 127.0.0.1`",
        ),
        (
            "ssh-stranger",
            "authentication failed; check the secret `ssh-stranger`",
        ),
        (
            "password",
            "secret `password` is a user name and password, but the remote is SSH",
        ),
    ];
    for (secret, expected) in failures {
        let expected = expected.replace("PORT", &port.to_string());
        let (run, log) = run_with("bad", secret).await?;
        assert_eq!(
            run_state(&run),
            RunState::Failed,
            "{secret}: {run:#?}\n{log}"
        );
        let message = &task(&run, "deploy").message;
        assert!(
            message.contains(&expected),
            "{secret}: {message}\n{log}\nsshd: {}",
            sshd.log()
        );
        assert_eq!(head(&f.server, "demo/manifests"), seed, "{secret} pushed");
    }

    // The source checkout goes over SSH too, with the runner's
    // --git-credentials secret.
    let id = submit(
        &c,
        "version: 1\nname: read\ntasks:\n  read:\n    steps: [ { run: 'cat k8s/pod.yaml' } ]\n",
        &[],
        &url,
        &seed,
    )
    .await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let log = logs(&c, &id, &["read"]).await;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    assert!(
        log.contains(&format!("checked out {url} at {seed}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("image: {image}:old # pinned")),
        "{log}"
    );

    let (run, log) = run_with("v1", "ssh-deploy").await?;
    assert_eq!(
        run_state(&run),
        RunState::Succeeded,
        "{run:#?}\n{log}\nsshd: {}",
        sshd.log()
    );
    let bare = bare(&f.server, "demo/manifests");
    let new_head = head(&f.server, "demo/manifests");
    assert_eq!(git(&bare, &["rev-parse", "main^"]), seed);
    assert_eq!(task(&run, "deploy").outputs.get("commit"), Some(&new_head));
    assert_eq!(
        String::from_utf8(show(&bare, "main", "k8s/pod.yaml"))?,
        pod_text.replace(":old", ":v1")
    );
    assert_eq!(
        git(&bare, &["log", "-1", "--format=%an <%ae>"]),
        BOT,
        "{log}"
    );
    // The session really went through sshd, with the key from the secret.
    assert!(
        sshd.log().contains("Accepted publickey"),
        "sshd: {}",
        sshd.log()
    );
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    Ok(())
}
