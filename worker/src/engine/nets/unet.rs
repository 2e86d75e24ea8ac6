//! The denoising UNet: diffusers' `UNet2DConditionModel`, built from its `config.json`.
//!
//! Owns the UNet config (parsed and validated; real SD1.5 and the tiny test model take the
//! same path) and its forward pass: timestep embedding, `conv_in`, down blocks
//! (`CrossAttnDownBlock2D` / `DownBlock2D`), `UNetMidBlock2DCrossAttn`, up blocks
//! (`CrossAttnUpBlock2D` / `UpBlock2D`) with skip connections, and the output head. Features
//! SD1.5 does not use (class embeddings, added conditioning, `time_cond_proj_dim`, ...) are
//! rejected at load rather than ignored.

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use serde::Deserialize;

use crate::engine::error::{EngineError, Result as EngineResult};
use crate::engine::load::weights::{Conv2d, GroupNorm, Linear, Params};
use crate::engine::nets::layers::{
    Downsample, ResnetBlock, ResnetConfig, Transformer2D, TransformerConfig, Upsample,
    guidance_embedding, timestep_embedding,
};

/// A config value that diffusers accepts either once for all blocks or once per block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub(crate) enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, blocks: usize, name: &str, path: &Path) -> EngineResult<Vec<usize>> {
        match self {
            Self::One(v) => Ok(vec![*v; blocks]),
            Self::Many(v) if v.len() == blocks => Ok(v.clone()),
            Self::Many(v) => Err(config_error(
                path,
                format!("{name} has {} values for {blocks} blocks", v.len()),
            )),
        }
    }
}

/// The fields of a diffusers `unet/config.json` that shape the network. Defaults are
/// diffusers' `UNet2DConditionModel` defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub(crate) struct UNetConfig {
    in_channels: usize,
    out_channels: usize,
    down_block_types: Vec<String>,
    mid_block_type: Option<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    layers_per_block: PerBlock,
    transformer_layers_per_block: PerBlock,
    attention_head_dim: PerBlock,
    num_attention_heads: Option<PerBlock>,
    cross_attention_dim: usize,
    norm_num_groups: usize,
    norm_eps: f64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    downsample_padding: usize,
    mid_block_scale_factor: f64,
    act_fn: String,
    use_linear_projection: bool,
    conv_in_kernel: usize,
    conv_out_kernel: usize,
    center_input_sample: bool,
    time_embedding_type: String,
    time_embedding_dim: Option<usize>,
    resnet_time_scale_shift: String,
    only_cross_attention: serde_json::Value,
    dual_cross_attention: bool,
    class_embed_type: Option<String>,
    num_class_embeds: Option<usize>,
    addition_embed_type: Option<String>,
    time_cond_proj_dim: Option<usize>,
    encoder_hid_dim: Option<usize>,
    timestep_post_act: Option<String>,
    resnet_skip_time_act: bool,
    resnet_out_scale_factor: f64,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Self {
            in_channels: 4,
            out_channels: 4,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_owned()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            cross_attention_dim: 1280,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".to_owned(),
            use_linear_projection: false,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            center_input_sample: false,
            time_embedding_type: "positional".to_owned(),
            time_embedding_dim: None,
            resnet_time_scale_shift: "default".to_owned(),
            only_cross_attention: serde_json::Value::Bool(false),
            dual_cross_attention: false,
            class_embed_type: None,
            num_class_embeds: None,
            addition_embed_type: None,
            time_cond_proj_dim: None,
            encoder_hid_dim: None,
            timestep_post_act: None,
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
        }
    }
}

fn config_error(path: &Path, reason: String) -> EngineError {
    EngineError::Config {
        path: path.to_owned(),
        reason,
    }
}

/// Per-block sizes resolved from a validated [`UNetConfig`].
#[derive(Clone, Debug)]
struct Resolved {
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    heads: Vec<usize>,
    temb: usize,
}

impl UNetConfig {
    /// Parses `unet/config.json`.
    pub(crate) fn from_json(path: &Path, json: &str) -> EngineResult<Self> {
        serde_json::from_str(json).map_err(|e| config_error(path, e.to_string()))
    }

