//! Runner configuration layers: built-in defaults -> TOML file (`--config`)
//! -> environment (`CAPSTAN_<FLAG>`) -> flags, layered by [`capstan_config`].
//!
//! One struct, [`Args`], is both the command line (clap merges the
//! environment and the flags; a flag beats its variable) and the TOML file
//! (keys: the flag names with `_`; an unknown key is an error). [`load`]
//! puts the command line over the file, then fills what is still unset
//! from the defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use capstan_proto::units::parse_memory;

use crate::RunnerConfig;

/// Default work dir of the binary.
pub const DEFAULT_WORK_DIR: &str = "./capstan-runner-work";
/// Default number of attempts run at once.
pub const DEFAULT_CAPACITY: u32 = 1;
/// Default executor of the binary (`capstan dev` picks its own).
pub const DEFAULT_EXECUTOR: ExecutorKind = ExecutorKind::Docker;

/// Which executor runs the steps of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// One container per step through the Docker Engine API.
    Docker,
    /// Host processes in a work dir; no isolation.
    Shell,
    /// Fault injection for tests; runs no processes.
    Fake,
}

/// Command line of `capstan-runner`, and its TOML file. Every value is
/// optional here so that the file and the defaults can fill the gaps;
/// [`load`] reports what is missing.
#[derive(Debug, Default, clap::Parser, Serialize, Deserialize)]
#[command(name = "capstan-runner", version, about = "Capstan runner agent")]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of the settings below (keys: flag names with `_`).
    #[arg(long, env = "CAPSTAN_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Coordinator gRPC URL(s), comma-separated; the leader is followed.
    #[arg(
        long,
        env = "CAPSTAN_COORDINATOR",
        value_name = "URL[,URL]",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "capstan_config::one_or_many")]
    pub coordinator: Option<Vec<String>>,
    /// The fleet's shared registration token.
    #[arg(
        long,
        env = "CAPSTAN_REGISTRATION_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub registration_token: Option<String>,
    /// Unique name of this runner.
    #[arg(long, env = "CAPSTAN_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Labels tasks select on with `runs-on`.
    #[arg(long, env = "CAPSTAN_LABELS", value_name = "k=v,k=v", value_parser = parse_labels)]
    #[serde(default, deserialize_with = "labels_text_or_table")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Attempts run at once [default: 1].
    #[arg(long, env = "CAPSTAN_CAPACITY", value_name = "N")]
    pub capacity: Option<u32>,
    /// Take exactly one task, then deregister and exit 0 (for autoscaled
    /// pools: a fresh runner, container and work dir per task).
    #[arg(long, env = "CAPSTAN_EPHEMERAL", num_args = 0..=1, default_missing_value = "true")]
    pub ephemeral: Option<bool>,
    /// Executor for the steps [default: docker].
    #[arg(long, env = "CAPSTAN_EXECUTOR", value_enum)]
    pub executor: Option<ExecutorKind>,
    /// Work dir for attempts, the log spool and the cached credentials
    /// [default: ./capstan-runner-work].
    #[arg(long, env = "CAPSTAN_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Secrets steps may name (TOML if it ends in .toml, else JSON): a map of
    /// name to a string, {username, password} or {ssh_key, known_hosts}.
    /// `CAPSTAN_SECRET_<NAME>`
    /// variables add to it.
    #[arg(long, env = "CAPSTAN_SECRETS_FILE", value_name = "PATH")]
    pub secrets_file: Option<PathBuf>,
    /// Name of the secret with the credentials for fetching run repositories.
    #[arg(long, env = "CAPSTAN_GIT_CREDENTIALS", value_name = "SECRET")]
    pub git_credentials: Option<String>,
    /// Most output one step may write to the log, e.g. `256m`; past it the
    /// log keeps the first part and the last quarter (at most 4 MiB) and says
    /// how much it dropped; `0`: no cap [default: 256m].
    #[arg(long, env = "CAPSTAN_MAX_STEP_LOG", value_name = "SIZE")]
    pub max_step_log: Option<String>,
    /// Identity of `git-push` commits [default: Capstan Bot <capstan@localhost>].
    #[arg(long, env = "CAPSTAN_GIT_AUTHOR", value_name = "NAME <EMAIL>")]
    pub git_author: Option<String>,
    /// Network of step containers: `none`, `internal` (a per-task network
    /// with no route out) or the name of an existing network [default: none].
    /// A task with `services:` always gets an internal network of its own,
    /// which its steps join.
    #[arg(
        long,
        env = "CAPSTAN_DOCKER_NETWORK",
        value_name = "none|internal|NAME"
    )]
    pub docker_network: Option<String>,
    /// Memory limit of each step container, e.g. `512m`, `2g` (no swap on top).
    #[arg(long, env = "CAPSTAN_DOCKER_MEMORY", value_name = "SIZE")]
    pub docker_memory: Option<String>,
    /// CPU limit of each step container, e.g. `1.5`.
    #[arg(long, env = "CAPSTAN_DOCKER_CPUS", value_name = "N")]
    pub docker_cpus: Option<f64>,
    /// Capabilities step containers keep (all others are dropped), e.g. `CHOWN,NET_RAW`.
    #[arg(
        long,
        env = "CAPSTAN_DOCKER_CAP_ADD",
        value_name = "CAP[,CAP]",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "capstan_config::one_or_many")]
    pub docker_cap_add: Option<Vec<String>>,
    /// Capabilities a pipeline may ask for with a task's `capabilities:`
    /// (none by default: a task asking for another one fails), e.g. `NET_ADMIN`.
    #[arg(
        long,
        env = "CAPSTAN_DOCKER_ALLOW_CAP",
        value_name = "CAP[,CAP]",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "capstan_config::one_or_many")]
    pub docker_allow_cap: Option<Vec<String>>,
    /// Image of the never-started container that copies the workspace in and
    /// out of its volume when a task has no image [default: capstan-test/busybox:1].
    #[arg(long, env = "CAPSTAN_DOCKER_HELPER_IMAGE", value_name = "IMAGE")]
    pub docker_helper_image: Option<String>,
    /// When images are pulled for a task whose `pull:` does not say:
    /// `always`, `if-not-present` or `never` [default: if-not-present].
    #[arg(long, env = "CAPSTAN_DOCKER_PULL", value_name = "POLICY")]
    pub docker_pull: Option<String>,
    /// The only images steps, services and builds may use: globs over the
    /// reference as written, `*` within a path segment and `**` across,
    /// e.g. `registry.internal:5000/ci/**` [default: any image].
    #[arg(
        long,
        alias = "allowed-images",
        env = "CAPSTAN_DOCKER_ALLOWED_IMAGES",
        value_name = "GLOB[,GLOB]",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "capstan_config::one_or_many")]
    pub docker_allowed_images: Option<Vec<String>>,
    /// Which secret (of --secrets-file) to pull each registry's images
    /// with, when the task names no `pull-credentials:`, e.g.
    /// `127.0.0.1:5000=registry-ci` (in the file: a table).
    #[arg(
        long,
        env = "CAPSTAN_DOCKER_PULL_CREDENTIALS",
        value_name = "REGISTRY=SECRET[,...]",
        value_parser = parse_registry_map
    )]
    pub docker_pull_credentials: Option<BTreeMap<String, String>>,
    /// Extra labels on every container, volume and network the runner creates.
    #[arg(long, env = "CAPSTAN_DOCKER_LABELS", value_name = "k=v,k=v", value_parser = parse_labels)]
    #[serde(default, deserialize_with = "labels_text_or_table")]
    pub docker_labels: Option<BTreeMap<String, String>>,
    /// CA certificate (PEM) that signed the coordinator's certificate, for
    /// `https://` coordinators [default: the system's roots].
    #[arg(long, env = "CAPSTAN_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) presented to a coordinator with
    /// --tls-client-ca (mTLS); needs --tls-client-key.
    #[arg(long, env = "CAPSTAN_TLS_CLIENT_CERT", value_name = "PEM")]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert.
    #[arg(long, env = "CAPSTAN_TLS_CLIENT_KEY", value_name = "PEM")]
    pub tls_client_key: Option<PathBuf>,
    /// Serve `/healthz` and `/metrics` (Prometheus) over HTTP on this
    /// address, e.g. 127.0.0.1:7702 [default: off]. Plaintext and
    /// unauthenticated: beyond loopback only with --http-insecure.
    #[arg(long, env = "CAPSTAN_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Allow --http-listen on an address beyond this host (the port holds
    /// counters only, no run data), e.g. for a Prometheus in the cluster.
    #[arg(long, env = "CAPSTAN_HTTP_INSECURE")]
    #[serde(default)]
    pub http_insecure: Option<bool>,
    /// How log lines on stderr are written: `text`, or `json` (one object
    /// a line, with trace and span ids) [default: text]. Flag or
    /// environment only: it applies before the config file is read.
    #[arg(long, env = "CAPSTAN_LOG_FORMAT", value_name = "text|json")]
    #[serde(skip)]
    pub log_format: Option<capstan_telemetry::LogFormat>,
}

