//! An SD1.5 model with its LoRA stack merged, built on one device.
//!
//! Owns building the networks in the compute dtype (f32 on CPU, f16 on CUDA/Metal) from a
//! [`BaseModel`] (the files, read once; see [`crate::engine::load::base`]), the identity of the result (name,
//! A1111's model hash, the merged LoRAs), and running each network. The tokenizer is compiled
//! in (SD1.5's CLIP BPE), so `tokenizer/` is not read. [`Model`] also exposes each network on
//! [`HostTensor`]s, which is how the reference tests reach them.

use std::path::Path;

use candle_core::{DType, Tensor};
use kiln_proto::prompt::{ParsedPrompt, PromptPart};

use crate::engine::device::Device;
use crate::engine::error::{EngineError, Result};
use crate::engine::load::base::BaseModel;
use crate::engine::load::lora::LoraSpec;
use crate::engine::load::weights::{HostTensor, Params};
use crate::engine::nets::clip::ClipTextModel;
use crate::engine::nets::unet::UNet;
use crate::engine::nets::vae::VaeDecoder;
use crate::engine::nets::vae_encoder::VaeEncoder;
use crate::engine::scheduler::ScheduleConfig;
use crate::engine::text::conditioning::{self, Encoded};
use crate::engine::text::inversion::InversionDb;
use crate::engine::text::tokenizer::{ClipTokenizer, MAX_LENGTH};
use crate::engine::tiling::{Tile, TileGrid, TiledImage, VaeTiling};

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

/// A VAE that replaced the model's own, for the image metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedVae {
    /// The file name, as A1111 writes it (`VAE:`).
    pub name: String,
    /// sha256 of the file, lowercase hex; A1111 writes its first 10 digits (`VAE hash:`).
    pub hash: String,
}

/// A textual-inversion embedding a prompt used, for the image metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct UsedInversion {
    /// Its name (the file stem), as the prompt writes it.
    pub name: String,
    /// sha256 of its file, lowercase hex; A1111 writes its first 12 digits (`TI hashes:`).
    pub hash: String,
}

/// What the VAE encoder makes of a batch of images: the mean and log-variance of diffusers'
/// `DiagonalGaussianDistribution`, each `[b, latent_channels, h/8, w/8]`, unscaled.
///
/// diffusers' img2img (`retrieve_latents`, `sample_mode="sample"` by default) and A1111
/// (`get_first_stage_encoding`) both *sample* `mean + exp(logvar/2)·noise` before scaling;
/// [`Self::latents`] is the noise-free `sample_mode="argmax"` path and [`Self::sample`] takes the
/// noise from the caller, so that which generator draws it stays the caller's decision.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedLatents {
    /// The mean (diffusers' `latent_dist.mean`, A1111's `mode()`).
    pub mean: HostTensor,
    /// The log-variance, clamped to [-30, 20].
    pub logvar: HostTensor,
    /// The VAE's `scaling_factor` (0.18215 for SD1.5), applied by [`Self::latents`] and
    /// [`Self::sample`].
    pub scaling_factor: f32,
}

impl EncodedLatents {
    /// The latents a diffusion step takes: `mean · scaling_factor` (diffusers'
    /// `retrieve_latents(sample_mode="argmax")` times `scaling_factor`).
    pub fn latents(&self) -> HostTensor {
        HostTensor {
            shape: self.mean.shape.clone(),
            data: self
                .mean
                .data
                .iter()
                .map(|m| m * self.scaling_factor)
                .collect(),
        }
    }

    /// A sample of the distribution, scaled: `(mean + exp(0.5·logvar)·noise) · scaling_factor`
    /// in f32 as torch computes it, with `noise` (standard normal, the mean's shape) drawn by
    /// the caller.
    pub fn sample(&self, noise: &HostTensor) -> Result<HostTensor> {
        if noise.shape != self.mean.shape {
            return Err(EngineError::InvalidRequest(format!(
                "noise of shape {:?} for latents of shape {:?}",
                noise.shape, self.mean.shape
            )));
        }
        let data = self
            .mean
            .data
            .iter()
            .zip(&self.logvar.data)
            .zip(&noise.data)
            .map(|((m, lv), n)| (m + (0.5 * lv).exp() * n) * self.scaling_factor)
            .collect();
        Ok(HostTensor {
            shape: self.mean.shape.clone(),
            data,
        })
    }
}

