//! A real etcd cluster (Debian's `etcd-server`, installed by `scripts/testbed`)
//! on loopback ports, one process per member, killed on drop.

use crate::net::free_port;
use crate::process::{Proc, tail_logs};
use crate::wait::eventually;
use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    proc: Option<Proc>,
}

pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    dir: tempfile::TempDir,
}

fn etcd_bin() -> PathBuf {
    let p = PathBuf::from(std::env::var("CAPSTAN_ETCD_BIN").unwrap_or_else(|_| "etcd".into()));
    if p.components().count() == 1 {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let c = PathBuf::from(dir).join(&p);
            if c.exists() {
                return c;
            }
        }
        panic!("etcd is not installed: run scripts/testbed up (it installs Debian's etcd-server)");
    }
    p
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one answers `/health`.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        // Ports come from `free_port` (bound and released), so another test
        // may take one before etcd binds it: start again on fresh ports.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(n).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    async fn try_start(n: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("n{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                proc: None,
            })
            .collect();
        let mut c = Self { members, dir };
        for i in 0..n {
            c.spawn(i)?;
        }
        for i in 0..n {
            if let Err(e) = c.wait_healthy(i, Duration::from_secs(20)).await {
                let log = tail_logs(c.dir.path(), 10);
                return Err(e.context(log)); // dropping `c` kills every member
            }
        }
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial = self.initial_cluster();
        let dir = self.dir.path().to_path_buf();
        let m = &mut self.members[i];
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(dir.join(format!("{}.data", m.name)))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", m.client_port),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", m.client_port),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer_port),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer_port),
            ])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"]);
        let proc = Proc::spawn(cmd, &dir, &m.name)?;
        m.proc = Some(proc);
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let port = self.members[i].client_port;
        eventually(
            timeout,
            Duration::from_millis(100),
            async || {
                if health(port).unwrap_or(false) {
                    return Ok(Some(()));
                }
                // A member that could not bind its ports exits at once.
                for m in &mut self.members {
                    if let Some(p) = m.proc.as_mut()
                        && let Ok(Some(status)) = p.try_wait()
                    {
                        bail!("etcd member {} exited with {status}", m.name);
                    }
                }
                Ok(None)
            },
            || format!("etcd member {i} not healthy in {timeout:?}"),
        )
        .await
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The index of the member that is etcd's raft leader now (asked with
    /// `etcdctl endpoint status`, from Debian's etcd-client).
    pub fn raft_leader(&self) -> anyhow::Result<usize> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints().join(",")])
            .args(["endpoint", "status", "-w", "json"])
            .output()
            .context("run etcdctl (scripts/testbed up installs etcd-client)")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("etcdctl said: {}", String::from_utf8_lossy(&out.stderr)))?;
        let statuses = v.as_array().cloned().unwrap_or_default();
        for (i, member) in self.endpoints().iter().enumerate() {
            let status = statuses
                .iter()
                .find(|s| s["Endpoint"].as_str() == Some(member.as_str()));
            if let Some(s) = status
                && s["Status"]["header"]["member_id"] == s["Status"]["leader"]
            {
                return Ok(i);
            }
        }
        bail!("no member says it leads: {v}")
    }

    /// Every key and value in the cluster, as `etcdctl get --prefix ""`
    /// prints them (key line, value line): to check what is stored in clear.
    pub fn dump(&self) -> anyhow::Result<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints().join(",")])
            .args(["get", "--prefix", ""])
            .output()
            .context("run etcdctl (scripts/testbed up installs etcd-client)")?;
        if !out.status.success() {
            bail!(
                "etcdctl get failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// kill -9 of member `i`.
    pub fn kill(&mut self, i: usize) {
        // Dropping the process kills and reaps it.
        self.members[i].proc = None;
    }

    /// Restarts member `i` with its data (it rejoins the cluster).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        Ok(())
    }
}

/// GET /health on a member: true when it reports healthy.
fn health(port: u16) -> anyhow::Result<bool> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp.contains("\"health\":\"true\""))
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
