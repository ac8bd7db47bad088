use super::*;
use crate::logs::sink::testing::VecSink;
use crate::step::testing::task;
use capstan_proto::pipeline::v1::Step;
use tokio_util::sync::CancellationToken;

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app # the app\nspec:\n  containers:\n    - name: app\n      image: \"127.0.0.1:5000/demo/app:old\" # bumped by CI\n";

pub(super) fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare `main` repository with k8s/pod.yaml and k8s/other.yaml.
pub(super) fn origin(dir: &Path) -> PathBuf {
    let bare = dir.join("origin.git");
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "--bare", "-b", "main"]);
    let seed = dir.join("seed");
    std::fs::create_dir_all(seed.join("k8s")).unwrap();
    git(&seed, &["init", "-b", "main"]);
    std::fs::write(seed.join("k8s/pod.yaml"), POD).unwrap();
    std::fs::write(seed.join("k8s/other.yaml"), "a: 1\n").unwrap();
    git(&seed, &["add", "."]);
    git(&seed, &["commit", "-m", "seed"]);
    git(&seed, &["push", bare.to_str().unwrap(), "main"]);
    bare
}

pub(super) fn set_image(repo: &str, file: &str, image: &str) -> Step {
    Step {
        kind: Some(step::Kind::SetImage(SetImageStep {
            repo: repo.into(),
            files: vec![file.into()],
            image: image.into(),
            allow_no_match: false,
            ..SetImageStep::default()
        })),
        ..Step::default()
    }
}

/// [`set_image`] with `pin: digest` (and `digest:` if not empty).
fn set_image_pinned(repo: &str, file: &str, image: &str, digest: &str) -> Step {
    let mut s = set_image(repo, file, image);
    if let Some(step::Kind::SetImage(si)) = s.kind.as_mut() {
        si.pin = "digest".into();
        si.digest = digest.into();
    }
    s
}

pub(super) fn git_push(message: &str) -> Step {
    Step {
        kind: Some(step::Kind::GitPush(GitPushStep {
            message: message.into(),
            pipeline: "deploy".into(),
            ..GitPushStep::default()
        })),
        ..Step::default()
    }
}

/// Runs every step of `t` as one attempt does.
async fn run_all(t: &TaskContext) -> (Vec<StepEnd>, String) {
    run_all_with(t, Arc::<GitOps>::default()).await
}

/// [`run_all`] with the attempt's `gitops`.
pub(super) async fn run_all_with(t: &TaskContext, gitops: Arc<GitOps>) -> (Vec<StepEnd>, String) {
    let sink = VecSink::default();
    let mut ends = Vec::new();
    for (i, s) in t.task.steps.iter().enumerate() {
        let ctx = StepContext {
            index: u32::try_from(i).unwrap(),
            step: s,
            cancel: CancellationToken::new(),
            deadline: None,
            output: &sink,
        };
        let end = match &s.kind {
            Some(step::Kind::SetImage(si)) => run_set_image(&gitops, t, &ctx, si).await.unwrap(),
            Some(step::Kind::GitPush(gp)) => run_git_push(&gitops, t, &ctx, gp).await.unwrap(),
            _ => unreachable!(),
        };
        ends.push(end);
    }
    (ends, sink.text())
}

pub(super) fn new_task(dir: &Path, name: &str, steps: Vec<Step>) -> TaskContext {
    let ws = dir.join(name);
    std::fs::create_dir_all(&ws).unwrap();
    task(ws, steps)
}

#[tokio::test]
async fn commits_as_the_bot_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let url = bare.display().to_string();
    let image = "127.0.0.1:5000/demo/app:abc123";
    let steps = vec![
        set_image(&url, "k8s/pod.yaml", image),
        git_push("deploy abc123"),
    ];
    let t = new_task(dir.path(), "a", steps.clone());
    let (ends, log) = run_all(&t).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    let head = git(&bare, &["rev-parse", "main"]);
    assert_eq!(
        t.outputs.lock().unwrap().get("commit"),
        Some(&head),
        "{log}"
    );
    assert_eq!(
        git(&bare, &["log", "-1", "--format=%an <%ae>|%s"]),
        "Capstan Bot <capstan@localhost>|deploy abc123"
    );
    let new = git(&bare, &["show", "main:k8s/pod.yaml"]);
    assert_eq!(
        format!("{new}\n"),
        POD.replace("127.0.0.1:5000/demo/app:old", image)
    );
    assert!(log.contains("k8s/pod.yaml:8:"), "{log}");

    // Same image again: no commit.
    let t = new_task(dir.path(), "b", steps);
    let (ends, log) = run_all(&t).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    assert!(log.contains("already up to date"), "{log}");
    assert_eq!(git(&bare, &["rev-parse", "main"]), head);
    assert_eq!(t.outputs.lock().unwrap().get("commit"), Some(&head));
}

