//! Integration tests of kiln-coordinator: the store conformance suite (SQLite and Postgres)
//! and the gRPC API against a real server on port 0.

mod conformance;
mod grpc;
mod harness;
