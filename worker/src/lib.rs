//! The kiln render worker.
//!
//! # Layout
//!
//! - [`engine`]: the numeric core of rendering that does not need candle: PyTorch-exact noise
//!   ([`engine::rng`]), the CLIP tokenizer ([`engine::tokenizer`]) and the diffusion schedulers
//!   ([`engine::scheduler`]). The candle pipeline, LoRA merging and PNG encoding will join it.
//!
//! The agent (lease → render → upload → complete), the pipeline cache and the uploaders come
//! later; the engine never learns about gRPC, databases or storage.
#![warn(missing_docs)]

pub mod engine;
