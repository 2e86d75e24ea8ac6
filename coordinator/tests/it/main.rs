//! Integration tests of kiln-coordinator: the store conformance suite (SQLite and Postgres),
//! the filter language on both backends, the gRPC API against a real server on port 0, and
//! sweep planning from the example files. `group_commit` is the batched writing of completes and leases, and
//! `intake` the staged insert of large submissions, on both backends; `names` the check that a
//! query names only sweeps and binding keys that exist; `keeper` starred and rated cells;
//! `render_level` which workers may lease which cells, and sampler names in the store; `hires`
//! the hires columns and the lease filter at a hires cell's final size; `models` the model
//! registry, pinning and the lease preference for workers that hold a cell's models.

#[macro_use]
mod harness;

mod auth;
mod conformance;
mod deadlock;
mod filter;
mod fuzz;
mod group_commit;
pub mod grpc;
mod hires;
mod images;
mod intake;
mod keeper;
mod metrics;
mod models;
mod names;
mod rate;
mod render_level;
mod sweep;
mod web_images;
mod web_pages;
