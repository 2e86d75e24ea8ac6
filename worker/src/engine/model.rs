//! Loading a diffusers-layout SD1.5 folder, with a LoRA stack merged in, onto a device.
//!
//! Owns locating each component (`unet/`, `vae/`, `text_encoder/`, `scheduler/`; full or
//! `*.fp16.safetensors` weights), reading each `config.json`, merging LoRAs into the host
//! weights, building the networks in the compute dtype (f32 on CPU, f16 on CUDA/Metal), and the
//! hashes that identify the result (A1111's model and LoRA hashes). The tokenizer is compiled
//! in (SD1.5's CLIP BPE), so `tokenizer/` is not read. [`Model`] also exposes each network on
//! [`HostTensor`]s, which is how the reference tests reach them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use super::clip::{ClipConfig, ClipTextModel};
use super::error::{EngineError, Result};
use super::lora::{self, LoraSpec, Targets};
use super::scheduler::ScheduleConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet, UNetConfig};
use super::vae::{VaeConfig, VaeDecoder};
use super::weights::{HostTensor, Params, Weights};

/// Where the networks run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The host CPU, computing in f32 (the reference-exact path).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal, in f16 (needs the `cuda` feature).
    Cuda(usize),
    /// An Apple GPU by ordinal, in f16 (needs the `metal` feature).
    Metal(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

impl Device {
    fn open(self) -> Result<(candle_core::Device, DType)> {
        let opened = match self {
            Self::Cpu => Ok((candle_core::Device::Cpu, DType::F32)),
            Self::Cuda(i) => candle_core::Device::new_cuda(i).map(|d| (d, DType::F16)),
            Self::Metal(i) => candle_core::Device::new_metal(i).map(|d| (d, DType::F16)),
        };
        opened.map_err(|e| EngineError::Device {
            device: self.to_string(),
            source: e.into(),
        })
    }
}

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
    tokenizer: ClipTokenizer,
    clip: ClipTextModel,
    context_tokens: usize,
    unet: UNet,
    latent_channels: usize,
    vae: VaeDecoder,
    /// f32 when the VAE config says `force_upcast` (SD1.5), else the compute dtype.
    vae_dtype: DType,
    vae_scaling_factor: f64,
    schedule: ScheduleConfig,
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

/// One component folder's config and weights file.
struct Part {
    config: PathBuf,
    weights: PathBuf,
}

/// Finds `folder/part/{config}` and the first existing weights file among `names`.
fn locate(folder: &Path, part: &'static str, config: &str, names: &[&str]) -> Result<Part> {
    let dir = folder.join(part);
    let missing = |expected: String| EngineError::MissingPart {
        folder: folder.to_owned(),
        part,
        expected,
    };
    if !dir.is_dir() {
        return Err(missing(format!("a {part}/ folder")));
    }
    let config = dir.join(config);
    if !config.is_file() {
        return Err(missing(config.display().to_string()));
    }
    let weights = names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| missing(format!("{part}/{}", names.join(" or "))))?;
    Ok(Part { config, weights })
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| EngineError::Io {
        path: path.to_owned(),
        source,
    })
}

/// transformers saves `CLIPTextModel` without the `text_model.` prefix; SD checkpoints have it.
fn normalise_text_encoder_keys(weights: &mut Weights) {
    let bare: Vec<String> = weights
        .tensors
        .keys()
        .filter(|k| !k.starts_with("text_model."))
        .cloned()
        .collect();
    for key in bare {
        if let Some(t) = weights.tensors.remove(&key) {
            weights.tensors.insert(format!("text_model.{key}"), t);
        }
    }
}

/// A1111's LoRA hash ("addnet" hash): sha256 of everything after the safetensors header.
fn lora_hash(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    let header = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| EngineError::Safetensors {
            path: path.to_owned(),
            reason: "file is shorter than a safetensors header".to_owned(),
        })?;
    let start = usize::try_from(header)
        .ok()
        .and_then(|h| h.checked_add(8))
        .filter(|&s| s <= bytes.len())
        .ok_or_else(|| EngineError::Safetensors {
            path: path.to_owned(),
            reason: "header length exceeds the file".to_owned(),
        })?;
    Ok(hex::encode(Sha256::digest(&bytes[start..])))
}

/// The files of a diffusers folder.
struct Parts {
    text_encoder: Part,
    unet: Part,
    vae: Part,
    scheduler_config: PathBuf,
}

impl Parts {
    fn locate(folder: &Path) -> Result<Self> {
        const DIFFUSERS: [&str; 2] = [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
        ];
        const TRANSFORMERS: [&str; 2] = ["model.safetensors", "model.fp16.safetensors"];
        let scheduler_config = folder.join("scheduler/scheduler_config.json");
        let parts = Self {
            text_encoder: locate(folder, "text_encoder", "config.json", &TRANSFORMERS)?,
            unet: locate(folder, "unet", "config.json", &DIFFUSERS)?,
            vae: locate(folder, "vae", "config.json", &DIFFUSERS)?,
            scheduler_config,
        };
        if !parts.scheduler_config.is_file() {
            return Err(EngineError::MissingPart {
                folder: folder.to_owned(),
                part: "scheduler",
                expected: parts.scheduler_config.display().to_string(),
            });
        }
        Ok(parts)
    }
}

