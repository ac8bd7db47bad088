//! TLS for Capstan's processes, on rustls with the ring provider.
//!
//! Layout:
//! - [`pem`]: certificates and keys read from PEM files, with errors that
//!   name the file and the flag;
//! - [`server`]: the coordinator's server configs (one for the gRPC port
//!   with ALPN `h2`, one for the HTTP port) sharing one certificate
//!   resolver that re-reads the pair when the files change, and optional
//!   client certificates checked against `--tls-client-ca`;
//! - [`client_ca`]: runners' client certificates, asked for in the
//!   handshake and judged by the runner service against `--tls-client-ca`;
//! - [`client`]: what a client (CLI, runner) trusts and presents, as
//!   tonic's `ClientTlsConfig`;
//! - [`identity`]: the name in a peer's certificate (CN, else the first DNS SAN);
//! - [`failure`]: a failed handshake explained: which side refused what,
//!   and which flag fixes it.

pub mod client;
pub mod client_ca;
pub mod failure;
pub mod identity;
pub mod pem;
pub mod pinned;
pub mod server;

pub use client::ClientTls;
pub use client_ca::ClientCa;
pub use failure::{TlsFailure, classify};
pub use identity::identity;
pub use pinned::pinned_client_config;
pub use server::{ServerConfigs, ServerTlsFiles};

use std::path::PathBuf;
use std::sync::Arc;

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: no PEM private key in it (expected -----BEGIN PRIVATE KEY----- or RSA/EC PRIVATE KEY)", path.display())]
    NoKey { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: not a usable PEM file: {detail}", path.display())]
    BadPem {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what}: {source}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The crypto provider every config here is built with: ring, named
/// explicitly so that another crate turning on rustls' aws-lc-rs feature
/// cannot make the process default ambiguous.
// Deprecated in 0.23.48 only for lacking post-quantum key exchange, which
// aws-lc-rs has; ring is chosen for its build time (docs/decisions.md).
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
