//! The one mapping from coordinator errors to gRPC statuses. Internal errors are logged here
//! and answered with an opaque message.

use tonic::{Code, Status};

use crate::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::SweepNotFound(_)
            | Error::CellNotFound(_)
            | Error::WorkerNotFound(_)
            | Error::ImageNotFound(_)
            | Error::ModelNotFound(_) => Status::not_found(e.to_string()),
            // A distinct, documented answer: the worker must abort and never retry the write.
            Error::LeaseLost { .. } => Status::new(Code::FailedPrecondition, e.to_string()),
            Error::Invalid(_) => Status::invalid_argument(e.to_string()),
            Error::TooLarge(_) | Error::Busy(_) => Status::resource_exhausted(e.to_string()),
            Error::Conflict(_) => Status::failed_precondition(e.to_string()),
            Error::NameTaken { .. } => Status::already_exists(e.to_string()),
            Error::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            Error::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            Error::Database(_) | Error::Corrupt(_) | Error::Config(_) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error; see the coordinator log")
            }
        }
    }
}
