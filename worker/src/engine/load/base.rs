//! A model's files read once: every component's config, its weights in f32 on the host, and
//! the hash that names them. [`BaseModel`] is what the worker's cache keeps so that a change of
//! LoRA stack or strength re-merges from memory instead of reading the checkpoint again.
//!
//! Owns locating each component of a diffusers folder (`unet/`, `vae/`, `text_encoder/`,
//! `scheduler/`; full or `*.fp16.safetensors` weights), reading and cross-checking the configs,
//! and merging a LoRA stack into a copy of the base weights. The copy is cheap: host tensors
//! share storage, and a merge replaces only the tensors a LoRA patches.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::engine::device::Device;
use crate::engine::error::{EngineError, Result};
use crate::engine::load::hashes;
use crate::engine::load::lora::{self, LoraSpec, Targets};
use crate::engine::load::weights::Weights;
use crate::engine::model::{LoadedLora, Model};
use crate::engine::nets::clip::ClipConfig;
use crate::engine::nets::unet::UNetConfig;
use crate::engine::nets::vae::VaeConfig;
use crate::engine::scheduler::ScheduleConfig;

/// One component folder's config and weights file.
pub(crate) struct Part {
    pub(crate) config: PathBuf,
    pub(crate) weights: PathBuf,
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

/// The largest `config.json` read, bytes (SD1.5's are under 2 KB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

pub(crate) fn read_text(path: &Path) -> Result<String> {
    use std::io::Read;
    let (file, len) = crate::engine::load::weights::open_regular(path)?;
    if len > MAX_CONFIG_BYTES {
        return Err(EngineError::Config {
            path: path.to_owned(),
            reason: format!("{len} bytes, larger than any config ({MAX_CONFIG_BYTES})"),
        });
    }
    let mut text = String::new();
    file.take(len)
        .read_to_string(&mut text)
        .map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(text)
}

fn read_bytes(path: &Path) -> Result<crate::engine::load::weights::FileBytes> {
    crate::engine::load::weights::read_safetensors_bytes(path)
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
fn lora_hash(path: &Path, bytes: &[u8]) -> Result<String> {
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
    hashes::remembered(hashes::ADDNET, path, || {
        Ok(hex::encode(Sha256::digest(&bytes[start..])))
    })
}

/// The files of a diffusers folder.
pub(crate) struct Parts {
    pub(crate) text_encoder: Part,
    pub(crate) unet: Part,
    pub(crate) vae: Part,
    pub(crate) scheduler_config: PathBuf,
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
pub(crate) struct Configs {
    pub(crate) clip: ClipConfig,
    pub(crate) unet: UNetConfig,
    pub(crate) vae: VaeConfig,
    pub(crate) schedule: ScheduleConfig,
}

impl Configs {
    fn read(parts: &Parts) -> Result<Self> {
        let text = |p: &Path| -> Result<(PathBuf, String)> { Ok((p.to_owned(), read_text(p)?)) };
        let te = text(&parts.text_encoder.config)?;
        let unet = text(&parts.unet.config)?;
        let vae = text(&parts.vae.config)?;
        let schedule = ScheduleConfig::from_json(&read_text(&parts.scheduler_config)?)?;
        Self::checked(
            ClipConfig::from_json(&te.0, &te.1)?,
            (&unet.0, UNetConfig::from_json(&unet.0, &unet.1)?),
            (&vae.0, VaeConfig::from_json(&vae.0, &vae.1)?),
            schedule,
        )
    }

    /// Parses configs in diffusers' JSON form that one file (`path`, named in errors)
    /// describes: a single-file checkpoint or its yaml.
    pub(crate) fn parse(
        path: &Path,
        text_encoder: &str,
        unet: &str,
        vae: &str,
        scheduler: &str,
    ) -> Result<Self> {
        Self::checked(
            ClipConfig::from_json(path, text_encoder)?,
            (path, UNetConfig::from_json(path, unet)?),
            (path, VaeConfig::from_json(path, vae)?),
            ScheduleConfig::from_json(scheduler)?,
        )
    }

    /// The configs, once their shared widths agree.
    fn checked(
        clip: ClipConfig,
        (unet_path, unet): (&Path, UNetConfig),
        (vae_path, vae): (&Path, VaeConfig),
        schedule: ScheduleConfig,
    ) -> Result<Self> {
        let mismatch = |path: &Path, reason: String| {
            Err(EngineError::Config {
                path: path.to_owned(),
                reason,
            })
        };
        if unet.cross_attention_dim() != clip.hidden_size() {
            return mismatch(
                unet_path,
                format!(
                    "cross_attention_dim {} differs from the text encoder's hidden_size {}",
                    unet.cross_attention_dim(),
                    clip.hidden_size()
                ),
            );
        }
        if vae.latent_channels() != unet.in_channels() {
            return mismatch(
                vae_path,
                format!(
                    "latent_channels {} differs from the UNet's in_channels {}",
                    vae.latent_channels(),
                    unet.in_channels()
                ),
            );
        }
        Ok(Self {
            clip,
            unet,
            vae,
            schedule,
        })
    }
}

/// Every component's weights in f32 on the host, where LoRAs are merged.
#[derive(Clone)]
pub(crate) struct HostWeights {
    pub(crate) text_encoder: Weights,
    pub(crate) unet: Weights,
    pub(crate) vae: Weights,
    /// sha256 over the three weight files' sha256s (lowercase hex) in a fixed order: the
    /// folder analogue of A1111's whole-file checkpoint hash, from per-file hashes so that
    /// each is remembered between loads ([`hashes`]).
    pub(crate) hash: String,
}

impl HostWeights {
    fn read(parts: &Parts) -> Result<Self> {
        let mut hasher = Sha256::new();
        let mut read = |path: &Path| -> Result<Weights> {
            let bytes = read_bytes(path)?;
            let file = hashes::remembered(hashes::FILE_SHA256, path, || {
                Ok(hex::encode(Sha256::digest(&bytes)))
            })?;
            hasher.update(file.as_bytes());
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
}

/// An SD1.5 model (a diffusers folder or a single-file checkpoint) read into host memory,
/// ready to be built with any LoRA stack.
pub struct BaseModel {
    /// The folder or file it was read from.
    pub(crate) path: PathBuf,
    /// What names the UNet's architecture in errors: `unet/config.json`, the yaml or the file.
    pub(crate) unet_config: PathBuf,
    pub(crate) configs: Configs,
    pub(crate) weights: HostWeights,
    bytes: u64,
}

impl std::fmt::Debug for BaseModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseModel")
            .field("path", &self.path)
            .field("hash", &self.weights.hash)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// Extensions of PyTorch pickle files, which kiln never unpickles.
const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];

/// Whether `path` is a pickle file, by its name or by its first bytes (a zip archive, as
/// `torch.save` writes, or a raw pickle stream, but never a safetensors file). Reads at most 9
/// bytes.
pub(crate) fn is_pickle(path: &Path) -> bool {
    use std::io::Read;
    let by_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
    // A safetensors file has `{` at byte 8 (its JSON header); a zip (`torch.save`) starts with
    // `PK\x03\x04`, a raw pickle with PROTO (0x80) and a protocol number.
    let mut head = [0u8; 9];
    let by_content = super::weights::open_regular(path)
        .ok()
        .and_then(|(f, _)| f.take(9).read_exact(&mut head).ok())
        .is_some()
        && head[8] != b'{'
        && (head[..4] == *b"PK\x03\x04" || (head[0] == 0x80 && (2..=5).contains(&head[1])));
    by_name || by_content
}

/// Refuses a pickle checkpoint before anything else reads it.
fn refuse_pickle(path: &Path) -> Result<()> {
    if !is_pickle(path) {
        return Ok(());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(EngineError::Pickle {
        path: path.to_owned(),
        convert: format!(
            "python -c \"import torch, safetensors.torch as s; sd = torch.load('{name}', \
             weights_only=True); s.save_file({{k: v.contiguous() for k, v in sd.get('state_dict', \
             sd).items() if hasattr(v, 'contiguous')}}, '{}.safetensors')\"",
            file_stem(path)
        ),
    })
}

impl BaseModel {
    /// Reads a model: every config and weights file of a diffusers folder, or a single-file
    /// checkpoint in the CompVis/LDM layout (with the `.yaml` beside it, if any).
    pub fn read(path: &Path) -> Result<Self> {
        let (configs, weights, unet_config) = if path.is_file() {
            refuse_pickle(path)?;
            let (configs, weights) = super::ldm::read(path)?;
            let yaml = super::ldm::yaml_beside(path);
            let named = if yaml.is_file() {
                yaml
            } else {
                path.to_owned()
            };
            (configs, weights, named)
        } else if path.is_dir() {
            let parts = Parts::locate(path)?;
            let configs = Configs::read(&parts)?;
            (configs, HostWeights::read(&parts)?, parts.unet.config)
        } else {
            return Err(EngineError::ModelNotFound {
                path: path.to_owned(),
            });
        };
        let bytes = [&weights.text_encoder, &weights.unet, &weights.vae]
            .iter()
            .flat_map(|w| w.tensors.values())
            .map(|t| t.elem_count() as u64 * 4)
            .sum();
        Ok(Self {
            path: path.to_owned(),
            unet_config,
            configs,
            weights,
            bytes,
        })
    }

    /// Host memory the base weights take (f32).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The folder or file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's name as A1111 writes it: the folder's name, or the file's stem.
    pub fn name(&self) -> String {
        let canonical = self
            .path
            .canonicalize()
            .unwrap_or_else(|_| self.path.clone());
        if canonical.is_file() {
            file_stem(&canonical)
        } else {
            canonical
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        }
    }

    /// Merges `loras` in order into a copy of the base weights and builds the networks on
    /// `device`. The base itself is not changed.
    pub fn build(&self, loras: &[LoraSpec], device: Device) -> Result<Model> {
        Model::from_base(self, loras, device)
    }

    /// [`Self::build`] with the VAE file `vae` in place of the model's own, when given.
    pub fn build_with_vae(
        &self,
        loras: &[LoraSpec],
        vae: Option<&Path>,
        device: Device,
    ) -> Result<Model> {
        Model::from_base_with_vae(self, loras, vae, device)
    }

    /// A copy of the base weights with `loras` merged in, the LoRAs as loaded, and the f32 bytes
    /// of the tensors the merge replaced.
    pub(crate) fn merged(&self, loras: &[LoraSpec]) -> Result<(HostWeights, Vec<LoadedLora>, u64)> {
        let mut weights = self.weights.clone();
        let mut loaded = Vec::with_capacity(loras.len());
        let mut replaced = std::collections::HashSet::new();
        for spec in loras {
            let bytes = read_bytes(&spec.path)?;
            let file = Weights::from_bytes(&spec.path, &bytes)?;
            let mut targets = Targets {
                unet: &mut weights.unet,
                text_encoder: &mut weights.text_encoder,
            };
            replaced.extend(lora::merge(spec, &file, &mut targets)?);
            loaded.push(LoadedLora {
                name: file_stem(&spec.path),
                hash: lora_hash(&spec.path, &bytes)?,
                strength: spec.strength,
            });
        }
        let replaced_bytes = replaced
            .iter()
            .filter_map(|(component, name)| {
                let w = match component {
                    lora::Component::Unet => &weights.unet,
                    lora::Component::TextEncoder => &weights.text_encoder,
                };
                w.tensors.get(name)
            })
            .map(|t| t.elem_count() as u64 * 4)
            .sum();
        Ok((weights, loaded, replaced_bytes))
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_safetensors_file_is_never_taken_for_a_pickle() {
        let dir = tempfile::tempdir().unwrap();
        // A header of 0x80 bytes puts PROTO's byte first; byte 8 is still the JSON's `{`.
        let mut bytes = 0x80u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(format!("{:<128}", "{}").as_bytes());
        let file = dir.path().join("fine.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        assert!(refuse_pickle(&file).is_ok());
        // A raw protocol-4 pickle and a torch zip are refused whatever their name.
        for (name, head) in [
            ("a.safetensors", &b"\x80\x04\x95abcdefgh"[..]),
            ("b", b"PK\x03\x04abcdefgh"),
        ] {
            let file = dir.path().join(name);
            std::fs::write(&file, head).unwrap();
            assert!(
                matches!(refuse_pickle(&file), Err(EngineError::Pickle { .. })),
                "{name}"
            );
        }
    }
}
