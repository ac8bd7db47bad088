//! Runner configuration layers: built-in defaults -> TOML file (`--config`)
//! -> environment (`CAPSTAN_<FLAG>`) -> flags.
//!
//! clap merges the environment and the flags into [`Args`] (a flag beats its
//! variable); [`merge`] then fills what is still unset from the file and
//! finally from the defaults. TOML keys are the flag names with `-` written
//! as `_`; an unknown key is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::RunnerConfig;

/// Default work dir of the binary.
pub const DEFAULT_WORK_DIR: &str = "./capstan-runner-work";
/// Default number of attempts run at once.
pub const DEFAULT_CAPACITY: u32 = 1;
/// Default executor of the binary (`capstan dev` picks its own).
pub const DEFAULT_EXECUTOR: ExecutorKind = ExecutorKind::Docker;

/// Which executor runs the steps of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// One container per step through the Docker Engine API.
    Docker,
    /// Host processes in a work dir; no isolation.
    Shell,
    /// Fault injection for tests; runs no processes.
    Fake,
}

/// Command line of `capstan-runner`. Every value is optional here so that the
/// file and the defaults can fill the gaps; [`merge`] reports what is missing.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "capstan-runner", version, about = "Capstan runner agent")]
pub struct Args {
    /// TOML file with any of the settings below (keys: flag names with `_`).
    #[arg(long, env = "CAPSTAN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Coordinator gRPC URL(s), comma-separated; the leader is followed.
    #[arg(
        long,
        env = "CAPSTAN_COORDINATOR",
        value_name = "URL[,URL]",
        value_delimiter = ','
    )]
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
    pub labels: Option<BTreeMap<String, String>>,
    /// Attempts run at once [default: 1].
    #[arg(long, env = "CAPSTAN_CAPACITY", value_name = "N")]
    pub capacity: Option<u32>,
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
    pub docker_cap_add: Option<Vec<String>>,
    /// Capabilities a pipeline may ask for with a task's `capabilities:`
    /// (none by default: a task asking for another one fails), e.g. `NET_ADMIN`.
    #[arg(
        long,
        env = "CAPSTAN_DOCKER_ALLOW_CAP",
        value_name = "CAP[,CAP]",
        value_delimiter = ','
    )]
    pub docker_allow_cap: Option<Vec<String>>,
    /// Image of the never-started container that copies the workspace in and
    /// out of its volume when a task has no image [default: capstan-test/busybox:1].
    #[arg(long, env = "CAPSTAN_DOCKER_HELPER_IMAGE", value_name = "IMAGE")]
    pub docker_helper_image: Option<String>,
    /// Extra labels on every container, volume and network the runner creates.
    #[arg(long, env = "CAPSTAN_DOCKER_LABELS", value_name = "k=v,k=v", value_parser = parse_labels)]
    pub docker_labels: Option<BTreeMap<String, String>>,
}

/// The TOML file. Same settings as the flags, minus `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub coordinator: Option<OneOrMany>,
    pub registration_token: Option<String>,
    pub name: Option<String>,
    pub labels: Option<LabelsValue>,
    pub capacity: Option<u32>,
    pub executor: Option<ExecutorKind>,
    pub work_dir: Option<PathBuf>,
    pub secrets_file: Option<PathBuf>,
    pub git_credentials: Option<String>,
    pub git_author: Option<String>,
    pub max_step_log: Option<String>,
    pub docker_network: Option<String>,
    pub docker_memory: Option<String>,
    pub docker_cpus: Option<f64>,
    pub docker_cap_add: Option<Vec<String>>,
    pub docker_allow_cap: Option<Vec<String>>,
    pub docker_helper_image: Option<String>,
    pub docker_labels: Option<LabelsValue>,
}

/// `coordinator = "URL,URL"` or `coordinator = ["URL", "URL"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `labels = "k=v,k=v"` or `labels = { k = "v" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LabelsValue {
    Text(String),
    Table(BTreeMap<String, String>),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {origin}")]
    Parse {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("missing setting: pass {flag} (or set {env}, or `{key}` in the config file)")]
    Missing {
        flag: &'static str,
        env: &'static str,
        key: &'static str,
    },
    #[error("invalid labels: {0}")]
    Labels(String),
    #[error("--capacity must be at least 1")]
    ZeroCapacity,
    #[error("invalid --docker-network: {0}")]
    Network(String),
    #[error("invalid --docker-memory `{0}`: expected bytes or a number with k, m or g, e.g. 512m")]
    Memory(String),
    #[error("invalid --docker-cpus {0}: expected a positive number")]
    Cpus(f64),
    #[error("invalid --git-author: {0}")]
    GitAuthor(String),
    #[error(
        "invalid --max-step-log `{0}`: expected bytes or a number with k, m or g, e.g. 256m (0: no cap)"
    )]
    StepLogCap(String),
}

