//! The rendering engine: everything between a resolved cell and its pixels.
//!
//! Owns tokenizing prompts ([`tokenizer`]), drawing noise ([`rng`]), stepping samplers
//! ([`scheduler`]), loading a diffusers SD1.5 folder with its LoRA stack ([`model`],
//! [`lora`]), the candle networks (CLIP text encoder, UNet, VAE decoder), the render loop
//! ([`pipeline`]) and PNG output ([`image`]). candle types never leave this module: the public
//! API speaks [`HostTensor`], paths and plain numbers. It must never know about leases, gRPC,
//! databases or object storage.

pub mod base;
mod clip;
pub mod device;
pub mod embeddings;
pub mod error;
pub mod image;
mod layers;
pub mod lora;
pub mod model;
pub mod pipeline;
pub mod profile;
pub mod rng;
pub mod scheduler;
pub mod threads;
pub mod tokenizer;
mod unet;
mod vae;
mod weights;

pub use base::BaseModel;
pub use device::{Device, DeviceInfo};
pub use embeddings::EmbeddingStats;
pub use error::{ComputeError, EngineError};
pub use lora::LoraSpec;
pub use model::{LoadedLora, Model};
pub use pipeline::{PhaseTimes, Pipeline, Progress, RenderOutput, RenderRequest, SamplerKind};

pub use weights::{HostTensor, read_safetensors};
