//! The `kiln.v1` gRPC API shared by the coordinator, the worker and the CLI.
//!
//! # Layout
//! - [`v1`]: prost messages and tonic clients/servers generated from
//!   `proto/kiln/v1/kiln.proto` (the documented source of the API).
//! - [`ids`]: newtypes for the ids that cross crate boundaries, so a sweep id can never be
//!   passed where a cell id is expected.
//! - [`prompt`]: A1111 prompt syntax (extra networks such as `<lora:name:0.7>`, emphasis,
//!   `BREAK`), parsed as A1111 parses it, so the coordinator can refuse a bad prompt at submit
//!   time and the worker encodes exactly what A1111 would.
//! - [`sampler`] and [`hires`]: sampler and hires-upscaler names in kiln's, A1111's and
//!   ComfyUI's spellings, so a name the coordinator accepts is one every worker renders.
//! - [`picture`]: the img2img pictures the CLI uploads, the coordinator stores and the worker
//!   renders from, accepted by all three under the same limits.
#![warn(missing_docs)]

pub mod hires;
pub mod ids;
pub mod picture;
pub mod prompt;
pub mod sampler;

/// Generated code for package `kiln.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}

pub use ids::{Attempt, CellId, SweepId, WorkerId};
