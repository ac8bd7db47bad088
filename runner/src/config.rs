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
/// Default executor of the binary.
// TODO(docker issue): DESIGN.md makes `docker` the runner's default; switch
// back once the docker executor exists.
pub const DEFAULT_EXECUTOR: ExecutorKind = ExecutorKind::Shell;

/// Which executor runs the steps of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// One container per step (not available in this build yet).
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
    /// Executor for the steps [default: shell].
    #[arg(long, env = "CAPSTAN_EXECUTOR", value_enum)]
    pub executor: Option<ExecutorKind>,
    /// Work dir for attempts, the log spool and the cached credentials
    /// [default: ./capstan-runner-work].
    #[arg(long, env = "CAPSTAN_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
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
    Ok(RunnerConfig {
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
}
