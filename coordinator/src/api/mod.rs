//! tonic adapters for `kiln.v1`: [`SweepApi`] for clients, [`WorkerApi`] for workers and
//! [`ModelApi`] for the model registry. The only module that knows `tonic::Status` (mapped
//! from [`crate::Error`] in `status`).

mod auth;
mod convert;
mod models;
mod pictures;
mod status;
mod sweeps;
mod workers;

pub(crate) use auth::bearer;
pub use auth::{Auth, AuthLayer, SESSION_HEADER};
pub use models::{MODEL_KEY_PREFIX, ModelApi};
pub use pictures::{IMAGE_CHUNK_BYTES, MAX_SWEEP_IMAGES};
pub use sweeps::SweepApi;
pub use workers::WorkerApi;

/// Largest accepted worker request, bytes. Bigger messages are answered OUT_OF_RANGE
/// ("decoded message length too large") by tonic before they reach a handler.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest referenced files of one sweep together, bytes: each may have
/// [`PlanLimits::max_file_bytes`](crate::sweep::PlanLimits) (16 MiB), three of them together.
pub const MAX_SWEEP_FILES_BYTES: usize = 48 << 20;

/// Largest accepted sweep-service request (a plan, or a submit's header with its sweep file and
/// referenced files), bytes: the sweep file's 1 MiB and [`MAX_SWEEP_FILES_BYTES`], with room for
/// the framing. Clients that check sizes first (the CLI) name the file that is too large.
pub const MAX_SWEEP_MESSAGE_BYTES: usize = MAX_SWEEP_FILES_BYTES + (2 << 20);
