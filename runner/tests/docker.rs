//! The docker executor against the real Docker Engine and registry that
//! `scripts/testbed up` starts. These tests fail (never skip) when the test
//! bed is missing.
//!
//! Every object a test creates carries `capstan.test=<id>`; a guard removes
//! whatever is left at the end, even after a panic, and the tests assert that
//! the executor itself left nothing.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capstan_proto::ids::{AttemptId, RunId};
use capstan_proto::pipeline::v1::{BuildStep, PushStep, RunStep, Step, TaskSpec, step};
use capstan_runner::executor::Executor;
use capstan_runner::executor::docker::{
    DockerExecutor, DockerOptions, DockerSettings, NetworkSetting, PullPolicy,
};
use capstan_runner::logs::sink::OutputSink;
use capstan_runner::secrets::{Secret, Secrets};
use capstan_runner::step::{StepContext, StepEnd, TaskContext};
use capstan_tests::testbed::{self, Cleanup, Testbed, remove_image, testbed};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos) * 1000 + N.fetch_add(1, Ordering::Relaxed)
}

#[derive(Default)]
struct Sink(Mutex<Vec<u8>>);

impl Sink {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[async_trait]
impl OutputSink for Sink {
    async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(())
    }
}

struct Fixture {
    ex: DockerExecutor,
    cleanup: Cleanup,
    tb: Testbed,
    dir: tempfile::TempDir,
}

