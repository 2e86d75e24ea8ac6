//! The kiln render worker.
//!
//! # Layout
//!
//! - [`engine`]: the numeric core of rendering that does not need candle: PyTorch-exact noise
//!   ([`engine::rng`]), the CLIP tokenizer ([`engine::tokenizer`]) and the diffusion schedulers
//!   ([`engine::scheduler`]). The candle pipeline, LoRA merging and PNG encoding will join it.
//!
//! - [`upload`]: where images go — `s3://bucket/prefix` (aws-sdk-s3, any S3-compatible server)
//!   or `file://DIR` — with retries and attempt-scoped keys.
//!
//! The agent (lease → render → upload → complete) and the pipeline cache come later; the engine
//! never learns about gRPC, databases or storage.
#![warn(missing_docs)]

pub mod engine;
pub mod upload;
