//! The coordinator processes of a [`TestCluster`]: starting (and
//! restarting) a replica, killing, terminating and pausing it, and asking
//! who leads.

use super::TestCluster;
use crate::bins::bin;
use crate::net::{free_addr, http_get, https_get};
use crate::process::Proc;
use crate::wait::{eventually, poll_until};
use anyhow::bail;
use capstan_proto::cluster::v1 as cluster;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// One coordinator: its ports, and its process while it runs.
pub struct Replica {
    /// `coordinator` for a standalone one, `coordinator-<i>` for replica i.
    pub name: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Serves TLS on both ports.
    pub tls: bool,
    proc: Option<Proc>,
}

impl Replica {
    pub(super) fn new(i: usize, replicated: bool, tls: bool) -> Self {
        Self {
            name: if replicated {
                format!("coordinator-{i}")
            } else {
                "coordinator".into()
            },
            grpc: free_addr(),
            http: free_addr(),
            tls,
            proc: None,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Running and not paused: it answers calls.
    pub fn answers(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| !p.is_paused())
    }
}

/// Sets the builder's variables on `cmd`, after removing every `OTEL_*`
/// variable the test process itself may have (a developer's collector must
/// not receive, or slow down, the test cluster's spans).
pub(super) fn set_env(cmd: &mut Command, extra: &[(String, String)]) {
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
        cmd.env_remove(k);
    }
    cmd.envs(extra.iter().map(|(k, v)| (k, v)));
}

impl TestCluster {
    /// The gRPC URL of the first replica (the only one without etcd).
    pub fn url(&self) -> String {
        self.replicas[0].url()
    }

