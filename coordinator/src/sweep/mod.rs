//! Sweeps: the sweep file (TOML) a client submits, planned into numbered, fully resolved
//! cells before anything is stored or dispatched.
//!
//! - [`source`]: what the planner reads ([`SweepSource`]: the file and every file it
//!   references, sent by the client) and `line:col` mapping.
//! - [`spec`]: the TOML schema and its resolution (values, axes, conflicts).
//! - [`template`]: `{a|b}` alternatives and `__name__` wildcards, and their expansion.
//! - [`seeds`]: seed lists, ranges and random seeds drawn once.
//! - [`plan`](mod@plan): [`plan()`] itself, [`PlanLimits`] and [`Plan`].
//! - [`error`]: [`PlanError`], which always names a place.
//! - [`cell`]: one resolved render ([`CellSpec`]), its validation and identity.

pub mod cell;
pub mod error;
pub mod plan;
pub mod seeds;
pub mod source;
pub mod spec;
pub mod template;

pub use cell::{CellSpec, LoraSpec, NewCell, Sampler};
pub use error::{Place, PlanError, PlanErrorKind};
pub use plan::{Plan, PlanLimits, plan, referenced_files};
pub use source::SweepSource;
