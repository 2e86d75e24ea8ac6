//! The kiln render worker.
//!
//! # Layout
//!
//! - [`engine`]: rendering. PyTorch-exact noise ([`engine::rng`]), the CLIP tokenizer
//!   ([`engine::tokenizer`]), the diffusion schedulers ([`engine::scheduler`]), loading a
//!   diffusers SD1.5 folder with a LoRA stack merged in ([`engine::model`], [`engine::lora`]),
//!   the candle networks (CLIP text encoder, UNet, VAE decoder), the render loop
//!   ([`engine::pipeline`]) and PNG output with A1111 metadata ([`engine::image`]).
//!
//! The agent (lease → render → upload → complete), the pipeline cache and the uploaders come
//! later; the engine never learns about gRPC, databases or storage.
#![warn(missing_docs)]

pub mod engine;
