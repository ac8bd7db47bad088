//! A Capstan fleet in containers: etcd members, coordinators and runners
//! from the images `deploy/images/build` makes, on a private `--internal`
//! network this harness creates, so the tests can cut them off from each
//! other the way real networks do (see [`docker`] for the faults).
//!
//! The host reaches every container by its address on that network (the
//! engine gives the host the bridge's gateway address even on an internal
//! network, and publishes no port there), so the test drives the fleet from
//! outside through the API and the `capstan` CLI, as a user would.
//! Everything is labelled `capstan.fleet=<id>` and removed when the [`Fleet`]
//! drops, after a failure too.
//!
//! Runners use the shell executor (busybox sh in the runner image): no
//! Docker-in-Docker; their steps write marks to a directory shared with the
//! host (`/shared`), which [`checks`] reads.

pub mod checks;
pub mod docker;

use crate::bins::bin;
use crate::wait::eventually;
use anyhow::{Context as _, bail};
use capstan_proto::cluster::v1 as cluster;
use docker::docker;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The images' tag: `CAPSTAN_FLEET_TAG`, default `dev` (the build's default).
pub fn image_tag() -> String {
    std::env::var("CAPSTAN_FLEET_TAG").unwrap_or_else(|_| "dev".into())
}

/// Timings shared by every member, tuned like the partition lab's.
pub struct Timings {
    pub election_ttl_ms: u64,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            election_ttl_ms: 3000,
            lease_ms: 3000,
            heartbeat_ms: 500,
        }
    }
}

/// A running fleet. `etcd[i]`, `coordinators[i]`, `runners[i]` are container
/// names; [`Fleet::ip`] gives their addresses.
pub struct Fleet {
    pub id: String,
    pub network: String,
    /// The network's /24 as `a.b.c` (members at .11.., .21.., .31..).
    net24: String,
    pub etcd: Vec<String>,
    pub coordinators: Vec<String>,
    pub runners: Vec<String>,
    pub timings: Timings,
    /// The runners' `/shared`, on the host.
    pub shared: tempfile::TempDir,
    /// The coordinators' common `--log-dir` (task logs live in a directory
    /// every replica reaches: README "high availability").
    logs: tempfile::TempDir,
    pub registration_token: String,
    pub api_token: String,
}

impl Fleet {
    /// Starts `etcd` members, `coordinators` and `runners` (capacity
    /// `capacity` each) and waits until a leader leads and every runner is
    /// connected.
    pub async fn start(
        etcd: usize,
        coordinators: usize,
        runners: usize,
        capacity: u32,
    ) -> anyhow::Result<Fleet> {
        let tag = image_tag();
        for image in ["coordinator", "runner", "etcd"] {
            let name = format!("capstan/{image}:{tag}");
            if !docker::image_exists(&name) {
                bail!(
                    "image {name} is missing: run `deploy/images/build {tag}` first (scripts/test does)"
                );
            }
        }
        let id = format!("{}-{}", std::process::id(), rand_suffix());
        let shared = tempfile::tempdir()?;
        let logs = tempfile::tempdir()?;
        // The coordinator image runs as uid 10001.
        std::os::unix::fs::chown(logs.path(), Some(10001), Some(10001))?;
        let (network, net24) = create_network(&id)?;
        let mut fleet = Fleet {
            network,
            net24,
            etcd: (1..=etcd)
                .map(|i| format!("capstan-fleet-{id}-etcd-{i}"))
                .collect(),
            coordinators: (1..=coordinators)
                .map(|i| format!("capstan-fleet-{id}-coordinator-{i}"))
                .collect(),
            runners: (1..=runners)
                .map(|i| format!("capstan-fleet-{id}-runner-{i}"))
                .collect(),
            id,
            timings: Timings::default(),
            shared,
            logs,
            registration_token: format!("fleet-{}", rand_suffix()),
            api_token: String::new(),
        };
        fleet.start_etcd(&tag)?;
        fleet.wait_etcd().await?;
        fleet.api_token = fleet.create_admin_token()?;
        for i in 0..coordinators {
            fleet.start_coordinator(&tag, i)?;
        }
        fleet.wait_leader(Duration::from_secs(30)).await?;
        for i in 0..runners {
            fleet.start_runner(&tag, i, capacity)?;
        }
        fleet.wait_runners(runners, Duration::from_secs(30)).await?;
        Ok(fleet)
    }

    fn labels(&self) -> Vec<String> {
        vec!["--label".into(), format!("capstan.fleet={}", self.id)]
    }

    /// The container's address on the fleet network.
    pub fn ip(&self, container: &str) -> String {
        let at = |list: &[String], base: usize| {
            list.iter()
                .position(|c| c == container)
                .map(|i| format!("{}.{}", self.net24, base + i))
        };
        at(&self.etcd, 11)
            .or_else(|| at(&self.coordinators, 21))
            .or_else(|| at(&self.runners, 31))
            .unwrap_or_else(|| panic!("{container} is not in this fleet"))
    }

