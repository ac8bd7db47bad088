//! Coordinator configuration: built-in defaults -> TOML file (`--config`) ->
//! environment (`CAPSTAN_...`) -> flags, layered by [`capstan_config`]: one
//! [`Args`] struct is the command line and the file (keys: the flags with
//! `_`; an unknown key is an error); [`Args::settings`] fills in defaults.

use crate::limits::Limits;
use crate::scheduler::state::Timing;
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What `run` needs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// State (`state.redb` and its write-ahead log `state.redb.wal`) and logs
    /// (`logs/`) live here.
    pub data_dir: PathBuf,
    pub registration_token: String,
    /// gRPC URL others should use to reach this coordinator.
    pub advertise: Option<String>,
    pub timing: Timing,
    /// etcd endpoints; empty for a standalone coordinator on redb.
    pub etcd_endpoints: Vec<String>,
    /// Every etcd key lives under this prefix.
    pub etcd_prefix: String,
    /// TTL of the leader's etcd lease: a dead leader is replaced within about this long.
    pub election_ttl: Duration,
    /// Task logs; replicas must share it. Default: `DATA_DIR/logs`.
    pub log_dir: Option<PathBuf>,
    /// An admin API token (named `dev`) stored at start: `capstan dev`'s,
    /// for its own client. None for the binary (tokens come from `token
    /// create`).
    pub dev_admin_token: Option<String>,
    /// Request, pipeline, run and log limits (`--max-*`).
    pub limits: Limits,
    /// TLS on both ports; `None`: plaintext (loopback only, unless `--insecure`).
    pub tls: Option<TlsSettings>,
    /// `--runner-pool`: label sets autoscaled pools serve, so their tasks
    /// count as matchable in the demand signal while no runner is up.
    pub runner_pools: Vec<std::collections::BTreeMap<String, String>>,
    /// Webhooks, commit statuses and schedules (`--public-url`, `--forge-key-file`).
    pub forge: ForgeSettings,
}

/// `--public-url` and `--forge-key-file`.
#[derive(Clone, Debug, Default)]
pub struct ForgeSettings {
    /// Base of the run links posted with statuses.
    pub public_url: Option<String>,
    /// The sealing key; default `DATA_DIR/forge.key`.
    pub key_file: Option<PathBuf>,
}

/// `--tls-*`.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub files: capstan_tls::ServerTlsFiles,
    /// `--tls-require-name-match`: a runner's client certificate must name
    /// its `--name` (needs `files.client_ca`).
    pub require_name_match: bool,
}

impl CoordinatorConfig {
    /// Settings for `capstan dev`: everything in `data_dir`, default timings,
    /// a fresh admin token (`dev_admin_token`) for its client.
    pub fn for_dev(data_dir: PathBuf, registration_token: String) -> Self {
        Self {
            data_dir,
            registration_token,
            advertise: None,
            timing: Timing::default(),
            etcd_endpoints: Vec::new(),
            etcd_prefix: DEFAULT_ETCD_PREFIX.into(),
            election_ttl: DEFAULT_ELECTION_TTL,
            log_dir: None,
            dev_admin_token: Some(crate::tokens::generate()),
            limits: Limits::default(),
            tls: None,
            runner_pools: Vec::new(),
            forge: Default::default(),
        }
    }
}

pub const DEFAULT_ETCD_PREFIX: &str = "/capstan/";
/// 5 s: an etcd raft leader election (1-2 s with etcd's default 1 s election
/// timeout) must fit inside the renewal slack without a coordinator failover.
pub const DEFAULT_ELECTION_TTL: Duration = Duration::from_secs(5);