/// Parses a memory size: `1048576`, `512k`, `512m`, `2g` (powers of 1024).
pub fn parse_memory(text: &str) -> Option<i64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (digits, unit) = match t.char_indices().last()? {
        (i, 'k') => (&t[..i], 1i64 << 10),
        (i, 'm') => (&t[..i], 1 << 20),
        (i, 'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    digits
        .parse::<i64>()
        .ok()?
        .checked_mul(unit)
        .filter(|n| *n > 0)
}

/// Parses `k=v,k=v` (empty string: no labels).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not of the form key=value"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("`{pair}` has an empty key"));
        }
        labels.insert(k.to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

/// Parses the text of a TOML config file; `origin` names it in errors.
pub fn parse_file(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        origin: origin.to_owned(),
        source,
    })
}

/// Reads `--config` (if given) and merges every layer.
pub fn load(args: Args) -> Result<RunnerConfig, ConfigError> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    merge(args, file)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text, &path.display().to_string())
}

/// Merges flags+environment (`args`) over the file over the defaults.
pub fn merge(args: Args, file: FileConfig) -> Result<RunnerConfig, ConfigError> {
    let coordinators = match (args.coordinator, file.coordinator) {
        (Some(urls), _) => urls,
        (None, Some(OneOrMany::One(s))) => s.split(',').map(str::to_owned).collect(),
        (None, Some(OneOrMany::Many(urls))) => urls,
        (None, None) => Vec::new(),
    };
    let coordinators: Vec<String> = coordinators
        .into_iter()
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
    let registration_token = args
        .registration_token
        .or(file.registration_token)
        .filter(|t| !t.is_empty())
        .ok_or(ConfigError::Missing {
            flag: "--registration-token",
            env: "CAPSTAN_REGISTRATION_TOKEN",
            key: "registration_token",
        })?;
    let name = args
        .name
        .or(file.name)
        .filter(|n| !n.is_empty())
        .ok_or(ConfigError::Missing {
            flag: "--name",
            env: "CAPSTAN_NAME",
            key: "name",
        })?;
    let labels = match (args.labels, file.labels) {
        (Some(labels), _) => labels,
        (None, Some(LabelsValue::Table(labels))) => labels,
        (None, Some(LabelsValue::Text(text))) => {
            parse_labels(&text).map_err(ConfigError::Labels)?
        }
        (None, None) => BTreeMap::new(),
    };
    let capacity = args.capacity.or(file.capacity).unwrap_or(DEFAULT_CAPACITY);
    if capacity == 0 {
        return Err(ConfigError::ZeroCapacity);
    }
    let network = args
        .docker_network
        .or(file.docker_network)
        .unwrap_or_else(|| "none".into())
        .parse()
        .map_err(ConfigError::Network)?;
    let memory_bytes = match args.docker_memory.or(file.docker_memory) {
        Some(text) => Some(parse_memory(&text).ok_or(ConfigError::Memory(text))?),
        None => None,
    };
    let cpus = args.docker_cpus.or(file.docker_cpus);
    if let Some(c) = cpus
        && !(c > 0.0 && c.is_finite())
    {
        return Err(ConfigError::Cpus(c));
    }
    let docker_labels = match (args.docker_labels, file.docker_labels) {
        (Some(labels), _) => labels,
        (None, Some(LabelsValue::Table(labels))) => labels,
        (None, Some(LabelsValue::Text(text))) => {
            parse_labels(&text).map_err(ConfigError::Labels)?
        }
        (None, None) => BTreeMap::new(),
    };
    let docker = crate::DockerSettings {
        network,
        memory_bytes,
        cpus,
        cap_add: cap_names(args.docker_cap_add.or(file.docker_cap_add)),
        allow_cap: cap_names(args.docker_allow_cap.or(file.docker_allow_cap)),
        helper_image: args
            .docker_helper_image
            .or(file.docker_helper_image)
            .unwrap_or_else(|| crate::executor::docker::DEFAULT_HELPER_IMAGE.into()),
        labels: docker_labels,
    };
    let git_author = match args.git_author.or(file.git_author) {
        Some(text) => text.parse().map_err(ConfigError::GitAuthor)?,
        None => crate::gitops::Author::default(),
    };
    let step_log_cap = match args.max_step_log.or(file.max_step_log) {
        Some(text) if text.trim() == "0" => crate::logs::cap::StepLogCap { cap: 0 },
        Some(text) => crate::logs::cap::StepLogCap {
            cap: parse_memory(&text)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or(ConfigError::StepLogCap(text))?,
        },
        None => crate::logs::cap::StepLogCap::default(),
    };
    Ok(RunnerConfig {
        step_log_cap,
        git_author,
        secrets_file: args.secrets_file.or(file.secrets_file),
        git_credentials: args
            .git_credentials
            .or(file.git_credentials)
            .filter(|s| !s.is_empty()),
        docker,
        coordinators,
        registration_token,
        name,
        labels,
        capacity,
        executor: args.executor.or(file.executor).unwrap_or(DEFAULT_EXECUTOR),
        work_dir: args
            .work_dir
            .or(file.work_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_WORK_DIR)),
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
        let file = parse_file(EXAMPLE, "deploy/config/runner.toml").unwrap();
        let config = merge(Args::default(), file).unwrap();
        assert_eq!(config.coordinators.len(), 2);
        assert_eq!(config.name, "runner-1");
        assert_eq!(config.capacity, 2);
        assert_eq!(config.executor, ExecutorKind::Shell);
        assert_eq!(config.labels.get("arch").map(String::as_str), Some("amd64"));
    }

    #[test]
    fn defaults_fill_what_is_unset() {
        let config = merge(required_args(), FileConfig::default()).unwrap();
        assert_eq!(config.capacity, DEFAULT_CAPACITY);
        assert_eq!(config.executor, DEFAULT_EXECUTOR);
        assert_eq!(config.work_dir, PathBuf::from(DEFAULT_WORK_DIR));
        assert!(config.labels.is_empty());
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let file = parse_file(
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
        let err = parse_file("name = \"x\"\ncapacityy = 2\n", "runner.toml").unwrap_err();
        let text = format!("{}: {}", err, std::error::Error::source(&err).unwrap());
        assert!(text.contains("capacityy"), "{text}");
        assert!(text.contains("runner.toml"), "{text}");
    }

    #[test]
    fn missing_required_setting_names_flag_and_env() {
        let err = merge(Args::default(), FileConfig::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--coordinator"), "{text}");
        assert!(text.contains("CAPSTAN_COORDINATOR"), "{text}");
    }

    #[test]
    fn docker_settings() {
        let file = parse_file(
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
            Some(Path::new("/etc/capstan/secrets.toml"))
        );
        assert_eq!(parse_memory("1g"), Some(1 << 30));
        assert_eq!(parse_memory("100"), Some(100));
        assert_eq!(parse_memory("12x"), None);
        let mut args = required_args();
        args.docker_network = Some("host".into());
        assert!(matches!(
            merge(args, FileConfig::default()),
            Err(ConfigError::Network(_))
        ));
    }

    #[test]
    fn bad_labels_and_zero_capacity_are_errors() {
        assert!(parse_labels("a=1,b").is_err());
        assert!(Args::try_parse_from(["capstan-runner", "--labels", "x"]).is_err());
        let mut args = required_args();
        args.capacity = Some(0);
        assert!(matches!(
            merge(args, FileConfig::default()),
            Err(ConfigError::ZeroCapacity)
        ));
    }

    #[test]
    fn step_log_cap() {
        let config = merge(required_args(), FileConfig::default()).unwrap();
        assert_eq!(config.step_log_cap.cap, 256 << 20);
        let mut args = required_args();
        args.max_step_log = Some("64k".into());
        assert_eq!(
            merge(args, FileConfig::default()).unwrap().step_log_cap.cap,
            64 << 10
        );
        let mut args = required_args();
        args.max_step_log = Some("0".into());
        assert_eq!(
            merge(args, FileConfig::default()).unwrap().step_log_cap.cap,
            0
        );
        let mut args = required_args();
        args.max_step_log = Some("lots".into());
        let e = merge(args, FileConfig::default()).unwrap_err().to_string();
        assert!(
            e.contains("--max-step-log `lots`") && e.contains("256m"),
            "{e}"
        );
    }
}
