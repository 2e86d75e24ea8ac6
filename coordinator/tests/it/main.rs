//! Integration tests of kiln-coordinator: the store conformance suite (SQLite and Postgres),
//! the filter language on both backends, the gRPC API against a real server on port 0, and
//! sweep planning from the example files. `completes` is the group commit of completes, on
//! both backends.

#[macro_use]
mod harness;

mod completes;
mod conformance;
mod filter;
mod grpc;
mod sweep;
