//! Sweeps: the sweep file (TOML) a client submits, planned into numbered, fully resolved
//! cells before anything is stored or dispatched. The user-facing reference is
//! `docs/sweep-file.md`.
//!
//! - [`source`]: what the planner reads ([`SweepSource`]: the file and every file it
//!   references, sent by the client) and `line:col` mapping.
//! - [`spec`]: the TOML schema (serde, spans, unknown keys rejected).
//! - [`resolve`]: the schema resolved into settings: values checked, defaults, conflicts,
//!   referenced files looked up; [`axis`] for `[axes]`; `hires` for the `hires_*` keys; `init`
//!   for img2img's `init_image` and `strength`; `pins` for references pinned to the model
//!   registry.
//! - [`template`]: `{a|b}` alternatives and `__name__` wildcards, and their expansion;
//!   [`wildcard`] for the declared wildcard lists (cycles, depth, counts).
//! - [`seeds`]: seed lists, ranges and random seeds drawn once.
//! - [`plan`](mod@plan): [`plan()`] itself, [`PlanLimits`] and [`Plan`].
//! - [`error`]: [`PlanError`], which always names a place.
//! - [`cell`]: one resolved render ([`CellSpec`]), its validation and identity.

pub mod axis;
pub mod cell;
mod cell_key;
pub mod error;
mod hires;
mod hires_spec;
mod init;
mod pins;
pub mod plan;
pub mod resolve;
mod resolver;
pub mod seeds;
pub mod source;
pub mod spec;
pub mod template;
mod values;
pub mod wildcard;

pub use cell::{
    CellSpec, DEFAULT_INIT_STRENGTH, HiresSpec, InitSpec, LoraSpec, NewCell, PlannedCell,
    RNG_SOURCES,
};
pub use error::{Place, PlanError, PlanErrorKind};
pub use pins::{MAX_MODEL_NAME_BYTES, SHA256_REF, check_model_name, pin, sha256_ref};
pub use plan::{
    CellSink, Plan, PlanLimits, PlanSummary, plan, plan_into, referenced_files, referenced_images,
    referenced_models,
};
pub use source::SweepSource;
