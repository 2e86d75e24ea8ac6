//! The coordinator library's error type. Variants say what went wrong in terms a caller can act
//! on; `api::status` maps each to one gRPC status code.

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};

/// Result alias for the coordinator library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No sweep with this id.
    #[error("sweep {0} not found")]
    SweepNotFound(SweepId),
    /// No cell with this id.
    #[error("cell {0} not found")]
    CellNotFound(CellId),
    /// No worker with this id.
    #[error("worker {0} not found")]
    WorkerNotFound(WorkerId),
    /// No stored img2img picture has this sha256.
    #[error("no picture with sha256 {0} is stored (upload it with PutImage first)")]
    ImageNotFound(String),
    /// No model registry entry has this name, or no registered model this `sha256:` hash.
    #[error("no registered model {0} (kiln model list shows the registry)")]
    ModelNotFound(String),
    /// The attempt is no longer held by this worker: its lease expired and the cell was
    /// re-queued, another attempt superseded it, or the cell was finalized. The write was
    /// rejected and nothing changed.
    #[error("lease lost: cell {cell} attempt {attempt} is not held by worker {worker}")]
    LeaseLost {
        /// The cell written about.
        cell: CellId,
        /// The attempt the worker named.
        attempt: Attempt,
        /// The worker that wrote.
        worker: WorkerId,
    },
    /// The request is malformed; the message names the field.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The request is well-formed but too large for the configured limits.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The caller already has as much work running as it may (a token's one plan or submit at
    /// a time); it may try again when that ends.
    #[error("busy: {0}")]
    Busy(String),
    /// The operation does not apply to the object's current state.
    #[error("{0}")]
    Conflict(String),
    /// A sweep of this name exists (a submission that asked for a unique name).
    #[error("a sweep named {name:?} exists (sweep {id})")]
    NameTaken {
        /// The name.
        name: String,
        /// The existing sweep.
        id: SweepId,
    },
    /// The caller is not who it must be: no token, an unknown or revoked one, a worker call
    /// without its session.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this: a token's scope, another owner's sweep.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A database error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored JSON document could not be read back (corrupt row).
    #[error("corrupt stored document: {0}")]
    Corrupt(String),
    /// Configuration is invalid; the message names the setting.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
