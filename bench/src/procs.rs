//! Real processes on loopback: the `capstan-coordinator` and `capstan-runner`
//! binaries, found next to `capstan-bench` (or in `$CAPSTAN_BIN_DIR`), and
//! what `/proc` says about them. The processes are the test harness's
//! [`Proc`]s and its waits; what is the bench's own is their environment
//! (Buildbot's, see [`daemon`]) and their flags.

use anyhow::{Context, bail};
use capstan_client::AuthChannel;
use capstan_proto::api::v1 as api;
use capstan_proto::api::v1::pipeline_service_client::PipelineServiceClient;
use capstan_tests::process::Proc;
use capstan_tests::wait::{eventually, poll_until};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the binaries are: `$CAPSTAN_BIN_DIR`, else the directory of this
/// executable (`target/<profile>/`), so a release bench runs release daemons.
pub(crate) fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAPSTAN_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Starts `program` with the minimal environment the Buildbot harness gives
/// its master and workers (`../shared/peers/buildbot/bench.py`,
/// `child_env`): `PATH`, `HOME`, `LANG`, and `RUST_LOG=warn`, plus what
/// configures the daemons or their Docker client (`CAPSTAN_*`, `DOCKER_*`)
/// and `TMPDIR` when set. Both sides then run their steps under the same
/// conditions (a step's `sh` walks the same short `PATH`), whatever else the
/// shell that started the bench exported.
fn daemon(program: PathBuf) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("RUST_LOG", "warn");
    for (name, value) in std::env::vars_os() {
        let keep = name == "HOME"
            || name == "TMPDIR"
            || name
                .to_str()
                .is_some_and(|n| n.starts_with("CAPSTAN_") || n.starts_with("DOCKER_"));
        if keep {
            cmd.env(name, value);
        }
    }
    cmd
}

/// `name` in the directory `dir`, which must hold it.
fn bin_in(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build it first (cargo build -p capstan-coordinator -p capstan-runner, \
             with the same profile as capstan-bench) or set CAPSTAN_BIN_DIR",
            p.display()
        );
    }
    Ok(p)
}

/// `capstan-coordinator token create` in the store the coordinator will use
/// (`data_dir`, or etcd when `flags` name it), offline, before it starts:
/// the admin token it prints. None for a build without the subcommand,
/// which has no tokens to check either.
fn bootstrap_token(
    bins: &Path,
    data_dir: &Path,
    flags: &[String],
) -> anyhow::Result<Option<String>> {
    // One name per coordinator: several may share one etcd prefix.
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "bench-{}",
        STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut cmd = daemon(bin_in(bins, "capstan-coordinator")?);
    cmd.args(["token", "create", "--name", &name, "--scope", "admin"])
        .arg("--data-dir")
        .arg(data_dir);
    for pair in flags.windows(2) {
        if matches!(pair[0].as_str(), "--etcd-endpoints" | "--etcd-prefix") {
            cmd.args(pair);
        }
    }
    let out = cmd
        .output()
        .context("run capstan-coordinator token create")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("unrecognized subcommand") || stderr.contains("unexpected argument") {
            return Ok(None);
        }
        bail!("capstan-coordinator token create failed: {stderr}");
    }
    Ok(Some(String::from_utf8(out.stdout)?.trim().to_string()))
}

/// A free loopback port (bound and released).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME, like `date +%s%N`).
pub(crate) fn epoch_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// An endpoint for `url`, trusting `ca` for `https://` ones.
pub(crate) fn endpoint(url: &str, ca: Option<&Path>) -> anyhow::Result<tonic::transport::Endpoint> {
    let tls = capstan_tls::ClientTls {
        ca_cert: ca.map(Path::to_path_buf),
        ..Default::default()
    };
    capstan_tests::endpoint(url, &tls)
}

/// A `capstan-coordinator` process; killed on drop.
pub(crate) struct Coordinator {
    proc: Proc,
    pub(crate) grpc: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) token: String,
    /// The admin API token every client of the bench carries (made offline
    /// before the start, as a user bootstraps one); None for a build that
    /// has no tokens (an A/B against an older commit).
    pub(crate) api_token: Option<String>,
    pub(crate) dir: PathBuf,
    /// Where this coordinator's binary came from; its runners come from there too.
    bins: PathBuf,
    /// The CA of its certificate, when it serves TLS ([`Coordinator::start_tls`]).
    pub(crate) ca: Option<PathBuf>,
    /// Process start -> `/readyz` 200 and an API call answered (5 ms polls).
    pub(crate) ready_in: Duration,
}