/// An SD1.5 model with its LoRA stack merged, ready to run on one device.
pub struct Model {
    name: String,
    hash: String,
    loras: Vec<LoadedLora>,
    vae_file: Option<LoadedVae>,
    device: candle_core::Device,
    dtype: DType,
    tokenizer: std::sync::Arc<ClipTokenizer>,
    clip: ClipTextModel,
    context_tokens: usize,
    unet: UNet,
    latent_channels: usize,
    vae: VaeDecoder,
    /// Built with the decoder (SD1.5: 34M parameters, 137 MB in f32 on a GPU; nothing extra on
    /// the CPU, where it shares the base's host tensors).
    vae_encoder: VaeEncoder,
    /// f32 when the VAE config says `force_upcast` (SD1.5), else the compute dtype.
    vae_dtype: DType,
    vae_scaling_factor: f64,
    /// The tiles of a tiled decode (diffusers' `tiled_decode` geometry).
    vae_tiles: TileGrid,
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
        Self::from_base_with_vae(base, loras, None, device)
    }

    /// [`Self::from_base`] with the VAE of the file `vae` (A1111's "SD VAE") in place of the
    /// model's own, when given.
    pub fn from_base_with_vae(
        base: &BaseModel,
        loras: &[LoraSpec],
        vae: Option<&Path>,
        device: Device,
    ) -> Result<Self> {
        let (mut weights, loaded, replaced_bytes) = base.merged(loras)?;
        let vae_file = match vae {
            Some(path) => {
                let (vae_weights, hash) = crate::engine::load::ldm::read_vae(path)?;
                weights.vae = vae_weights;
                Some(LoadedVae {
                    name: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    hash,
                })
            }
            None => None,
        };
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
        let vae_params = Params::new(&weights.vae, &device_handle, vae_dtype);
        let vae = VaeDecoder::new(&vae_params, &configs.vae)?;
        let vae_encoder = VaeEncoder::new(&vae_params, &configs.vae)?;
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
            vae_file,
            device: device_handle,
            dtype,
            tokenizer: ClipTokenizer::shared()?,
            clip,
            context_tokens: configs.clip.max_position_embeddings(),
            unet,
            latent_channels: configs.unet.in_channels(),
            vae,
            vae_encoder,
            vae_dtype,
            vae_scaling_factor: configs.vae.scaling_factor(),
            vae_tiles: configs
                .vae
                .tile_grid()
                .map_err(|reason| EngineError::Config {
                    path: base.path().join("vae/config.json"),
                    reason,
                })?,
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

    /// The model's hash, lowercase hex: a single file's sha256 (A1111's); for a diffusers
    /// folder, the sha256 of its text encoder's, UNet's and VAE's weight-file sha256s (hex, in
    /// that order).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The VAE that replaced the model's own, if one did.
    pub fn vae_file(&self) -> Option<&LoadedVae> {
        self.vae_file.as_ref()
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

    /// Text embeddings (`[1, 77·k, hidden]`) of a positive prompt in A1111 syntax at clip skip
    /// 1 (see [`crate::engine::text::conditioning`]); a plain prompt of up to 75 tokens gives
    /// exactly diffusers' `[1, 77, hidden]`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<HostTensor> {
        let parsed = ParsedPrompt::parse(prompt).map_err(|error| EngineError::Prompt {
            which: "prompt",
            error,
        })?;
        self.encode_parsed(&parsed, 1)
    }

    /// Text embeddings (`[1, 77·k, hidden]`) of a parsed prompt, `clip_skip` layers from the
    /// end of the text encoder.
    pub fn encode_parsed(&self, parsed: &ParsedPrompt, clip_skip: usize) -> Result<HostTensor> {
        self.encode_parsed_with(parsed, clip_skip, &InversionDb::empty())
    }

    /// [`Self::encode_parsed`] with the textual-inversion embeddings of `inversions` in place
    /// of their names.
    pub fn encode_parsed_with(
        &self,
        parsed: &ParsedPrompt,
        clip_skip: usize,
        inversions: &InversionDb,
    ) -> Result<HostTensor> {
        to_host(
            &self
                .text_embeddings(&parsed.parts, clip_skip, inversions)?
                .z,
        )
    }

    /// The text encoder's layer count: the largest clip skip this model takes.
    pub fn clip_layers(&self) -> usize {
        self.clip.layers()
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
    /// division by the VAE's `scaling_factor` happens here. Never tiled.
    pub fn decode(&self, latents: &HostTensor) -> Result<HostTensor> {
        self.decode_with(latents, VaeTiling::Off)
    }

    /// [`Self::decode`], in tiles when `tiling` says so for this size (diffusers'
    /// `tiled_decode`; see [`crate::engine::tiling`]).
    pub fn decode_with(&self, latents: &HostTensor, tiling: VaeTiling) -> Result<HostTensor> {
        Ok(self.decode_to_host(&self.to_device(latents)?, tiling)?.0)
    }

    /// The tile grid a tiled decode of this model's VAE uses.
    pub fn vae_tile_grid(&self) -> TileGrid {
        self.vae_tiles
    }

    /// Decodes scaled latents `[b, c, h, w]` on the device to host pixels `[b, 3, 8h, 8w]`, in
    /// tiles when `tiling` says so for `[h, w]`; true when it tiled. Each tile runs the whole
    /// decoder, `post_quant_conv` included, and only one tile's activations exist at a time.
    pub(crate) fn decode_to_host(
        &self,
        latents: &Tensor,
        tiling: VaeTiling,
    ) -> Result<(HostTensor, bool)> {
        let (b, _, h, w) = latents.dims4()?;
        let grid = self.vae_tiles;
        if !tiling.tiles(&grid, [h, w]) {
            return Ok((to_host(&self.decode_latents(latents)?)?, false));
        }
        let z = self.unscaled(latents)?;
        let mut data = Vec::new();
        let mut out_channels = 0;
        for i in 0..b {
            let z = z.narrow(0, i, 1)?;
            let mut image: Option<TiledImage> = None;
            for y in grid.starts(h) {
                let (y0, y1) = grid.span(y, h);
                for x in grid.starts(w) {
                    let (x0, x1) = grid.span(x, w);
                    let tile = z.narrow(2, y0, y1 - y0)?.narrow(3, x0, x1 - x0)?;
                    let decoded = to_host(&self.vae.forward(&tile.contiguous()?)?)?;
                    let &[_, channels, th, tw] = decoded.shape.as_slice() else {
                        unreachable!("the decoder returns [b, c, h, w]");
                    };
                    out_channels = channels;
                    image
                        .get_or_insert_with(|| TiledImage::new(grid, channels, [h, w]))
                        .push(Tile {
                            data: decoded.data,
                            channels,
                            h: th,
                            w: tw,
                        })?;
                }
                if let Some(image) = &mut image {
                    image.end_row();
                }
            }
            data.extend(image.expect("a latent has at least one tile").finish()?);
        }
        let shape = vec![b, out_channels, h * grid.scale, w * grid.scale];
        Ok((HostTensor { shape, data }, true))
    }

    /// The VAE encoder's distribution for images `[b, 3, h, w]` with values in [-1, 1] (see
    /// [`crate::engine::image::to_vae_input`]); `h` and `w` must be multiples of 8.
    pub fn encode_image(&self, image: &HostTensor) -> Result<EncodedLatents> {
        let channels = self.vae_encoder.in_channels();
        let ok = matches!(image.shape.as_slice(),
            &[b, c, h, w] if b > 0 && c == channels && h > 0 && w > 0
                && h % 8 == 0 && w % 8 == 0);
        if !ok || image.data.len() != image.shape.iter().product::<usize>() {
            return Err(EngineError::InvalidRequest(format!(
                "an image to encode is [b, {channels}, h, w] with h and w non-zero multiples \
                 of 8; got shape {:?} with {} values",
                image.shape,
                image.data.len()
            )));
        }
        let (mean, logvar) = self.encode_pixels(&self.to_device(image)?)?;
        Ok(EncodedLatents {
            mean: to_host(&mean)?,
            logvar: to_host(&logvar)?,
            scaling_factor: self.vae_scaling_factor as f32,
        })
    }

    /// The VAE encoder's mean and clamped log-variance (f32, unscaled) for images in [-1, 1],
    /// run in the VAE's dtype.
    pub(crate) fn encode_pixels(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mean, logvar) = self.vae_encoder.forward(&image.to_dtype(self.vae_dtype)?)?;
        Ok((mean.to_dtype(DType::F32)?, logvar.to_dtype(DType::F32)?))
    }

    /// The conditioning (`[1, 77·k, hidden]`, f32) of a parsed prompt's parts: A1111's chunks,
    /// the embeddings of `inversions` in place of their names, encoded `clip_skip` layers from
    /// the end, with emphasis; and the embeddings used.
    pub(crate) fn text_embeddings(
        &self,
        parts: &[PromptPart],
        clip_skip: usize,
        inversions: &InversionDb,
    ) -> Result<Encoded> {
        if self.context_tokens < MAX_LENGTH {
            return Err(EngineError::InvalidRequest(format!(
                "the text encoder takes {} tokens, a prompt chunk is {MAX_LENGTH}",
                self.context_tokens
            )));
        }
        let chunks = conditioning::chunk_prompt_with(&self.tokenizer, parts, inversions)?;
        Ok(Encoded {
            z: conditioning::encode_chunks(&self.clip, &chunks, clip_skip, &self.device)?,
            inversions: conditioning::inversions_used(&chunks),
        })
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
        Ok(self
            .vae
            .forward(&self.unscaled(latents)?)?
            .to_dtype(DType::F32)?)
    }

    /// Scaled latents divided by the VAE's `scaling_factor` (in f32), in the VAE's dtype.
    fn unscaled(&self, latents: &Tensor) -> Result<Tensor> {
        Ok((latents.to_dtype(DType::F32)? / self.vae_scaling_factor)?.to_dtype(self.vae_dtype)?)
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
