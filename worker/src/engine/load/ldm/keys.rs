//! Tensor names of a CompVis/LDM single-file checkpoint, renamed to diffusers' names.
//!
//! Owns the one mapping from `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
//! `cond_stage_model.transformer.*` (CLIP) to the names the networks in `nets` read. The
//! UNet's block indices depend on its res blocks per level (SD1.5: 2), which the caller reads
//! from the file ([`super::arch`]); the VAE decoder's level index runs in reverse, so it needs
//! the number of levels. Names of anything else (EMA copies, schedule buffers) map to nothing.
//! Written from the layout in diffusers' and sd-scripts' converters; checked by the fixture test
//! against diffusers' `from_single_file`, which converts with its own code.

/// Which network a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    Unet,
    Vae,
    TextEncoder,
}

/// The prefixes of each network in an LDM checkpoint.
pub(crate) const UNET_PREFIX: &str = "model.diffusion_model.";
pub(crate) const VAE_PREFIX: &str = "first_stage_model.";
pub(crate) const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// The block layout the names depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Res blocks per UNet level (`num_res_blocks`).
    pub(crate) unet_layers: usize,
    /// Levels of the VAE decoder (`len(ch_mult)`).
    pub(crate) vae_levels: usize,
}

/// The diffusers name of the LDM tensor `name`, or `None` for a tensor no network reads.
pub(crate) fn rename(name: &str, layout: Layout) -> Option<(Part, String)> {
    if let Some(rest) = name.strip_prefix(UNET_PREFIX) {
        return unet(rest, layout.unet_layers).map(|n| (Part::Unet, n));
    }
    if let Some(rest) = name.strip_prefix(VAE_PREFIX) {
        return vae(rest, layout.vae_levels).map(|n| (Part::Vae, n));
    }
    if let Some(rest) = name.strip_prefix(CLIP_PREFIX) {
        if rest.ends_with("position_ids") {
            return None;
        }
        // Older checkpoints lack the `text_model.` level that transformers' names have.
        let named = if rest.starts_with("text_model.") {
            rest.to_owned()
        } else {
            format!("text_model.{rest}")
        };
        return Some((Part::TextEncoder, named));
    }
    None
}

/// The diffusers module a kohya LoRA names in LDM style (`input_blocks_1_0_in_layers_2`,
/// as LoRAs trained on CompVis modules do), underscored as kohya writes diffusers names
/// (`down_blocks_0_resnets_0_conv1`); `layers` is the UNet's res blocks per level.
pub(crate) fn ldm_lora_module(module: &str, layers: usize) -> Option<String> {
    // Re-dot the LDM name: block and indices, then a res block's known children; an
    // attention's children are named alike in both layouts, so they pass through as they are.
    let (block, rest) = [
        "input_blocks_",
        "output_blocks_",
        "middle_block_",
        "time_embed_",
        "out_",
    ]
    .iter()
    .find_map(|b| module.strip_prefix(b).map(|r| (b.trim_end_matches('_'), r)))?;
    let indices = if matches!(block, "input_blocks" | "output_blocks") {
        2
    } else if block == "middle_block" {
        1
    } else {
        0
    };
    let mut parts = rest.splitn(indices + 1, '_');
    let mut dotted = String::from(block);
    let mut tail = rest;
    for _ in 0..indices {
        let index = parts.next()?;
        index.parse::<usize>().ok()?;
        dotted.push('.');
        dotted.push_str(index);
        tail = parts.clone().next().unwrap_or("");
    }
    if indices == 0 {
        rest.parse::<usize>().ok()?;
        dotted = format!("{block}.{rest}");
        tail = "";
    }
    const CHILDREN: [(&str, &str); 8] = [
        ("in_layers_0", "in_layers.0"),
        ("in_layers_2", "in_layers.2"),
        ("emb_layers_1", "emb_layers.1"),
        ("out_layers_0", "out_layers.0"),
        ("out_layers_3", "out_layers.3"),
        ("skip_connection", "skip_connection"),
        ("op", "op"),
        ("conv", "conv"),
    ];
    if !tail.is_empty() {
        let child = CHILDREN
            .iter()
            .find(|(u, _)| *u == tail)
            .map_or(tail, |(_, d)| *d);
        dotted.push('.');
        dotted.push_str(child);
    }
    let (part, name) = rename(
        &format!("{UNET_PREFIX}{dotted}.weight"),
        Layout {
            unet_layers: layers,
            vae_levels: 1,
        },
    )?;
    (part == Part::Unet).then(|| name.trim_end_matches(".weight").replace('.', "_"))
}

