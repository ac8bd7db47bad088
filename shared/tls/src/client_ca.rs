//! Runners' client certificates (`--tls-client-ca`): asked for at the TLS
//! layer, judged by the runner service.
//!
//! Why not let rustls refuse a certificate of another CA during the
//! handshake: under TLS 1.3 the client has finished its side of the
//! handshake by then, and the alert is lost in the HTTP/2 connection's
//! "broken pipe"; the runner would only log transport errors. So the
//! handshake accepts any client certificate whose key the client proves it
//! holds (the handshake signature is still verified), and the runner
//! service checks the chain against the CA with the same webpki verifier,
//! answering UNAUTHENTICATED with what is wrong. The CLI's services never
//! look at client certificates.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::{TlsError, pem, provider};

/// The CA runners' certificates must chain to.
#[derive(Debug)]
pub struct ClientCa {
    webpki: Arc<dyn ClientCertVerifier>,
}

impl ClientCa {
    /// Reads the CA file (`--tls-client-ca`).
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in pem::certs("--tls-client-ca", path)? {
            roots.add(cert).map_err(|source| TlsError::Rustls {
                what: format!("--tls-client-ca {}", path.display()),
                source,
            })?;
        }
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Invalid(format!("--tls-client-ca {}: {e}", path.display())))?;
        Ok(Self { webpki })
    }

    /// Checks a peer's chain (leaf first) against the CA, now.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.webpki
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
    }

    /// The TLS layer's verifier (see the module docs).
    pub(crate) fn handshake_verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(AskOnly(self.clone()))
    }
}

/// Asks for a client certificate, accepts any (or none), and verifies the
/// handshake signature that proves the client holds its key.
#[derive(Debug)]
struct AskOnly(Arc<ClientCa>);

impl ClientCertVerifier for AskOnly {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Judged by the runner service with `ClientCa::verify`.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ca");
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let client_ca = ClientCa::load(&dir.path().join("ca.pem")).unwrap();

        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "leaf");
        let signed = leaf.signed_by(&key, &ca).unwrap();
        client_ca.verify(&[signed.der().clone()]).unwrap();

        let stranger = leaf.self_signed(&key).unwrap();
        assert_eq!(
            client_ca
                .verify(&[stranger.der().clone()])
                .unwrap_err()
                .to_string(),
            "invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            client_ca.verify(&[]).unwrap_err(),
            rustls::Error::NoCertificatesPresented
        );
    }
}
