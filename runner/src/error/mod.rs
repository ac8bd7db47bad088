//! The runner's errors: [`Error`], the failures that end the runner, and
//! [`chain`], which puts an error and its sources on the one line a log or
//! a report shows.
//!
//! Layout: `chain` lives in a file of its own because everything may use
//! it, executors included, while [`Error`] names the errors of the
//! executors, secrets and credentials it wraps.

mod chain;

use std::path::PathBuf;

pub(crate) use chain::chain;

/// Failures that end the runner. A coordinator that cannot be reached is not
/// one of them: the agent keeps retrying. One that cannot be reached
/// securely is: its certificate will not become trusted by waiting.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(
        "starting the docker executor (or pass --executor shell to run steps as host processes)"
    )]
    Docker(#[from] crate::executor::docker::DockerError),
    #[error("loading secrets")]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error("no coordinator URL given: pass --coordinator URL")]
    NoCoordinator,
    #[error("invalid coordinator URL `{url}`: expected e.g. http://127.0.0.1:7700")]
    InvalidCoordinatorUrl { url: String },
    #[error("capacity must be at least 1")]
    ZeroCapacity,
    #[error("cannot listen on {addr} (--http-listen): {source}; pick a free port or drop the flag")]
    HttpListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// UNAUTHENTICATED or PERMISSION_DENIED: the coordinator's message says
    /// which setting (the token, the client certificate, or a name that
    /// belongs to a registered runner this one cannot prove it is).
    #[error("the coordinator refused to register this runner: {message}")]
    RegistrationRejected { message: String },
    /// PERMISSION_DENIED on the Control stream (a client certificate of
    /// another subject than the one registered).
    #[error("the coordinator refused this runner's connection: {message}")]
    ConnectionRefused { message: String },
    #[error("cannot connect securely to the coordinator at {url}: {failure}")]
    Tls {
        url: String,
        failure: capstan_tls::TlsFailure,
    },
    #[error(transparent)]
    TlsConfig(#[from] capstan_tls::TlsError),
    #[error(
        "the coordinator rejected this runner's credentials even after registering again: {message}"
    )]
    CredentialsRejected { message: String },
    #[error("the coordinator refused this runner's protocol version: {message}")]
    ProtocolRejected { message: String },
    #[error("preparing work dir {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] crate::credentials::CredentialsError),
}
