//! The compose cluster of `deploy/compose` (3 etcd, 3 coordinators, 2
//! runners; TLS, mTLS and tokens on), brought up by its own `up` script
//! under a project name and a state dir of its own, driven from the host as
//! a user would (the published ports, the `capstan` CLI with the CA and the
//! admin token `up` made), and removed by its `down` script when dropped,
//! after a failure too.
//!
//! The images are the ones `deploy/images/build` made, tag
//! [`crate::fleet::image_tag`]; the runners' helper image is the test bed's.

use crate::bins::bin;
use anyhow::{Context as _, bail};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A compose project that is up. [`ComposeCluster::down`] removes it (and
/// says what is left, if anything); dropping it removes it too.
pub struct ComposeCluster {
    pub project: String,
    state: tempfile::TempDir,
    /// `CAPSTAN_SERVER`, `CAPSTAN_CA_CERT`, `CAPSTAN_TOKEN_FILE` from `up`.
    env: Vec<(String, String)>,
    removed: bool,
}

fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose")
}

impl ComposeCluster {
    /// Runs `deploy/compose/up` for a new project named after `name`, with
    /// `env` added to its environment (e.g. `CAPSTAN_ELECTION_TTL_MS`).
    pub fn up(name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let mut c = ComposeCluster {
            project: format!("cps-{name}-{}-{nanos}", std::process::id()),
            state: tempfile::tempdir()?,
            env: Vec::new(),
            removed: false,
        };
        let mut up = c.script("up");
        for (k, v) in env {
            up.env(k, v);
        }
        let out = up.output().context("run deploy/compose/up")?;
        if !out.status.success() {
            bail!(
                "deploy/compose/up failed ({}):\n{}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                c.logs()
            );
        }
        c.reload_env()?;
        Ok(c)
    }

    /// Reads what `up` (or `etcd-restore`) last wrote for the host's CLI.
    fn reload_env(&mut self) -> anyhow::Result<()> {
        let env_file = self.state_dir().join("env");
        let text = std::fs::read_to_string(&env_file)
            .with_context(|| format!("read {}", env_file.display()))?;
        self.env = text
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(())
    }

