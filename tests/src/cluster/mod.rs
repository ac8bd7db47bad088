//! [`TestCluster`]: the real `capstan-coordinator` and `capstan-runner`
//! binaries as separate processes talking gRPC over loopback, started by a
//! [`Builder`]:
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use capstan_tests::TestCluster;
//! // One standalone coordinator, one shell runner.
//! let c = TestCluster::builder().start().await?;
//! // Three replicas on a three-node etcd, two fake runners.
//! let ha = TestCluster::builder().replicas(3).etcd().runners(2).executor("fake").start().await?;
//! # Ok(()) }
//! ```
//!
//! Layout:
//! - `mod.rs`: the builder, the cluster's scratch dir, start and drop;
//! - `replicas`: the coordinator processes, kill/restart/pause, who leads;
//! - `runners`: the runner processes;
//! - `api`: submitting runs and waiting on them through the client API;
//! - `tokens`: the admin API token made at start (offline, as a user
//!   bootstraps one), other tokens, authenticated channels.
//!
//! Every process is a [`crate::process::Proc`] logging to `<dir>/<name>.log`;
//! every wait is [`crate::wait`]'s. Without etcd the cluster is one
//! standalone coordinator; with [`Builder::etcd`] it is `replicas`
//! coordinators electing a leader on a three-node [`EtcdCluster`], and the
//! runners and the API calls know every replica.

mod api;
mod replicas;
mod runners;
mod tokens;

pub use replicas::Replica;
pub use tokens::ADMIN_TOKEN_NAME;

use crate::certs::{CertFiles, Pki};
use crate::etcd::EtcdCluster;
use crate::process::{Proc, tail_logs};
use anyhow::bail;
use std::path::Path;
use std::time::Duration;

/// The variable that keeps a cluster's scratch dir after the cluster ends
/// (and prints its path): for reading the processes' logs after a slow
/// bench round or a failed test.
pub const KEEP_DIR_VAR: &str = "CAPSTAN_KEEP_CLUSTER_DIR";
/// Its older name, still honoured (bench/README.md used to document it).
pub const KEEP_DIR_VAR_OLD: &str = "CAPSTAN_KEEP_HA_DIR";

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct Builder {
    replicas: usize,
    etcd: bool,
    election_ttl_ms: u64,
    runners: usize,
    capacity: u32,
    executor: String,
    lease_ms: u64,
    heartbeat_ms: u64,
    labels: Vec<String>,
    runner_args: Vec<String>,
    coordinator_args: Vec<String>,
    env: Vec<(String, String)>,
    tls: bool,
    mtls: bool,
    advertise_unreachable: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            replicas: 1,
            etcd: false,
            election_ttl_ms: 5000,
            runners: 1,
            capacity: 1,
            executor: "shell".into(),
            lease_ms: 2000,
            heartbeat_ms: 250,
            labels: Vec::new(),
            runner_args: Vec::new(),
            coordinator_args: Vec::new(),
            env: Vec::new(),
            tls: false,
            mtls: false,
            advertise_unreachable: false,
        }
    }
}

impl Builder {
    /// Coordinator replicas (more than one needs [`Builder::etcd`]).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }
    /// Store and elect on a real three-node etcd cluster.
    pub fn etcd(mut self) -> Self {
        self.etcd = true;
        self
    }
    /// The leader lease TTL of the election (with etcd; default 5 s).
    pub fn election_ttl_ms(mut self, ms: u64) -> Self {
        self.election_ttl_ms = ms;
        self
    }
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
    /// The runners' heartbeat interval (`--heartbeat-ms`, default 250 ms).
    pub fn heartbeat_ms(mut self, ms: u64) -> Self {
        self.heartbeat_ms = ms;
        self
    }
    /// The coordinator's attempt lease (`--lease-ms`, default 2 s).
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

    /// TLS on the coordinators' ports with a test CA ([`TestCluster::pki`]):
    /// `https://` URLs, runners and the CLI given `--ca-cert`.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// [`Builder::tls`] and mTLS for runners: the coordinator trusts the
    /// same CA for client certificates (`--tls-client-ca`), and each runner
    /// presents one with CN = its name.
    pub fn mtls(mut self) -> Self {
        self.tls = true;
        self.mtls = true;
        self
    }

    /// Each replica on etcd advertises (names as the leader in its hints)
    /// an address nobody serves: its port on a loopback address of its own
    /// in 127.77.0.0/24, as a container advertises a name only its network
    /// resolves. Clients must reach the leader through the URLs they were
    /// given; runners cannot follow such hints, so use it with no runners.
    pub fn advertise_unreachable(mut self) -> Self {
        self.advertise_unreachable = true;
        self
    }