/// Every component's config, checked against each other.
struct Configs {
    clip: ClipConfig,
    unet: UNetConfig,
    vae: VaeConfig,
    schedule: ScheduleConfig,
}

impl Configs {
    fn read(parts: &Parts) -> Result<Self> {
        let te = &parts.text_encoder.config;
        let configs = Self {
            clip: ClipConfig::from_json(te, &read_text(te)?)?,
            unet: UNetConfig::from_json(&parts.unet.config, &read_text(&parts.unet.config)?)?,
            vae: VaeConfig::from_json(&parts.vae.config, &read_text(&parts.vae.config)?)?,
            schedule: ScheduleConfig::from_json(&read_text(&parts.scheduler_config)?)?,
        };
        let mismatch = |path: &Path, reason: String| {
            Err(EngineError::Config {
                path: path.to_owned(),
                reason,
            })
        };
        if configs.unet.cross_attention_dim() != configs.clip.hidden_size() {
            return mismatch(
                &parts.unet.config,
                format!(
                    "cross_attention_dim {} differs from the text encoder's hidden_size {}",
                    configs.unet.cross_attention_dim(),
                    configs.clip.hidden_size()
                ),
            );
        }
        if configs.vae.latent_channels() != configs.unet.in_channels() {
            return mismatch(
                &parts.vae.config,
                format!(
                    "latent_channels {} differs from the UNet's in_channels {}",
                    configs.vae.latent_channels(),
                    configs.unet.in_channels()
                ),
            );
        }
        Ok(configs)
    }
}

/// Every component's weights in f32 on the host, where LoRAs are merged.
struct HostWeights {
    text_encoder: Weights,
    unet: Weights,
    vae: Weights,
    /// sha256 over the three weight files in a fixed order: the folder analogue of A1111's
    /// whole-file checkpoint hash.
    hash: String,
}

impl HostWeights {
    fn read(parts: &Parts) -> Result<Self> {
        let mut hasher = Sha256::new();
        let mut read = |path: &Path| -> Result<Weights> {
            let bytes = read_bytes(path)?;
            hasher.update(&bytes);
            Weights::from_bytes(path, &bytes)
        };
        let mut text_encoder = read(&parts.text_encoder.weights)?;
        let unet = read(&parts.unet.weights)?;
        let vae = read(&parts.vae.weights)?;
        normalise_text_encoder_keys(&mut text_encoder);
        Ok(Self {
            text_encoder,
            unet,
            vae,
            hash: hex::encode(hasher.finalize()),
        })
    }

    fn merge(&mut self, spec: &LoraSpec) -> Result<LoadedLora> {
        let mut targets = Targets {
            unet: &mut self.unet,
            text_encoder: &mut self.text_encoder,
        };
        lora::merge(spec, &mut targets)?;
        Ok(LoadedLora {
            name: file_stem(&spec.path),
            hash: lora_hash(&spec.path)?,
            strength: spec.strength,
        })
    }
}

impl Model {
    /// Loads the diffusers folder `folder`, merges `loras` in order, and builds the networks
    /// on `device`.
    pub fn load(folder: &Path, loras: &[LoraSpec], device: Device) -> Result<Self> {
        let parts = Parts::locate(folder)?;
        let configs = Configs::read(&parts)?;
        let mut weights = HostWeights::read(&parts)?;
        let loaded = loras
            .iter()
            .map(|spec| weights.merge(spec))
            .collect::<Result<Vec<_>>>()?;
        let HostWeights {
            text_encoder,
            unet,
            vae,
            hash,
        } = weights;

        let (device, dtype) = device.open()?;
        let clip = ClipTextModel::new(&Params::new(&text_encoder, &device, dtype), &configs.clip)?;
        drop(text_encoder);
        let unet = UNet::new(
            &Params::new(&unet, &device, dtype),
            &configs.unet,
            &parts.unet.config,
        )?;
        let vae_dtype = if configs.vae.force_upcast() {
            DType::F32
        } else {
            dtype
        };
        let vae = VaeDecoder::new(&Params::new(&vae, &device, vae_dtype), &configs.vae)?;
        Ok(Self {
            name: folder_name(folder),
            hash,
            loras: loaded,
            device,
            dtype,
            tokenizer: ClipTokenizer::new()?,
            clip,
            context_tokens: configs.clip.max_position_embeddings(),
            unet,
            latent_channels: configs.unet.in_channels(),
            vae,
            vae_dtype,
            vae_scaling_factor: configs.vae.scaling_factor(),
            schedule: configs.schedule,
        })
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
    /// conditioned on `context` (`[b, tokens, hidden]`).
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

    pub(crate) fn unet_forward(
        &self,
        latents: &Tensor,
        t: f32,
        context: &Tensor,
    ) -> Result<Tensor> {
        let latents = latents.to_dtype(self.dtype)?;
        let context = context.to_dtype(self.dtype)?;
        Ok(self
            .unet
            .forward(&latents, t, &context)?
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

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn folder_name(folder: &Path) -> String {
    let canonical = folder.canonicalize().unwrap_or_else(|_| folder.to_owned());
    canonical
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
