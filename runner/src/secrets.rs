//! Runner-side secrets: registry and git credentials that pipelines refer to
//! by name and never carry themselves.
//!
//! Sources, later ones winning for the same name:
//! 1. `--secrets-file PATH`: TOML (`.toml`) or JSON (anything else), a map of
//!    name to either a string or `{ username, password }`:
//!
//!    ```toml
//!    registry = { username = "ci", password = "s3cret" }
//!    deploy-token = "abc123"
//!    ```
//! 2. The environment: `CAPSTAN_SECRET_<NAME>` where `<NAME>` is the secret's
//!    name upper-cased with `-` and `.` written as `_` (`registry` ->
//!    `CAPSTAN_SECRET_REGISTRY`). A value that starts with `{` is parsed as
//!    JSON `{"username": ..., "password": ...}`; anything else is a string.
//!
//! A string secret used as a username/password pair (registry push, git) is
//! read as `username:password` when it contains a colon, else as a password
//! (token) with the username `capstan`.
//!
//! Every value of every secret is masked in step logs ([`crate::logs::mask`]),
//! not only the ones a step names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of the environment variables that hold secrets.
pub const ENV_PREFIX: &str = "CAPSTAN_SECRET_";

/// One secret.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Secret {
    Text(String),
    Login { username: String, password: String },
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret as a username/password pair (see the module docs).
    pub fn login(&self) -> (String, String) {
        match self {
            Secret::Login { username, password } => (username.clone(), password.clone()),
            Secret::Text(text) => match text.split_once(':') {
                Some((user, pass)) => (user.to_owned(), pass.to_owned()),
                None => ("capstan".to_owned(), text.clone()),
            },
        }
    }

    /// Every value worth masking: the password or text, and for a pair the
    /// `user:password` text that basic auth encodes.
    pub fn values(&self) -> Vec<String> {
        match self {
            Secret::Text(text) => vec![text.clone()],
            Secret::Login { username, password } => {
                vec![password.clone(), format!("{username}:{password}")]
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("reading secrets file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: expected a string or JSON {{\"username\", \"password\"}}")]
    Env { var: String },
    #[error(
        "secret `{name}` is not configured on this runner: add it to --secrets-file or set {env}"
    )]
    Missing { name: String, env: String },
}

/// The runner's secrets, by name.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    by_name: BTreeMap<String, Secret>,
}

impl Secrets {
    /// Reads the file (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SecretsError> {
        let mut secrets = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        secrets.add_env(std::env::vars())?;
        Ok(secrets)
    }

    pub fn from_file(path: &Path) -> Result<Self, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_error = |message: String| SecretsError::Parse {
            path: path.to_owned(),
            message,
        };
        let by_name: BTreeMap<String, Secret> = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| parse_error(e.message().to_owned()))?
        } else {
            serde_json::from_str(&text).map_err(|e| parse_error(e.to_string()))?
        };
        Ok(Self { by_name })
    }

    /// Adds `CAPSTAN_SECRET_*` variables from `vars`.
    pub fn add_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), SecretsError> {
        for (var, value) in vars {
            let Some(name) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let secret = if value.trim_start().starts_with('{') {
                serde_json::from_str::<Secret>(&value)
                    .map_err(|_| SecretsError::Env { var: var.clone() })?
            } else {
                Secret::Text(value)
            };
            self.by_name.insert(env_key(name), secret);
        }
        Ok(())
    }

    pub fn insert(&mut self, name: &str, secret: Secret) {
        self.by_name.insert(name.to_owned(), secret);
    }

    /// The secret called `name`: an exact match first, then the environment
    /// spelling (`my-registry` finds `CAPSTAN_SECRET_MY_REGISTRY`).
    pub fn get(&self, name: &str) -> Result<&Secret, SecretsError> {
        self.by_name
            .get(name)
            .or_else(|| self.by_name.get(&env_key(name)))
            .ok_or_else(|| SecretsError::Missing {
                name: name.to_owned(),
                env: format!("{ENV_PREFIX}{}", env_key(name)),
            })
    }

    /// Every secret value, for masking.
    pub fn values(&self) -> Vec<String> {
        self.by_name.values().flat_map(Secret::values).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The environment spelling of a secret's name.
fn env_key(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_toml_and_json_files() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("s.toml");
        std::fs::write(
            &toml_path,
            "registry = { username = \"ci\", password = \"pw1\" }\ntoken = \"abc\"\n",
        )
        .unwrap();
        let s = Secrets::from_file(&toml_path).unwrap();
        assert_eq!(
            s.get("registry").unwrap().login(),
            ("ci".into(), "pw1".into())
        );
        assert_eq!(s.get("token").unwrap(), &Secret::Text("abc".into()));
        let json_path = dir.path().join("s.json");
        std::fs::write(
            &json_path,
            r#"{"git": {"username": "bot", "password": "x:y"}}"#,
        )
        .unwrap();
        let s = Secrets::from_file(&json_path).unwrap();
        assert_eq!(s.get("git").unwrap().login(), ("bot".into(), "x:y".into()));
        std::fs::write(&json_path, "{not json").unwrap();
        assert!(matches!(
            Secrets::from_file(&json_path),
            Err(SecretsError::Parse { .. })
        ));
    }

    #[test]
    fn environment_and_missing_names() {
        let mut s = Secrets::default();
        s.add_env([
            ("CAPSTAN_SECRET_MY_REG".to_owned(), "u:p".to_owned()),
            (
                "CAPSTAN_SECRET_GIT".to_owned(),
                r#"{"username":"a","password":"b"}"#.to_owned(),
            ),
            ("OTHER".to_owned(), "x".to_owned()),
        ])
        .unwrap();
        assert_eq!(s.get("my-reg").unwrap().login(), ("u".into(), "p".into()));
        assert_eq!(s.get("git").unwrap().login(), ("a".into(), "b".into()));
        let err = s.get("nope").unwrap_err().to_string();
        assert!(err.contains("CAPSTAN_SECRET_NOPE"), "{err}");
        assert!(format!("{:?}", s.get("git").unwrap()) == "Secret(..)");
    }
}
