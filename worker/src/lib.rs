//! The kiln render worker.
//!
//! # Layout
//!
//! - [`engine`]: rendering. PyTorch-exact noise ([`engine::rng`]), the CLIP tokenizer
//!   ([`engine::tokenizer`]), the diffusion schedulers ([`engine::scheduler`]), loading a
//!   diffusers SD1.5 folder with a LoRA stack merged in ([`engine::model`], [`engine::lora`]),
//!   the candle networks (CLIP text encoder, UNet, VAE decoder), the render loop
//!   ([`engine::pipeline`]) and PNG output with A1111 metadata ([`engine::image`]).
//!   The engine never learns about gRPC, databases or storage.
//! - [`cache`]: loaded pipelines by (model, LoRA stack, device) under a memory budget (LRU),
//!   and on disk the models fetched by sha256 from the pool's model storage ([`cache::disk`]).
//! - [`upload`]: where images go — `s3://bucket/prefix` (aws-sdk-s3, any S3-compatible server)
//!   or `file://DIR` — with retries and attempt-scoped keys.
//! - [`agent`]: lease → resolve → render (on a dedicated thread) → upload → complete, with
//!   heartbeats, progress, failure classes, reconnection and drain.
//! - [`hub`]: references a user can paste — `hf:OWNER/REPO[@REV][/FILE]` and `https://…` —
//!   fetched into the Hugging Face cache (or kiln's) on demand, and found there offline.
//! - [`picture`]: img2img start pictures decoded and resized as A1111 resizes them.
#![warn(missing_docs)]

pub mod agent;
pub mod cache;
pub mod engine;
pub mod hub;
pub mod picture;
pub mod upload;
