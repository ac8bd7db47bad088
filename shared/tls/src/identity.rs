//! The name a peer's certificate gives: its subject's common name, else
//! its first DNS subjectAltName. The coordinator records it as a runner's
//! identity.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The CN of `der`'s subject, else its first DNS SAN; `None` if it has
/// neither (or does not parse, which cannot happen for a certificate
/// rustls has verified).
pub fn identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .map(str::trim)
        .filter(|cn| !cn.is_empty());
    if let Some(cn) = cn {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some((*name).to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: Option<&str>, sans: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_else_the_first_dns_name() {
        assert_eq!(
            identity(&cert(Some("builder-1"), &["b1.example"])).as_deref(),
            Some("builder-1")
        );
        assert_eq!(
            identity(&cert(None, &["b2.example", "other.example"])).as_deref(),
            Some("b2.example")
        );
        assert_eq!(identity(&cert(None, &[])), None);
        assert_eq!(identity(b"garbage"), None);
    }
}
