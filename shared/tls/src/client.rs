//! What a client of the coordinator trusts (`--ca-cert`, else the system's
//! roots) and, for a runner under mTLS, the certificate it presents.
//!
//! Only `https://` URLs use this; `http://` is plaintext. tonic (with its
//! TLS features, which the workspace turns on) refuses an `https://` URL
//! that has no TLS config rather than falling back to plaintext, and the
//! clients always give `https://` URLs one.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::{TlsError, pem};

/// A client's TLS files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// `--ca-cert`: the CA that signed the coordinator's certificate; none:
    /// the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// `--tls-client-cert`: presented to the coordinator (runners under mTLS).
    pub client_cert: Option<PathBuf>,
    /// `--tls-client-key`: its key.
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    /// tonic's config for an `https://` endpoint, the files read (and
    /// checked) now, so a wrong path fails before any connection.
    pub fn tonic_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        match &self.ca_cert {
            Some(path) => {
                // Parsed here: tonic skips certificates it cannot parse, and
                // a file with none would silently trust nothing.
                pem::certs("--ca-cert", path)?;
                let bytes = read("--ca-cert", path)?;
                config = config.ca_certificate(Certificate::from_pem(bytes));
            }
            None => config = config.with_native_roots(),
        }
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                pem::certs("--tls-client-cert", cert)?;
                pem::key("--tls-client-key", key)?;
                config = config.identity(Identity::from_pem(
                    read("--tls-client-cert", cert)?,
                    read("--tls-client-key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::Invalid(
                    "--tls-client-cert and --tls-client-key go together: pass both or neither"
                        .into(),
                ));
            }
        }
        Ok(config)
    }
}

fn read(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_cert_needs_its_key() {
        let tls = ClientTls {
            client_cert: Some("c.pem".into()),
            ..ClientTls::default()
        };
        assert_eq!(
            tls.tonic_config().unwrap_err().to_string(),
            "--tls-client-cert and --tls-client-key go together: pass both or neither"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "").unwrap();
        let tls = ClientTls {
            ca_cert: Some(path.clone()),
            ..ClientTls::default()
        };
        assert_eq!(
            tls.tonic_config().unwrap_err().to_string(),
            format!(
                "--ca-cert {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            )
        );
    }
}
