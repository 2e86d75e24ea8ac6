//! tonic adapters for `kiln.v1`: [`SweepApi`] for clients and [`WorkerApi`] for workers. The
//! only module that knows `tonic::Status` (mapped from [`crate::Error`] in `status`).

mod convert;
mod status;
mod sweeps;
mod workers;

pub use sweeps::SweepApi;
pub use workers::WorkerApi;

/// Largest accepted request message (one chunk of a sweep), bytes. Bigger messages are
/// answered OUT_OF_RANGE ("decoded message length too large") by tonic before they reach a handler.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