/// `in_layers.0` → `norm1` and the rest of an LDM `ResBlock`'s children.
fn resnet_child(rest: &str) -> Option<String> {
    const CHILDREN: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    CHILDREN
        .iter()
        .find_map(|(ldm, diffusers)| rest.strip_prefix(ldm).map(|t| format!("{diffusers}{t}")))
}

/// Splits `a.b.rest` into (`a`, `b`, `rest`).
fn split2(s: &str) -> Option<(&str, &str, &str)> {
    let (a, s) = s.split_once('.')?;
    let (b, rest) = s.split_once('.')?;
    Some((a, b, rest))
}

fn unet(rest: &str, layers: usize) -> Option<String> {
    let per = layers + 1;
    let (block, index, tail) = split2(rest)?;
    let k: usize = index.parse().ok()?;
    match block {
        "time_embed" => match k {
            0 => Some(format!("time_embedding.linear_1.{tail}")),
            2 => Some(format!("time_embedding.linear_2.{tail}")),
            _ => None,
        },
        "out" => match k {
            0 => Some(format!("conv_norm_out.{tail}")),
            2 => Some(format!("conv_out.{tail}")),
            _ => None,
        },
        "input_blocks" => {
            let (slot, child) = tail.split_once('.')?;
            if k == 0 {
                return (slot == "0").then(|| format!("conv_in.{child}"));
            }
            if k.is_multiple_of(per) {
                // The downsampler closing level k/per - 1.
                let conv = child.strip_prefix("op.")?;
                return Some(format!(
                    "down_blocks.{}.downsamplers.0.conv.{conv}",
                    k / per - 1
                ));
            }
            let (i, j) = ((k - 1) / per, (k - 1) % per);
            match slot {
                "0" => Some(format!(
                    "down_blocks.{i}.resnets.{j}.{}",
                    resnet_child(child)?
                )),
                "1" => Some(format!("down_blocks.{i}.attentions.{j}.{child}")),
                _ => None,
            }
        }
        "middle_block" => match k {
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                k / 2,
                resnet_child(tail)?
            )),
            1 => Some(format!("mid_block.attentions.0.{tail}")),
            _ => None,
        },
        "output_blocks" => {
            let (i, j) = (k / per, k % per);
            let (slot, child) = tail.split_once('.')?;
            // An upsampler sits after the res block (slot 1) or after the attention (slot 2).
            if let Some(conv) = child.strip_prefix("conv.") {
                return Some(format!("up_blocks.{i}.upsamplers.0.conv.{conv}"));
            }
            match slot {
                "0" => Some(format!(
                    "up_blocks.{i}.resnets.{j}.{}",
                    resnet_child(child)?
                )),
                "1" => Some(format!("up_blocks.{i}.attentions.{j}.{child}")),
                _ => None,
            }
        }
        _ => None,
    }
}