/// The TOML file. Same settings as the flags, minus `config`.
/// `deserialize_with` for labels in the file: `"k=v,k=v"` as on the command
/// line, or a table `{ k = "v" }`.
fn labels_text_or_table<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Labels {
        Text(String),
        Table(BTreeMap<String, String>),
    }
    match Option::<Labels>::deserialize(d)? {
        None => Ok(None),
        Some(Labels::Table(labels)) => Ok(Some(labels)),
        Some(Labels::Text(text)) => parse_labels(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("invalid labels: {e}"))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] capstan_config::FileError),
    #[error("missing setting: pass {flag} (or set {env}, or `{key}` in the config file)")]
    Missing {
        flag: &'static str,
        env: &'static str,
        key: &'static str,
    },
    #[error("--capacity must be at least 1")]
    ZeroCapacity,
    #[error("an --ephemeral runner runs one task: leave --capacity unset or 1")]
    EphemeralCapacity,
    #[error("invalid --docker-network: {0}")]
    Network(String),
    #[error("invalid --docker-memory `{0}`: expected bytes or a number with k, m or g, e.g. 512m")]
    Memory(String),
    #[error("invalid --docker-cpus {0}: expected a positive number")]
    Cpus(f64),
    #[error("invalid --docker-pull: {0}")]
    Pull(String),
    #[error("invalid --docker-allowed-images: {0}")]
    AllowedImages(String),
    #[error("invalid --git-author: {0}")]
    GitAuthor(String),
    #[error(
        "invalid --max-step-log `{0}`: expected bytes or a number with k, m or g, e.g. 256m (0: no cap)"
    )]
    StepLogCap(String),
    #[error(
        "refusing to serve plaintext metrics on {0} (--http-listen), beyond this host: listen on \
         127.0.0.1, or pass --http-insecure to serve them there anyway"
    )]
    HttpBeyondLoopback(std::net::SocketAddr),
}

