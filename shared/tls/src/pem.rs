//! Certificates and private keys from PEM files. Each error names the file
//! and the flag it came from, so a wrong path says what to fix.

use std::path::Path;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// Every certificate in the PEM file at `path` (a chain: leaf first), at least one.
pub fn certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(flag, path, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The private key in the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
pub fn key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(flag, path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => Err(TlsError::NoKey {
            flag,
            path: path.to_owned(),
        }),
        Err(e) => Err(bad(flag, path, &e)),
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn bad(flag: &'static str, path: &Path, e: &pem::Error) -> TlsError {
    TlsError::BadPem {
        flag,
        path: path.to_owned(),
        detail: format!("{e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_names_the_flag_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = certs("--ca-cert", &missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot read --ca-cert {}: ", missing.display())),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        assert_eq!(
            certs("--ca-cert", &empty).unwrap_err().to_string(),
            format!(
                "--ca-cert {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                empty.display()
            )
        );
        assert_eq!(
            key("--tls-key", &empty).unwrap_err().to_string(),
            format!(
                "--tls-key {}: no PEM private key in it (expected -----BEGIN PRIVATE KEY----- or RSA/EC PRIVATE KEY)",
                empty.display()
            )
        );
    }

    #[test]
    fn reads_a_certificate_and_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key_pair)
            .unwrap();
        std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("k.pem"), key_pair.serialize_pem()).unwrap();
        assert_eq!(
            certs("--tls-cert", &dir.path().join("c.pem"))
                .unwrap()
                .len(),
            1
        );
        key("--tls-key", &dir.path().join("k.pem")).unwrap();
    }
}