/// Command line of `capstan-coordinator`, and the TOML file. Every flag also
/// reads `CAPSTAN_<FLAG>`.
#[derive(Parser, Debug, Default, Serialize, Deserialize)]
#[command(name = "capstan-coordinator", version, about = "Capstan coordinator")]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// An offline admin command instead of serving (`token create`).
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<AdminCommand>,
    /// TOML file with any of the settings below (keys as the flags, with `_`).
    #[arg(long, env = "CAPSTAN_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// How log lines on stderr are written: `text`, or `json` (one object
    /// a line, with trace and span ids) [default: text]. Flag or
    /// environment only: it applies before the config file is read.
    #[arg(
        long,
        env = "CAPSTAN_LOG_FORMAT",
        value_name = "text|json",
        global = true
    )]
    #[serde(skip)]
    pub log_format: Option<capstan_telemetry::LogFormat>,
    /// gRPC listen address [default: 127.0.0.1:7700].
    #[arg(long, env = "CAPSTAN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP listen address for /healthz, /readyz, /metrics [default: 127.0.0.1:7701].
    #[arg(long, env = "CAPSTAN_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Directory for state and logs [default: ./capstan-data].
    #[arg(long, env = "CAPSTAN_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Shared token runners register with (required).
    #[arg(long, env = "CAPSTAN_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,
    /// etcd endpoints (URL,URL): run as one of several replicas with state in etcd.
    #[arg(
        long,
        env = "CAPSTAN_ETCD_ENDPOINTS",
        value_delimiter = ',',
        global = true
    )]
    #[serde(default, deserialize_with = "capstan_config::one_or_many")]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Labels an autoscaled runner pool gives its runners (`k=v,k=v`;
    /// repeatable, `;` between pools in the environment): while the pool
    /// has no runner up, its tasks are demand, not "unmatched".
    #[arg(
        long = "runner-pool",
        env = "CAPSTAN_RUNNER_POOLS",
        value_delimiter = ';',
        value_name = "k=v,k=v"
    )]
    #[serde(default, deserialize_with = "capstan_config::one_or_many")]
    pub runner_pool: Option<Vec<String>>,
    /// Prefix of every etcd key [default: /capstan/].
    #[arg(long, env = "CAPSTAN_ETCD_PREFIX", global = true)]
    pub etcd_prefix: Option<String>,
    /// Leader lease TTL in milliseconds, whole seconds [default: 5000].
    #[arg(long, env = "CAPSTAN_ELECTION_TTL_MS")]
    pub election_ttl_ms: Option<u64>,
    /// Directory for task logs, shared by all replicas [default: DATA_DIR/logs].
    #[arg(long, env = "CAPSTAN_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// gRPC URL advertised to clients and runners [default: http://LISTEN].
    #[arg(long, env = "CAPSTAN_ADVERTISE")]
    pub advertise: Option<String>,
    /// Runner heartbeat interval in milliseconds [default: 1000].
    #[arg(long, env = "CAPSTAN_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Heartbeat interval of runners that run nothing, in milliseconds
    /// [default: 5000; never shorter than --heartbeat-ms].
    #[arg(long, env = "CAPSTAN_IDLE_HEARTBEAT_MS")]
    pub idle_heartbeat_ms: Option<u64>,
    /// Milliseconds without a heartbeat before a runner's attempts are requeued [default: 5000].
    #[arg(long, env = "CAPSTAN_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Milliseconds a runner has to accept an offer [default: 5000].
    #[arg(long, env = "CAPSTAN_OFFER_TIMEOUT_MS")]
    pub offer_timeout_ms: Option<u64>,
    /// Infrastructure failures retried per task [default: 3].
    #[arg(long, env = "CAPSTAN_MAX_INFRA_RETRIES")]
    pub max_infra_retries: Option<u32>,
    /// Milliseconds before the first infrastructure retry; doubled for each
    /// further one, jittered, capped by --infra-retry-backoff-max-ms; 0:
    /// retry at once [default: 1000].
    #[arg(long, env = "CAPSTAN_INFRA_RETRY_BACKOFF_MS")]
    pub infra_retry_backoff_ms: Option<u64>,
    /// Longest wait in milliseconds before an infrastructure retry [default: 30000].
    #[arg(long, env = "CAPSTAN_INFRA_RETRY_BACKOFF_MAX_MS")]
    pub infra_retry_backoff_max_ms: Option<u64>,
    /// Delete finished runs and their logs this long after they end, e.g.
    /// `30d`, `12h`, `90m`; `forever` keeps everything [default: 30d].
    #[arg(long, env = "CAPSTAN_RETENTION", value_name = "DURATION")]
    pub retention: Option<String>,
    /// Largest gRPC request, e.g. `4m` [default: 4m].
    #[arg(long, env = "CAPSTAN_MAX_REQUEST", value_name = "SIZE")]
    pub max_request: Option<String>,
    /// Largest pipeline file, at most `1m` [default: 1m].
    #[arg(long, env = "CAPSTAN_MAX_PIPELINE", value_name = "SIZE")]
    pub max_pipeline: Option<String>,
    /// Most tasks in one run [default: 1000].
    #[arg(long, env = "CAPSTAN_MAX_TASKS")]
    pub max_tasks: Option<usize>,
    /// Most `--param`s in one submit [default: 100].
    #[arg(long, env = "CAPSTAN_MAX_PARAMS")]
    pub max_params: Option<usize>,
    /// Longest `--param` value [default: 64k].
    #[arg(long, env = "CAPSTAN_MAX_PARAM_VALUE", value_name = "SIZE")]
    pub max_param_value: Option<String>,
    /// Most log bytes stored for one attempt of a task [default: 16g].
    #[arg(long, env = "CAPSTAN_MAX_TASK_LOG", value_name = "SIZE")]
    pub max_task_log: Option<String>,
    /// Close a connection whose peer has sent nothing for this long, e.g.
    /// `90s`, `5m` (live clients answer the server's pings, sent at a third
    /// of it) [default: 90s].
    #[arg(long, env = "CAPSTAN_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Most unfinished (queued or running) runs one API token may have [default: 50000].
    #[arg(long, env = "CAPSTAN_MAX_QUEUED_RUNS_PER_TOKEN")]
    pub max_queued_runs_per_token: Option<usize>,
    /// Most tasks of unfinished runs one API token may have [default: 200000].
    #[arg(long, env = "CAPSTAN_MAX_QUEUED_TASKS_PER_TOKEN")]
    pub max_queued_tasks_per_token: Option<usize>,
    /// TLS certificate chain (PEM) for the gRPC and HTTP ports, re-read
    /// when the file changes; needs --tls-key.
    #[arg(long, env = "CAPSTAN_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "CAPSTAN_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates runners must present (mTLS for
    /// the runner service; the CLI needs none).
    #[arg(long, env = "CAPSTAN_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// A runner's client certificate must name (CN or first DNS SAN) its --name.
    #[arg(long, env = "CAPSTAN_TLS_REQUIRE_NAME_MATCH", num_args = 0..=1, default_missing_value = "true")]
    pub tls_require_name_match: Option<bool>,
    /// Serve plaintext on non-loopback addresses (without TLS the
    /// coordinator refuses to listen beyond this host).
    #[arg(long, env = "CAPSTAN_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// Base URL of the web UI, for the links posted with commit statuses
    /// (`https://ci.example.com`) [default: http://HTTP_LISTEN].
    #[arg(long, env = "CAPSTAN_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// 32-byte key (base64, one line) that seals repositories' webhook
    /// secrets and status tokens in the store; every replica needs the same
    /// one [default: DATA_DIR/forge.key, made on first use].
    #[arg(long, env = "CAPSTAN_FORGE_KEY_FILE", value_name = "FILE")]
    pub forge_key_file: Option<PathBuf>,
}

