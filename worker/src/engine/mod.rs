//! The rendering engine: everything between a resolved cell and its pixels.
//!
//! Owns, by submodule: [`load`] (model files, LoRAs, textual-inversion embedding files),
//! [`text`] (tokenizer, prompt conditioning, the embedding database), the candle networks (CLIP
//! text encoder, UNet, VAE decoder and encoder, in `nets`), drawing noise ([`rng`]: torch's CPU
//! generator; [`philox`]: its CUDA one; [`brownian`]: torchsde's Brownian tree for DPM++ SDE;
//! each image's stream with variation seeds in [`noise`]), stepping samplers ([`scheduler`]),
//! one model built on a device ([`model`]), what a render is asked to be ([`request`]), the
//! render loop ([`pipeline`]) with the hires fix ([`hires`], latent resizing in [`upscale`],
//! Pillow's Lanczos in [`lanczos`]) and img2img, the tiled VAE decode ([`tiling`]), and
//! PNG output ([`image`]). candle types never leave this module: the public API speaks
//! [`HostTensor`], paths and plain numbers. It must never know about leases, gRPC, databases or
//! object storage.

#[cfg(feature = "testing")]
pub mod bench;
pub mod brownian;
pub mod device;
pub mod error;
pub mod hires;
pub mod image;
pub mod lanczos;
pub mod load;
pub mod model;
mod nets;
pub mod noise;
mod pass;
pub mod philox;
pub mod pipeline;
pub mod profile;
pub mod request;
pub mod rng;
pub mod scheduler;
pub mod text;
pub mod threads;
pub mod tiling;
pub mod upscale;

pub use device::{Device, DeviceInfo};
pub use error::{ComputeError, EngineError};
pub use hires::Hires;
pub use image::{HiresSize, HiresText};
pub use kiln_proto::hires::{LatentMode, Upscaler};
pub use kiln_proto::sampler::{Method, SamplerName, Schedule};
pub use load::base::{self, BaseModel};
pub use load::inversion::{Inversion, InversionFormat};
pub use load::lora::{self, LoraSpec};
pub use model::{EncodedLatents, LoadedLora, LoadedVae, Model, UsedInversion};
pub use noise::{NoiseSpec, RngKind};
pub use pipeline::{InitImage, PhaseTimes, Pipeline, Progress, RenderOutput, RenderRequest};
pub use text::embeddings::{self, EmbeddingStats};
pub use text::inversion::InversionDb;
pub use text::tokenizer;
pub use tiling::VaeTiling;

pub use load::weights::{HostTensor, read_safetensors};
