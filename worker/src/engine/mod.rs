//! The rendering engine: everything between a resolved cell and its pixels.
//!
//! Owns, by submodule: [`load`] (model files, LoRAs, textual-inversion embedding files),
//! [`text`] (tokenizer, prompt conditioning, the embedding database), the candle networks (CLIP
//! text encoder, UNet, VAE decoder, in `nets`), drawing noise ([`rng`]), stepping samplers
//! ([`scheduler`]), one model built on a device ([`model`]), the render loop ([`pipeline`]) and
//! PNG output ([`image`]). candle types never leave this module: the public API speaks
//! [`HostTensor`], paths and plain numbers. It must never know about leases, gRPC, databases or
//! object storage.

pub mod device;
pub mod error;
pub mod image;
pub mod load;
pub mod model;
mod nets;
pub mod pipeline;
pub mod profile;
pub mod rng;
pub mod scheduler;
pub mod text;
pub mod threads;

pub use device::{Device, DeviceInfo};
pub use error::{ComputeError, EngineError};
pub use load::base::{self, BaseModel};
pub use load::inversion::{Inversion, InversionFormat};
pub use load::lora::{self, LoraSpec};
pub use model::{LoadedLora, LoadedVae, Model, UsedInversion};
pub use pipeline::{PhaseTimes, Pipeline, Progress, RenderOutput, RenderRequest, SamplerKind};
pub use text::embeddings::{self, EmbeddingStats};
pub use text::inversion::InversionDb;
pub use text::tokenizer;

pub use load::weights::{HostTensor, read_safetensors};