/// Parses `k=v,k=v` (empty string: no labels).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    capstan_proto::labels::parse(text)
}

/// Parses `registry=secret,registry=secret` (`--docker-pull-credentials`).
pub fn parse_registry_map(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.split_once('=') {
            Some((registry, secret))
                if !registry.trim().is_empty() && !secret.trim().is_empty() =>
            {
                map.insert(registry.trim().to_owned(), secret.trim().to_owned());
            }
            _ => {
                return Err(format!(
                    "`{entry}` is not REGISTRY=SECRET, e.g. 127.0.0.1:5000=registry-ci"
                ));
            }
        }
    }
    Ok(map)
}

/// Reads `--config` (if given) and merges every layer.
pub fn load(args: Args) -> Result<RunnerConfig, ConfigError> {
    let file: Args = capstan_config::load(args.config.as_deref())?;
    merge(args, file)
}

/// Merges flags+environment (`args`) over the file over the defaults.
fn merge(args: Args, file: Args) -> Result<RunnerConfig, ConfigError> {
    let s = capstan_config::layer(&file, &args)?;
    let (coordinators, registration_token, name) = identity(&s)?;
    let capacity = s.capacity.unwrap_or(DEFAULT_CAPACITY);
    if capacity == 0 {
        return Err(ConfigError::ZeroCapacity);
    }
    let ephemeral = s.ephemeral.unwrap_or(false);
    if ephemeral && capacity > 1 {
        return Err(ConfigError::EphemeralCapacity);
    }
    let docker = docker_settings(&s)?;
    let git_author = match s.git_author {
        Some(text) => text.parse().map_err(ConfigError::GitAuthor)?,
        None => crate::gitops::Author::default(),
    };
    let step_log_cap = match s.max_step_log {
        Some(text) if text.trim() == "0" => crate::logs::cap::StepLogCap { cap: 0 },
        Some(text) => crate::logs::cap::StepLogCap {
            cap: parse_memory(&text).ok_or(ConfigError::StepLogCap(text))?,
        },
        None => crate::logs::cap::StepLogCap::default(),
    };
    let http_listen = s.http_listen;
    if let Some(addr) = http_listen
        && !addr.ip().is_loopback()
        && !s.http_insecure.unwrap_or(false)
    {
        return Err(ConfigError::HttpBeyondLoopback(addr));
    }
    Ok(RunnerConfig {
        http_listen,
        tls: capstan_tls::ClientTls {
            ca_cert: s.ca_cert,
            client_cert: s.tls_client_cert,
            client_key: s.tls_client_key,
        },
        step_log_cap,
        git_author,
        secrets_file: s.secrets_file,
        git_credentials: s.git_credentials.filter(|c| !c.is_empty()),
        docker,
        coordinators,
        registration_token,
        name,
        labels: s.labels.unwrap_or_default(),
        capacity,
        ephemeral,
        executor: s.executor.unwrap_or(DEFAULT_EXECUTOR),
        work_dir: s
            .work_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_WORK_DIR)),
    })
}

