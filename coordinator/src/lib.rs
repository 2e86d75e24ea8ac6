//! kiln's coordinator: turns submitted sweeps into durable cells, leases them to workers over
//! gRPC, and records every result so it can be queried later.
//!
//! # Layout
//! - [`clock`]: injected time, so leases, backoff and maintenance are testable.
//! - [`sweep`]: sweep files (TOML: templates, wildcards, axes, seeds) planned into numbered
//!   cells by a pure function ([`sweep::plan`]), and the validation and identity of cells
//!   (cell key, affinity key).
//! - [`domain`]: the ground floor the queue, store and API share: states, failures and
//!   decisions, lease candidates.
//! - [`queue`]: the cell lifecycle — retry/backoff/poison policy, affinity choice,
//!   the maintenance loop, and [`queue::Queue`], the one entry point the API calls.
//! - [`query`]: the filter language of `kiln query` (lexer, parser, sort keys) → a typed AST;
//!   no SQL.
//! - [`store`]: the only SQL — one seam ([`store::Store`]) with SQLite and Postgres backends.
//! - [`result`]: the stored form of a Result (what the winning attempt produced).
//! - [`grid`]: the X/Y contact sheet (`kiln grid`, the web UI's X/Y view): which cell goes on
//!   which tile along one or two axes, and the labelled sheet drawn as a PNG.
//! - [`events`]: in-process progress notifications for watchers.
//! - [`metrics`]: Prometheus counters and gauges, served as `GET /metrics` on the same port.
//! - [`api`]: tonic adapters for `kiln.v1`; the only place that knows `tonic::Status`.
//! - [`config`]: settings (defaults → file → env → flags) validated into [`config::Config`].
//! - [`web`]: the web UI (farm overview, sweep pages, gallery, X/Y view, keepers), served on
//!   the gRPC port.
//! - [`server`]: runs the gRPC server, health service, web UI and maintenance until shutdown.
#![warn(missing_docs)]

pub mod api;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod grid;
pub mod metrics;
pub mod query;
pub mod queue;
pub mod result;
pub mod server;
pub mod store;
pub mod sweep;
pub mod web;

pub use error::{Error, Result};