    /// The host's address on the fleet network (where the CLI comes from).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.net24)
    }

    pub fn ips(&self, containers: &[String]) -> Vec<String> {
        containers.iter().map(|c| self.ip(c)).collect()
    }

    pub fn etcd_endpoints(&self) -> String {
        self.etcd
            .iter()
            .map(|e| format!("http://{}:2379", self.ip(e)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The coordinator's gRPC URL (what it advertises).
    pub fn url(&self, coordinator: &str) -> String {
        format!("http://{}:7700", self.ip(coordinator))
    }

    pub fn urls(&self) -> Vec<String> {
        self.coordinators.iter().map(|c| self.url(c)).collect()
    }

    fn run_container(
        &self,
        name: &str,
        image: &str,
        extra: &[String],
        args: &[String],
    ) -> anyhow::Result<()> {
        let mut a: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.into()];
        a.extend(["--hostname".into(), short_name(name)]);
        a.extend([
            "--network".into(),
            self.network.clone(),
            "--ip".into(),
            self.ip(name),
        ]);
        a.extend(self.labels());
        a.extend(extra.iter().cloned());
        a.push(image.into());
        a.extend(args.iter().cloned());
        docker(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(())
    }

    fn start_etcd(&self, tag: &str) -> anyhow::Result<()> {
        let cluster: Vec<String> = self
            .etcd
            .iter()
            .map(|e| format!("{}=http://{}:2380", short_name(e), self.ip(e)))
            .collect();
        for e in &self.etcd {
            let ip = self.ip(e);
            let args: Vec<String> = [
                "--name",
                &short_name(e),
                "--advertise-client-urls",
                &format!("http://{ip}:2379"),
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &self.id,
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
            ]
            .map(String::from)
            .into();
            self.run_container(e, &format!("capstan/etcd:{tag}"), &[], &args)?;
        }
        Ok(())
    }

    async fn wait_etcd(&self) -> anyhow::Result<()> {
        let addrs: Vec<std::net::SocketAddr> = self
            .etcd
            .iter()
            .map(|e| format!("{}:2379", self.ip(e)).parse())
            .collect::<Result<_, _>>()?;
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(200),
            async || {
                let healthy = addrs.iter().all(|a| {
                    crate::net::http_get(*a, "/health").is_ok_and(|(status, body)| {
                        status == 200 && body.contains("\"health\":\"true\"")
                    })
                });
                Ok(healthy.then_some(()))
            },
            || format!("etcd did not become healthy\n{}", self.all_logs()),
        )
        .await
    }

    /// The first admin token, made offline against etcd the way a user does.
    fn create_admin_token(&self) -> anyhow::Result<String> {
        let out = Command::new(bin("capstan-coordinator"))
            .args([
                "token",
                "create",
                "--name",
                "fleet-admin",
                "--scope",
                "admin",
            ])
            .args(["--etcd-endpoints", &self.etcd_endpoints()])
            .stdin(Stdio::null())
            .output()
            .context("run capstan-coordinator token create")?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    fn start_coordinator(&self, tag: &str, i: usize) -> anyhow::Result<()> {
        let c = &self.coordinators[i];
        let t = &self.timings;
        let args: Vec<String> = [
            "--advertise",
            &self.url(c),
            "--etcd-endpoints",
            &self.etcd_endpoints(),
            "--registration-token",
            &self.registration_token,
            "--election-ttl-ms",
            &t.election_ttl_ms.to_string(),
            "--lease-ms",
            &t.lease_ms.to_string(),
            "--heartbeat-ms",
            &t.heartbeat_ms.to_string(),
            "--insecure",
            "--log-dir",
            "/shared-logs",
        ]
        .map(String::from)
        .into();
        let extra: Vec<String> = vec![
            "-e".into(),
            "RUST_LOG=info".into(),
            "-v".into(),
            format!("{}:/shared-logs", self.logs.path().display()),
        ];
        self.run_container(c, &format!("capstan/coordinator:{tag}"), &extra, &args)
    }

    fn start_runner(&self, tag: &str, i: usize, capacity: u32) -> anyhow::Result<()> {
        let r = &self.runners[i];
        let extra: Vec<String> = vec![
            "-e".into(),
            "RUST_LOG=info".into(),
            "-v".into(),
            format!("{}:/shared", self.shared.path().display()),
        ];
        let args: Vec<String> = [
            "--coordinator",
            &self.urls().join(","),
            "--registration-token",
            &self.registration_token,
            "--name",
            &short_name(r),
            "--labels",
            &format!("host={}", short_name(r)),
            "--capacity",
            &capacity.to_string(),
            "--executor",
            "shell",
        ]
        .map(String::from)
        .into();
        self.run_container(r, &format!("capstan/runner:{tag}"), &extra, &args)
    }

    /// A leader-following client over every coordinator, with the admin token.
    pub async fn client(&self) -> anyhow::Result<capstan_client::Client> {
        let options = capstan_client::ClientOptions {
            token: capstan_client::Bearer::new(Some(&self.api_token))?,
            ..Default::default()
        };
        Ok(capstan_client::Client::connect_with(&self.urls(), options).await?)
    }

    /// Runs the `capstan` CLI on the host against every coordinator.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("capstan"))
            .args(["--server", &self.urls().join(",")])
            .args(args)
            .env("CAPSTAN_TOKEN", &self.api_token)
            .env_remove("CAPSTAN_TOKEN_FILE")
            .stdin(Stdio::null())
            .output()
            .expect("run capstan")
    }

    /// What the coordinator says about the election (3 s limit).
    pub async fn ask(&self, coordinator: &str) -> anyhow::Result<cluster::AskLeaderResponse> {
        let channel = crate::net::endpoint(&self.url(coordinator), &Default::default())?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let channel = capstan_client::auth::authed(
            channel,
            capstan_client::Bearer::new(Some(&self.api_token))?,
        );
        let mut c = cluster::cluster_service_client::ClusterServiceClient::new(channel);
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            c.ask_leader(cluster::AskLeaderRequest {}),
        )
        .await??;
        Ok(r.into_inner())
    }

    /// The coordinator's `/readyz` (status, body): 200 `ready: leader` on the
    /// leader only. Unlike the gRPC API it needs no token, so it answers
    /// even when the coordinator cannot read its tokens from etcd.
    pub fn readyz(&self, coordinator: &str) -> anyhow::Result<(u16, String)> {
        let addr = format!("{}:7701", self.ip(coordinator)).parse()?;
        crate::net::http_get(addr, "/readyz")
    }

    /// The coordinator that says it leads, and its epoch.
    pub async fn leader(&self) -> Option<(String, u64)> {
        for c in &self.coordinators {
            if let Ok(r) = self.ask(c).await
                && r.is_leader
            {
                return Some((c.clone(), r.epoch));
            }
        }
        None
    }

    /// Waits for a leader other than `not`.
    pub async fn wait_new_leader(
        &self,
        not: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<(String, u64)> {
        eventually(
            timeout,
            Duration::from_millis(100),
            async || Ok(self.leader().await.filter(|(c, _)| Some(c.as_str()) != not)),
            || format!("no new leader within {timeout:?}\n{}", self.all_logs()),
        )
        .await
    }

    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<(String, u64)> {
        self.wait_new_leader(None, timeout).await
    }

    /// Waits until `n` runners are connected to the leader.
    pub async fn wait_runners(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        eventually(
            timeout,
            Duration::from_millis(200),
            async || {
                let Ok(client) = self.client().await else {
                    return Ok(None);
                };
                let connected = client
                    .list_runners()
                    .await
                    .map(|r| r.iter().filter(|r| r.connected).count());
                Ok(connected.is_ok_and(|c| c >= n).then_some(()))
            },
            || {
                format!(
                    "{n} runners did not connect in {timeout:?}\n{}",
                    self.all_logs()
                )
            },
        )
        .await
    }

    /// The last lines of every container's output, for failure messages.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for c in self
            .etcd
            .iter()
            .chain(&self.coordinators)
            .chain(&self.runners)
        {
            let logs = Command::new("docker")
                .args(["logs", "--tail", "60", c])
                .output();
            if let Ok(l) = logs {
                out.push_str(&format!(
                    "--- {c}\n{}{}",
                    String::from_utf8_lossy(&l.stdout),
                    String::from_utf8_lossy(&l.stderr)
                ));
            }
        }
        out
    }

    /// The shared directory's path on the host.
    pub fn shared(&self) -> &Path {
        self.shared.path()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::env::var_os("CAPSTAN_FLEET_KEEP").is_some() {
            eprintln!("CAPSTAN_FLEET_KEEP: leaving fleet {} running", self.id);
            return;
        }
        let filter = format!("label=capstan.fleet={}", self.id);
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids);
                let _ = docker(&args);
            }
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// `capstan-fleet-<id>-runner-1` -> `runner-1`.
fn short_name(container: &str) -> String {
    let parts: Vec<&str> = container.rsplitn(3, '-').collect();
    format!("{}-{}", parts[1], parts[0])
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{:06x}", nanos & 0xff_ffff)
}

/// An `--internal` network on a free /24 of 10.213.0.0/16 (the engine
/// refuses one that overlaps another network: try the next). A fixed subnet
/// lets every member have a fixed address, known before it starts.
fn create_network(id: &str) -> anyhow::Result<(String, String)> {
    let name = format!("capstan-fleet-{id}");
    let start = (std::process::id() as usize) % 250;
    let mut last = None;
    for k in 0..250 {
        let third = (start + k) % 250 + 1;
        let net24 = format!("10.213.{third}");
        let r = docker(&[
            "network",
            "create",
            "--internal",
            "--subnet",
            &format!("{net24}.0/24"),
            "--gateway",
            &format!("{net24}.1"),
            "--label",
            &format!("capstan.fleet={id}"),
            &name,
        ]);
        match r {
            Ok(_) => return Ok((name, net24)),
            Err(e) if e.to_string().contains("overlap") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no free /24 in 10.213.0.0/16")))
}