impl Coordinator {
    /// Starts a coordinator with its data dir under `dir` and waits for `/readyz`.
    /// `extra` are more flags (`--lease-ms 2000`, ...).
    pub(crate) async fn start(dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
        Self::launch(&bin_dir(), dir, extra, false).await
    }

    /// [`Coordinator::start`] with TLS on both ports (`--tls-cert`, a test
    /// CA made in `dir/pki`): its clients and runners trust that CA.
    pub(crate) async fn start_tls(dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
        Self::launch(&bin_dir(), dir, extra, true).await
    }

    /// [`Coordinator::start`] with the binaries (this one and its runners')
    /// from `bins` instead of [`bin_dir`]: two builds side by side.
    pub(crate) async fn start_from(
        bins: &Path,
        dir: &Path,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        Self::launch(bins, dir, extra, false).await
    }

    async fn launch(bins: &Path, dir: &Path, extra: &[String], tls: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let token = format!("bench-{}", std::process::id());
        let api_token = bootstrap_token(bins, &dir.join("data"), extra)?;
        let mut cmd = daemon(bin_in(bins, "capstan-coordinator")?);
        cmd.args(["--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--registration-token", &token])
            .args(extra);
        let ca = if tls {
            let pki = capstan_tests::certs::Pki::new(&dir.join("pki"), "bench")?;
            let server = pki.server("server")?;
            cmd.arg("--tls-cert")
                .arg(server.cert)
                .arg("--tls-key")
                .arg(server.key);
            Some(pki.ca_cert())
        } else {
            None
        };
        let spawned = Instant::now();
        let proc = Proc::spawn(cmd, dir, "coordinator")?;
        let mut c = Self {
            proc,
            grpc,
            http,
            token,
            api_token,
            dir: dir.to_path_buf(),
            bins: bins.to_path_buf(),
            ca,
            ready_in: Duration::ZERO,
        };
        // Ready, and leader: an API call answers (a coordinator that is
        // still electing itself answers UNAVAILABLE).
        let ready = poll_until(
            Duration::from_secs(120),
            Duration::from_millis(5),
            async || {
                if let Ok((200, _)) = c.http_get("/readyz")
                    && c.answers().await
                {
                    return Ok(Some(()));
                }
                if let Some(status) = c.proc.try_wait()? {
                    bail!("coordinator exited with {status}:\n{}", c.log());
                }
                Ok(None)
            },
        )
        .await?;
        if ready.is_none() {
            bail!("coordinator not ready in 120 s:\n{}", c.log());
        }
        c.ready_in = spawned.elapsed();
        Ok(c)
    }

    async fn answers(&self) -> bool {
        match self.client().await {
            Ok(mut client) => client
                .list_runs(api::ListRunsRequest {
                    limit: 1,
                    ..Default::default()
                })
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid() as u32
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }

    /// The client API, with no limit on response size (ListRuns of a whole
    /// benchmark's runs is large).
    pub(crate) async fn client(&self) -> anyhow::Result<PipelineServiceClient<AuthChannel>> {
        Ok(PipelineServiceClient::new(self.channel().await?).max_decoding_message_size(usize::MAX))
    }

    /// A channel to this coordinator carrying the API token.
    pub(crate) async fn channel(&self) -> anyhow::Result<AuthChannel> {
        let ch = endpoint(&self.url(), self.ca.as_deref())?.connect().await?;
        let bearer = capstan_client::Bearer::new(self.api_token.as_deref())?;
        Ok(capstan_client::auth::authed(ch, bearer))
    }

    /// A plain HTTP/1.0 GET on the side port: (status, body).
    pub(crate) fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        match &self.ca {
            Some(ca) => capstan_tests::https_get(self.http, path, ca).map(|a| (a.status, a.body)),
            None => capstan_tests::http_get(self.http, path),
        }
    }

    /// Starts a real runner process against this coordinator.
    pub(crate) fn start_runner(
        &self,
        name: &str,
        executor: &str,
        capacity: u32,
    ) -> anyhow::Result<Runner> {
        let work = self.dir.join(format!("work-{name}"));
        let mut cmd = daemon(bin_in(&self.bins, "capstan-runner")?);
        cmd.args(["--coordinator", &self.url()])
            .args(["--registration-token", &self.token])
            .args(["--name", name])
            .args(["--labels", &format!("bench={name}")])
            .args(["--capacity", &capacity.to_string()])
            .args(["--executor", executor])
            // Every image the benchmarks use is built here; nothing is pulled.
            .args(["--docker-pull", "never"])
            // The log scenario writes 1 GiB in one step: measure the whole
            // path, not the per-step cap (default 256 MiB).
            .args(["--max-step-log", "0"])
            .arg("--work-dir")
            .arg(&work);
        if let Some(ca) = &self.ca {
            cmd.arg("--ca-cert").arg(ca);
        }
        Ok(Runner {
            name: name.to_string(),
            proc: Proc::spawn(cmd, &self.dir, name)?,
        })
    }