/// What `capstan-coordinator health` dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTarget {
    pub addr: SocketAddr,
    pub tls_cert: Option<PathBuf>,
}

/// The binary's offline commands (see `crate::admin`).
#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// API tokens, offline, in the store this coordinator uses (--data-dir,
    /// or --etcd-endpoints and --etcd-prefix).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Exit 0 if the coordinator these settings describe answers
    /// `/healthz` on its HTTP port (over TLS with --tls-cert): the images'
    /// health check.
    Health,
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Make an API token and print it, once: the bootstrap of the first
    /// admin token (with the coordinator stopped, for a standalone one).
    Create {
        /// Unique name, recorded with every run the token submits.
        #[arg(long)]
        name: String,
        /// read, submit or admin.
        #[arg(long)]
        scope: String,
        /// Lifetime, e.g. `30d`, `12h` [default: never expires].
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
}

/// Where the state lives: what the offline commands need of the settings.
#[derive(Debug)]
pub struct StoreLocation {
    pub data_dir: PathBuf,
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
}

/// The merged settings of the binary.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub coordinator: CoordinatorConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] capstan_config::FileError),
    #[error("{0}")]
    Invalid(String),
}

impl Args {
    /// The file under the flags (no defaults filled in).
    fn layered(&self) -> Result<Args, ConfigError> {
        let file: Args = capstan_config::load(self.config.as_deref())?;
        Ok(capstan_config::layer(&file, self)?)
    }

