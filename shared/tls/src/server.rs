//! The coordinator's TLS: one certificate for both ports, re-read when its
//! files change (rotation without a restart), and, with `--tls-client-ca`,
//! client certificates checked against that CA.
//!
//! Client certificates are optional at the TLS layer: the same gRPC port
//! serves the CLI, which has none. Whether a call needs one, and whether
//! it chains to the CA, is the RunnerService's to decide from the peer
//! certificates tonic hands it ([`crate::client_ca`] says why).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::{ClientCa, TlsError, pem, provider};

/// The coordinator's TLS files.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    /// `--tls-cert`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `--tls-key`: its private key.
    pub key: PathBuf,
    /// `--tls-client-ca`: the CA runners' client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

/// ALPN of the gRPC port.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of the HTTP side port (axum serves HTTP/1.1 there).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The server configs of both ports; they share one [`ReloadingCert`].
#[derive(Clone, Debug)]
pub struct ServerConfigs {
    pub grpc: Arc<ServerConfig>,
    pub http: Arc<ServerConfig>,
    /// With `--tls-client-ca`: what runners' certificates are checked against.
    pub client_ca: Option<Arc<ClientCa>>,
}

impl ServerConfigs {
    /// Reads the files (a bad pair or CA fails the start) and builds both configs.
    pub fn load(files: &ServerTlsFiles) -> Result<Self, TlsError> {
        let resolver = Arc::new(ReloadingCert::load(&files.cert, &files.key)?);
        let client_ca = match &files.client_ca {
            Some(path) => Some(Arc::new(ClientCa::load(path)?)),
            None => None,
        };
        let build = |alpn: &[u8]| -> Result<Arc<ServerConfig>, TlsError> {
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|source| rustls_error("TLS protocol versions", source))?;
            let builder = match &client_ca {
                None => builder.with_no_client_auth(),
                Some(ca) => builder.with_client_cert_verifier(ca.handshake_verifier()),
            };
            let mut config = builder.with_cert_resolver(resolver.clone());
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        Ok(Self {
            grpc: build(ALPN_H2)?,
            http: build(ALPN_HTTP1)?,
            client_ca,
        })
    }
}

fn rustls_error(what: &str, source: rustls::Error) -> TlsError {
    TlsError::Rustls {
        what: what.to_owned(),
        source,
    }
}

/// What identifies a version of a file: a replaced or rewritten file
/// changes at least one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&meta),
    })
}

#[derive(Debug)]
struct Current {
    stamps: (Option<Stamp>, Option<Stamp>),
    key: Arc<CertifiedKey>,
}

/// The server certificate, re-read on the first handshake after its files
/// changed. A new pair that cannot be used (half-written, a key that does
/// not match) is logged and the previous one kept; it is tried again when
/// the files change again.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Current>,
}

impl ReloadingCert {
    /// Reads the pair; failing here fails the coordinator's start.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let certified = read_pair(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Mutex::new(Current {
                stamps,
                key: certified,
            }),
        })
    }

    /// The pair to serve now: two `stat`s per handshake, a read only when
    /// either file changed.
    fn now(&self) -> Arc<CertifiedKey> {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if stamps != current.stamps {
            current.stamps = stamps;
            match read_pair(&self.cert, &self.key) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert.display(), "reloaded the TLS certificate");
                    current.key = key;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "the changed TLS certificate or key cannot be used; still serving the previous one"
                ),
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.now())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = pem::certs("--tls-cert", cert)?;
    let private = pem::key("--tls-key", key)?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|source| {
        rustls_error(
            &format!(
                "--tls-cert {} with --tls-key {}",
                cert.display(),
                key.display()
            ),
            source,
        )
    })?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        // Replaced by rename, as cert tools do.
        std::fs::write(dir.join("cert.tmp"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.tmp"), key.serialize_pem()).unwrap();
        std::fs::rename(dir.join("cert.tmp"), &c).unwrap();
        std::fs::rename(dir.join("key.tmp"), &k).unwrap();
        (c, k)
    }

    fn served_cn(r: &ReloadingCert) -> Option<String> {
        crate::identity(r.now().cert[0].as_ref())
    }

    #[test]
    fn a_changed_pair_is_served_and_a_bad_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "first");
        let r = ReloadingCert::load(&c, &k).unwrap();
        assert_eq!(served_cn(&r).as_deref(), Some("first"));
        write_pair(dir.path(), "second");
        assert_eq!(served_cn(&r).as_deref(), Some("second"));
        std::fs::write(&k, "half-written").unwrap();
        assert_eq!(
            served_cn(&r).as_deref(),
            Some("second"),
            "kept the old pair"
        );
        write_pair(dir.path(), "third");
        assert_eq!(served_cn(&r).as_deref(), Some("third"));
    }

    #[test]
    fn a_key_of_another_certificate_fails_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = write_pair(dir.path(), "a");
        let other = rcgen::KeyPair::generate().unwrap();
        let k = dir.path().join("other.pem");
        std::fs::write(&k, other.serialize_pem()).unwrap();
        let e = ReloadingCert::load(&c, &k).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "--tls-cert {} with --tls-key {}: keys may not be consistent: KeyMismatch",
                c.display(),
                k.display()
            )
        );
    }
}