async fn fixture(name: &str, tune: impl FnOnce(&mut DockerSettings)) -> Fixture {
    let tb = testbed();
    let cleanup = Cleanup::new(name);
    let mut options = DockerOptions::new("test-runner", &cleanup.id);
    options
        .settings
        .labels
        .insert("capstan.test".into(), cleanup.id.clone());
    options.settings.helper_image = tb.image.clone();
    // Nothing is pulled from outside this machine; the pull tests say so.
    options.settings.pull = PullPolicy::Never;
    tune(&mut options.settings);
    let mut secrets = Secrets::default();
    secrets.insert(
        "registry",
        Secret::Login {
            username: tb.user.clone(),
            password: tb.password.clone(),
        },
    );
    secrets.insert(
        "wrong",
        Secret::Login {
            username: tb.user.clone(),
            password: "not-the-password".into(),
        },
    );
    let ex = DockerExecutor::connect(options, Arc::new(secrets))
        .await
        .unwrap_or_else(|e| panic!("{e}: run scripts/testbed up"));
    let status = std::process::Command::new("docker")
        .args(["image", "inspect", &tb.image])
        .output()
        .expect("docker CLI");
    assert!(
        status.status.success(),
        "image {} is missing: run scripts/testbed up",
        tb.image
    );
    Fixture {
        ex,
        cleanup,
        tb,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn run(script: &str) -> Step {
    Step {
        name: "run".into(),
        kind: Some(step::Kind::Run(RunStep {
            script: script.into(),
            image: String::new(),
        })),
        ..Step::default()
    }
}

impl Fixture {
    fn task(&self, steps: Vec<Step>) -> TaskContext {
        let workspace = self.dir.path().join("workspace");
        std::fs::create_dir_all(&workspace).unwrap();
        TaskContext {
            run_id: RunId::from_string(format!("run-{}", self.cleanup.id)),
            task_name: "test".into(),
            attempt_id: AttemptId::from_string(format!("att-{}-{}", self.cleanup.id, unique())),
            workspace,
            task: TaskSpec {
                name: "test".into(),
                image: self.tb.image.clone(),
                steps,
                ..TaskSpec::default()
            },
            repo: String::new(),
            // Per test: builds of one commit are the same image (no
            // per-run label), and tests remove their images while others
            // build theirs.
            rev: format!("0123abcd-{}", self.cleanup.id),
            outputs: Arc::default(),
            pushed: Default::default(),
            cancel: CancellationToken::new(),
        }
    }

    async fn step(
        &self,
        task: &TaskContext,
        index: usize,
        cancel: CancellationToken,
        deadline: Option<Instant>,
    ) -> (StepEnd, String) {
        let sink = Sink::default();
        let step = &task.task.steps[index];
        let index = u32::try_from(index).unwrap();
        let end = self
            .ex
            .run_step(
                task,
                StepContext {
                    index,
                    step,
                    cancel,
                    deadline,
                    output: &sink,
                },
            )
            .await
            .unwrap();
        self.ex.destroy_step(task, index).await.unwrap();
        (end, sink.text())
    }

    /// Runs every step of a fresh task, tears it down, and checks nothing is left.
    async fn run_task(&self, steps: Vec<Step>) -> Vec<(StepEnd, String)> {
        let task = self.task(steps);
        self.ex.setup_task(&task).await.unwrap();
        let mut out = Vec::new();
        for i in 0..task.task.steps.len() {
            out.push(self.step(&task, i, CancellationToken::new(), None).await);
        }
        self.ex.destroy_task(&task).await.unwrap();
        self.assert_nothing_left();
        out
    }

    fn assert_nothing_left(&self) {
        let left = self.cleanup.leftovers();
        assert_eq!(left, "", "containers, volumes, networks left");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_code_and_output() {
    let f = fixture("exit", |_| {}).await;
    let out = f
        .run_task(vec![
            run("echo to-stdout; echo to-stderr >&2; exit 3"),
            run("true"),
        ])
        .await;
    assert_eq!(out[0].0, StepEnd::Exited(3));
    assert!(out[0].1.contains("to-stdout\n"), "{:?}", out[0].1);
    assert!(out[0].1.contains("to-stderr\n"), "{:?}", out[0].1);
    assert_eq!(out[1].0, StepEnd::Exited(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn workspace_is_shared_and_holds_the_checkout() {
    let f = fixture("workspace", |_| {}).await;
    let ws = f.dir.path().join("workspace");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/hello.txt"), "from the checkout\n").unwrap();
    let out = f
        .run_task(vec![
            run("pwd; cat src/hello.txt; echo made-by-step-1 > /workspace/shared.txt"),
            run("cat shared.txt; echo \"$CAPSTAN_WORKSPACE\""),
        ])
        .await;
    assert_eq!(out[0].0, StepEnd::Exited(0), "{}", out[0].1);
    assert_eq!(
        after_image_line(&out[0].1),
        "/workspace\nfrom the checkout\n"
    );
    assert_eq!(after_image_line(&out[1].1), "made-by-step-1\n/workspace\n");
}

/// A `run` step's output after the runner's first line, which says what
/// the step's image resolved to (`image capstan-test/busybox:1 is
/// sha256:...`, the engine's id for an image no registry has seen).
fn after_image_line(text: &str) -> &str {
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let tb = testbed();
    assert!(
        first.starts_with(&format!("image {} is sha256:", tb.image)),
        "{text}"
    );
    rest
}

#[tokio::test(flavor = "multi_thread")]
async fn isolation_no_network_no_socket_no_privileges() {
    let f = fixture("isolation", |_| {}).await;
    let out = f
        .run_task(vec![run(
            "ls /sys/class/net; \
             test ! -e /var/run/docker.sock && echo no-socket; \
             grep CapEff /proc/self/status; \
             ps -o pid,comm | grep -q 'init' && echo has-init; \
             if mount -t tmpfs none /mnt 2>/dev/null; then echo mounted; else echo cannot-mount; fi",
        )])
        .await;
    let text = after_image_line(&out[0].1);
    assert_eq!(out[0].0, StepEnd::Exited(0), "{text}");
    assert!(text.starts_with("lo\n"), "only loopback expected: {text}");
    assert!(!text.contains("eth0"), "{text}");
    assert!(text.contains("no-socket"), "{text}");
    assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
    assert!(text.contains("has-init"), "{text}");
    assert!(text.contains("cannot-mount"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_capability_is_the_only_one() {
    // CAP_CHOWN is bit 0, CAP_NET_RAW bit 13.
    let f = fixture("caps", |o| {
        o.cap_add = vec!["CHOWN".into(), "NET_RAW".into()];
    })
    .await;
    let out = f.run_task(vec![run("grep CapEff /proc/self/status")]).await;
    assert!(
        out[0].1.contains("CapEff:\t0000000000002001"),
        "{}",
        out[0].1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_capabilities_and_resources_within_what_the_runner_allows() {
    // CAP_CHOWN is bit 0, CAP_NET_BIND_SERVICE bit 10.
    let f = fixture("task-caps", |o| {
        o.cap_add = vec!["CHOWN".into()];
        o.allow_cap = vec!["NET_BIND_SERVICE".into()];
        o.memory_bytes = Some(256 << 20);
    })
    .await;
    let mut task = f.task(vec![run(
        "grep CapEff /proc/self/status; cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    )]);
    task.task.capabilities = vec!["NET_BIND_SERVICE".into()];
    task.task.memory_bytes = 64 << 20;
    f.ex.setup_task(&task).await.unwrap();
    let (end, text) = f.step(&task, 0, CancellationToken::new(), None).await;
    assert_eq!(end, StepEnd::Exited(0), "{text}");
    assert!(text.contains("CapEff:\t0000000000000401"), "{text}");
    assert!(
        text.contains(&(64u64 << 20).to_string()),
        "the task's memory limit wins: {text}"
    );
    // A capability the runner does not allow fails the step, clearly.
    task.task.capabilities = vec!["NET_ADMIN".into()];
    let (end, _) = f.step(&task, 0, CancellationToken::new(), None).await;
    let StepEnd::Failed { message } = end else {
        panic!("expected a refusal, got {end:?}")
    };
    assert!(
        message.contains("NET_ADMIN") && message.contains("--docker-allow-cap"),
        "{message}"
    );
    f.ex.destroy_task(&task).await.unwrap();
    f.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_network_has_no_route_out() {
    let f = fixture("internal", |o| o.network = NetworkSetting::Internal).await;
    let task = f.task(vec![run("ls /sys/class/net; cat /proc/net/route")]);
    f.ex.setup_task(&task).await.unwrap();
    let inspect = std::process::Command::new("docker")
        .args([
            "network",
            "ls",
            "--filter",
            &format!("label={}", f.cleanup.label()),
        ])
        .args(["--format", "{{.Name}} {{.Internal}}"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&inspect.stdout).to_string();
    assert!(
        listed.trim().ends_with("true"),
        "internal network: {listed:?}"
    );
    let (end, text) = f.step(&task, 0, CancellationToken::new(), None).await;
    assert_eq!(end, StepEnd::Exited(0), "{text}");
    // The step is on the task's network (the engine keeps it off every
    // outside route because the network is internal).
    assert!(text.contains("eth0"), "{text}");
    f.ex.destroy_task(&task).await.unwrap();
    f.assert_nothing_left();
}

async fn stop_latency(f: &Fixture, script: &str, use_deadline: bool) -> (StepEnd, Duration) {
    let task = f.task(vec![run(script)]);
    f.ex.setup_task(&task).await.unwrap();
    let cancel = CancellationToken::new();
    let fire_at = Instant::now() + Duration::from_millis(1500);
    let deadline = use_deadline.then_some(fire_at);
    if !use_deadline {
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(fire_at).await;
            trigger.cancel();
        });
    }
    let (end, _) = f.step(&task, 0, cancel, deadline).await;
    let latency = Instant::now() - fire_at;
    f.ex.destroy_task(&task).await.unwrap();
    (end, latency)
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_timeout_stop_the_container_within_two_seconds() {
    let f = fixture("stop", |_| {}).await;
    let (end, latency) = stop_latency(&f, "sleep 100", false).await;
    assert_eq!(end, StepEnd::Cancelled);
    eprintln!("cancel -> step ended: {latency:?}");
    assert!(latency < Duration::from_secs(2), "cancel took {latency:?}");
    // A script that ignores SIGTERM is killed after the grace period.
    let (end, latency) = stop_latency(&f, "trap '' TERM; while true; do sleep 1; done", true).await;
    assert_eq!(end, StepEnd::TimedOut);
    eprintln!("deadline -> step ended (SIGTERM ignored): {latency:?}");
    assert!(latency < Duration::from_secs(2), "timeout took {latency:?}");
    f.assert_nothing_left();
}

/// The step allocates after a second, not at once: containerd may miss an
/// OOM kill in the first milliseconds of a container, before its shim
/// watches the cgroup (containerd#8180), and the engine then reports a plain
/// exit 137. With `dd` at once this failed here about once in 12 runs, 137
/// without the flag even after the executor's re-checks.
#[tokio::test(flavor = "multi_thread")]
async fn out_of_memory_is_reported_as_oom() {
    let f = fixture("oom", |o| o.memory_bytes = Some(16 << 20)).await;
    let out = f
        .run_task(vec![run(
            "sleep 1; dd if=/dev/zero of=/dev/null bs=128M count=1",
        )])
        .await;
    assert!(
        matches!(out[0].0, StepEnd::OutOfMemory { .. }),
        "{:?} {}",
        out[0].0,
        out[0].1
    );
}

/// A step that dies of SIGKILL with memory to spare is a plain exit 137,
/// not an OOM, even after the executor asked again (the OOM flag can lag
/// behind the exit).
#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_without_oom_is_a_plain_exit() {
    let f = fixture("sigkill", |o| o.memory_bytes = Some(64 << 20)).await;
    let out = f.run_task(vec![run("kill -9 $$")]).await;
    assert_eq!(out[0].0, StepEnd::Exited(137), "{}", out[0].1);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_image_is_a_clear_failure() {
    let f = fixture("noimage", |_| {}).await;
    let mut step = run("true");
    if let Some(step::Kind::Run(r)) = &mut step.kind {
        r.image = "capstan-test/does-not-exist:1".into();
    }
    let out = f.run_task(vec![step]).await;
    match &out[0].0 {
        StepEnd::Failed { message } => {
            assert!(
                message.contains("capstan-test/does-not-exist:1"),
                "{message}"
            );
            assert!(message.contains("not present"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

fn build(tag: &str, dockerfile: &str) -> Step {
    build_asking(tag, dockerfile, "")
}

/// A build that asks the registry with the secret `credentials` whether it
/// already has `tag` (what a pipeline's build gets from its push).
fn build_asking(tag: &str, dockerfile: &str, credentials: &str) -> Step {
    Step {
        name: "build".into(),
        kind: Some(step::Kind::Build(BuildStep {
            context: "app".into(),
            dockerfile: dockerfile.into(),
            tag: tag.into(),
            force: false,
            credentials: credentials.into(),
            args: Default::default(),
        })),
        ..Step::default()
    }
}

fn push(image: &str, credentials: &str) -> Step {
    Step {
        name: "push".into(),
        kind: Some(step::Kind::Push(PushStep {
            image: image.into(),
            credentials: credentials.into(),
            force: false,
        })),
        ..Step::default()
    }
}

/// GET on the registry with basic auth: (status, headers, body).
fn registry_get(tb: &Testbed, path: &str) -> (u16, String, String) {
    let (code, resp) = testbed::registry_get(tb, path);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (code, head.to_owned(), body.to_owned())
}

fn write_app(ws: &Path, dockerfile: &str) {
    std::fs::create_dir_all(ws.join("app")).unwrap();
    std::fs::write(ws.join("app/Dockerfile"), dockerfile).unwrap();
    std::fs::write(ws.join("app/message.txt"), "hello from the image\n").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn build_push_and_verify_through_the_registry_api() {
    let f = fixture("build-push", |_| {}).await;
    let name = format!("capstan-tests/app-{}", unique());
    let image = format!("{}/{name}:v1", f.tb.registry);
    let ws = f.dir.path().join("workspace");
    write_app(
        &ws,
        &format!(
            "FROM {}\nCOPY message.txt /message.txt\nCOPY generated.txt /generated.txt\n",
            f.tb.image
        ),
    );
    let task = f.task(vec![
        run("echo generated-by-a-step > app/generated.txt"),
        build(&image, "Dockerfile"),
        push(&image, "registry"),
        // Again: the registry has the tag now, so both skip.
        build_asking(&image, "Dockerfile", "registry"),
        push(&image, "registry"),
    ]);
    f.ex.setup_task(&task).await.unwrap();
    let mut logs = Vec::new();
    for i in 0..5 {
        let (end, text) = f.step(&task, i, CancellationToken::new(), None).await;
        assert_eq!(end, StepEnd::Exited(0), "step {i}: {text}");
        logs.push(text);
    }
    f.ex.destroy_task(&task).await.unwrap();
    f.assert_nothing_left();
    assert!(
        logs[1].contains(&format!(": FROM {}", f.tb.image)),
        "{}",
        logs[1]
    );
    let outputs = task.outputs.lock().unwrap().clone();
    let digest = outputs.get("digest").expect("digest output").clone();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(logs[2].contains(&digest), "{}", logs[2]);
    for (i, verb) in [(3, "build"), (4, "push")] {
        assert!(
            logs[i].contains(&format!(
                "{image} is already in {} as {digest}: {verb} skipped",
                f.tb.registry
            )),
            "{}",
            logs[i]
        );
    }
    assert!(!logs[4].contains("pushed"), "{}", logs[4]);

    // The image carries its commit (nothing per run) and the step's file.
    let labels = std::process::Command::new("docker")
        .args([
            "image",
            "inspect",
            &image,
            "--format",
            "{{json .Config.Labels}}",
        ])
        .output()
        .unwrap();
    let labels = String::from_utf8_lossy(&labels.stdout);
    assert!(
        labels.contains(&format!("\"capstan.commit\":\"{}\"", task.rev)),
        "{labels}"
    );
    assert!(
        !labels.contains("capstan.run") && !labels.contains("capstan.task"),
        "nothing per run in the image: {labels}"
    );

    let (code, _, body) = registry_get(&f.tb, &format!("/v2/{name}/tags/list"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"v1\""), "{body}");
    let (code, head, _) = registry_get(&f.tb, &format!("/v2/{name}/manifests/v1"));
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("docker-content-digest: {digest}")),
        "{head}"
    );
    remove_image(&image);
}

#[tokio::test(flavor = "multi_thread")]
async fn push_errors_are_clear() {
    let f = fixture("push-errors", |_| {}).await;
    let image = format!("{}/capstan-tests/denied-{}:v1", f.tb.registry, unique());
    write_app(
        &f.dir.path().join("workspace"),
        &format!("FROM {}\n", f.tb.image),
    );
    let unreachable = format!("127.0.0.1:1/capstan-tests/x-{}:v1", unique());
    let task = f.task(vec![
        build(&image, "Dockerfile"),
        push(&image, "wrong"),
        push(&image, ""),
        push(&image, "no-such-secret"),
        build(&unreachable, "Dockerfile"),
        push(&unreachable, "registry"),
    ]);
    f.ex.setup_task(&task).await.unwrap();
    let mut ends = Vec::new();
    for i in 0..task.task.steps.len() {
        ends.push(f.step(&task, i, CancellationToken::new(), None).await);
    }
    f.ex.destroy_task(&task).await.unwrap();
    f.assert_nothing_left();
    remove_image(&image);
    remove_image(&unreachable);
    let message = |i: usize| match &ends[i].0 {
        StepEnd::Failed { message } => message.clone(),
        other => panic!("step {i}: {other:?} {}", ends[i].1),
    };
    assert_eq!(ends[0].0, StepEnd::Exited(0), "{}", ends[0].1);
    assert!(
        message(1).contains("rejected the credentials of secret `wrong`"),
        "{}",
        message(1)
    );
    assert!(
        message(2).contains("requires credentials"),
        "{}",
        message(2)
    );
    assert!(
        message(3).contains("CAPSTAN_SECRET_NO_SUCH_SECRET"),
        "{}",
        message(3)
    );
    assert_eq!(ends[4].0, StepEnd::Exited(0), "{}", ends[4].1);
    assert!(message(5).contains("unreachable"), "{}", message(5));
}

/// A registry (Debian's docker-registry, as in the test bed) in read-only
/// maintenance mode: it answers, and refuses every push.
struct ReadOnlyRegistry {
    addr: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl ReadOnlyRegistry {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}, maintenance: {{readonly: {{enabled: true}}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is installed by scripts/testbed up");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for ReadOnlyRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn push_rejected_by_the_registry_is_clear() {
    let registry = ReadOnlyRegistry::start();
    let f = fixture("push-rejected", |_| {}).await;
    let image = format!("{}/capstan-tests/readonly-{}:v1", registry.addr, unique());
    write_app(
        &f.dir.path().join("workspace"),
        &format!("FROM {}\n", f.tb.image),
    );
    let task = f.task(vec![build(&image, "Dockerfile"), push(&image, "")]);
    f.ex.setup_task(&task).await.unwrap();
    let built = f.step(&task, 0, CancellationToken::new(), None).await;
    let pushed = f.step(&task, 1, CancellationToken::new(), None).await;
    f.ex.destroy_task(&task).await.unwrap();
    f.assert_nothing_left();
    remove_image(&image);
    assert_eq!(built.0, StepEnd::Exited(0), "{}", built.1);
    let StepEnd::Failed { message } = &pushed.0 else {
        panic!("the push should fail: {:?} {}", pushed.0, pushed.1)
    };
    assert!(
        message.contains(&registry.addr) && message.contains("rejected"),
        "{message}\n{}",
        pushed.1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn build_failures_are_clear() {
    let f = fixture("build-errors", |_| {}).await;
    let ws = f.dir.path().join("workspace");
    write_app(
        &ws,
        &format!("FROM {}\nRUN echo building && exit 3\n", f.tb.image),
    );
    std::fs::write(
        ws.join("app/Dockerfile.missing"),
        "FROM capstan-test/not-here:1\nRUN true\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("app/Dockerfile.arg"),
        "ARG BASE\nFROM ${BASE}\nRUN echo on \"$(cat /etc/hostname)\" > /dev/null\n",
    )
    .unwrap();
    let tag = format!("capstan-tests/broken-{}:1", unique());
    let mut with_base = build(&tag, "Dockerfile.arg");
    if let Some(step::Kind::Build(b)) = with_base.kind.as_mut() {
        b.args.insert("BASE".into(), f.tb.image.clone());
    }
    let out = f
        .run_task(vec![
            build(&tag, "Dockerfile"),
            build(&tag, "Dockerfile.missing"),
            build(&tag, "Dockerfile.absent"),
            build(&tag, "Dockerfile.arg"),
            with_base,
        ])
        .await;
    remove_image(&tag);
    let message = |i: usize| match &out[i].0 {
        StepEnd::Failed { message } => message.clone(),
        other => panic!("step {i}: {other:?} {}", out[i].1),
    };
    // The log and the message name the failing Dockerfile instruction.
    assert!(
        out[0].1.contains(": RUN echo building && exit 3"),
        "{}",
        out[0].1
    );
    assert!(
        message(0).contains(": RUN echo building && exit 3"),
        "{}",
        message(0)
    );
    assert!(message(0).contains("non-zero code: 3"), "{}", message(0));
    assert!(
        message(1).contains("capstan-test/not-here:1"),
        "{}",
        message(1)
    );
    assert!(
        message(1).contains("Dockerfile.missing:1"),
        "{}",
        message(1)
    );
    assert!(message(2).contains("not found"), "{}", message(2));
    // `FROM ${BASE}`: unset, the step says which arg to give; given, the
    // base image is checked and the build runs.
    assert!(
        message(3).contains("Dockerfile.arg:2") && message(3).contains("uses $BASE"),
        "{}",
        message(3)
    );
    assert_eq!(out[4].0, StepEnd::Exited(0), "{}", out[4].1);
}

#[tokio::test(flavor = "multi_thread")]
async fn reap_removes_what_a_crashed_runner_left() {
    let f = fixture("reap", |_| {}).await;
    let task = f.task(vec![run("sleep 100")]);
    f.ex.setup_task(&task).await.unwrap();
    let cancel = CancellationToken::new();
    let step_task = {
        let trigger = cancel.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            // The "crash": the step is abandoned without any teardown.
            trigger.cancel();
        }
    };
    let sink = Sink::default();
    let step = &task.task.steps[0];
    // Run the step but drop its future mid-way, like a killed process would.
    tokio::select! {
        _ = f.ex.run_step(&task, StepContext { index: 0, step, cancel: CancellationToken::new(), deadline: None, output: &sink }) => panic!("step ended"),
        () = step_task => {}
    }
    let (containers, volumes) = (
        f.cleanup.list(&["ps", "-a"]),
        f.cleanup.list(&["volume", "ls"]),
    );
    assert!(
        !containers.is_empty() && !volumes.is_empty(),
        "the crash left nothing to reap"
    );
    let removed = f.ex.reap().await.unwrap();
    assert!(removed >= 2, "removed {removed}");
    f.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_engine_is_a_clear_error() {
    let mut options = DockerOptions::new("probe", "probe");
    options.host = Some("unix:///nonexistent/docker.sock".into());
    let err = match DockerExecutor::connect(options, Arc::default()).await {
        Ok(_) => panic!("connected to a socket that does not exist"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("the Docker Engine is unreachable"), "{err}");
}