    /// The latent channel count the UNet takes.
    pub(crate) fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// The width of the text embeddings it cross-attends to.
    pub(crate) fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dim
    }

    fn resolve(&self, path: &Path) -> EngineResult<Resolved> {
        let bad = |reason: String| Err(config_error(path, reason));
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "block_out_channels, down_block_types and up_block_types must have the same \
                 non-zero length (got {n}, {}, {})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!("unsupported down block type {t}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!("unsupported up block type {t}"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return bad(format!(
                "unsupported mid_block_type {:?}",
                self.mid_block_type
            ));
        }
        let unsupported = [
            (self.act_fn != "silu", "act_fn other than silu"),
            (self.center_input_sample, "center_input_sample"),
            (
                self.time_embedding_type != "positional",
                "time_embedding_type other than positional",
            ),
            (
                self.resnet_time_scale_shift != "default",
                "resnet_time_scale_shift other than default",
            ),
            (
                self.only_cross_attention != serde_json::Value::Bool(false),
                "only_cross_attention",
            ),
            (self.dual_cross_attention, "dual_cross_attention"),
            (
                self.class_embed_type.is_some() || self.num_class_embeds.is_some(),
                "class embeddings",
            ),
            (self.addition_embed_type.is_some(), "addition_embed_type"),
            (self.encoder_hid_dim.is_some(), "encoder_hid_dim"),
            (self.timestep_post_act.is_some(), "timestep_post_act"),
            (self.resnet_skip_time_act, "resnet_skip_time_act"),
            (
                self.resnet_out_scale_factor != 1.0,
                "resnet_out_scale_factor other than 1",
            ),
            (
                self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2),
                "even conv_in/conv_out kernels",
            ),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
            return bad(format!("{what} is not supported"));
        }
        let heads_cfg = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let resolved = Resolved {
            layers: self.layers_per_block.expand(n, "layers_per_block", path)?,
            transformer_layers: self.transformer_layers_per_block.expand(
                n,
                "transformer_layers_per_block",
                path,
            )?,
            // SD1.5's `attention_head_dim` is really the number of heads (diffusers keeps the
            // misnomer: `num_attention_heads = num_attention_heads or attention_head_dim`).
            heads: heads_cfg.expand(n, "attention_head_dim", path)?,
            temb: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels[0] * 4),
        };
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            let heads = resolved.heads[i];
            if self.norm_num_groups == 0 || !ch.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "block {i}: {ch} channels are not divisible into {} groups",
                    self.norm_num_groups
                ));
            }
            if heads == 0 || !ch.is_multiple_of(heads) {
                return bad(format!(
                    "block {i}: {ch} channels are not divisible into {heads} heads"
                ));
            }
        }
        Ok(resolved)
    }
}