#[tokio::test]
async fn a_race_is_fetched_reapplied_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let url = bare.display().to_string();
    let t = new_task(
        dir.path(),
        "a",
        vec![
            set_image(&url, "k8s/pod.yaml", "127.0.0.1:5000/demo/app:v2"),
            git_push("deploy v2"),
        ],
    );
    // set-image first, then someone else pushes, then git-push.
    let gitops = Arc::<GitOps>::default();
    let sink = VecSink::default();
    let ctx = |i: u32| StepContext {
        index: i,
        step: &t.task.steps[i as usize],
        cancel: CancellationToken::new(),
        deadline: None,
        output: &sink,
    };
    let Some(step::Kind::SetImage(si)) = &t.task.steps[0].kind else {
        unreachable!()
    };
    assert_eq!(
        run_set_image(&gitops, &t, &ctx(0), si).await.unwrap(),
        StepEnd::Exited(0)
    );
    let other = dir.path().join("other");
    git(
        dir.path(),
        &["clone", url.as_str(), other.to_str().unwrap()],
    );
    std::fs::write(other.join("k8s/other.yaml"), "a: 2\n").unwrap();
    git(&other, &["commit", "-am", "other change"]);
    git(&other, &["push", "origin", "main"]);
    let Some(step::Kind::GitPush(gp)) = &t.task.steps[1].kind else {
        unreachable!()
    };
    assert_eq!(
        run_git_push(&gitops, &t, &ctx(1), gp).await.unwrap(),
        StepEnd::Exited(0),
        "{}",
        sink.text()
    );
    assert_eq!(
        git(&bare, &["log", "--format=%s", "main"]),
        "deploy v2\nother change\nseed"
    );
    assert_eq!(
        git(&bare, &["show", "main:k8s/other.yaml"]),
        "a: 2",
        "the other change is kept"
    );
    assert!(sink.text().contains("re-applying"), "{}", sink.text());
}

#[tokio::test]
async fn git_push_without_set_image_and_a_missing_match_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let url = bare.display().to_string();
    let t = new_task(dir.path(), "a", vec![git_push("m")]);
    let (ends, log) = run_all(&t).await;
    assert!(
        matches!(&ends[0], StepEnd::Failed { message } if message.contains("needs a `set-image`")),
        "{log}"
    );
    let t = new_task(
        dir.path(),
        "b",
        vec![set_image(
            &url,
            "k8s/other.yaml",
            "127.0.0.1:5000/demo/app:v2",
        )],
    );
    let (ends, log) = run_all(&t).await;
    assert!(
        matches!(&ends[0], StepEnd::Failed { message } if message.contains("no image reference")),
        "{log}"
    );
    // Unless the step allows it: then it succeeds and changes nothing.
    let mut lenient = set_image(&url, "k8s/other.yaml", "127.0.0.1:5000/demo/app:v2");
    if let Some(step::Kind::SetImage(si)) = lenient.kind.as_mut() {
        si.allow_no_match = true;
    }
    let t = new_task(dir.path(), "c", vec![lenient]);
    let (ends, log) = run_all(&t).await;
    assert_eq!(ends[0], StepEnd::Exited(0), "{log}");
}