    /// Waits until at least `n` runners are connected.
    pub(crate) async fn wait_connected(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        eventually(
            timeout,
            Duration::from_millis(20),
            async || {
                let Ok(r) = client.list_runners(api::ListRunnersRequest {}).await else {
                    return Ok(None);
                };
                let connected = r
                    .into_inner()
                    .runners
                    .iter()
                    .filter(|r| r.connected)
                    .count();
                Ok((connected >= n).then_some(()))
            },
            || format!("{n} runners did not connect in {timeout:?}"),
        )
        .await
    }

    /// Submits a pipeline's text and returns the run id.
    pub(crate) async fn submit(
        client: &mut PipelineServiceClient<AuthChannel>,
        yaml: &str,
    ) -> anyhow::Result<String> {
        Ok(client
            .submit_run(api::SubmitRunRequest {
                pipeline_yaml: yaml.to_string(),
                file_name: "bench.yaml".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .run_id)
    }
}

/// A `capstan-runner` process; killed on drop.
pub(crate) struct Runner {
    pub(crate) name: String,
    proc: Proc,
}

impl Runner {
    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid() as u32
    }

    /// kill -9 and reap.
    pub(crate) fn kill(&mut self) {
        self.proc.kill();
    }
}

/// What /proc says about a process.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProcStat {
    pub(crate) rss_mb: f64,
    pub(crate) hwm_mb: f64,
    /// utime + stime in seconds.
    pub(crate) cpu_s: f64,
}

/// `USER_HZ`, the unit of utime/stime in /proc/PID/stat: 100 on every Linux
/// architecture we run on.
const CLOCK_TICKS: f64 = 100.0;

pub(crate) fn proc_stat(pid: u32) -> anyhow::Result<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(ProcStat {
        rss_mb: kb("VmRSS:") / 1024.0,
        hwm_mb: kb("VmHWM:") / 1024.0,
        cpu_s: (ticks(14) + ticks(15)) / CLOCK_TICKS,
    })
}

/// Samples the RSS of some processes every 100 ms until dropped; keeps the peak.
pub(crate) struct RssSampler {
    peaks: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl RssSampler {
    pub(crate) fn start(pids: Vec<u32>) -> Self {
        let peaks = std::sync::Arc::new(std::sync::Mutex::new(vec![0.0f64; pids.len()]));
        let stop = tokio_util::sync::CancellationToken::new();
        let (p, s) = (peaks.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                for (i, pid) in pids.iter().enumerate() {
                    if let Ok(st) = proc_stat(*pid)
                        && let Ok(mut v) = p.lock()
                    {
                        v[i] = v[i].max(st.rss_mb);
                    }
                }
                tokio::select! {
                    () = s.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Self { peaks, stop }
    }

    /// Peak RSS (MB) of each process, in the order given.
    pub(crate) fn peaks(&self) -> Vec<f64> {
        self.peaks.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Raises the soft open-files limit to the hard limit (many connections).
pub(crate) fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

/// One `etcd` member on loopback ports (Debian's `etcd-server`, installed by
/// `scripts/testbed`, or `$CAPSTAN_ETCD_BIN`); killed on drop.
pub(crate) struct Etcd {
    proc: Proc,
    pub(crate) client_port: u16,
}

/// The `etcd` binary, if installed.
pub(crate) fn etcd_bin() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var("CAPSTAN_ETCD_BIN").unwrap_or_else(|_| "etcd".into()));
    if p.components().count() > 1 {
        return p.exists().then_some(p);
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| PathBuf::from(d).join(&p))
        .find(|c| c.exists())
}

impl Etcd {
    pub(crate) async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "bench"])
            .arg("--data-dir")
            .arg(dir.join("etcd.data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .args(["--initial-cluster-state", "new"]);
        let proc = Proc::spawn(cmd, dir, "etcd")?;
        let mut etcd = Self { proc, client_port };
        let healthy = poll_until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            async || {
                if etcd.healthy() {
                    return Ok(Some(()));
                }
                if let Some(status) = etcd.proc.try_wait()? {
                    bail!("etcd exited with {status}");
                }
                Ok(None)
            },
        )
        .await?;
        if healthy.is_none() {
            bail!("etcd not healthy in 20 s");
        }
        Ok(etcd)
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn healthy(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if write!(s, "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
            return false;
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.contains("\"health\":\"true\"")
    }
}
