//! An SD1.5 model with its LoRA stack merged, built on one device.
//!
//! Owns building the networks in the compute dtype (f32 on CPU, f16 on CUDA/Metal) from a
//! [`BaseModel`] (the files, read once; see [`crate::engine::load::base`]), the identity of the result (name,
//! A1111's model hash, the merged LoRAs), and running each network. The tokenizer is compiled
//! in (SD1.5's CLIP BPE), so `tokenizer/` is not read. [`Model`] also exposes each network on
//! [`HostTensor`]s, which is how the reference tests reach them.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::engine::device::Device;
use crate::engine::error::{EngineError, Result};
use crate::engine::load::base::BaseModel;
use crate::engine::load::lora::LoraSpec;
use crate::engine::load::weights::{HostTensor, Params};
use crate::engine::nets::clip::ClipTextModel;
use crate::engine::nets::unet::UNet;
use crate::engine::nets::vae::VaeDecoder;
use crate::engine::scheduler::ScheduleConfig;
use crate::engine::text::tokenizer::ClipTokenizer;

/// A LoRA as merged into a [`Model`], for the image metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedLora {
    /// The file stem, as A1111 names LoRAs.
    pub name: String,
    /// A1111's LoRA hash: sha256 of the file after its safetensors header, lowercase hex.
    pub hash: String,
    /// The strength it was merged at.
    pub strength: f32,
}

/// An SD1.5 model with its LoRA stack merged, ready to run on one device.
pub struct Model {
    name: String,
    hash: String,
    loras: Vec<LoadedLora>,
    device: candle_core::Device,
    dtype: DType,
    tokenizer: std::sync::Arc<ClipTokenizer>,
    clip: ClipTextModel,
    context_tokens: usize,
    unet: UNet,
    latent_channels: usize,
    vae: VaeDecoder,
    /// f32 when the VAE config says `force_upcast` (SD1.5), else the compute dtype.
    vae_dtype: DType,
    vae_scaling_factor: f64,
    schedule: ScheduleConfig,
    resident_bytes: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("loras", &self.loras)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads the diffusers folder `folder`, merges `loras` in order, and builds the networks
    /// on `device`.
    pub fn load(folder: &Path, loras: &[LoraSpec], device: Device) -> Result<Self> {
        Self::from_base(&BaseModel::read(folder)?, loras, device)
    }

    /// Builds the networks on `device` from `base` with `loras` merged in order; the base is
    /// left as it was.
    pub fn from_base(base: &BaseModel, loras: &[LoraSpec], device: Device) -> Result<Self> {
        let (weights, loaded, replaced_bytes) = base.merged(loras)?;
        let configs = &base.configs;
        let (device_handle, dtype) = device.open()?;
        let clip = ClipTextModel::new(
            &Params::new(&weights.text_encoder, &device_handle, dtype),
            &configs.clip,
        )?;
        let unet = UNet::new(
            &Params::new(&weights.unet, &device_handle, dtype),
            &configs.unet,
            &base.unet_config,
        )?;
        let vae_dtype = if configs.vae.force_upcast() {
            DType::F32
        } else {
            dtype
        };
        let vae = VaeDecoder::new(
            &Params::new(&weights.vae, &device_handle, vae_dtype),
            &configs.vae,
        )?;
        // On the CPU in f32 the networks share the base's storage except where a LoRA merged;
        // elsewhere every weight has its own copy on the device.
        let resident_bytes = match device {
            Device::Cpu => replaced_bytes,
            _ => {
                let elems = |w: &crate::engine::load::weights::Weights| -> u64 {
                    w.tensors.values().map(|t| t.elem_count() as u64).sum()
                };
                (elems(&weights.text_encoder) + elems(&weights.unet)) * dtype.size_in_bytes() as u64
                    + elems(&weights.vae) * vae_dtype.size_in_bytes() as u64
            }
        };
        Ok(Self {
            name: base.name(),
            hash: weights.hash.clone(),
            loras: loaded,
            device: device_handle,
            dtype,
            tokenizer: ClipTokenizer::shared()?,
            clip,
            context_tokens: configs.clip.max_position_embeddings(),
            unet,
            latent_channels: configs.unet.in_channels(),
            vae,
            vae_dtype,
            vae_scaling_factor: configs.vae.scaling_factor(),
            schedule: configs.schedule.clone(),
            resident_bytes,
        })
    }

