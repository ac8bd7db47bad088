//! `git-push` with `branch:` and `mode: pull-request`, against bare
//! repositories on disk and a recording [`PullRequests`].

use super::git_push;
use super::pull_request::{Ask, Opened, PullRequests};
use super::tests::{git, git_push, new_task, origin, run_all_with, set_image};
use super::*;
use capstan_proto::ids::AttemptId;
use capstan_proto::pipeline::v1::Step;

/// Answers as a forge would: the first ask for a branch opens a pull
/// request, later ones find it; or fails every ask with `fail`.
#[derive(Debug, Default)]
struct Recording {
    asks: Mutex<Vec<Ask>>,
    fail: Option<String>,
}

#[async_trait::async_trait]
impl PullRequests for Recording {
    async fn open(&self, _: &AttemptId, ask: &Ask) -> Result<Option<Opened>, String> {
        if let Some(f) = &self.fail {
            return Err(f.clone());
        }
        let mut asks = self.asks.lock().unwrap();
        let first = asks.iter().position(|a| a.head == ask.head);
        asks.push(ask.clone());
        let number = first.map_or(asks.len(), |i| i + 1);
        Ok(Some(Opened {
            url: format!("https://forge.example/pull/{number}"),
            created: first.is_none(),
        }))
    }
}

fn pull_request(message: &str, branch: &str) -> Step {
    let mut s = git_push(message);
    if let Some(step::Kind::GitPush(g)) = s.kind.as_mut() {
        g.mode = "pull-request".into();
        g.branch = branch.into();
    }
    s
}

fn gitops_with(p: Arc<Recording>) -> Arc<GitOps> {
    Arc::new(GitOps::default().with_pull_requests(p))
}

#[tokio::test]
async fn pull_request_mode_pushes_the_runs_branch_once_and_asks_for_the_pull_request() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let url = bare.display().to_string();
    let main = git(&bare, &["rev-parse", "main"]);
    let image = "127.0.0.1:5000/demo/app:abc123";
    let steps = vec![
        set_image(&url, "k8s/pod.yaml", image),
        pull_request("deploy abc123\n\nthe tests passed", ""),
    ];
    let forge = Arc::new(Recording::default());
    let t = new_task(dir.path(), "a", steps.clone());
    let (ends, log) = run_all_with(&t, gitops_with(forge.clone())).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    // No source checkout: the branch is named after the manifests' base.
    let branch = format!("capstan/deploy/test/{main}");
    assert_eq!(git(&bare, &["rev-parse", "main"]), main, "main untouched");
    let pushed = git(&bare, &["rev-parse", &branch]);
    assert!(
        git(&bare, &["show", &format!("{branch}:k8s/pod.yaml")]).contains(image),
        "{log}"
    );
    let outputs = t.outputs.lock().unwrap().clone();
    assert_eq!(outputs.get("branch"), Some(&branch));
    assert_eq!(outputs.get("commit"), Some(&pushed));
    assert_eq!(
        outputs.get("pull-request").map(String::as_str),
        Some("https://forge.example/pull/1")
    );
    assert!(
        log.contains("pull request opened https://forge.example/pull/1"),
        "{log}"
    );
    let asks = forge.asks.lock().unwrap().clone();
    assert_eq!(asks.len(), 1);
    assert_eq!(
        (asks[0].head.as_str(), asks[0].base.as_str()),
        (branch.as_str(), "main")
    );
    assert_eq!(asks[0].title, "deploy abc123");
    assert!(
        asks[0]
            .body
            .starts_with("the tests passed\n\nOpened by Capstan"),
        "{:?}",
        asks[0]
    );
    assert_eq!(asks[0].repo, url);

    // A rerun: the branch already has the change, so nothing is pushed and
    // the open pull request is found, not opened again.
    let t = new_task(dir.path(), "b", steps);
    let (ends, log) = run_all_with(&t, gitops_with(forge.clone())).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    assert!(
        log.contains(&format!("{branch} already has this change at {pushed}")),
        "{log}"
    );
    assert!(
        log.contains("pull request already open: https://forge.example/pull/1"),
        "{log}"
    );
    assert_eq!(git(&bare, &["rev-parse", &branch]), pushed);
    assert_eq!(t.outputs.lock().unwrap().get("commit"), Some(&pushed));
}