    /// Where `health` asks (no registration token needed): the HTTP listen
    /// address, an unspecified IP (0.0.0.0, ::) as loopback, and the
    /// certificate it serves when TLS is on.
    pub fn health_target(&self) -> Result<HealthTarget, ConfigError> {
        let s = self.layered()?;
        let mut addr = s.http_listen.unwrap_or_else(|| {
            SocketAddr::from(([127, 0, 0, 1], capstan_proto::DEFAULT_HTTP_PORT))
        });
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(HealthTarget {
            addr,
            tls_cert: s.tls_cert,
        })
    }

    /// The store settings alone (no registration token needed).
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        let s = self.layered()?;
        Ok(StoreLocation {
            data_dir: s
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            etcd_endpoints: endpoints(s.etcd_endpoints),
            etcd_prefix: s.etcd_prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into()),
        })
    }

    /// Merges defaults, the TOML file and the flags/environment.
    pub fn settings(self) -> Result<Settings, ConfigError> {
        let s = self.layered()?;
        let limits = limits(&s)?;
        let tls = tls_settings(&s)?;
        // Read before fields move out of `s`; its errors come in their old order below.
        let timing = timing(&s);
        let (listen, http_listen, advertise) = addresses(&s, tls.is_some())?;
        let etcd_endpoints = endpoints(s.etcd_endpoints);
        let election_ttl = Duration::from_millis(
            s.election_ttl_ms
                .unwrap_or(DEFAULT_ELECTION_TTL.as_millis() as u64),
        );
        if election_ttl < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "--election-ttl-ms must be at least 1000 (etcd leases have whole-second TTLs)"
                    .into(),
            ));
        }
        let etcd_prefix = s.etcd_prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into());
        let registration_token =
            s.registration_token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    ConfigError::Invalid(
                        "a registration token is required: pass --registration-token or set \
                     CAPSTAN_REGISTRATION_TOKEN"
                            .into(),
                    )
                })?;
        let timing = timing?;
        Ok(Settings {
            listen,
            http_listen,
            coordinator: CoordinatorConfig {
                tls,
                data_dir: s
                    .data_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
                registration_token,
                advertise,
                timing,
                etcd_endpoints,
                etcd_prefix,
                election_ttl,
                log_dir: s.log_dir,
                dev_admin_token: None,
                limits,
                runner_pools: runner_pools(s.runner_pool)?,
                forge: ForgeSettings {
                    public_url: s.public_url.clone(),
                    key_file: s.forge_key_file.clone(),
                },
            },
        })
    }
}

const DEFAULT_DATA_DIR: &str = "capstan-data";

/// `--runner-pool k=v,k=v` (each pool needs at least one label).
fn runner_pools(
    list: Option<Vec<String>>,
) -> Result<Vec<std::collections::BTreeMap<String, String>>, ConfigError> {
    let mut pools = Vec::new();
    for text in list.unwrap_or_default() {
        let pool = capstan_proto::labels::parse(&text).map_err(|e| {
            ConfigError::Invalid(format!(
                "bad --runner-pool `{text}` ({e}): use the pool's runner labels, k=v,k=v"
            ))
        })?;
        if pool.is_empty() {
            return Err(ConfigError::Invalid(
                "an empty --runner-pool would match every task: give the pool's runner labels, k=v,k=v".into(),
            ));
        }
        pools.push(pool);
    }
    Ok(pools)
}

