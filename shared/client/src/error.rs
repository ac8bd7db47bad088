//! What can go wrong in a client call, and how it reads: [`ClientError`],
//! and [`code_name`] for a status code as a user sees it.

use std::error::Error as StdError;
use std::time::Duration;

use tonic::{Code, Status};

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A server address is not a valid URL.
    #[error(
        "invalid coordinator address `{url}`: {source}; expected a URL like http://127.0.0.1:7700"
    )]
    InvalidServer {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS settings cannot be used (a `--ca-cert` that is not there...).
    #[error("{0}")]
    TlsConfig(#[from] capstan_tls::TlsError),
    /// A server answered, but not securely: an untrusted or expired
    /// certificate, a plaintext server behind an `https://` URL (never
    /// used in plaintext), or a TLS port behind an `http://` one.
    #[error("cannot connect securely to the coordinator at {url}: {failure}")]
    Tls {
        url: String,
        failure: capstan_tls::TlsFailure,
    },
    /// No server answered (connection refused, timed out, reset...).
    #[error(
        "cannot reach the coordinator at {}: {}; is it running? set --server or CAPSTAN_SERVER",
        servers.join(","),
        root_cause(&**source)
    )]
    Unreachable {
        servers: Vec<String>,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// Servers answered, but kept saying `UNAVAILABLE` without naming a
    /// leader (an election in progress, or no leader can be elected).
    #[error(
        "the coordinator at {} is unavailable: {}; no leader answered within {retried_for:?}, try again shortly",
        servers.join(","),
        source.message()
    )]
    NoLeader {
        servers: Vec<String>,
        retried_for: Duration,
        #[source]
        source: Status,
    },
    /// Every server that answered is a follower, and the leader they name
    /// cannot be reached from here: an address only the cluster's own
    /// network reaches (a container's name, a private IP behind NAT). None
    /// of the given servers led either, so the user must give one that does.
    #[error(
        "no coordinator at {} is the leader, and the leader they name, {leader}, cannot be reached from here ({}); add an address of the leader that this host can reach (e.g. its published port) to --server or CAPSTAN_SERVER",
        servers.join(","),
        root_cause(&**source)
    )]
    LeaderUnreachable {
        servers: Vec<String>,
        leader: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The coordinator answered the call with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[source] Status),
}

impl ClientError {
    /// The gRPC status the coordinator answered with, if it answered.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status(s) => Some(s),
            _ => None,
        }
    }

    /// The status code of a coordinator's answer, if it answered.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// True if no coordinator (or no leader) could be reached.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::NoLeader { .. }
                | Self::LeaderUnreachable { .. }
                | Self::Tls { .. }
        )
    }
}

/// A lower-case name of a status code, as used in messages.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The innermost error of a chain: "Connection refused (os error 111)"
/// says more than "transport error".
fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
