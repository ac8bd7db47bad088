//! Runner-side secrets: registry and git credentials that pipelines refer to
//! by name and never carry themselves.
//!
//! Sources, later ones winning for the same name:
//! 1. `--secrets-file PATH`: TOML (`.toml`) or JSON (anything else), a map of
//!    name to a string, `{ username, password }`, or an SSH key for git
//!    remotes (`{ ssh_key, username?, passphrase?, known_hosts? }`, see
//!    [`crate::git`]):
//!
//!    ```toml
//!    registry = { username = "ci", password = "s3cret" }
//!    deploy-token = "abc123"
//!    [manifests-ssh]
//!    ssh_key = """
//!    -----BEGIN OPENSSH PRIVATE KEY-----
//!    ...
//!    -----END OPENSSH PRIVATE KEY-----
//!    """
//!    known_hosts = "[git.example.com]:2222 ssh-ed25519 AAAAC3Nza..."
//!    ```
//! 2. The environment: `CAPSTAN_SECRET_<NAME>` where `<NAME>` is the secret's
//!    name upper-cased with `-` and `.` written as `_` (`registry` ->
//!    `CAPSTAN_SECRET_REGISTRY`). A value that starts with `{` is parsed as
//!    JSON (`{"username": ..., "password": ...}` or `{"ssh_key": ...}`);
//!    anything else is a string.
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
    /// A private key (OpenSSH or PEM text) for SSH git remotes. Before
    /// `Login` so that serde tries it first: only this kind has `ssh_key`.
    SshKey {
        ssh_key: String,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        passphrase: Option<String>,
        /// OpenSSH known_hosts lines for the remote; without them the
        /// runner user's `~/.ssh/known_hosts` is used.
        #[serde(default)]
        known_hosts: Option<String>,
    },
    Login {
        username: String,
        password: String,
    },
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret as a username/password pair (see the module docs); `None`
    /// for an SSH key, which has no password to give.
    pub fn login(&self) -> Option<(String, String)> {
        match self {
            Secret::Login { username, password } => Some((username.clone(), password.clone())),
            Secret::Text(text) => Some(match text.split_once(':') {
                Some((user, pass)) => (user.to_owned(), pass.to_owned()),
                None => ("capstan".to_owned(), text.clone()),
            }),
            Secret::SshKey { .. } => None,
        }
    }

    /// Every value worth masking: the password or text, and for a pair the
    /// `user:password` text that basic auth encodes. A key is masked line
    /// by line (a step that prints it prints lines) and as a whole.
    pub fn values(&self) -> Vec<String> {
        match self {
            Secret::Text(text) => vec![text.clone()],
            Secret::Login { username, password } => {
                vec![password.clone(), format!("{username}:{password}")]
            }
            Secret::SshKey {
                ssh_key,
                passphrase,
                ..
            } => {
                let mut values = vec![ssh_key.trim().to_owned()];
                values.extend(
                    ssh_key
                        .lines()
                        .map(str::trim)
                        // The armour lines are public and identical in every key.
                        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
                        .map(str::to_owned),
                );
                values.extend(passphrase.iter().filter(|p| !p.is_empty()).cloned());
                values
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
    #[error(
        "environment variable {var}: expected a string, JSON {{\"username\", \"password\"}} or JSON {{\"ssh_key\", ...}}"
    )]
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
            Some(("ci".into(), "pw1".into()))
        );
        assert_eq!(s.get("token").unwrap(), &Secret::Text("abc".into()));
        let json_path = dir.path().join("s.json");
        std::fs::write(
            &json_path,
            r#"{"git": {"username": "bot", "password": "x:y"}}"#,
        )
        .unwrap();
        let s = Secrets::from_file(&json_path).unwrap();
        assert_eq!(
            s.get("git").unwrap().login(),
            Some(("bot".into(), "x:y".into()))
        );
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
        assert_eq!(
            s.get("my-reg").unwrap().login(),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(
            s.get("git").unwrap().login(),
            Some(("a".into(), "b".into()))
        );
        let err = s.get("nope").unwrap_err().to_string();
        assert!(err.contains("CAPSTAN_SECRET_NOPE"), "{err}");
        assert!(format!("{:?}", s.get("git").unwrap()) == "Secret(..)");
    }

    #[test]
    fn ssh_key_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "[deploy]\nssh_key = \"\"\"\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\nAAAAB3NzaC1yc2E\n-----END OPENSSH PRIVATE KEY-----\n\"\"\"\nknown_hosts = \"[h]:2222 ssh-ed25519 AAAA\"\n[login]\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let s = Secrets::from_file(&path).unwrap();
        let deploy = s.get("deploy").unwrap();
        assert!(
            matches!(deploy, Secret::SshKey { username: None, known_hosts: Some(k), .. } if k.starts_with("[h]:2222"))
        );
        assert_eq!(deploy.login(), None, "a key is not a password");
        let values = deploy.values();
        assert!(values.contains(&"b3BlbnNzaC1rZXk".to_owned()), "{values:?}");
        assert!(values.contains(&"AAAAB3NzaC1yc2E".to_owned()), "{values:?}");
        assert!(
            !values
                .iter()
                .any(|v| v.starts_with("-----") && !v.contains('\n')),
            "armour lines are not secret: {values:?}"
        );
        assert!(matches!(s.get("login").unwrap(), Secret::Login { .. }));

        let mut env = Secrets::default();
        env.add_env([(
            "CAPSTAN_SECRET_KEY".to_owned(),
            r#"{"ssh_key": "k", "username": "git", "passphrase": "pp"}"#.to_owned(),
        )])
        .unwrap();
        let key = env.get("key").unwrap();
        assert!(matches!(key, Secret::SshKey { username: Some(u), .. } if u == "git"));
        assert!(key.values().contains(&"pp".to_owned()));
    }
}