    /// Runs `deploy/compose/NAME ARGS` (e.g. `etcd-backup FILE`) on this
    /// project, then re-reads the CLI's environment it may have rewritten;
    /// fails with its output unless it succeeded.
    pub fn run_script(&mut self, name: &str, args: &[&str]) -> anyhow::Result<Output> {
        let out = self
            .script(name)
            .args(args)
            .output()
            .with_context(|| format!("run deploy/compose/{name}"))?;
        if !out.status.success() {
            bail!(
                "deploy/compose/{name} failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        self.reload_env()?;
        Ok(out)
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    fn script(&self, name: &str) -> Command {
        let mut cmd = Command::new(scripts_dir().join(name));
        cmd.env("CAPSTAN_COMPOSE_PROJECT", &self.project)
            // Only local images: nothing a test runs may pull from outside.
            .env("CAPSTAN_DOCKER_PULL", "never")
            .env("CAPSTAN_COMPOSE_STATE", self.state_dir())
            .env("CAPSTAN_TAG", crate::fleet::image_tag())
            .env("CAPSTAN_CLI", bin("capstan"))
            .stdin(Stdio::null());
        cmd
    }

    /// A value `up` printed for the host's CLI (`CAPSTAN_SERVER`, ...).
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The coordinators' published URLs as `up` printed them
    /// (`https://127.0.0.1:PORT`).
    pub fn servers(&self) -> Vec<String> {
        self.env("CAPSTAN_SERVER")
            .unwrap_or_default()
            .split(',')
            .map(String::from)
            .collect()
    }

    /// The published URL of each coordinator running now, asked of the
    /// engine: a container started again, or connected to the network
    /// again, gets a new port.
    pub fn live_servers(&self) -> Vec<String> {
        (1..=3)
            .filter_map(|i| {
                let out = self
                    .compose(&["port", &format!("coordinator-{i}"), "7700"])
                    .ok()?;
                let port = String::from_utf8(out.stdout).ok()?.trim().to_string();
                port.contains(':').then(|| format!("https://{port}"))
            })
            .collect()
    }

    /// A client of `servers` (e.g. [`Self::live_servers`]) with the
    /// cluster's CA and admin token, and `timeout` for connecting and for
    /// retrying a call.
    pub async fn client(
        &self,
        servers: &[String],
        timeout: std::time::Duration,
    ) -> anyhow::Result<capstan_client::Client> {
        let token = std::fs::read_to_string(self.state_dir().join("admin.token"))?;
        let options = capstan_client::ClientOptions {
            connect_timeout: timeout,
            connect_retry_for: timeout,
            retry_for: timeout,
            request_timeout: timeout,
            token: capstan_client::Bearer::new(Some(token.trim()))?,
            tls: capstan_tls::ClientTls {
                ca_cert: Some(self.state_dir().join("certs/ca.pem")),
                ..Default::default()
            },
        };
        Ok(capstan_client::Client::connect_with(servers, options).await?)
    }

    /// The network the services are on (`PROJECT_capstan`).
    pub fn network(&self) -> String {
        format!("{}_capstan", self.project)
    }

    /// The host's `capstan` CLI with what `up` printed (servers, CA, token).
    pub fn cli_command(&self) -> Command {
        let mut cmd = Command::new(bin("capstan"));
        cmd.env_remove("CAPSTAN_TOKEN").stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command().args(args).output().expect("run capstan")
    }

    /// `docker-compose` on this project.
    pub fn compose(&self, args: &[&str]) -> anyhow::Result<Output> {
        let token = std::fs::read_to_string(self.state_dir().join("registration.token"))
            .unwrap_or_default();
        Ok(Command::new("docker-compose")
            // Only local images: nothing a test runs may pull from outside.
            .env("CAPSTAN_DOCKER_PULL", "never")
            .env("COMPOSE_PROJECT_NAME", &self.project)
            .env("COMPOSE_FILE", scripts_dir().join("docker-compose.yaml"))
            .env("CAPSTAN_COMPOSE_STATE", self.state_dir())
            .env("CAPSTAN_TAG", crate::fleet::image_tag())
            .env("CAPSTAN_REGISTRATION_TOKEN", token.trim())
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// The container of `service` (e.g. `coordinator-2`).
    pub fn container(&self, service: &str) -> anyhow::Result<String> {
        let out = self.compose(&["ps", "-q", service])?;
        let id = String::from_utf8(out.stdout)?.trim().to_string();
        if id.is_empty() {
            bail!("no container for {service} in {}", self.project);
        }
        Ok(id)
    }

    /// The service whose coordinator leads, from its advertised URL, asked
    /// through the ports published now.
    pub fn leader_service(&self) -> anyhow::Result<String> {
        let out = self
            .cli_command()
            .env("CAPSTAN_SERVER", self.live_servers().join(","))
            .args(["cluster", "-o", "json"])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("capstan cluster: {out:?}"))?;
        let leader = v["leader"].as_str().unwrap_or_default();
        let host = leader
            .strip_prefix("https://")
            .and_then(|h| h.split(':').next())
            .filter(|h| h.starts_with("coordinator-"));
        host.map(String::from)
            .with_context(|| format!("no leader named in {v}"))
    }

    /// Every service's log (for failure messages).
    pub fn logs(&self) -> String {
        match self.compose(&["logs", "--no-color", "--tail", "40"]) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => format!("(no logs: {e})"),
        }
    }

    /// Runs `deploy/compose/down`; fails naming what it left behind.
    pub fn down(mut self) -> anyhow::Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> anyhow::Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let out = self.script("down").output()?;
        if !out.status.success() {
            bail!(
                "deploy/compose/down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut left = String::new();
        for what in [
            &["ps", "-aq"][..],
            &["volume", "ls", "-q"],
            &["network", "ls", "-q"],
        ] {
            let out = Command::new("docker")
                .args(what)
                .args(["--filter", &label])
                .output()?;
            left.push_str(String::from_utf8_lossy(&out.stdout).trim());
        }
        if !left.is_empty() {
            bail!("deploy/compose/down left {left}");
        }
        Ok(())
    }
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("{e:#}");
        }
    }
}
