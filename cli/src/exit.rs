//! Exit codes, in one place (DESIGN.md, "Command line"):
//! 0 run (or command) succeeded, 1 run failed or was cancelled (and any
//! other failed command), 2 usage or validation error, 3 coordinator
//! unreachable, 4 API token refused (missing, unknown, expired, revoked, or
//! its scope too small), 5 a quota of the coordinator is used up
//! (RESOURCE_EXHAUSTED: the token's queued runs or tasks; wait or cancel,
//! then submit again), 130 interrupted while following.

use std::process::ExitCode;

use capstan_client::ClientError;
use capstan_proto::pipeline::v1::RunState;
use tonic::Code;

/// How the process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    Success,
    /// The run failed or was cancelled; also any command that failed for
    /// another reason than the ones below.
    Failed,
    /// Bad input: a flag, a file, an id.
    Usage,
    /// No coordinator (or no leader) answered.
    Unreachable,
    /// The coordinator refused the API token (UNAUTHENTICATED or
    /// PERMISSION_DENIED).
    Denied,
    /// A quota is used up (RESOURCE_EXHAUSTED): trying again later works.
    Exhausted,
    /// Ctrl-C while following.
    Interrupted,
}

impl Exit {
    pub(crate) fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Unreachable => 3,
            Exit::Denied => 4,
            Exit::Exhausted => 5,
            Exit::Interrupted => 130,
        }
    }

    /// The exit of a finished run.
    pub(crate) fn of_run(state: RunState) -> Exit {
        match state {
            RunState::Succeeded => Exit::Success,
            _ => Exit::Failed,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// A command that failed: what to print on stderr, and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) exit: Exit,
    /// Printed as is, so validation output keeps its `FILE:LINE:COL: msg` lines.
    pub(crate) message: String,
}

impl Failure {
    /// Bad input; `message` should say what to do.
    pub(crate) fn usage(message: impl std::fmt::Display) -> Self {
        Self {
            exit: Exit::Usage,
            message: format!("error: {message}"),
        }
    }

    /// Anything else that went wrong.
    pub(crate) fn failed(message: impl std::fmt::Display) -> Self {
        Self {
            exit: Exit::Failed,
            message: format!("error: {message}"),
        }
    }

    /// A client error, with `NOT_FOUND` explained by `not_found` (what was
    /// not found and where to look).
    pub(crate) fn from_client(err: ClientError, not_found: impl FnOnce() -> String) -> Self {
        if err.code() == Some(Code::NotFound) {
            Failure::usage(not_found())
        } else {
            Failure::from(err)
        }
    }

    /// `NOT_FOUND` for a run id.
    pub(crate) fn for_run(err: ClientError, run: &str) -> Self {
        Failure::from_client(err, || no_run(run))
    }
}

/// The message for an unknown run id.
pub(crate) fn no_run(run: &str) -> String {
    format!("no run `{run}` (see `capstan runs`)")
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        if err.is_unreachable() {
            return Failure {
                exit: Exit::Unreachable,
                message: format!("error: {err}"),
            };
        }
        if let ClientError::TlsConfig(_) = err {
            return Failure::usage(err);
        }
        match err.status() {
            // The coordinator's validation message lists every
            // `FILE:LINE:COL: msg`, one a line: print it alone.
            Some(s) if s.code() == Code::InvalidArgument => Failure {
                exit: Exit::Usage,
                message: s.message().to_string(),
            },
            // One line saying what to do (the coordinator's message names
            // the flag, or the scope needed).
            Some(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                Failure {
                    exit: Exit::Denied,
                    message: format!("error: {}", s.message()),
                }
            }
            Some(s) if s.code() == Code::ResourceExhausted => Failure {
                exit: Exit::Exhausted,
                message: format!("error: {}", s.message()),
            },
            Some(s) if s.code() == Code::Unavailable => Failure {
                exit: Exit::Unreachable,
                message: format!("error: {err}"),
            },
            _ => Failure::failed(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn maps_client_errors() {
        let f = Failure::from(ClientError::Status(Status::invalid_argument(
            "p.yaml:3:5: unknown key `stpes`",
        )));
        assert_eq!(f.exit, Exit::Usage);
        assert_eq!(f.message, "p.yaml:3:5: unknown key `stpes`");

        let f = Failure::for_run(ClientError::Status(Status::not_found("x")), "run-9");
        assert_eq!(f.exit, Exit::Usage);
        assert_eq!(f.message, "error: no run `run-9` (see `capstan runs`)");

        let f = Failure::from(ClientError::Status(Status::unauthenticated(
            "this call needs an API token: pass --token or set CAPSTAN_TOKEN",
        )));
        assert_eq!(f.exit.code(), 4);
        assert_eq!(
            f.message,
            "error: this call needs an API token: pass --token or set CAPSTAN_TOKEN"
        );
        let f = Failure::from(ClientError::Status(Status::permission_denied(
            "needs admin",
        )));
        assert_eq!(
            (f.exit, f.message.as_str()),
            (Exit::Denied, "error: needs admin")
        );

        let f = Failure::from(ClientError::Status(Status::resource_exhausted("quota")));
        assert_eq!((f.exit.code(), f.message.as_str()), (5, "error: quota"));

        let f = Failure::from(ClientError::Status(Status::internal("boom")));
        assert_eq!(f.exit, Exit::Failed);
        assert_eq!(f.message, "error: internal error: boom");
    }

    #[test]
    fn run_results() {
        assert_eq!(Exit::of_run(RunState::Succeeded).code(), 0);
        assert_eq!(Exit::of_run(RunState::Failed).code(), 1);
        assert_eq!(Exit::of_run(RunState::Cancelled).code(), 1);
    }
}