/// The required settings: where to connect, the fleet's token, our name.
fn identity(s: &Args) -> Result<(Vec<String>, String, String), ConfigError> {
    let coordinators: Vec<String> = s
        .coordinator
        .iter()
        .flatten()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if coordinators.is_empty() {
        return Err(ConfigError::Missing {
            flag: "--coordinator",
            env: "CAPSTAN_COORDINATOR",
            key: "coordinator",
        });
    }
    let registration_token = s
        .registration_token
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or(ConfigError::Missing {
            flag: "--registration-token",
            env: "CAPSTAN_REGISTRATION_TOKEN",
            key: "registration_token",
        })?;
    let name = s
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(ConfigError::Missing {
            flag: "--name",
            env: "CAPSTAN_NAME",
            key: "name",
        })?;
    Ok((coordinators, registration_token, name))
}

/// The `--docker-*` settings.
fn docker_settings(s: &Args) -> Result<crate::DockerSettings, ConfigError> {
    let network = s
        .docker_network
        .as_deref()
        .unwrap_or("none")
        .parse()
        .map_err(ConfigError::Network)?;
    let memory_bytes = match &s.docker_memory {
        Some(text) => Some(
            parse_memory(text)
                .and_then(|n| i64::try_from(n).ok())
                .ok_or_else(|| ConfigError::Memory(text.clone()))?,
        ),
        None => None,
    };
    if let Some(c) = s.docker_cpus
        && !(c > 0.0 && c.is_finite())
    {
        return Err(ConfigError::Cpus(c));
    }
    Ok(crate::DockerSettings {
        network,
        memory_bytes,
        cpus: s.docker_cpus,
        cap_add: cap_names(s.docker_cap_add.clone()),
        allow_cap: cap_names(s.docker_allow_cap.clone()),
        helper_image: s
            .docker_helper_image
            .clone()
            .unwrap_or_else(|| crate::executor::docker::DEFAULT_HELPER_IMAGE.into()),
        labels: s.docker_labels.clone().unwrap_or_default(),
        pull: s
            .docker_pull
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(ConfigError::Pull)?
            .unwrap_or_default(),
        allowed_images: crate::executor::docker::AllowedImages::new(
            s.docker_allowed_images.clone().unwrap_or_default(),
        )
        .map_err(ConfigError::AllowedImages)?,
        pull_credentials: s.docker_pull_credentials.clone().unwrap_or_default(),
    })
}

