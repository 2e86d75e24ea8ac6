//! The architecture of a single-file checkpoint: what family it is, and the diffusers configs
//! that describe its networks.
//!
//! Owns detecting the model family from tensor names and shapes (SD1.x is rendered; SDXL, SD2,
//! SD3, Flux, inpainting and v-prediction models are named and refused), reading the LDM
//! `.yaml` that A1111 reads beside a checkpoint, and reading from the tensors' shapes what a
//! yaml would say. Without a yaml the shapes give channels, levels, res blocks, attention
//! levels and widths, and what shapes cannot tell takes SD1.5's values: 8 attention heads,
//! 32 norm groups (LDM hard-codes them), and a CLIP head width of 64 (ViT-L/14: 768 / 64 = 12
//! heads; at least one head). With a yaml, every value the shapes also give must agree.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::keys::{CLIP_PREFIX, Layout, UNET_PREFIX, VAE_PREFIX};
use crate::engine::error::{EngineError, Result};

/// Tensor name → shape, for every tensor of the checkpoint.
pub(crate) type Shapes = BTreeMap<String, Vec<usize>>;

/// The configs of one checkpoint in diffusers' `config.json` form, and its key layout.
#[derive(Debug)]
pub(crate) struct Architecture {
    pub(crate) layout: Layout,
    pub(crate) unet: Value,
    pub(crate) vae: Value,
    pub(crate) text_encoder: Value,
    pub(crate) scheduler: Value,
}

/// What the UNet's and VAE's tensors say about their shape.
#[derive(Debug, PartialEq)]
struct Observed {
    in_channels: usize,
    out_channels: usize,
    channels: Vec<usize>,
    layers: usize,
    attention: Vec<bool>,
    context_dim: usize,
    transformer_depth: usize,
    linear_projection: bool,
    vae_channels: Vec<usize>,
    vae_layers: usize,
    latent_channels: usize,
}

/// SD1.5's attention heads (`num_heads: 8` in v1-inference.yaml).
const SD1_HEADS: usize = 8;
/// The width of one CLIP attention head in every SD text encoder.
const CLIP_HEAD_WIDTH: usize = 64;

fn shape<'a>(shapes: &'a Shapes, name: &str) -> Option<&'a [usize]> {
    shapes.get(name).map(Vec::as_slice)
}

/// Names the family of a checkpoint that is not SD1.x, from its tensors alone.
pub(crate) fn unsupported_family(shapes: &Shapes) -> Option<String> {
    let any = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    if any("conditioner.embedders.") || any("model.diffusion_model.label_emb.") {
        return Some("an SDXL checkpoint (conditioner.embedders.* tensors)".into());
    }
    if any("model.diffusion_model.joint_blocks.") {
        return Some("an SD3 checkpoint (joint_blocks.* tensors)".into());
    }
    if any("double_blocks.") || any("model.diffusion_model.double_blocks.") {
        return Some("a Flux checkpoint (double_blocks.* tensors)".into());
    }
    if any("cond_stage_model.model.") {
        return Some(
            "an SD2.x checkpoint (an OpenCLIP text encoder, cond_stage_model.model.*)".into(),
        );
    }
    if !any(UNET_PREFIX) {
        return Some(if any("lora_unet_") || any("lora_te_") {
            "a LoRA, not a model (lora_unet_*/lora_te_* tensors): name it with --lora or \
             <lora:name:weight>"
                .into()
        } else if any("down_blocks.") {
            "a diffusers UNet file on its own, not a whole model: name the model's folder".into()
        } else {
            "not a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)".into()
        });
    }
    if let Some(s) = shape(shapes, "model.diffusion_model.input_blocks.0.0.weight")
        && s.get(1).is_some_and(|&c| c != 4)
    {
        return Some(format!(
            "an inpainting or other {}-channel UNet",
            s.get(1).copied().unwrap_or(0)
        ));
    }
    None
}

