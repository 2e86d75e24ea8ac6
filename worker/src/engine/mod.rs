//! The rendering engine: everything between a resolved cell and its pixels.
//!
//! Owns tokenizing prompts, drawing noise and stepping samplers. For now it works on plain
//! `f32` slices so it can be checked against PyTorch without a GPU; the candle pipeline will
//! wrap these pieces. It must never know about leases, gRPC, databases or object storage.

pub mod rng;
pub mod scheduler;
pub mod tokenizer;