    /// Memory this model holds beyond its [`BaseModel`]: on the CPU the tensors a LoRA
    /// replaced, on a GPU every weight (an estimate from element counts).
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// The model's name (its folder name), as A1111's `Model:` field.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// sha256 of the text encoder, UNet and VAE weight files, in that order, lowercase hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The merged LoRAs, in merge order.
    pub fn loras(&self) -> &[LoadedLora] {
        &self.loras
    }

    /// The noise schedule from `scheduler/scheduler_config.json`.
    pub fn schedule(&self) -> &ScheduleConfig {
        &self.schedule
    }

    /// Channels of a latent.
    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    /// Text embeddings (`[1, 77, hidden]`) of a prompt, tokenized as SD1.5 does.
    pub fn encode_prompt(&self, prompt: &str) -> Result<HostTensor> {
        to_host(&self.text_embeddings(&[prompt])?)
    }

    /// One UNet forward: the predicted noise for `latents` (`[b, c, h, w]`) at `timestep`,
    /// conditioned on `context` (`[b, tokens, hidden]`). For tests and benchmarks; renders go
    /// through `Pipeline`.
    #[cfg(feature = "testing")]
    pub fn predict_noise(
        &self,
        latents: &HostTensor,
        timestep: f32,
        context: &HostTensor,
    ) -> Result<HostTensor> {
        let out = self.unet_forward(
            &self.to_device(latents)?,
            timestep,
            &self.to_device(context)?,
            1.0,
        )?;
        to_host(&out)
    }

    /// The VAE decoder output (about [-1, 1], `[b, 3, 8h, 8w]`) for *scaled* latents; the
    /// division by the VAE's `scaling_factor` happens here.
    pub fn decode(&self, latents: &HostTensor) -> Result<HostTensor> {
        to_host(&self.decode_latents(&self.to_device(latents)?)?)
    }

    pub(crate) fn text_embeddings(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.context_tokens);
        for prompt in prompts {
            let encoded = self.tokenizer.encode(prompt);
            if encoded.len() > self.context_tokens {
                return Err(EngineError::InvalidRequest(format!(
                    "the text encoder takes {} tokens, the tokenizer gives {}",
                    self.context_tokens,
                    encoded.len()
                )));
            }
            ids.extend(encoded);
        }
        let n = ids.len() / prompts.len().max(1);
        let ids = Tensor::from_vec(ids, (prompts.len(), n), &self.device)?;
        Ok(self.clip.forward(&ids)?)
    }

    /// Whether the UNet is LCM-distilled: it takes the guidance scale as an embedding and
    /// needs one pass per step whatever the scale (no classifier-free guidance batch).
    pub fn embeds_guidance(&self) -> bool {
        self.unet.guidance_embedding_dim().is_some()
    }

    /// One UNet pass; `guidance_scale` reaches only an LCM-distilled UNet
    /// ([`Self::embeds_guidance`]).
    pub(crate) fn unet_forward(
        &self,
        latents: &Tensor,
        t: f32,
        context: &Tensor,
        guidance_scale: f32,
    ) -> Result<Tensor> {
        let latents = latents.to_dtype(self.dtype)?;
        let context = context.to_dtype(self.dtype)?;
        Ok(self
            .unet
            .forward(&latents, t, &context, guidance_scale)?
            .to_dtype(DType::F32)?)
    }

    pub(crate) fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z =
            (latents.to_dtype(DType::F32)? / self.vae_scaling_factor)?.to_dtype(self.vae_dtype)?;
        Ok(self.vae.forward(&z)?.to_dtype(DType::F32)?)
    }

    pub(crate) fn to_device(&self, host: &HostTensor) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &host.data,
            host.shape.as_slice(),
            &self.device,
        )?)
    }
}

/// Copies a tensor to the host as f32.
pub(crate) fn to_host(t: &Tensor) -> Result<HostTensor> {
    Ok(HostTensor {
        shape: t.dims().to_vec(),
        data: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    })
}
