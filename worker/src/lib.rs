//! The kiln render worker.
//!
//! # Layout
//!
//! - [`engine`]: SD1.5 on candle — loading, LoRA merge, PyTorch-exact noise, the CLIP
//!   tokenizer, schedulers, the [`engine::Pipeline`] and PNG metadata. Knows nothing of gRPC,
//!   databases or storage.
//! - [`cache`]: loaded pipelines by (model, LoRA stack, device) under a memory budget (LRU).
//! - [`upload`]: where images go — `s3://bucket/prefix` (aws-sdk-s3, any S3-compatible server)
//!   or `file://DIR` — with retries and attempt-scoped keys.
//! - [`agent`]: lease → resolve → render (on a dedicated thread) → upload → complete, with
//!   heartbeats, progress, failure classes, reconnection and drain.
#![warn(missing_docs)]

pub mod agent;
pub mod cache;
pub mod engine;
pub mod upload;
