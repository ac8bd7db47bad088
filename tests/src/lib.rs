//! End-to-end test harness: a [`TestCluster`] runs the real
//! `capstan-coordinator`, `capstan-runner` and `capstan` binaries as separate
//! processes talking gRPC over loopback, and hands back handles to kill,
//! restart and query them.
//!
//! The binaries are found next to the test executable's `deps/` directory
//! (`$CARGO_TARGET_DIR/debug/`), or in `$CAPSTAN_BIN_DIR`. Build them first:
//! `cargo build --workspace --bins` (the test command in the README does).

pub mod etcd;
pub mod git_server;
pub mod ha;
pub mod otlp;
pub mod ssh_server;
pub mod testbed;

use anyhow::{Context, bail};
use capstan_proto::api::v1 as api;
use capstan_proto::pipeline::v1::{RunState, TaskState};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use api::pipeline_service_client::PipelineServiceClient;

/// Where the binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAPSTAN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("an executable has a directory");
    // A binary beside the others (capstan-bench), or a test in .../debug/deps.
    if dir.join("capstan-coordinator").exists() {
        return dir.to_path_buf();
    }
    dir.parent()
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// The last `lines` lines of every `*.log` file in `dir`, sorted by name,
/// for failure messages.
pub fn tail_logs(dir: &Path, lines: usize) -> String {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    let mut out = String::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        out.push_str(&format!(
            "----- {} (last {lines} lines) -----\n{tail}\n",
            p.display()
        ));
    }
    out
}