#[tokio::test]
async fn without_a_forge_the_branch_is_pushed_and_named_and_a_forge_failure_fails_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let url = bare.display().to_string();
    let steps = vec![
        set_image(&url, "k8s/pod.yaml", "127.0.0.1:5000/demo/app:n1"),
        pull_request("deploy n1", ""),
    ];
    let t = new_task(dir.path(), "a", steps);
    let (ends, log) = run_all_with(&t, Arc::<GitOps>::default()).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    let branch = t.outputs.lock().unwrap().get("branch").cloned().unwrap();
    assert!(
        log.contains(&format!(
            "no forge is registered for {url}: open a pull request from {branch} into main by hand"
        )),
        "{log}"
    );
    assert!(!t.outputs.lock().unwrap().contains_key("pull-request"));
    git(&bare, &["rev-parse", &branch]);

    let failing = Arc::new(Recording {
        fail: Some("no pull request: the forge refused".into()),
        ..Recording::default()
    });
    let steps = vec![
        set_image(&url, "k8s/pod.yaml", "127.0.0.1:5000/demo/app:n2"),
        pull_request("deploy n2", ""),
    ];
    let t = new_task(dir.path(), "b", steps);
    let (ends, log) = run_all_with(&t, gitops_with(failing)).await;
    assert_eq!(
        ends[1],
        StepEnd::Failed {
            message: "no pull request: the forge refused".into()
        },
        "{log}"
    );
    assert!(
        log.contains("pushed "),
        "the push is logged before the failure: {log}"
    );
}

#[tokio::test]
async fn branch_names_where_the_commit_goes_and_bad_settings_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let url = bare.display().to_string();
    let main = git(&bare, &["rev-parse", "main"]);
    git(&bare, &["branch", "release", "main"]);
    let mut direct = git_push("deploy to release");
    if let Some(step::Kind::GitPush(g)) = direct.kind.as_mut() {
        g.branch = "release".into();
    }
    let image = "127.0.0.1:5000/demo/app:r1";
    let t = new_task(
        dir.path(),
        "a",
        vec![set_image(&url, "k8s/pod.yaml", image), direct],
    );
    let (ends, log) = run_all_with(&t, Arc::<GitOps>::default()).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    assert_eq!(git(&bare, &["rev-parse", "main"]), main, "main untouched");
    assert!(
        git(&bare, &["show", "release:k8s/pod.yaml"]).contains(image),
        "{log}"
    );

    // A pull request into release has release's head as its parent.
    let release = git(&bare, &["rev-parse", "release"]);
    let t = new_task(
        dir.path(),
        "b",
        vec![
            set_image(&url, "k8s/pod.yaml", "127.0.0.1:5000/demo/app:r2"),
            pull_request("deploy r2", "release"),
        ],
    );
    let forge = Arc::new(Recording::default());
    let (ends, log) = run_all_with(&t, gitops_with(forge.clone())).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    let branch = t.outputs.lock().unwrap().get("branch").cloned().unwrap();
    assert_eq!(git(&bare, &["rev-parse", &format!("{branch}^")]), release);
    assert_eq!(forge.asks.lock().unwrap()[0].base, "release");

    for (field, value, says) in [
        (
            "branch",
            "bad..name",
            "`bad..name` is not a branch name git accepts",
        ),
        (
            "mode",
            "merge",
            "unknown `mode: merge` of `git-push`: use direct or pull-request",
        ),
    ] {
        let mut push = git_push("x");
        if let Some(step::Kind::GitPush(g)) = push.kind.as_mut() {
            match field {
                "branch" => g.branch = value.into(),
                _ => g.mode = value.into(),
            }
        }
        let steps = vec![
            set_image(&url, "k8s/pod.yaml", "127.0.0.1:5000/demo/app:x"),
            push,
        ];
        let t = new_task(dir.path(), field, steps);
        let (ends, log) = run_all_with(&t, Arc::<GitOps>::default()).await;
        assert!(
            matches!(&ends[1], StepEnd::Failed { message } if message.contains(says)),
            "{ends:?} {log}"
        );
    }
}

#[test]
fn each_task_has_its_own_branch_and_a_matrix_task_a_valid_one() {
    assert_eq!(
        git_push::pull_request_branch("promote", "deploy", "abc"),
        "capstan/promote/deploy/abc"
    );
    let b = git_push::pull_request_branch("promote", "deploy[env=prod,zone=b]", "abc");
    assert_eq!(b, "capstan/promote/deploy-env-prod-zone-b/abc");
    assert!(git2::Reference::is_valid_name(&format!("refs/heads/{b}")));
}