/// `--etcd-endpoints` without blanks.
fn endpoints(list: Option<Vec<String>>) -> Vec<String> {
    list.unwrap_or_default()
        .into_iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

/// The scheduler's clocks: heartbeats, leases, offer timeout, retries, retention.
fn timing(s: &Args) -> Result<Timing, ConfigError> {
    let d = Timing::default();
    let ms = |setting: Option<u64>, default: Duration| {
        setting.map(Duration::from_millis).unwrap_or(default)
    };
    let heartbeat = ms(s.heartbeat_ms, d.heartbeat);
    let timing = Timing {
        heartbeat,
        idle_heartbeat: ms(s.idle_heartbeat_ms, d.idle_heartbeat).max(heartbeat),
        lease: ms(s.lease_ms, d.lease),
        offer_timeout: ms(s.offer_timeout_ms, d.offer_timeout),
        max_infra_retries: s.max_infra_retries.unwrap_or(d.max_infra_retries),
        infra_backoff: ms(s.infra_retry_backoff_ms, d.infra_backoff),
        infra_backoff_max: ms(s.infra_retry_backoff_max_ms, d.infra_backoff_max),
        timeout_grace: d.timeout_grace,
        // The runners' detection of a silent leader and their reconnect
        // (docs/decisions.md, issue 25).
        reattach_grace: capstan_proto::liveness::reattach_grace(heartbeat),
        disconnect_grace: capstan_proto::liveness::disconnect_grace(heartbeat),
        retention: match &s.retention {
            None => d.retention,
            Some(text) => parse_retention(text).map_err(ConfigError::Invalid)?,
        },
    };
    if timing.lease <= timing.heartbeat {
        return Err(ConfigError::Invalid(format!(
            "the lease ({} ms) must be longer than the heartbeat interval ({} ms)",
            timing.lease.as_millis(),
            timing.heartbeat.as_millis()
        )));
    }
    Ok(timing)
}

/// The `--max-*` flags over [`Limits::default`].
fn limits(s: &Args) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let size = |flag: &str, text: &Option<String>, default: u64| match text {
        None => Ok(default),
        Some(t) => capstan_proto::units::parse_memory(t)
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "bad --{flag} `{t}`: use a size such as `512k`, `4m` or `1g`"
                ))
            }),
    };
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let limits = Limits {
        request_bytes: to_usize(size("max-request", &s.max_request, d.request_bytes as u64)?),
        pipeline_bytes: to_usize(size(
            "max-pipeline",
            &s.max_pipeline,
            d.pipeline_bytes as u64,
        )?),
        tasks: s.max_tasks.unwrap_or(d.tasks),
        params: s.max_params.unwrap_or(d.params),
        param_value_bytes: to_usize(size(
            "max-param-value",
            &s.max_param_value,
            d.param_value_bytes as u64,
        )?),
        task_log_bytes: size("max-task-log", &s.max_task_log, d.task_log_bytes)?,
        quota: crate::limits::Quota {
            runs: s.max_queued_runs_per_token.unwrap_or(d.quota.runs),
            tasks: s.max_queued_tasks_per_token.unwrap_or(d.quota.tasks),
        },
        idle: match &s.idle_timeout {
            None => d.idle,
            Some(t) => capstan_proto::units::parse_age(t.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "bad --idle-timeout `{t}`: use a duration such as `90s` or `5m`"
                    ))
                })?,
        },
    };
    if limits.quota.runs == 0 || limits.quota.tasks == 0 {
        return Err(ConfigError::Invalid(
            "--max-queued-runs-per-token and --max-queued-tasks-per-token must be at least 1"
                .into(),
        ));
    }
    if limits.pipeline_bytes > capstan_pipeline::MAX_FILE_BYTES {
        return Err(ConfigError::Invalid(format!(
            "--max-pipeline may be at most 1m ({} bytes), the parser's own limit",
            capstan_pipeline::MAX_FILE_BYTES
        )));
    }
    if limits.tasks == 0 {
        return Err(ConfigError::Invalid(
            "--max-tasks must be at least 1".into(),
        ));
    }
    Ok(limits)
}

/// The listen addresses and the advertised URL. Without TLS both ports
/// must be on loopback unless `--insecure`.
fn addresses(s: &Args, tls: bool) -> Result<(SocketAddr, SocketAddr, Option<String>), ConfigError> {
    let listen = s
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], capstan_proto::DEFAULT_GRPC_PORT)));
    let http_listen = s
        .http_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], capstan_proto::DEFAULT_HTTP_PORT)));
    if !tls && !s.insecure.unwrap_or(false) {
        plaintext_on_loopback(listen, "--listen")?;
        plaintext_on_loopback(http_listen, "--http-listen")?;
    }
    // Clients must know to use TLS from the URL.
    let advertise = s
        .advertise
        .clone()
        .or_else(|| tls.then(|| format!("https://{listen}")));
    Ok((listen, http_listen, advertise))
}

