//! gRPC tests (wip)