fn observe(path: &Path, shapes: &Shapes) -> Result<Observed> {
    let missing = |what: &str| EngineError::Config {
        path: path.to_owned(),
        reason: format!("cannot read the architecture from the tensors: {what}"),
    };
    let unet = |name: &str| shape(shapes, &format!("{UNET_PREFIX}{name}"));
    let conv_in = unet("input_blocks.0.0.weight").ok_or_else(|| missing("no conv_in"))?;
    let out = unet("out.2.weight").ok_or_else(|| missing("no UNet conv_out"))?;
    // The first downsampler sits at input block layers+1; levels = downsamplers + 1.
    let downsamplers: Vec<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix(&format!("{UNET_PREFIX}input_blocks.")))
        .filter_map(|k| k.strip_suffix(".0.op.weight"))
        .filter_map(|k| k.parse().ok())
        .collect();
    let per = downsamplers
        .iter()
        .min()
        .copied()
        .filter(|&p| p >= 2)
        .ok_or_else(|| missing("no UNet downsampler"))?;
    let levels = downsamplers.len() + 1;
    let mut channels = Vec::with_capacity(levels);
    let mut attention = Vec::with_capacity(levels);
    for i in 0..levels {
        let k = i * per + 1;
        let out = unet(&format!("input_blocks.{k}.0.out_layers.3.weight"))
            .ok_or_else(|| missing(&format!("no res block in input block {k}")))?;
        channels.push(out[0]);
        attention.push(unet(&format!("input_blocks.{k}.1.proj_in.weight")).is_some());
    }
    let attn = unet("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
        .ok_or_else(|| missing("no mid-block cross-attention"))?;
    let proj_in = unet("middle_block.1.proj_in.weight").ok_or_else(|| missing("no proj_in"))?;
    let transformer_depth = (0..)
        .take_while(|d| {
            unet(&format!(
                "middle_block.1.transformer_blocks.{d}.norm1.weight"
            ))
            .is_some()
        })
        .count();
    let vae = |name: &str| shape(shapes, &format!("{VAE_PREFIX}{name}"));
    let vae_levels = (0..)
        .take_while(|i| vae(&format!("decoder.up.{i}.block.0.conv1.weight")).is_some())
        .count();
    let vae_channels = (0..vae_levels)
        .map(|i| vae(&format!("decoder.up.{i}.block.0.conv2.weight")).map(|s| s[0]))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| missing("an incomplete VAE decoder"))?;
    let vae_layers = (0..)
        .take_while(|j| vae(&format!("decoder.up.0.block.{j}.conv1.weight")).is_some())
        .count();
    let latent = vae("post_quant_conv.weight").ok_or_else(|| missing("no post_quant_conv"))?;
    if vae_levels == 0 || vae_layers == 0 {
        return Err(missing("no VAE decoder"));
    }
    Ok(Observed {
        in_channels: conv_in[1],
        out_channels: out[0],
        channels,
        layers: per - 1,
        attention,
        context_dim: attn[1],
        transformer_depth,
        linear_projection: proj_in.len() == 2,
        vae_channels,
        vae_layers: vae_layers - 1,
        latent_channels: latent[0],
    })
}

/// What an LDM yaml says, in the form [`Observed`] has, plus what shapes cannot say.
struct Declared {
    observed: Observed,
    heads: Heads,
    scale_factor: f64,
    schedule: (f64, f64, usize),
}

/// Attention heads: a fixed count (SD1) or a fixed head width (SD2's `num_head_channels`).
#[derive(Clone, Copy)]
enum Heads {
    Count(usize),
    Width(usize),
}

fn read_yaml(path: &Path, text: &str, seen: &Observed) -> Result<Declared> {
    let bad = |reason: String| EngineError::Config {
        path: path.to_owned(),
        reason,
    };
    let root: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| bad(format!("not YAML: {e}")))?;
    let params = &root["model"]["params"];
    if params.is_null() {
        return Err(bad("no model.params: not an LDM config".into()));
    }
    if params["network_config"].is_mapping() || params["conditioner_config"].is_mapping() {
        return Err(EngineError::Unsupported {
            path: path.to_owned(),
            detected: "an SDXL config (network_config/conditioner_config)".into(),
        });
    }
    if params["parameterization"].as_str() == Some("v") {
        return Err(EngineError::Unsupported {
            path: path.to_owned(),
            detected: "a v-prediction model (parameterization: v)".into(),
        });
    }
    let unet = &params["unet_config"]["params"];
    let dd = &params["first_stage_config"]["params"]["ddconfig"];
    let int = |v: &serde_yaml_ng::Value, what: &str| -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad(format!("{what} is missing or not a whole number")))
    };
    let ints = |v: &serde_yaml_ng::Value, what: &str| -> Result<Vec<usize>> {
        v.as_sequence()
            .ok_or_else(|| bad(format!("{what} is missing or not a list")))?
            .iter()
            .map(|x| int(x, what))
            .collect()
    };
    let float = |v: &serde_yaml_ng::Value, default: f64| v.as_f64().unwrap_or(default);
    let model_channels = int(&unet["model_channels"], "unet_config model_channels")?;
    let mult = ints(&unet["channel_mult"], "unet_config channel_mult")?;
    let resolutions = ints(&unet["attention_resolutions"], "attention_resolutions")?;
    let heads = match unet["num_head_channels"].as_i64() {
        Some(w) if w > 0 => Heads::Width(w as usize),
        _ => Heads::Count(int(&unet["num_heads"], "unet_config num_heads")?),
    };
    let vae_ch = int(&dd["ch"], "ddconfig ch")?;
    let vae_mult = ints(&dd["ch_mult"], "ddconfig ch_mult")?;
    let observed = Observed {
        in_channels: int(&unet["in_channels"], "unet_config in_channels")?,
        out_channels: int(&unet["out_channels"], "unet_config out_channels")?,
        channels: mult.iter().map(|m| m * model_channels).collect(),
        layers: int(&unet["num_res_blocks"], "unet_config num_res_blocks")?,
        attention: (0..mult.len())
            .map(|i| resolutions.contains(&(1 << i)))
            .collect(),
        context_dim: int(&unet["context_dim"], "unet_config context_dim")?,
        transformer_depth: unet["transformer_depth"].as_u64().map_or(1, |d| d as usize),
        linear_projection: unet["use_linear_in_transformer"].as_bool().unwrap_or(false),
        vae_channels: vae_mult.iter().map(|m| m * vae_ch).collect(),
        vae_layers: int(&dd["num_res_blocks"], "ddconfig num_res_blocks")?,
        latent_channels: int(&dd["z_channels"], "ddconfig z_channels")?,
    };
    if observed != *seen {
        return Err(bad(format!(
            "describes a different model than the checkpoint beside it: the yaml says \
             {observed:?}, the tensors say {seen:?}"
        )));
    }
    Ok(Declared {
        observed,
        heads,
        scale_factor: float(&params["scale_factor"], 0.18215),
        schedule: (
            float(&params["linear_start"], 0.00085),
            float(&params["linear_end"], 0.012),
            params["timesteps"].as_u64().map_or(1000, |t| t as usize),
        ),
    })
}