/// The `--tls-*` settings, checked for the ones that need others.
fn tls_settings(s: &Args) -> Result<Option<TlsSettings>, ConfigError> {
    let name_match = s.tls_require_name_match.unwrap_or(false);
    let (cert, key) = match (&s.tls_cert, &s.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => {
            if s.tls_client_ca.is_some() {
                return Err(ConfigError::Invalid(
                    "--tls-client-ca needs TLS: pass --tls-cert and --tls-key too".into(),
                ));
            }
            if name_match {
                return Err(ConfigError::Invalid(
                    "--tls-require-name-match needs --tls-client-ca (and --tls-cert, --tls-key)"
                        .into(),
                ));
            }
            return Ok(None);
        }
        _ => {
            return Err(ConfigError::Invalid(
                "--tls-cert and --tls-key go together: pass both".into(),
            ));
        }
    };
    if name_match && s.tls_client_ca.is_none() {
        return Err(ConfigError::Invalid(
            "--tls-require-name-match needs --tls-client-ca".into(),
        ));
    }
    Ok(Some(TlsSettings {
        files: capstan_tls::ServerTlsFiles {
            cert,
            key,
            client_ca: s.tls_client_ca.clone(),
        },
        require_name_match: name_match,
    }))
}

/// Plaintext is for this host only: anyone on the network could read the
/// registration token and every runner's secret, and talk to the API.
fn plaintext_on_loopback(addr: SocketAddr, flag: &str) -> Result<(), ConfigError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "refusing to serve plaintext on {addr} ({flag}), beyond this host: pass --tls-cert and \
         --tls-key, or --insecure to serve without TLS anyway"
    )))
}

