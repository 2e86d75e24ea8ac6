//! Loading what a user brings: model files into host memory, ready to build on a device.
//!
//! Owns reading safetensors weights ([`weights`]), diffusers folders and their configs
//! ([`base`]), single-file checkpoints in the CompVis/LDM layout (`ldm`), LoRA files merged
//! into the base weights ([`lora`]) and textual-inversion embedding files ([`inversion`]),
//! and the files' hashes for the metadata, remembered between loads ([`hashes`]).
//! Nothing here runs a network; [`super::nets`] builds the networks from what this module read.

pub mod base;
pub mod hashes;
pub mod inversion;
pub(crate) mod ldm;
pub mod lora;
pub(crate) mod weights;
