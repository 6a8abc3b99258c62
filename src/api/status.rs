//! The one mapping from use-case errors to gRPC statuses.
//!
//! Messages are for a person: they say what was wrong and what to do. An
//! internal failure is logged in full with a fresh incident id and answered
//! with only that id, so no detail (paths, keys, SQL) reaches the caller.

use tonic::{Code, Status};

use crate::error::Error;

pub fn to_status(e: Error) -> Status {
    let code = match &e {
        Error::Invalid(_) => Code::InvalidArgument,
        Error::Precondition(_) | Error::CustomerShredded | Error::CustomerPendingShred => Code::FailedPrecondition,
        Error::NotFound(_) => Code::NotFound,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::TooLarge(_) | Error::StorageFull => Code::ResourceExhausted,
        Error::Busy(_) => Code::Aborted,
        Error::Integrity => Code::DataLoss,
        Error::OutOfRange(_) => Code::OutOfRange,
        Error::Idle(_) => Code::DeadlineExceeded,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal(detail) => {
            let incident = uuid::Uuid::new_v4();
            tracing::error!(%incident, %detail, "internal error");
            return Status::internal(format!("internal error (incident {incident}); see the server log"));
        }
    };
    if code == Code::DataLoss {
        tracing::warn!("integrity check failed on a read");
    }
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_do_not_reach_the_caller() {
        let s = to_status(Error::Internal("sqlite at /secret/path failed".into()));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("/secret/path"));
    }

    #[test]
    fn shredded_customers_answer_failed_precondition() {
        let s = to_status(Error::CustomerShredded);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "customer shredded");
    }
}