    /// The gRPC URL of every replica.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(Replica::url).collect()
    }

    /// The data dir of replica 0 (`coordinator-data`, standalone).
    pub fn data_dir(&self) -> PathBuf {
        self.replica_data_dir(0)
    }

    fn replica_data_dir(&self, i: usize) -> PathBuf {
        if self.etcd.is_some() {
            self.dir().join(format!("{}.data", self.replicas[i].name))
        } else {
            self.dir().join("coordinator-data")
        }
    }

    /// An HTTP/1.0 GET on replica 0's side port (over TLS with
    /// [`super::Builder::tls`]): (status, body).
    pub fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.http_get_on(self.replicas[0].http, path)
    }

    /// [`Self::http_get`] on replica `i`'s side port.
    pub fn http_get_replica(&self, i: usize, path: &str) -> anyhow::Result<(u16, String)> {
        self.http_get_on(self.replicas[i].http, path)
    }

    /// A plain HTTP/1.0 GET on replica 0's side port with the bearer
    /// `token` (None: no Authorization header): (status, body).
    pub fn http_get_auth(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        crate::net::http_get_with(self.replicas[0].http, path, &headers)
    }

    fn http_get_on(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        match self.pki() {
            Some(pki) => https_get(addr, path, &pki.ca_cert()).map(|a| (a.status, a.body)),
            None => http_get(addr, path),
        }
    }

    /// Spawns replica `i`'s process on its ports (no wait).
    pub(super) fn spawn_replica(&mut self, i: usize) -> anyhow::Result<()> {
        let r = &self.replicas[i];
        let mut cmd = Command::new(bin("capstan-coordinator"));
        set_env(&mut cmd, &self.opts.env);
        cmd.args(["--listen", &r.grpc.to_string()])
            .args(["--http-listen", &r.http.to_string()])
            .arg("--data-dir")
            .arg(self.replica_data_dir(i))
            .args(["--registration-token", &self.token])
            .args(["--lease-ms", &self.opts.lease_ms.to_string()])
            .args(["--heartbeat-ms", &self.opts.heartbeat_ms.to_string()]);
        if let Some(pki) = self.pki() {
            let server = self.server_cert();
            cmd.arg("--tls-cert")
                .arg(server.cert)
                .arg("--tls-key")
                .arg(server.key);
            if self.opts.mtls {
                cmd.arg("--tls-client-ca").arg(pki.ca_cert());
            }
        }
        if let Some(etcd) = &self.etcd {
            // Every replica serves the logs any leader wrote: one log dir.
            let advertise = if self.opts.advertise_unreachable {
                unreachable_url(&r.url(), i)
            } else {
                r.url()
            };
            cmd.args(["--advertise", &advertise])
                .arg("--log-dir")
                .arg(self.dir().join("logs"))
                .args(["--etcd-endpoints", &etcd.endpoints().join(",")])
                .args(["--election-ttl-ms", &self.opts.election_ttl_ms.to_string()]);
        }
        cmd.args(&self.opts.coordinator_args)
            .env("RUST_LOG", "info");
        let proc = Proc::spawn(cmd, self.dir(), &r.name)?;
        self.replicas[i].proc = Some(proc);
        Ok(())
    }

    /// Starts (or restarts) replica `i`. A standalone coordinator is waited
    /// for until `/readyz` says it serves; a replica on etcd is not (a
    /// follower is never ready: wait for a leader with
    /// [`TestCluster::wait_leader`]).
    pub async fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_replica(i)?;
        if self.etcd.is_some() {
            return Ok(());
        }
        let name = self.replicas[i].name.clone();
        let http = self.replicas[i].http;
        let log = |c: &Self| c.process_log(&name);
        let ready = poll_until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            async || {
                if let Ok((200, _)) = self.http_get_on(http, "/readyz") {
                    return Ok(Some(()));
                }
                if let Some(p) = self.replicas[i].proc.as_mut()
                    && let Some(status) = p.try_wait()?
                {
                    bail!("{name} exited with {status}:\n{}", log(self));
                }
                Ok(None)
            },
        )
        .await?;
        if ready.is_none() {
            bail!("{name} not ready in 20 s:\n{}", log(self));
        }
        Ok(())
    }

    /// Starts the standalone coordinator. Its ports were free when picked,
    /// but another process (a client's ephemeral port, a parallel test) may
    /// take one before the coordinator binds it: pick new ones and try again.
    pub(super) async fn start_standalone(&mut self) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            match self.start_replica(0).await {
                Err(e) if tries < 5 && format!("{e:#}").contains("Address already in use") => {
                    tries += 1;
                    self.replicas[0].grpc = free_addr();
                    self.replicas[0].http = free_addr();
                }
                other => return other,
            }
        }
    }

    /// kill -9 of replica `i`.
    pub fn kill_replica(&mut self, i: usize) {
        // Dropping the process kills and reaps it.
        self.replicas[i].proc = None;
    }

    /// SIGTERM to replica `i`; waits up to `timeout` for it to exit and
    /// returns how long that took.
    pub fn terminate_replica(&mut self, i: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let Some(mut p) = self.replicas[i].proc.take() else {
            bail!("{} is not running", self.replicas[i].name);
        };
        p.terminate(timeout)
            .map_err(|e| e.context(self.process_log(&self.replicas[i].name)))
    }

    /// SIGSTOP to replica `i`: it keeps its sockets and answers nothing.
    pub fn pause(&self, i: usize) {
        if let Some(p) = &self.replicas[i].proc {
            p.pause();
        }
    }

    /// SIGCONT to replica `i` after [`TestCluster::pause`].
    pub fn resume(&self, i: usize) {
        if let Some(p) = &self.replicas[i].proc {
            p.resume();
        }
    }

    /// AskLeader on replica `i`.
    pub async fn ask(&self, i: usize) -> anyhow::Result<cluster::AskLeaderResponse> {
        let mut c = cluster::cluster_service_client::ClusterServiceClient::new(
            self.admin_channel(&self.replicas[i].url()).await?,
        );
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
            if !self.replicas[i].answers() {
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
        eventually(
            timeout,
            Duration::from_millis(25),
            async || Ok(self.leader().await.filter(|(i, _)| Some(*i) != not)),
            || format!("no new leader within {timeout:?}\n{}", self.all_logs()),
        )
        .await
    }
}

/// `url` with its host replaced by 127.77.0.(i+1): the same port on a
/// loopback address nothing listens on (connections are refused).
fn unreachable_url(url: &str, i: usize) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let port = rest.rsplit_once(':').map_or("7700", |(_, p)| p);
    format!("{scheme}://127.77.0.{}:{port}", i + 1)
}