/// Reads the architecture of the checkpoint at `path` from its tensors, and from `yaml`
/// (`(path, text)`) when one lies beside it.
pub(crate) fn read(
    path: &Path,
    shapes: &Shapes,
    yaml: Option<(&Path, &str)>,
) -> Result<Architecture> {
    if let Some(detected) = unsupported_family(shapes) {
        return Err(EngineError::Unsupported {
            path: path.to_owned(),
            detected,
        });
    }
    let seen = observe(path, shapes)?;
    if seen.context_dim == 1024 {
        return Err(EngineError::Unsupported {
            path: path.to_owned(),
            detected: "an SD2.x checkpoint (cross-attention width 1024)".into(),
        });
    }
    let declared = match yaml {
        Some((yaml_path, text)) => read_yaml(yaml_path, text, &seen)?,
        None => Declared {
            observed: seen,
            heads: Heads::Count(SD1_HEADS),
            scale_factor: 0.18215,
            schedule: (0.00085, 0.012, 1000),
        },
    };
    let o = &declared.observed;
    let heads: Vec<usize> = o
        .channels
        .iter()
        .map(|&c| match declared.heads {
            Heads::Count(n) => n,
            Heads::Width(w) => (c / w).max(1),
        })
        .collect();
    let down: Vec<&str> = o
        .attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = o
        .attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    let unet = json!({
        "in_channels": o.in_channels,
        "out_channels": o.out_channels,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "block_out_channels": o.channels,
        "layers_per_block": o.layers,
        "transformer_layers_per_block": o.transformer_depth,
        "attention_head_dim": heads,
        "cross_attention_dim": o.context_dim,
        "norm_num_groups": 32,
        "use_linear_projection": o.linear_projection,
    });
    let vae = json!({
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; o.vae_channels.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; o.vae_channels.len()],
        "block_out_channels": o.vae_channels,
        "layers_per_block": o.vae_layers,
        "latent_channels": o.latent_channels,
        "norm_num_groups": 32,
        "scaling_factor": declared.scale_factor,
        "force_upcast": true,
        // What diffusers' single-file loader gives an SD1.5 VAE (its `image_size`); it sets
        // the tiled decode's tile size.
        "sample_size": 512,
    });
    let text_encoder = clip_config(path, shapes)?;
    let (beta_start, beta_end, timesteps) = declared.schedule;
    let scheduler = json!({
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": timesteps,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "clip_sample": false,
    });
    Ok(Architecture {
        layout: Layout {
            unet_layers: o.layers,
            vae_levels: o.vae_channels.len(),
        },
        unet,
        vae,
        text_encoder,
        scheduler,
    })
}

/// The CLIP text encoder's config from its tensors: an LDM file carries none (LDM builds
/// OpenAI's ViT-L/14 text tower by name).
fn clip_config(path: &Path, shapes: &Shapes) -> Result<Value> {
    let find = |suffix: &str| {
        [
            format!("{CLIP_PREFIX}text_model.{suffix}"),
            format!("{CLIP_PREFIX}{suffix}"),
        ]
        .into_iter()
        .find_map(|n| shape(shapes, &n))
    };
    let missing = |what: &str| EngineError::Unsupported {
        path: path.to_owned(),
        detected: format!("a checkpoint without a CLIP text encoder ({what} is missing)"),
    };
    let tokens =
        find("embeddings.token_embedding.weight").ok_or_else(|| missing("token_embedding"))?;
    let positions = find("embeddings.position_embedding.weight")
        .ok_or_else(|| missing("position_embedding"))?;
    let fc1 = find("encoder.layers.0.mlp.fc1.weight").ok_or_else(|| missing("layer 0"))?;
    let layers = (0..)
        .take_while(|i| find(&format!("encoder.layers.{i}.mlp.fc1.weight")).is_some())
        .count();
    let hidden = tokens[1];
    Ok(json!({
        "vocab_size": tokens[0],
        "hidden_size": hidden,
        "intermediate_size": fc1[0],
        "num_hidden_layers": layers,
        "num_attention_heads": (hidden / CLIP_HEAD_WIDTH).max(1),
        "max_position_embeddings": positions[0],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }))
}