fn vae(rest: &str, levels: usize) -> Option<String> {
    let (side, tail) = rest.split_once('.')?;
    let tail = match side {
        "encoder" | "decoder" => tail,
        "quant_conv" | "post_quant_conv" => return Some(rest.to_owned()),
        _ => return None,
    };
    let body = if let Some(t) = tail.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{t}")
    } else if let Some(t) = tail.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{t}")
    } else if let Some(t) = tail.strip_prefix("mid.attn_1.") {
        let (child, param) = t.split_once('.')?;
        let child = match child {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{child}.{param}")
    } else if let Some(t) = tail.strip_prefix("norm_out.") {
        format!("conv_norm_out.{t}")
    } else if let Some(t) = tail
        .strip_prefix("down.")
        .filter(|_| side == "encoder")
        .or_else(|| tail.strip_prefix("up.").filter(|_| side == "decoder"))
    {
        let (level, kind, t) = split2(t)?;
        let level: usize = level.parse().ok()?;
        let (blocks, i) = if side == "encoder" {
            ("down_blocks", level)
        } else {
            // LDM numbers the decoder's levels from the bottom, diffusers from the top.
            ("up_blocks", levels.checked_sub(level + 1)?)
        };
        match kind {
            "block" => {
                let (j, t) = t.split_once('.')?;
                let t = t.replace("nin_shortcut.", "conv_shortcut.");
                format!("{blocks}.{i}.resnets.{j}.{t}")
            }
            "downsample" | "upsample" => {
                let sampler = if kind == "downsample" {
                    "downsamplers"
                } else {
                    "upsamplers"
                };
                format!("{blocks}.{i}.{sampler}.0.{t}")
            }
            _ => return None,
        }
    } else {
        tail.to_owned()
    };
    Some(format!("{side}.{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: Layout = Layout {
        unet_layers: 2,
        vae_levels: 4,
    };

    fn unet_name(ldm: &str) -> String {
        match rename(&format!("{UNET_PREFIX}{ldm}"), SD15) {
            Some((Part::Unet, n)) => n,
            other => panic!("{ldm}: {other:?}"),
        }
    }

    #[test]
    fn sd15_unet_names_follow_the_published_table() {
        // The SD1.5 rows of the table in diffusers' and sd-scripts' converters.
        for (ldm, diffusers) in [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.11.0.out_layers.3.weight",
                "down_blocks.3.resnets.1.conv2.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            (
                "middle_block.1.proj_out.weight",
                "mid_block.attentions.0.proj_out.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.11.0.in_layers.2.weight",
                "up_blocks.3.resnets.2.conv1.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ] {
            assert_eq!(unet_name(ldm), diffusers, "{ldm}");
        }
    }

    #[test]
    fn ldm_style_lora_names_reach_diffusers_modules() {
        for (ldm, diffusers) in [
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            (
                "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_8_0_skip_connection",
                "up_blocks_2_resnets_2_conv_shortcut",
            ),
            ("time_embed_0", "time_embedding_linear_1"),
            ("out_2", "conv_out"),
        ] {
            assert_eq!(ldm_lora_module(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(ldm_lora_module("down_blocks_0_resnets_0_conv1", 2), None);
    }

    #[test]
    fn vae_and_clip_names_and_ignored_tensors() {
        let vae = |ldm: &str| rename(&format!("{VAE_PREFIX}{ldm}"), SD15).map(|(_, n)| n);
        assert_eq!(
            vae("decoder.up.0.block.2.conv1.weight").as_deref(),
            Some("decoder.up_blocks.3.resnets.2.conv1.weight")
        );
        assert_eq!(
            vae("decoder.up.3.upsample.conv.bias").as_deref(),
            Some("decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            vae("encoder.down.1.block.0.nin_shortcut.weight").as_deref(),
            Some("encoder.down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            vae("decoder.mid.attn_1.proj_out.weight").as_deref(),
            Some("decoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(
            vae("decoder.norm_out.bias").as_deref(),
            Some("decoder.conv_norm_out.bias")
        );
        assert_eq!(
            vae("post_quant_conv.weight").as_deref(),
            Some("post_quant_conv.weight")
        );
        assert_eq!(
            rename(
                "cond_stage_model.transformer.embeddings.token_embedding.weight",
                SD15
            ),
            Some((
                Part::TextEncoder,
                "text_model.embeddings.token_embedding.weight".to_owned()
            ))
        );
        for ignored in [
            "cond_stage_model.transformer.text_model.embeddings.position_ids",
            "model_ema.diffusion_modelinput_blocks00weight",
            "alphas_cumprod",
            "model.diffusion_model.label_emb.0.0.weight",
        ] {
            assert_eq!(rename(ignored, SD15), None, "{ignored}");
        }
    }
}
