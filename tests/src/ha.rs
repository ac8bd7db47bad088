//! Several coordinator replicas on a real etcd cluster, plus runners that know
//! every replica's URL.

use crate::etcd::EtcdCluster;
use crate::{bin, free_port, is_finished};
use anyhow::{Context, bail};
use capstan_client::Client;
use capstan_proto::api::v1 as api;
use capstan_proto::cluster::v1 as cluster;
use capstan_proto::ids::RunId;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Replica {
    pub grpc: u16,
    pub http: u16,
    child: Option<Child>,
    /// Stopped with SIGSTOP: it accepts connections but never answers.
    paused: std::sync::atomic::AtomicBool,
}

impl Replica {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

pub struct HaCluster {
    pub etcd: EtcdCluster,
    pub replicas: Vec<Replica>,
    runners: Vec<(String, Child)>,
    pub election_ttl_ms: u64,
    pub lease_ms: u64,
    token: String,
    executor: String,
    dir: tempfile::TempDir,
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("log file")
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// The cluster's scratch dir (data dirs and every process's log). With
/// `CAPSTAN_KEEP_HA_DIR=1` it outlives the cluster, and its path is printed:
/// for reading the replicas' and runners' logs after a slow bench round or
/// a failed test.
fn cluster_dir() -> std::io::Result<tempfile::TempDir> {
    let keep = std::env::var_os("CAPSTAN_KEEP_HA_DIR").is_some_and(|v| v == "1");
    let dir = tempfile::Builder::new()
        .prefix("capstan-ha-")
        .disable_cleanup(keep)
        .tempdir()?;
    if keep {
        eprintln!("HaCluster: keeping {}", dir.path().display());
    }
    Ok(dir)
}

impl HaCluster {
    /// A 3-node etcd, `replicas` coordinators and `runners` runners, with
    /// the default election TTL (5 s).
    pub async fn start(replicas: usize, runners: usize, executor: &str) -> anyhow::Result<Self> {
        Self::start_with_ttl(replicas, runners, executor, 5000).await
    }

    /// The same with the leader lease TTL `election_ttl_ms`.
    pub async fn start_with_ttl(
        replicas: usize,
        runners: usize,
        executor: &str,
        election_ttl_ms: u64,
    ) -> anyhow::Result<Self> {
        let etcd = EtcdCluster::start(3).await?;
        let mut c = Self {
            etcd,
            replicas: (0..replicas)
                .map(|_| Replica {
                    grpc: free_port(),
                    http: free_port(),
                    child: None,
                    paused: Default::default(),
                })
                .collect(),
            runners: Vec::new(),
            election_ttl_ms,
            lease_ms: 3000,
            token: "ha-token".into(),
            executor: executor.into(),
            dir: cluster_dir()?,
        };
        for i in 0..replicas {
            c.start_replica(i)?;
        }
        c.wait_leader(Duration::from_secs(20)).await?;
        for i in 0..runners {
            c.start_runner(&format!("runner-{i}"))?;
        }
        c.wait_runners(runners, Duration::from_secs(20)).await?;
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(Replica::url).collect()
    }

    fn log_dir(&self) -> PathBuf {
        self.dir().join("logs")
    }

    pub fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        let r = &self.replicas[i];
        let name = format!("coordinator-{i}");
        let child = Command::new(bin("capstan-coordinator"))
            .args(["--listen", &format!("127.0.0.1:{}", r.grpc)])
            .args(["--http-listen", &format!("127.0.0.1:{}", r.http)])
            .args(["--advertise", &r.url()])
            .arg("--data-dir")
            .arg(self.dir().join(format!("{name}.data")))
            .arg("--log-dir")
            .arg(self.log_dir())
            .args(["--etcd-endpoints", &self.etcd.endpoints().join(",")])
            .args(["--election-ttl-ms", &self.election_ttl_ms.to_string()])
            .args(["--lease-ms", &self.lease_ms.to_string()])
            .args(["--heartbeat-ms", "250"])
            .args(["--registration-token", &self.token])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file(self.dir(), &name))
            .stderr(log_file(self.dir(), &name))
            .spawn()
            .context("spawn coordinator")?;
        self.replicas[i].child = Some(child);
        Ok(())
    }