/// A plain HTTP/1.0 GET on `addr`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((code, body))
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Waits until `child` exits, polling; fails naming `what` after `timeout`.
pub async fn wait_exit(
    child: &mut Child,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{what} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct Builder {
    runners: usize,
    capacity: u32,
    executor: String,
    lease_ms: u64,
    heartbeat_ms: u64,
    labels: Vec<String>,
    runner_args: Vec<String>,
    coordinator_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            runners: 1,
            capacity: 1,
            executor: "shell".into(),
            lease_ms: 2000,
            heartbeat_ms: 250,
            labels: Vec::new(),
            runner_args: Vec::new(),
            coordinator_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl Builder {
    pub fn runners(mut self, n: usize) -> Self {
        self.runners = n;
        self
    }
    pub fn capacity(mut self, n: u32) -> Self {
        self.capacity = n;
        self
    }
    pub fn executor(mut self, e: &str) -> Self {
        self.executor = e.into();
        self
    }
    pub fn lease_ms(mut self, ms: u64) -> Self {
        self.lease_ms = ms;
        self
    }
    /// Labels of every runner, as `k=v` (runner i also gets `index=i`).
    pub fn labels(mut self, labels: &[&str]) -> Self {
        self.labels = labels.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Extra arguments for the coordinator (e.g. `--retention 1s`).
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args
            .extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// An environment variable for the coordinator and every runner (e.g.
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Extra arguments for every runner (e.g. `--secrets-file PATH`).
    pub fn runner_args(mut self, args: &[&str]) -> Self {
        self.runner_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub async fn start(self) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let mut c = TestCluster {
            grpc: SocketAddr::from(([127, 0, 0, 1], free_port())),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            token: format!("tok-{}", std::process::id()),
            coordinator: None,
            runners: Vec::new(),
            opts: self.clone(),
            dir,
        };
        // The ports were free when picked, but another process (a client's
        // ephemeral port, a parallel test) may take one before the
        // coordinator binds it: pick new ones and try again.
        let mut tries = 0;
        loop {
            match c.start_coordinator().await {
                Err(e) if tries < 5 && format!("{e:#}").contains("Address already in use") => {
                    tries += 1;
                    c.grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    c.http = SocketAddr::from(([127, 0, 0, 1], free_port()));
                }
                other => break other?,
            }
        }
        for i in 0..self.runners {
            c.start_runner(&format!("runner-{i}"))?;
        }
        c.wait_runners_connected(self.runners, Duration::from_secs(20))
            .await?;
        Ok(c)
    }
}

/// A running runner process.
pub struct RunnerProc {
    pub name: String,
    pub child: Child,
}

/// Real processes on loopback; everything is killed on drop.
pub struct TestCluster {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub token: String,
    coordinator: Option<Child>,
    pub runners: Vec<RunnerProc>,
    opts: Builder,
    dir: tempfile::TempDir,
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?)
}

/// Sets the builder's variables on `cmd`, after removing every `OTEL_*`
/// variable the test process itself may have (a developer's collector must
/// not receive, or slow down, the test cluster's spans).
fn set_env(cmd: &mut Command, extra: &[(String, String)]) {
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
        cmd.env_remove(k);
    }
    cmd.envs(extra.iter().map(|(k, v)| (k, v)));
}

impl TestCluster {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator-data")
    }

    /// Starts (or restarts) the coordinator on the cluster's ports and waits for `/readyz`.
    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("capstan-coordinator"));
        set_env(&mut cmd, &self.opts.env);
        let child = cmd
            .args(["--listen", &self.grpc.to_string()])
            .args(["--http-listen", &self.http.to_string()])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--registration-token", &self.token])
            .args(["--lease-ms", &self.opts.lease_ms.to_string()])
            .args(["--heartbeat-ms", &self.opts.heartbeat_ms.to_string()])
            .args(&self.opts.coordinator_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file(self.dir(), "coordinator")?)
            .stderr(log_file(self.dir(), "coordinator")?)
            .spawn()
            .context("spawn capstan-coordinator")?;
        self.coordinator = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = self.http_get("/readyz") {
                return Ok(());
            }
            if let Some(c) = self.coordinator.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "coordinator exited with {status}:\n{}",
                    self.process_log("coordinator")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "coordinator not ready in 20 s:\n{}",
                    self.process_log("coordinator")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 of the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to the coordinator; waits up to `timeout` for it to exit and
    /// returns how long that took.
    pub fn terminate_coordinator(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let Some(mut c) = self.coordinator.take() else {
            bail!("the coordinator is not running");
        };
        let started = Instant::now();
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        while started.elapsed() < timeout {
            if c.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!(
            "the coordinator did not exit within {timeout:?} of SIGTERM:\n{}",
            self.process_log("coordinator")
        )
    }

    /// Spawns a runner process named `name` (its work dir is under the cluster's dir).
    pub fn start_runner(&mut self, name: &str) -> anyhow::Result<()> {
        let child = self.runner_command(name, &self.token.clone()).spawn()?;
        self.runners.push(RunnerProc {
            name: name.to_string(),
            child,
        });
        Ok(())
    }

    /// The command that starts a runner, for tests that want to change it.
    pub fn runner_command(&self, name: &str, token: &str) -> Command {
        let index = self.runners.len();
        let mut labels = self.opts.labels.clone();
        labels.push(format!("index={index}"));
        let mut cmd = Command::new(bin("capstan-runner"));
        set_env(&mut cmd, &self.opts.env);
        cmd.args(["--coordinator", &self.url()])
            .args(["--registration-token", token])
            .args(["--name", name])
            .args(["--labels", &labels.join(",")])
            .args(["--capacity", &self.opts.capacity.to_string()])
            .args(["--executor", &self.opts.executor])
            .arg("--work-dir")
            .arg(self.dir().join(format!("work-{name}")))
            .args(&self.opts.runner_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file(self.dir(), name).expect("log file"))
            .stderr(log_file(self.dir(), name).expect("log file"));
        cmd
    }

    /// kill -9 of the runner named `name`.
    pub fn kill_runner(&mut self, name: &str) {
        if let Some(pos) = self.runners.iter().position(|r| r.name == name) {
            let mut r = self.runners.remove(pos);
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }

    /// Sends SIGTERM to the runner named `name` and returns its process.
    pub fn terminate_runner(&mut self, name: &str) -> Option<RunnerProc> {
        let pos = self.runners.iter().position(|r| r.name == name)?;
        let r = self.runners.remove(pos);
        let pid = nix::unistd::Pid::from_raw(r.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        Some(r)
    }

    /// What a process of the cluster wrote to its log.
    pub fn process_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// All process logs, for failure messages.
    pub fn all_logs(&self) -> String {
        tail_logs(self.dir(), 40)
    }

    /// A plain HTTP/1.0 GET on the side port: (status, body).
    pub fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.http, path)
    }

    pub async fn client(&self) -> anyhow::Result<PipelineServiceClient<tonic::transport::Channel>> {
        Ok(PipelineServiceClient::connect(self.url()).await?)
    }

    /// Runs the `capstan` CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("capstan"))
            .args(["--server", &self.url()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run capstan")
    }

    /// Submits a pipeline file's text through the API and returns the run id.
    pub async fn submit(&self, yaml: &str) -> anyhow::Result<String> {
        let r = self
            .client()
            .await?
            .submit_run(api::SubmitRunRequest {
                pipeline_yaml: yaml.into(),
                file_name: "test.yaml".into(),
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().run_id)
    }

    pub async fn get_run(&self, id: &str) -> anyhow::Result<api::Run> {
        Ok(self
            .client()
            .await?
            .get_run(api::GetRunRequest { run_id: id.into() })
            .await?
            .into_inner())
    }

    /// Polls until `pred` holds for the run, or fails with the cluster's logs.
    pub async fn wait_run(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&api::Run) -> bool,
    ) -> anyhow::Result<api::Run> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Ok(run) = self.get_run(id).await {
                if pred(&run) {
                    return Ok(run);
                }
                last = Some(run);
            }
            if Instant::now() > deadline {
                bail!(
                    "run {id} did not reach the expected state in {timeout:?}; last: {last:#?}\n{}",
                    self.all_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the run to end and returns it.
    pub async fn wait_done(&self, id: &str, timeout: Duration) -> anyhow::Result<api::Run> {
        self.wait_run(id, timeout, is_finished).await
    }

    /// The whole log of a task (every attempt), as the API streams it.
    pub async fn task_log(&self, run: &str, task: &str) -> anyhow::Result<Vec<u8>> {
        let mut stream = self
            .client()
            .await?
            .read_logs(api::ReadLogsRequest {
                run_id: run.into(),
                task: task.into(),
                follow: false,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    pub async fn wait_runners_connected(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(mut c) = self.client().await
                && let Ok(r) = c.list_runners(api::ListRunnersRequest {}).await
                && r.into_inner()
                    .runners
                    .iter()
                    .filter(|r| r.connected)
                    .count()
                    >= n
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{n} runners did not connect in {timeout:?}\n{}",
                    self.all_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for r in &mut self.runners {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        self.kill_coordinator();
    }
}

pub fn run_state(r: &api::Run) -> RunState {
    RunState::try_from(r.state).unwrap_or(RunState::Unspecified)
}

pub fn is_finished(r: &api::Run) -> bool {
    matches!(
        run_state(r),
        RunState::Succeeded | RunState::Failed | RunState::Cancelled
    )
}

pub fn task<'a>(r: &'a api::Run, name: &str) -> &'a api::Task {
    r.tasks
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no task {name} in {r:#?}"))
}

pub fn task_state(r: &api::Run, name: &str) -> TaskState {
    TaskState::try_from(task(r, name).state).unwrap_or(TaskState::Unspecified)
}
