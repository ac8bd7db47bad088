//! The one mapping from internal errors to gRPC statuses.

use crate::logs::LogError;
use crate::scheduler::SchedulerGone;
use crate::scheduler::state::StateError;
use tonic::Status;

pub(crate) fn from_state(e: StateError) -> Status {
    match e {
        StateError::UnknownRun(_)
        | StateError::UnknownTask { .. }
        | StateError::UnknownRunner(_) => Status::not_found(e.to_string()),
        StateError::BadRunnerCredentials => Status::unauthenticated(e.to_string()),
        StateError::ProtocolVersion { .. } | StateError::NotAtGate(_) => {
            Status::failed_precondition(e.to_string())
        }
        StateError::MayNotDecide { .. } => Status::permission_denied(e.to_string()),
        StateError::QuotaExceeded(_) => Status::resource_exhausted(e.to_string()),
        StateError::History(_) => Status::unavailable(e.to_string()),
        StateError::NotYourAttempt { .. }
        | StateError::NotYourRun { .. }
        | StateError::NameTaken(_)
        | StateError::AttemptFinished(_)
        | StateError::TlsIdentity { .. } => Status::permission_denied(e.to_string()),
    }
}

pub(crate) fn from_gone(e: SchedulerGone) -> Status {
    Status::unavailable(e.to_string())
}

pub(crate) fn from_log(e: LogError) -> Status {
    match e {
        LogError::Gap { .. } => Status::out_of_range(e.to_string()),
        LogError::BadId(_) => Status::invalid_argument(e.to_string()),
        LogError::Sealed { .. } => Status::failed_precondition(e.to_string()),
        // Never leak paths of the coordinator's disk to a client.
        LogError::Io { .. } | LogError::Open { .. } => {
            tracing::error!(error = %e, "log store failure");
            Status::internal("the coordinator could not access its log store; see its log")
        }
    }
}

/// Flattens the scheduler's double result.
pub(crate) fn flatten<T>(r: Result<Result<T, StateError>, SchedulerGone>) -> Result<T, Status> {
    r.map_err(from_gone)?.map_err(from_state)
}