    /// Extra arguments for every runner (e.g. `--secrets-file PATH`).
    pub fn runner_args(mut self, args: &[&str]) -> Self {
        self.runner_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Starts etcd (if asked), the coordinators and the runners, and waits
    /// until a coordinator leads and every runner is connected.
    pub async fn start(self) -> anyhow::Result<TestCluster> {
        if self.replicas == 0 || (self.replicas > 1 && !self.etcd) {
            bail!(
                "a cluster has one standalone coordinator, or replicas on etcd: got {} replicas without etcd",
                self.replicas
            );
        }
        let etcd = if self.etcd {
            Some(EtcdCluster::start(3).await?)
        } else {
            None
        };
        let dir = scratch_dir()?;
        let pki = if self.tls {
            let pki = Pki::new(&dir.path().join("pki"), "capstan")?;
            pki.server("server")?;
            Some(pki)
        } else {
            None
        };
        let mut c = TestCluster {
            pki,
            replicas: (0..self.replicas)
                .map(|i| Replica::new(i, etcd.is_some(), self.tls))
                .collect(),
            runners: Vec::new(),
            token: format!("tok-{}", std::process::id()),
            api_token: String::new(),
            etcd,
            opts: self.clone(),
            dir,
        };
        c.api_token = c.create_token_offline(ADMIN_TOKEN_NAME, "admin", &[])?;
        if c.etcd.is_some() {
            for i in 0..self.replicas {
                c.spawn_replica(i)?;
            }
            c.wait_leader(Duration::from_secs(20)).await?;
        } else {
            c.start_standalone().await?;
        }
        for i in 0..self.runners {
            c.start_runner(&format!("runner-{i}"))?;
        }
        c.wait_runners_connected(self.runners, Duration::from_secs(20))
            .await?;
        Ok(c)
    }
}

/// The cluster's scratch dir (data dirs and every process's log); with
/// [`KEEP_DIR_VAR`]`=1` (or [`KEEP_DIR_VAR_OLD`]`=1`) it outlives the
/// cluster, and its path is printed.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let keep = [KEEP_DIR_VAR, KEEP_DIR_VAR_OLD]
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| v == "1"));
    let dir = tempfile::Builder::new()
        .prefix("capstan-cluster-")
        .disable_cleanup(keep)
        .tempdir()?;
    if keep {
        eprintln!("TestCluster: keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// Real processes on loopback; everything is killed on drop.
pub struct TestCluster {
    /// The coordinators, by index (one without etcd).
    pub replicas: Vec<Replica>,
    /// The runners started and not killed, in start order.
    pub runners: Vec<Proc>,
    /// The registration token every runner presents.
    pub token: String,
    /// The admin API token (named [`ADMIN_TOKEN_NAME`]) the harness's API
    /// calls and CLI runs carry; bootstrapped offline before the
    /// coordinators start.
    pub api_token: String,
    /// The etcd cluster under the replicas, with [`Builder::etcd`]
    /// (tests reach it through [`TestCluster::etcd`]).
    etcd: Option<EtcdCluster>,
    /// The test CA, with [`Builder::tls`].
    pki: Option<Pki>,
    opts: Builder,
    dir: tempfile::TempDir,
}

impl TestCluster {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The scratch dir: data dirs, work dirs and `<process>.log` files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test CA of a cluster started with [`Builder::tls`]: its
    /// certificate is `pki().ca_cert()`, the coordinators serve
    /// [`TestCluster::server_cert`].
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// The coordinators' `--tls-cert` and `--tls-key` (replace them to rotate).
    pub fn server_cert(&self) -> CertFiles {
        let dir = self.dir().join("pki");
        CertFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        }
    }

    /// What the cluster's clients trust: the test CA with [`Builder::tls`].
    pub fn client_tls(&self) -> capstan_tls::ClientTls {
        capstan_tls::ClientTls {
            ca_cert: self.pki.as_ref().map(Pki::ca_cert),
            ..Default::default()
        }
    }

    /// The runners' heartbeat interval.
    pub fn heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.opts.heartbeat_ms)
    }

    /// The attempt lease.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.opts.lease_ms)
    }

    /// The leader lease TTL of the election, in ms (with etcd).
    pub fn election_ttl_ms(&self) -> u64 {
        self.opts.election_ttl_ms
    }

    /// The etcd cluster; panics on a cluster started without one.
    pub fn etcd(&mut self) -> &mut EtcdCluster {
        self.etcd.as_mut().expect("a cluster started with .etcd()")
    }

    /// What a process of the cluster wrote to its log.
    pub fn process_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The tail of every process log, for failure messages.
    pub fn all_logs(&self) -> String {
        tail_logs(self.dir(), 40)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Runners first, so none sees its coordinator go and reconnects.
        self.runners.clear();
        self.replicas.clear();
    }
}
