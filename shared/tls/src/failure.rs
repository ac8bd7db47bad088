//! A failed TLS connection explained: found in an error's source chain
//! (rustls' errors travel inside `std::io::Error`s, whose `source` skips
//! them, so each `io::Error` is opened with `get_ref`, and inside
//! `h2::Error`s, opened with `get_io`).

use std::error::Error as StdError;

use rustls::{AlertDescription, CertificateError};

/// Why a TLS connection to the coordinator failed, with what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The server's certificate does not chain to a CA this client trusts.
    #[error(
        "the coordinator's certificate is not trusted ({0}): pass the CA certificate that signed it with --ca-cert (or CAPSTAN_CA_CERT)"
    )]
    UntrustedServer(String),
    /// The server's certificate is outside its validity period.
    #[error(
        "the coordinator's certificate has expired or is not yet valid ({0}): renew --tls-cert (the coordinator reloads it when the file changes)"
    )]
    ExpiredServer(String),
    /// The server's certificate does not name the host in the URL.
    #[error(
        "the coordinator's certificate is not valid for this address ({0}): connect with a host name or IP address in its subjectAltName"
    )]
    WrongName(String),
    /// The server refused the certificate this client presented (or wanted one).
    #[error(
        "the coordinator refused this client's certificate ({0}): use a --tls-client-cert signed by the CA the coordinator trusts (its --tls-client-ca)"
    )]
    ClientCertRefused(String),
    /// The server does not speak TLS.
    #[error(
        "the server did not answer with TLS ({0}): it may serve plaintext; use an http:// URL for a coordinator without --tls-cert"
    )]
    NotTls(String),
    /// A TLS port answered a plaintext (`http://`) client.
    #[error(
        "the coordinator requires TLS on this port: use an https:// URL (with --ca-cert if its certificate is from a private CA)"
    )]
    ServerWantsTls,
    /// Any other TLS error.
    #[error("TLS failed: {0}")]
    Other(String),
}

/// The TLS failure somewhere in `err`'s source chain, if any.
pub fn classify(err: &(dyn StdError + 'static)) -> Option<TlsFailure> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(from_rustls(r));
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // What the coordinator's TLS port sends a plaintext HTTP/2 client.
            if h2.is_go_away()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::INADEQUATE_SECURITY)
            {
                return Some(TlsFailure::ServerWantsTls);
            }
            // h2's errors have no `source`: an alert read on an open
            // connection (a refused client certificate under TLS 1.3) is
            // only reachable through `get_io`.
            if let Some(io) = h2.get_io()
                && let Some(found) = classify(io)
            {
                return Some(found);
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = classify(inner)
        {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

fn from_rustls(e: &rustls::Error) -> TlsFailure {
    let detail = e.to_string();
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::ExpiredServer(detail),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::WrongName(detail)
            }
            _ => TlsFailure::UntrustedServer(detail),
        },
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied,
        ) => TlsFailure::ClientCertRefused(detail),
        rustls::Error::InvalidMessage(_) => TlsFailure::NotTls(detail),
        _ => TlsFailure::Other(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let failure = classify(&io).unwrap();
        assert_eq!(
            failure.to_string(),
            "the coordinator's certificate is not trusted (invalid peer certificate: UnknownIssuer): pass the CA certificate that signed it with --ca-cert (or CAPSTAN_CA_CERT)"
        );
        let alert =
            std::io::Error::other(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert!(matches!(
            classify(&alert),
            Some(TlsFailure::ClientCertRefused(_))
        ));
        assert_eq!(classify(&std::io::Error::other("plain")), None);
    }
}
