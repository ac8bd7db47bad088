//! Sealing secrets before they reach the store: those a repository
//! registration holds (its webhook secret, its forge status token, its
//! fetch login) and the password in a run's repository URL
//! (`scheduler/stored.rs`).
//!
//! Both must stay usable (the webhook secret is an HMAC key, the status
//! token goes to the forge's API), so hashing them as API tokens are hashed
//! is not an option. Instead each is encrypted with ChaCha20-Poly1305 under
//! a 32-byte key that lives outside the store: `--forge-key-file`, or
//! `DATA_DIR/forge.key` (mode 0600, made on first use). A copy of the store
//! (an etcd backup, a redb file) without the key holds no usable secret.
//! Every replica of an HA deployment must be given the same key file.
//!
//! Sealed form: `v1:` and base64 of a 12-byte random nonce followed by the
//! ciphertext and its tag. The key is never logged.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::path::{Path, PathBuf};

const PREFIX: &str = "v1:";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A failure to load the key or to open a sealed value.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SealError {
    #[error("cannot read the forge key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write a new forge key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the forge key file {0} does not hold a 32-byte key in base64: make one with \
         `head -c 32 /dev/urandom | base64 > FILE`"
    )]
    BadKey(PathBuf),
    #[error(
        "a stored repository secret does not open with this coordinator's forge key: give every \
         replica the same --forge-key-file (the one the repository was added with)"
    )]
    WrongKey,
}

/// The key that seals and opens repository secrets.
#[derive(Clone)]
pub(crate) struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// The key in `file`, or in `data_dir/forge.key` (made, 0600, when it
    /// does not exist yet).
    pub(crate) fn load(file: Option<&Path>, data_dir: &Path) -> Result<Sealer, SealError> {
        let path = match file {
            Some(p) => p.to_path_buf(),
            None => {
                let p = data_dir.join("forge.key");
                if !p.exists() {
                    let key: [u8; 32] = rand::random();
                    write_new_private(&p, format!("{}\n", B64.encode(key)).as_bytes()).map_err(
                        |source| SealError::Write {
                            path: p.clone(),
                            source,
                        },
                    )?;
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| SealError::Read {
            path: path.clone(),
            source,
        })?;
        let bytes = B64
            .decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| SealError::BadKey(path.clone()))?;
        Ok(Self::from_key(&bytes))
    }

    pub(crate) fn from_key(key: &[u8]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
        }
    }

    /// `plain` sealed; empty stays empty (no secret).
    pub(crate) fn seal(&self, plain: &str) -> String {
        if plain.is_empty() {
            return String::new();
        }
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .expect("ChaCha20-Poly1305 encrypts any message this size");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        format!("{PREFIX}{}", B64.encode(out))
    }

    /// The plain text of a value [`Self::seal`] made.
    pub(crate) fn open(&self, sealed: &str) -> Result<String, SealError> {
        if sealed.is_empty() {
            return Ok(String::new());
        }
        let bytes = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| B64.decode(b).ok())
            .filter(|b| b.len() > 12)
            .ok_or(SealError::WrongKey)?;
        let (nonce, body) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| SealError::WrongKey)?;
        String::from_utf8(plain).map_err(|_| SealError::WrongKey)
    }
}

/// Creates `path` with mode 0600 (never widening an existing file).
fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::private::FILE_MODE)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_refuses_another_key() {
        let a = Sealer::from_key(&[7; 32]);
        let sealed = a.seal("hook-secret");
        assert!(sealed.starts_with("v1:") && !sealed.contains("hook-secret"));
        assert_ne!(sealed, a.seal("hook-secret"), "a fresh nonce each time");
        assert_eq!(a.open(&sealed).unwrap(), "hook-secret");
        let b = Sealer::from_key(&[8; 32]);
        assert!(matches!(b.open(&sealed), Err(SealError::WrongKey)));
        assert!(matches!(a.open("v1:AAAA"), Err(SealError::WrongKey)));
        assert_eq!(a.seal(""), "");
        assert_eq!(a.open("").unwrap(), "");
    }

    #[test]
    fn the_default_key_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Sealer::load(None, dir.path()).unwrap();
        let b = Sealer::load(None, dir.path()).unwrap();
        assert_eq!(b.open(&a.seal("x")).unwrap(), "x");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("forge.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "short").unwrap();
        let err = Sealer::load(Some(&bad), dir.path()).unwrap_err();
        assert!(err.to_string().contains("32-byte key"), "{err}");
    }
}