/// `forever` (or `0`): keep everything; else a duration of whole days
/// (`30d`) or what a pipeline `timeout` takes (`12h`, `1h30m`, `90s`).
fn parse_retention(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t == "forever" || t == "0" {
        return Ok(None);
    }
    let bad = || {
        format!(
            "bad retention `{text}`: use a duration such as `30d`, `12h` or `90m`, or `forever`"
        )
    };
    let duration = capstan_proto::units::parse_age(t).map_err(|_| bad())?;
    Ok(Some(duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let f: Args = capstan_config::parse(
            include_str!("../../deploy/config/coordinator.toml"),
            "coordinator.toml",
        )
        .unwrap();
        assert_eq!(f.listen, Some("127.0.0.1:7700".parse().unwrap()));
        assert!(f.registration_token.is_some());
        assert_eq!(f.retention.as_deref(), Some("30d"));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e =
            capstan_config::parse::<Args>("listen = \"127.0.0.1:1\"\nlisten_port = 3\n", "c.toml")
                .unwrap_err();
        let e = format!("{:#}", anyhow::Error::from(e));
        assert!(e.contains("c.toml") && e.contains("listen_port"), "{e}");
    }

    #[test]
    fn flags_override_file_and_defaults_fill_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "registration_token = \"file\"\nlease_ms = 9000\n").unwrap();
        let args = Args {
            config: Some(path),
            registration_token: Some("flag".into()),
            ..Args::default()
        };
        let s = args.settings().unwrap();
        assert_eq!(s.coordinator.registration_token, "flag");
        assert_eq!(s.coordinator.timing.lease, Duration::from_millis(9000));
        assert_eq!(s.listen.port(), 7700);
    }

    #[test]
    fn retention() {
        let with = |r: &str| {
            Args {
                registration_token: Some("t".into()),
                retention: Some(r.into()),
                ..Args::default()
            }
            .settings()
            .map(|s| s.coordinator.timing.retention)
        };
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(with("7d").unwrap(), Some(7 * day));
        assert_eq!(with("12h").unwrap(), Some(day / 2));
        assert_eq!(with("1h30m").unwrap(), Some(Duration::from_secs(5400)));
        assert_eq!(with("forever").unwrap(), None);
        assert_eq!(with("0").unwrap(), None);
        let e = with("a week").unwrap_err().to_string();
        assert!(e.contains("`30d`") && e.contains("forever"), "{e}");
        let default = Args {
            registration_token: Some("t".into()),
            ..Args::default()
        };
        assert_eq!(
            default.settings().unwrap().coordinator.timing.retention,
            Some(30 * day)
        );
    }

    #[test]
    fn missing_token_says_what_to_do() {
        let e = Args::default().settings().unwrap_err();
        assert!(e.to_string().contains("--registration-token"), "{e}");
    }

    fn with_token() -> Args {
        Args {
            registration_token: Some("t".into()),
            ..Args::default()
        }
    }

    #[test]
    fn quotas_and_the_idle_bound() {
        let c = with_token().settings().unwrap().coordinator;
        assert_eq!(c.limits.quota, crate::limits::Quota::default());
        assert_eq!(c.limits.idle, Duration::from_secs(90));
        let c = Args {
            max_queued_runs_per_token: Some(3),
            max_queued_tasks_per_token: Some(7),
            idle_timeout: Some("2s".into()),
            ..with_token()
        }
        .settings()
        .unwrap()
        .coordinator;
        assert_eq!(
            (c.limits.quota.runs, c.limits.quota.tasks, c.limits.idle),
            (3, 7, Duration::from_secs(2))
        );
        let e = Args {
            idle_timeout: Some("soon".into()),
            ..with_token()
        }
        .settings()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad --idle-timeout `soon`: use a duration such as `90s` or `5m`"
        );
        let e = Args {
            max_queued_runs_per_token: Some(0),
            ..with_token()
        }
        .settings()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--max-queued-runs-per-token and --max-queued-tasks-per-token must be at least 1"
        );
    }

    #[test]
    fn plaintext_beyond_loopback_is_refused_unless_insecure() {
        let any: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        let e = Args {
            listen: Some(any),
            ..with_token()
        }
        .settings()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "refusing to serve plaintext on 0.0.0.0:7700 (--listen), beyond this host: pass \
             --tls-cert and --tls-key, or --insecure to serve without TLS anyway"
        );
        let e = Args {
            http_listen: Some("10.1.2.3:7701".parse().unwrap()),
            ..with_token()
        }
        .settings()
        .unwrap_err();
        assert!(
            e.to_string().contains("10.1.2.3:7701 (--http-listen)"),
            "{e}"
        );
        let ok = Args {
            listen: Some(any),
            insecure: Some(true),
            ..with_token()
        }
        .settings()
        .unwrap();
        assert_eq!(ok.listen, any);
        for loopback in ["127.0.0.2:1", "[::1]:1"] {
            Args {
                listen: Some(loopback.parse().unwrap()),
                ..with_token()
            }
            .settings()
            .unwrap();
        }
    }

    #[test]
    fn tls_settings_that_need_others() {
        let e = |a: Args| a.settings().unwrap_err().to_string();
        assert_eq!(
            e(Args {
                tls_cert: Some("c.pem".into()),
                ..with_token()
            }),
            "--tls-cert and --tls-key go together: pass both"
        );
        assert_eq!(
            e(Args {
                tls_client_ca: Some("ca.pem".into()),
                ..with_token()
            }),
            "--tls-client-ca needs TLS: pass --tls-cert and --tls-key too"
        );
        assert_eq!(
            e(Args {
                tls_cert: Some("c.pem".into()),
                tls_key: Some("k.pem".into()),
                tls_require_name_match: Some(true),
                ..with_token()
            }),
            "--tls-require-name-match needs --tls-client-ca"
        );
        let s = Args {
            listen: Some("0.0.0.0:7700".parse().unwrap()),
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..with_token()
        }
        .settings()
        .unwrap();
        assert!(s.coordinator.tls.is_some());
        assert_eq!(
            s.coordinator.advertise.as_deref(),
            Some("https://0.0.0.0:7700")
        );
    }

    #[test]
    fn ha_settings() {
        let args = Args {
            registration_token: Some("t".into()),
            etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into(), " ".into()]),
            election_ttl_ms: Some(2000),
            ..Args::default()
        };
        let s = args.settings().unwrap().coordinator;
        assert_eq!(s.etcd_endpoints, vec!["http://127.0.0.1:2379".to_string()]);
        assert_eq!(s.election_ttl, Duration::from_secs(2));
        assert_eq!(s.etcd_prefix, "/capstan/");
        let bad = Args {
            registration_token: Some("t".into()),
            election_ttl_ms: Some(10),
            ..Args::default()
        };
        assert!(
            bad.settings()
                .unwrap_err()
                .to_string()
                .contains("election-ttl")
        );
    }
}