/// Capability names as Docker takes them: upper case, no `CAP_` prefix.
fn cap_names(list: Option<Vec<String>>) -> Vec<String> {
    list.unwrap_or_default()
        .into_iter()
        .map(|c| c.trim().to_ascii_uppercase())
        .map(|c| c.strip_prefix("CAP_").map(str::to_owned).unwrap_or(c))
        .filter(|c| !c.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const EXAMPLE: &str = include_str!("../../deploy/config/runner.toml");

    fn required_args() -> Args {
        Args {
            coordinator: Some(vec!["http://a:7700".into()]),
            registration_token: Some("tok".into()),
            name: Some("r1".into()),
            ..Args::default()
        }
    }

    #[test]
    fn example_config_parses() {
        let file = capstan_config::parse::<Args>(EXAMPLE, "deploy/config/runner.toml").unwrap();
        let config = merge(Args::default(), file).unwrap();
        assert_eq!(config.coordinators.len(), 2);
        assert_eq!(config.name, "runner-1");
        assert_eq!(config.capacity, 2);
        assert_eq!(config.executor, ExecutorKind::Shell);
        assert_eq!(config.labels.get("arch").map(String::as_str), Some("amd64"));
    }

    #[test]
    fn defaults_fill_what_is_unset() {
        let config = merge(required_args(), Args::default()).unwrap();
        assert_eq!(config.capacity, DEFAULT_CAPACITY);
        assert_eq!(config.executor, DEFAULT_EXECUTOR);
        assert_eq!(config.work_dir, PathBuf::from(DEFAULT_WORK_DIR));
        assert!(config.labels.is_empty());
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let file = capstan_config::parse::<Args>(
            r#"
            coordinator = "http://f1:7700,http://f2:7700"
            registration_token = "file-token"
            name = "file-name"
            labels = { os = "linux" }
            capacity = 3
            executor = "fake"
            work_dir = "/tmp/from-file"
            "#,
            "test",
        )
        .unwrap();
        let args = Args::try_parse_from([
            "capstan-runner",
            "--name",
            "flag-name",
            "--labels",
            "a=1,b=2",
            "--capacity",
            "5",
        ])
        .unwrap();
        let config = merge(args, file).unwrap();
        assert_eq!(config.coordinators, ["http://f1:7700", "http://f2:7700"]);
        assert_eq!(config.registration_token, "file-token");
        assert_eq!(config.name, "flag-name");
        assert_eq!(config.labels.len(), 2);
        assert_eq!(config.labels["b"], "2");
        assert_eq!(config.capacity, 5);
        assert_eq!(config.executor, ExecutorKind::Fake);
        assert_eq!(config.work_dir, PathBuf::from("/tmp/from-file"));
    }

    #[test]
    fn coordinator_flag_splits_on_commas() {
        let args = Args::try_parse_from([
            "capstan-runner",
            "--coordinator",
            "http://a:7700,http://b:7700",
            "--executor",
            "fake",
        ])
        .unwrap();
        assert_eq!(
            args.coordinator.as_deref(),
            Some(&["http://a:7700".to_owned(), "http://b:7700".to_owned()][..])
        );
        assert_eq!(args.executor, Some(ExecutorKind::Fake));
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = capstan_config::parse::<Args>("name = \"x\"\ncapacityy = 2\n", "runner.toml")
            .unwrap_err();
        let text = format!("{}: {}", err, std::error::Error::source(&err).unwrap());
        assert!(text.contains("capacityy"), "{text}");
        assert!(text.contains("runner.toml"), "{text}");
    }

    #[test]
    fn missing_required_setting_names_flag_and_env() {
        let err = merge(Args::default(), Args::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--coordinator"), "{text}");
        assert!(text.contains("CAPSTAN_COORDINATOR"), "{text}");
    }

    #[test]
    fn docker_settings() {
        let file = capstan_config::parse::<Args>(
            r#"
            docker_network = "internal"
            docker_memory = "64m"
            docker_cpus = 0.5
            docker_cap_add = ["chown"]
            secrets_file = "/etc/capstan/secrets.toml"
            "#,
            "test",
        )
        .unwrap();
        let config = merge(required_args(), file).unwrap();
        assert_eq!(
            config.docker.network,
            crate::executor::docker::NetworkSetting::Internal
        );
        assert_eq!(config.docker.memory_bytes, Some(64 << 20));
        assert_eq!(config.docker.cpus, Some(0.5));
        assert_eq!(config.docker.cap_add, ["CHOWN"]);
        assert_eq!(
            config.secrets_file.as_deref(),
            Some(std::path::Path::new("/etc/capstan/secrets.toml"))
        );
        let mut args = required_args();
        args.docker_memory = Some("1.5g".into());
        assert_eq!(
            merge(args, Args::default()).unwrap().docker.memory_bytes,
            Some(3 << 29),
            "fractions as in a pipeline's `memory:`"
        );
        let mut args = required_args();
        args.docker_network = Some("host".into());
        assert!(matches!(
            merge(args, Args::default()),
            Err(ConfigError::Network(_))
        ));
    }

    #[test]
    fn bad_labels_in_the_file_name_the_file_and_the_pair() {
        let err =
            capstan_config::parse::<Args>("labels = \"os=linux,x\"\n", "runner.toml").unwrap_err();
        let text = format!("{}: {}", err, std::error::Error::source(&err).unwrap());
        assert!(text.contains("runner.toml"), "{text}");
        assert!(
            text.contains("invalid labels: `x` is not of the form key=value"),
            "{text}"
        );
    }

    #[test]
    fn bad_labels_and_zero_capacity_are_errors() {
        assert!(parse_labels("a=1,b").is_err());
        assert!(Args::try_parse_from(["capstan-runner", "--labels", "x"]).is_err());
        let mut args = required_args();
        args.capacity = Some(0);
        assert!(matches!(
            merge(args, Args::default()),
            Err(ConfigError::ZeroCapacity)
        ));
    }

    #[test]
    fn pull_settings_from_file_and_flags() {
        use crate::executor::docker::PullPolicy;
        let file = capstan_config::parse::<Args>(
            r#"
            docker_pull = "never"
            docker_allowed_images = ["127.0.0.1:5000/ci/**"]
            docker_pull_credentials = { "127.0.0.1:5000" = "registry" }
            "#,
            "test",
        )
        .unwrap();
        let config = merge(required_args(), file).unwrap();
        assert_eq!(config.docker.pull, PullPolicy::Never);
        assert!(
            config
                .docker
                .allowed_images
                .allows("127.0.0.1:5000/ci/a/b:1")
        );
        assert!(!config.docker.allowed_images.allows("busybox:1"));
        assert_eq!(
            config
                .docker
                .pull_credentials
                .get("127.0.0.1:5000")
                .map(String::as_str),
            Some("registry")
        );
        let defaults = merge(required_args(), Args::default()).unwrap();
        assert_eq!(defaults.docker.pull, PullPolicy::IfNotPresent);
        assert!(defaults.docker.allowed_images.allows("anything:1"));

        let args = Args::try_parse_from([
            "capstan-runner",
            "--docker-pull-credentials",
            "a:5000=one, b.example=two",
            "--docker-allowed-images",
            "a:5000/**,b.example/x/*",
        ])
        .unwrap();
        assert_eq!(
            args.docker_pull_credentials
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [
                ("a:5000".into(), "one".into()),
                ("b.example".into(), "two".into())
            ]
        );
        assert_eq!(args.docker_allowed_images.unwrap().len(), 2);
        let e = parse_registry_map("a:5000").unwrap_err();
        assert!(e.contains("`a:5000` is not REGISTRY=SECRET"), "{e}");

        let mut args = required_args();
        args.docker_pull = Some("sometimes".into());
        let e = merge(args, Args::default()).unwrap_err().to_string();
        assert!(
            e.contains("--docker-pull") && e.contains("always, if-not-present or never"),
            "{e}"
        );
        let mut args = required_args();
        args.docker_allowed_images = Some(vec!["bad[".into()]);
        let e = merge(args, Args::default()).unwrap_err().to_string();
        assert!(
            e.contains("--docker-allowed-images: `bad[` is not a glob"),
            "{e}"
        );
    }

    #[test]
    fn step_log_cap() {
        let config = merge(required_args(), Args::default()).unwrap();
        assert_eq!(config.step_log_cap.cap, 256 << 20);
        let mut args = required_args();
        args.max_step_log = Some("64k".into());
        assert_eq!(
            merge(args, Args::default()).unwrap().step_log_cap.cap,
            64 << 10
        );
        let mut args = required_args();
        args.max_step_log = Some("0".into());
        assert_eq!(merge(args, Args::default()).unwrap().step_log_cap.cap, 0);
        let mut args = required_args();
        args.max_step_log = Some("lots".into());
        let e = merge(args, Args::default()).unwrap_err().to_string();
        assert!(
            e.contains("--max-step-log `lots`") && e.contains("256m"),
            "{e}"
        );
    }
}
