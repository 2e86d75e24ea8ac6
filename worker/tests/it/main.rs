//! Integration tests of the worker's engine against reference fixtures, and of its cache and
//! render thread.
//!
//! The fixtures under `tests/fixtures/reference/` were written by PyTorch, transformers and
//! diffusers (`tools/reference/*.py`, versions recorded in each file). These tests read only
//! those JSON files; a missing fixture fails the test with its path rather than skipping.

mod batch;
mod cache;
mod diffusers_samplers;
mod disk;
mod dpmpp_sde;
mod fixture;
mod hires;
mod hub;
mod hubserver;
mod img2img;
mod inversion;
mod ksampler;
mod lanczos;
mod lcm_distilled;
mod model;
mod philox;
mod pipeline;
mod prompt;
mod rng;
mod s3server;
mod scheduler;
mod single_file;
mod tokenizer;
mod upload;
mod vae_encoder;
mod vae_tiled;
mod variation;