#[derive(Debug)]
struct Block {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

impl Block {
    fn forward_layer(
        &self,
        i: usize,
        h: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let h = self.resnets[i].forward(h, Some(temb))?;
        match self.attentions.get(i) {
            Some(attn) => attn.forward(&h, context),
            None => Ok(h),
        }
    }
}

/// diffusers' `UNet2DConditionModel` (SD1.x/2.x family).
#[derive(Debug)]
pub(crate) struct UNet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<(Block, Option<Downsample>)>,
    mid_first: ResnetBlock,
    mid: Block,
    up: Vec<(Block, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// LCM-distilled UNets: projects the guidance-scale embedding (`time_cond_proj_dim`
    /// wide) onto the timestep embedding.
    cond_proj: Option<(Linear, usize)>,
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl UNet {
    /// Builds the UNet described by `config` (read from `path`) from `p`.
    pub(crate) fn new(p: &Params, config: &UNetConfig, path: &Path) -> EngineResult<Self> {
        let r = config.resolve(path)?;
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let resnet = |input, output| ResnetConfig {
            input,
            output,
            temb: Some(r.temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale_factor: 1.0,
        };
        let transformer = |channels, block: usize| TransformerConfig {
            channels,
            heads: r.heads[block],
            layers: r.transformer_layers[block],
            context_dim: c.cross_attention_dim,
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
        };

        let mut down = Vec::with_capacity(n);
        let mut input = ch[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let bp = p.pp("down_blocks").pp(i);
            let output = ch[i];
            let mut block = Block {
                resnets: Vec::new(),
                attentions: Vec::new(),
            };
            for j in 0..r.layers[i] {
                let res_in = if j == 0 { input } else { output };
                let rc = resnet(res_in, output);
                block
                    .resnets
                    .push(ResnetBlock::new(&bp.pp("resnets").pp(j), rc)?);
                if kind == "CrossAttnDownBlock2D" {
                    let tc = transformer(output, i);
                    block
                        .attentions
                        .push(Transformer2D::new(&bp.pp("attentions").pp(j), tc)?);
                }
            }
            let downsample = (i + 1 < n)
                .then(|| Downsample::new(&bp.pp("downsamplers.0"), output, c.downsample_padding))
                .transpose()?;
            down.push((block, downsample));
            input = output;
        }

        let mp = p.pp("mid_block");
        let last = ch[n - 1];
        let mid_resnet = ResnetConfig {
            output_scale_factor: c.mid_block_scale_factor,
            ..resnet(last, last)
        };
        let mid_first = ResnetBlock::new(&mp.pp("resnets.0"), mid_resnet)?;
        let mid = Block {
            resnets: vec![ResnetBlock::new(&mp.pp("resnets.1"), mid_resnet)?],
            attentions: vec![Transformer2D::new(
                &mp.pp("attentions.0"),
                transformer(last, n - 1),
            )?],
        };

        let mut up = Vec::with_capacity(n);
        let mut prev_output = ch[n - 1];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let bp = p.pp("up_blocks").pp(i);
            let rev = n - 1 - i;
            let output = ch[rev];
            let skip_input = ch[rev.saturating_sub(1)];
            let layers = r.layers[rev] + 1;
            let mut block = Block {
                resnets: Vec::new(),
                attentions: Vec::new(),
            };
            for j in 0..layers {
                let skip = if j == layers - 1 { skip_input } else { output };
                let res_in = if j == 0 { prev_output } else { output };
                let rc = resnet(res_in + skip, output);
                block
                    .resnets
                    .push(ResnetBlock::new(&bp.pp("resnets").pp(j), rc)?);
                if kind == "CrossAttnUpBlock2D" {
                    let tc = transformer(output, rev);
                    block
                        .attentions
                        .push(Transformer2D::new(&bp.pp("attentions").pp(j), tc)?);
                }
            }
            let upsample = (i + 1 < n)
                .then(|| Upsample::new(&bp.pp("upsamplers.0"), output))
                .transpose()?;
            up.push((block, upsample));
            prev_output = output;
        }

        let (k_in, k_out) = (c.conv_in_kernel, c.conv_out_kernel);
        Ok(Self {
            conv_in: p
                .pp("conv_in")
                .conv2d(c.in_channels, ch[0], k_in, 1, (k_in - 1) / 2)?,
            time_linear_1: p
                .pp("time_embedding.linear_1")
                .linear(ch[0], r.temb, true)?,
            time_linear_2: p
                .pp("time_embedding.linear_2")
                .linear(r.temb, r.temb, true)?,
            down,
            mid_first,
            mid,
            up,
            norm_out: GroupNorm::with_silu(
                &p.pp("conv_norm_out"),
                c.norm_num_groups,
                ch[0],
                c.norm_eps,
            )?,
            conv_out: p
                .pp("conv_out")
                .conv2d(ch[0], c.out_channels, k_out, 1, (k_out - 1) / 2)?,
            cond_proj: c
                .time_cond_proj_dim
                .map(|dim| {
                    p.pp("time_embedding.cond_proj")
                        .linear(dim, ch[0], false)
                        .map(|l| (l, dim))
                })
                .transpose()?,
            time_proj_dim: ch[0],
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
        })
    }

    /// The width of the guidance-scale embedding an LCM-distilled UNet takes, if it takes one.
    pub(crate) fn guidance_embedding_dim(&self) -> Option<usize> {
        self.cond_proj.as_ref().map(|(_, dim)| *dim)
    }

    /// Predicts the noise in `sample` (`[b, c, h, w]`) at `timestep`, conditioned on
    /// `context` (`[b, tokens, cross_attention_dim]`); an LCM-distilled UNet also on
    /// `guidance_scale` (ignored by others).
    pub(crate) fn forward(
        &self,
        sample: &Tensor,
        timestep: f32,
        context: &Tensor,
        guidance_scale: f32,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let t_emb = timestep_embedding(
            timestep,
            batch,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            sample.device(),
        )?
        .to_dtype(sample.dtype())?;
        let t_emb = match &self.cond_proj {
            Some((proj, dim)) => {
                let w = guidance_embedding(guidance_scale, batch, *dim, sample.device())?
                    .to_dtype(sample.dtype())?;
                (t_emb + proj.forward(&w)?)?
            }
            None => t_emb,
        };
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for (block, downsample) in &self.down {
            for i in 0..block.resnets.len() {
                h = block.forward_layer(i, &h, &temb, context)?;
                skips.push(h.clone());
            }
            if let Some(down) = downsample {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }

        h = self.mid_first.forward(&h, Some(&temb))?;
        h = self.mid.attentions[0].forward(&h, context)?;
        h = self.mid.resnets[0].forward(&h, Some(&temb))?;

        for (block, upsample) in &self.up {
            for i in 0..block.resnets.len() {
                // `skips` holds exactly one entry per resnet of the up path, by construction.
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("UNet skip connections exhausted".to_owned())
                })?;
                h = Tensor::cat(&[&h, &skip], 1)?;
                h = block.forward_layer(i, &h, &temb, context)?;
            }
            if let Some(up) = upsample {
                // Upsample to the next skip's size, as diffusers does for odd latent sizes.
                let size = match skips.last() {
                    Some(s) => Some((s.dim(2)?, s.dim(3)?)),
                    None => None,
                };
                h = up.forward(&h, size)?;
            }
        }

        let h = self.norm_out.forward(&h)?;
        self.conv_out.forward(&h)
    }
}
