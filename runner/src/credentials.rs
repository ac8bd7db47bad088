//! The per-runner credential from `Register`, cached in a file
//! (`<work_dir>/runner.json`, see [`crate::workdir`]) so a restarted runner
//! keeps its id. The file does not name a coordinator: every replica of a
//! cluster accepts it.

use std::fmt;
use std::path::{Path, PathBuf};

use capstan_proto::ids::RunnerId;
use serde::{Deserialize, Serialize};

/// A runner id and its secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub runner_id: RunnerId,
    pub runner_secret: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("runner_id", &self.runner_id)
            .field("runner_secret", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading cached runner credentials {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing cached runner credentials {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The credential cached in `path`, `None` when there is none. A file that
/// does not parse is logged and ignored: the runner registers again and
/// replaces it.
pub(crate) async fn load(path: &Path) -> Result<Option<Credentials>, CredentialsError> {
    let path = path.to_owned();
    let text = match tokio::fs::read(&path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CredentialsError::Read { path, source }),
    };
    match serde_json::from_slice::<Credentials>(&text) {
        Ok(creds) if !creds.runner_id.as_str().is_empty() => Ok(Some(creds)),
        Ok(_) => Ok(None),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable cached credentials; registering again");
            Ok(None)
        }
    }
}

/// Saves the credential to `path` atomically (a temporary file beside it,
/// then a rename), readable by the owner only.
pub(crate) async fn save(path: &Path, creds: &Credentials) -> Result<(), CredentialsError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let path = path.to_owned();
    let write_err = |source| CredentialsError::Write {
        path: path.clone(),
        source,
    };
    let json = serde_json::to_vec_pretty(creds).map_err(|e| write_err(e.into()))?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        use tokio::io::AsyncWriteExt;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true).mode(0o600);
        let mut file = tokio::fs::OpenOptions::from(options)
            .open(&tmp)
            .await
            .map_err(write_err)?;
        file.write_all(&json).await.map_err(write_err)?;
        file.sync_all().await.map_err(write_err)?;
    }
    tokio::fs::rename(&tmp, &path).await.map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn save_then_load_round_trips_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = crate::workdir::WorkDir::new(dir.path()).credentials_file();
        assert!(load(&file).await.unwrap().is_none());
        let creds = Credentials {
            runner_id: RunnerId::from_string("rnr-1"),
            runner_secret: "s3cret".into(),
        };
        save(&file, &creds).await.unwrap();
        assert_eq!(load(&file).await.unwrap(), Some(creds.clone()));
        assert!(!format!("{creds:?}").contains("s3cret"));
        assert!(dir.path().join("runner.json").exists());
        std::fs::write(&file, b"{not json").unwrap();
        assert!(load(&file).await.unwrap().is_none());
    }
}