    pub fn start_runner(&mut self, name: &str) -> anyhow::Result<()> {
        let child = Command::new(bin("capstan-runner"))
            .args(["--coordinator", &self.urls().join(",")])
            .args(["--registration-token", &self.token])
            .args(["--name", name])
            .args(["--capacity", "2"])
            .args(["--executor", &self.executor])
            .arg("--work-dir")
            .arg(self.dir().join(format!("work-{name}")))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file(self.dir(), name))
            .stderr(log_file(self.dir(), name))
            .spawn()?;
        self.runners.push((name.to_string(), child));
        Ok(())
    }

    /// kill -9 of replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.replicas[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to replica `i` and wait for it to exit.
    pub fn terminate(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.replicas[i].child.take() {
            signal(c.id() as i32, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("replica {i} did not exit within 15 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn pause(&self, i: usize) {
        if let Some(pid) = self.replicas[i].pid() {
            signal(pid, nix::sys::signal::Signal::SIGSTOP);
            self.replicas[i]
                .paused
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub fn resume(&self, i: usize) {
        if let Some(pid) = self.replicas[i].pid() {
            signal(pid, nix::sys::signal::Signal::SIGCONT);
            self.replicas[i]
                .paused
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn answers(&self, i: usize) -> bool {
        let r = &self.replicas[i];
        r.child.is_some() && !r.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// AskLeader on replica `i`.
    pub async fn ask(&self, i: usize) -> anyhow::Result<cluster::AskLeaderResponse> {
        let mut c =
            cluster::cluster_service_client::ClusterServiceClient::connect(self.replicas[i].url())
                .await?;
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            c.ask_leader(cluster::AskLeaderRequest {}),
        )
        .await??;
        Ok(r.into_inner())
    }

    /// The index of the replica that says it leads, with its epoch.
    pub async fn leader(&self) -> Option<(usize, u64)> {
        for i in 0..self.replicas.len() {
            if !self.answers(i) {
                continue;
            }
            if let Ok(r) = self.ask(i).await
                && r.is_leader
            {
                return Some((i, r.epoch));
            }
        }
        None
    }

    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<(usize, u64)> {
        self.wait_new_leader(None, timeout).await
    }

    /// Waits for a leader other than `not` (any leader when None).
    pub async fn wait_new_leader(
        &self,
        not: Option<usize>,
        timeout: Duration,
    ) -> anyhow::Result<(usize, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((i, e)) = self.leader().await
                && Some(i) != not
            {
                return Ok((i, e));
            }
            if Instant::now() > deadline {
                bail!("no new leader within {timeout:?}\n{}", self.all_logs());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A client over every live replica that answers; it follows the leader.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let urls: Vec<String> = (0..self.replicas.len())
            .filter(|&i| self.answers(i))
            .map(|i| self.replicas[i].url())
            .collect();
        Ok(Client::connect(&urls).await?)
    }

    pub async fn submit(&self, yaml: &str) -> anyhow::Result<RunId> {
        Ok(self
            .client()
            .await?
            .submit_run(api::SubmitRunRequest {
                pipeline_yaml: yaml.into(),
                file_name: "ha.yaml".into(),
                ..Default::default()
            })
            .await?)
    }

    pub async fn wait_run(
        &self,
        id: &RunId,
        timeout: Duration,
        pred: impl Fn(&api::Run) -> bool,
    ) -> anyhow::Result<api::Run> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Ok(c) = self.client().await
                && let Ok(run) = c.get_run(id).await
            {
                if pred(&run) {
                    return Ok(run);
                }
                last = Some(run);
            }
            if Instant::now() > deadline {
                bail!(
                    "run {id} not as expected within {timeout:?}; last: {last:#?}\n{}",
                    self.all_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_done(&self, id: &RunId, timeout: Duration) -> anyhow::Result<api::Run> {
        self.wait_run(id, timeout, is_finished).await
    }

    pub async fn task_log(&self, id: &RunId, task: &str) -> anyhow::Result<Vec<u8>> {
        let mut s = self
            .client()
            .await?
            .read_logs(id, Some(task), false)
            .await?;
        let mut out = Vec::new();
        while let Some(chunk) = s.message().await? {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    pub async fn wait_runners(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(c) = self.client().await
                && let Ok(rs) = c.list_runners().await
                && rs.iter().filter(|r| r.connected).count() >= n
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{n} runners did not connect within {timeout:?}\n{}",
                    self.all_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tail of every process log, for failure messages.
    pub fn all_logs(&self) -> String {
        crate::tail_logs(self.dir(), 30)
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.runners {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..self.replicas.len() {
            self.resume(i);
            self.kill(i);
        }
    }
}