#[tokio::test]
async fn pin_digest_writes_the_digest_the_run_pushed_or_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let url = bare.display().to_string();
    let image = "127.0.0.1:5000/demo/app:abc123";
    let (d1, d2, d3) = (
        format!("sha256:{}", "1".repeat(64)),
        format!("sha256:{}", "2".repeat(64)),
        format!("sha256:{}", "3".repeat(64)),
    );
    let pod =
        |digest: &str| POD.replace("127.0.0.1:5000/demo/app:old", &format!("{image}@{digest}"));

    // Pushed by an earlier task of the run (the offer's map).
    let mut t = new_task(
        dir.path(),
        "a",
        vec![
            set_image_pinned(&url, "k8s/pod.yaml", image, ""),
            git_push("pin"),
        ],
    );
    t.pushed.insert(image.into(), d1.clone());
    t.pushed
        .insert("127.0.0.1:5000/demo/other:abc123".into(), d2.clone());
    let (ends, log) = run_all(&t).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    assert!(
        log.contains(&format!(
            "pinning {image} to {image}@{d1} (pushed by an earlier task of this run)"
        )),
        "{log}"
    );
    let show = || format!("{}\n", git(&bare, &["show", "main:k8s/pod.yaml"]));
    assert_eq!(show(), pod(&d1));

    // Pushed by this task: its own output wins over the run's.
    let mut t = new_task(
        dir.path(),
        "b",
        vec![
            set_image_pinned(&url, "k8s/pod.yaml", image, ""),
            git_push("pin"),
        ],
    );
    t.pushed.insert(image.into(), d1.clone());
    t.set_output("image", image);
    t.set_output("digest", &d2);
    let (ends, log) = run_all(&t).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    assert!(log.contains("(pushed by this task)"), "{log}");
    assert_eq!(show(), pod(&d2));

    // The step's `digest` wins over both.
    let mut t = new_task(
        dir.path(),
        "c",
        vec![
            set_image_pinned(&url, "k8s/pod.yaml", image, &d3),
            git_push("pin"),
        ],
    );
    t.pushed.insert(image.into(), d1.clone());
    let (ends, log) = run_all(&t).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    assert_eq!(show(), pod(&d3));

    // Nobody pushed it: the step fails saying what to do, nothing changes.
    let head = git(&bare, &["rev-parse", "main"]);
    let t = new_task(
        dir.path(),
        "d",
        vec![set_image_pinned(&url, "k8s/pod.yaml", image, "")],
    );
    let (ends, log) = run_all(&t).await;
    let [StepEnd::Failed { message }] = ends.as_slice() else {
        panic!("{ends:?} {log}")
    };
    assert!(
        message.contains("no task of this run pushed it") && message.contains("`digest:`"),
        "{message}"
    );
    assert_eq!(git(&bare, &["rev-parse", "main"]), head);
}

/// `order: monotonic` fetches the source first: a commit pushed after the
/// run's checkout, whose image is already deployed, still counts as newer.
#[tokio::test]
async fn monotonic_knows_commits_pushed_after_the_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.git");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "--bare", "-b", "main"]);
    let seed = dir.path().join("src-seed");
    std::fs::create_dir_all(&seed).unwrap();
    git(&seed, &["init", "-b", "main"]);
    std::fs::write(seed.join("README"), "one\n").unwrap();
    git(&seed, &["add", "."]);
    git(&seed, &["commit", "-m", "older"]);
    git(&seed, &["push", src.to_str().unwrap(), "main"]);
    let older = git(&seed, &["rev-parse", "HEAD"]);
    std::fs::write(seed.join("README"), "two\n").unwrap();
    git(&seed, &["commit", "-am", "newer"]);
    git(&seed, &["push", src.to_str().unwrap(), "main"]);
    let newer = git(&seed, &["rev-parse", "HEAD"]);

    let manifests = origin(dir.path());
    let url = manifests.display().to_string();
    let deployed = format!("127.0.0.1:5000/demo/app:{newer}");
    let newer_run = new_task(
        dir.path(),
        "newer",
        vec![
            set_image(&url, "k8s/pod.yaml", &deployed),
            git_push("newer"),
        ],
    );
    let (ends, log) = run_all(&newer_run).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    let head = git(&manifests, &["rev-parse", "main"]);

    let mut step = set_image(
        &url,
        "k8s/pod.yaml",
        &format!("127.0.0.1:5000/demo/app:{older}"),
    );
    if let Some(step::Kind::SetImage(si)) = step.kind.as_mut() {
        si.order = "monotonic".into();
    }
    // The older run's checkout as it was before the newer commit existed.
    let ws2 = dir.path().join("ws2");
    git(dir.path(), &["clone", "-q", src.to_str().unwrap(), "ws2"]);
    git(&ws2, &["reset", "-q", "--hard", &older]);
    git(&ws2, &["update-ref", "-d", "refs/remotes/origin/main"]);
    git(&ws2, &["reflog", "expire", "--expire=now", "--all"]);
    git(&ws2, &["gc", "-q", "--prune=now"]);
    assert!(
        std::process::Command::new("git")
            .args(["cat-file", "-e", &newer])
            .current_dir(&ws2)
            .status()
            .is_ok_and(|s| !s.success()),
        "the checkout must not know the newer commit yet"
    );
    let older_run = TaskContext {
        repo: src.display().to_string(),
        rev: older.clone(),
        ..task(ws2, vec![step, git_push("older")])
    };
    let (ends, log) = run_all(&older_run).await;
    assert_eq!(ends, vec![StepEnd::Exited(0); 2], "{log}");
    assert!(log.contains("fetched "), "{log}");
    assert!(log.contains("newer image already deployed"), "{log}");
    assert_eq!(
        git(&manifests, &["rev-parse", "main"]),
        head,
        "no commit: {log}"
    );
}
