//! Integration tests of kiln-coordinator: the store conformance suite (SQLite and Postgres),
//! the filter language on both backends, and the gRPC API against a real server on port 0.

mod conformance;
mod filter;
mod grpc;
mod harness;
