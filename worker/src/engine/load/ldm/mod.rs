//! Single-file checkpoints in the CompVis/LDM layout: what Civitai and A1111 users have.
//!
//! Owns reading one `.safetensors` checkpoint (UNet, VAE and CLIP text encoder in one file,
//! fp16, bf16 or fp32, with or without EMA copies) into the same configs and host weights a
//! diffusers folder gives ([`super::base`]), so everything after loading is shared. The
//! architecture comes from the tensors and an optional `<stem>.yaml` beside the file
//! ([`arch`]); names are mapped by [`keys`]. Tensors no network reads (EMA copies, schedule
//! buffers) are skipped without being converted, so they cost no memory beyond the file.

mod arch;
pub(crate) mod keys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::base::{Configs, HostWeights};
use super::hashes;
use super::weights::{Weights, display_name, read_safetensors_bytes, tensor_f32};
use crate::engine::error::{EngineError, Result};
use keys::Part;

/// Reads a VAE file to replace a model's own (A1111's "SD VAE"): the LDM layout of the
/// released SD VAEs (`encoder.down.*`, `decoder.up.*`), a whole checkpoint's
/// `first_stage_model.*`, or diffusers' names. Gives the weights under diffusers' names and the
/// file's sha256 (A1111's VAE hash).
pub(crate) fn read_vae(path: &Path) -> Result<(Weights, String)> {
    let bytes = read_safetensors_bytes(path)?;
    let bad = |reason: String| EngineError::Safetensors {
        path: path.to_owned(),
        reason,
    };
    let file =
        candle_core::safetensors::SliceSafetensors::new(&bytes).map_err(|e| bad(e.to_string()))?;
    let names: Vec<String> = file.tensors().into_iter().map(|(n, _)| n).collect();
    let prefix = if names.iter().any(|n| n.starts_with(keys::VAE_PREFIX)) {
        keys::VAE_PREFIX
    } else {
        ""
    };
    let levels = (0..)
        .take_while(|i| {
            let block = format!("{prefix}decoder.up.{i}.");
            names.iter().any(|n| n.starts_with(&block))
        })
        .count();
    let diffusers = names.iter().any(|n| n.starts_with("decoder.up_blocks."));
    if levels == 0 && !diffusers {
        return Err(EngineError::Unsupported {
            path: path.to_owned(),
            detected: "not a VAE (no decoder.up.* or decoder.up_blocks.* tensors)".into(),
        });
    }
    let layout = keys::Layout {
        unet_layers: 2,
        vae_levels: levels,
    };
    let mut tensors = HashMap::new();
    for name in &names {
        let renamed = if diffusers {
            Some(name.clone())
        } else {
            keys::rename(
                &format!("{}{}", keys::VAE_PREFIX, &name[prefix.len()..]),
                layout,
            )
            .map(|(_, n)| n)
        };
        let Some(renamed) = renamed else {
            continue;
        };
        let tensor = load_f32(path, &file, name, &renamed, true)?;
        tensors.insert(renamed, tensor);
    }
    let hash = hashes::remembered(hashes::FILE_SHA256, path, || {
        Ok(hex::encode(Sha256::digest(&bytes)))
    })?;
    Ok((
        Weights {
            file: display_name(path),
            tensors,
        },
        hash,
    ))
}

/// The tensor `name` of `file` in f32, renamed `renamed`. LDM keeps a VAE's attention
/// projections as 1×1 convolutions, diffusers as linears: those are reshaped when `vae`.
fn load_f32(
    path: &Path,
    file: &candle_core::safetensors::SliceSafetensors<'_>,
    name: &str,
    renamed: &str,
    vae: bool,
) -> Result<candle_core::Tensor> {
    let bad = |e: candle_core::Error| EngineError::Safetensors {
        path: path.to_owned(),
        reason: format!("tensor `{name}`: {e}"),
    };
    let view = file
        .get(name)
        .map_err(|e| bad(candle_core::Error::Msg(e.to_string())))?;
    let tensor = tensor_f32(&view).map_err(bad)?;
    if vae && renamed.contains(".attentions.") && tensor.rank() == 4 {
        let (o, i, _, _) = tensor.dims4().map_err(bad)?;
        return tensor.reshape((o, i)).map_err(bad);
    }
    Ok(tensor)
}

/// The yaml A1111 reads beside a checkpoint: the same stem, `.yaml`.
pub(crate) fn yaml_beside(path: &Path) -> PathBuf {
    path.with_extension("yaml")
}

/// Reads the checkpoint at `path` (and its yaml, if any): configs, weights in f32 on the host,
/// and the whole file's sha256 (A1111's model hash).
pub(crate) fn read(path: &Path) -> Result<(Configs, HostWeights)> {
    let bytes = read_safetensors_bytes(path)?;
    let bad = |reason: String| EngineError::Safetensors {
        path: path.to_owned(),
        reason,
    };
    let file =
        candle_core::safetensors::SliceSafetensors::new(&bytes).map_err(|e| bad(e.to_string()))?;
    let shapes: arch::Shapes = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    let yaml_path = yaml_beside(path);
    let yaml_text = if yaml_path.is_file() {
        Some(super::base::read_text(&yaml_path)?)
    } else {
        None
    };
    let arch = arch::read(
        path,
        &shapes,
        yaml_text.as_deref().map(|t| (yaml_path.as_path(), t)),
    )?;
    let config_path = if yaml_text.is_some() {
        yaml_path.as_path()
    } else {
        path
    };
    let configs = Configs::parse(
        config_path,
        &arch.text_encoder.to_string(),
        &arch.unet.to_string(),
        &arch.vae.to_string(),
        &arch.scheduler.to_string(),
    )?;
    let mut parts: [HashMap<String, candle_core::Tensor>; 3] = Default::default();
    for name in shapes.keys() {
        let Some((part, renamed)) = keys::rename(name, arch.layout) else {
            continue;
        };
        let tensor = load_f32(path, &file, name, &renamed, part == Part::Vae)?;
        let slot = match part {
            Part::TextEncoder => 0,
            Part::Unet => 1,
            Part::Vae => 2,
        };
        parts[slot].insert(renamed, tensor);
    }
    let hash = hashes::remembered(hashes::FILE_SHA256, path, || {
        Ok(hex::encode(Sha256::digest(&bytes)))
    })?;
    drop(file);
    drop(bytes);
    let file_name = display_name(path);
    let [text_encoder, unet, vae] = parts.map(|tensors| Weights {
        file: file_name.clone(),
        tensors,
    });
    Ok((
        configs,
        HostWeights {
            text_encoder,
            unet,
            vae,
            hash,
        },
    ))
}
