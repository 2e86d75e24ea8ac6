//! The VAE decoder: diffusers' `AutoencoderKL.decode`, built from `vae/config.json`.
//!
//! Owns the VAE config (including `scaling_factor`), the mid block both halves share (resnet,
//! single-head spatial attention, resnet) and the decoder path from latents to images in about
//! [-1, 1]: `post_quant_conv`, `conv_in`, the mid block, `UpDecoderBlock2D`s and the output
//! head. The encoder, over the same config and weights file, is [`super::vae_encoder`].

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use serde::Deserialize;

use crate::engine::error::{EngineError, Result as EngineResult};
use crate::engine::load::weights::{Conv2d, GroupNorm, Params};
use crate::engine::nets::layers::{Attention, ResnetBlock, ResnetConfig, Upsample};
use crate::engine::tiling::TileGrid;

/// diffusers hard-codes this epsilon for every VAE norm.
pub(super) const VAE_NORM_EPS: f64 = 1e-6;

/// The fields of a diffusers `vae/config.json` the encoder and decoder (and the tiled decode)
/// need. Defaults are diffusers' `AutoencoderKL` defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub(crate) struct VaeConfig {
    pub(super) in_channels: usize,
    out_channels: usize,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    pub(super) block_out_channels: Vec<usize>,
    pub(super) layers_per_block: usize,
    act_fn: String,
    pub(super) latent_channels: usize,
    pub(super) norm_num_groups: usize,
    scaling_factor: f64,
    shift_factor: Option<f64>,
    pub(super) use_quant_conv: bool,
    use_post_quant_conv: bool,
    mid_block_add_attention: bool,
    force_upcast: bool,
    /// The native image size in pixels: a side, or `[h, w]` (diffusers takes the first).
    sample_size: SampleSize,
}

/// `sample_size` as diffusers configs write it: one side, or a list whose first entry counts.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum SampleSize {
    Side(usize),
    Sides(Vec<usize>),
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_owned()],
            up_block_types: vec!["UpDecoderBlock2D".to_owned()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_owned(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
            sample_size: SampleSize::Side(32),
        }
    }
}

impl VaeConfig {
    /// Parses and validates `vae/config.json`.
    pub(crate) fn from_json(path: &Path, json: &str) -> EngineResult<Self> {
        let bad = |reason: String| EngineError::Config {
            path: path.to_owned(),
            reason,
        };
        let c: Self = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let n = c.block_out_channels.len();
        if n == 0 || c.up_block_types.len() != n || c.down_block_types.len() != n {
            return Err(bad(
                "down_block_types, up_block_types and block_out_channels must have \
                 the same non-zero length"
                    .to_owned(),
            ));
        }
        if let Some(t) = c.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(bad(format!("unsupported up block type {t}")));
        }
        if let Some(t) = c
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(bad(format!("unsupported down block type {t}")));
        }
        if c.act_fn != "silu" {
            return Err(bad(format!("unsupported act_fn {}", c.act_fn)));
        }
        if c.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(bad("shift_factor is not supported".to_owned()));
        }
        if let Some(ch) = c
            .block_out_channels
            .iter()
            .find(|&&ch| c.norm_num_groups == 0 || !ch.is_multiple_of(c.norm_num_groups))
        {
            return Err(bad(format!(
                "{ch} channels are not divisible into {} groups",
                c.norm_num_groups
            )));
        }
        c.tile_grid().map_err(bad)?;
        Ok(c)
    }

    /// The tiles diffusers' `tiled_decode` cuts a latent into, from `sample_size` and the
    /// number of levels.
    pub(crate) fn tile_grid(&self) -> std::result::Result<TileGrid, String> {
        let side = match &self.sample_size {
            SampleSize::Side(s) => Some(*s),
            SampleSize::Sides(s) => s.first().copied(),
        };
        let side = side.ok_or("sample_size is an empty list")?;
        TileGrid::new(side, self.block_out_channels.len())
    }

    /// Latents are divided by this before decoding.
    pub(crate) fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// Whether the VAE must run in f32 even when the rest runs in f16 (SD1.5's VAE overflows
    /// in f16; diffusers upcasts it).
    pub(crate) fn force_upcast(&self) -> bool {
        self.force_upcast
    }

    /// Channels of a latent.
    pub(crate) fn latent_channels(&self) -> usize {
        self.latent_channels
    }
}

/// A VAE resnet (no time embedding) from `input` to `output` channels.
pub(super) fn vae_resnet(c: &VaeConfig, input: usize, output: usize) -> ResnetConfig {
    ResnetConfig {
        input,
        output,
        temb: None,
        groups: c.norm_num_groups,
        eps: VAE_NORM_EPS,
        output_scale_factor: 1.0,
    }
}

/// diffusers' `UNetMidBlock2D` as both VAE halves build it: resnet, single-head spatial
/// self-attention over all positions (with its residual; absent when
/// `mid_block_add_attention` is false), resnet.
#[derive(Debug)]
pub(super) struct VaeMidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<(GroupNorm, Attention)>,
}

impl VaeMidBlock {
    /// The mid block under `p` (`encoder.mid_block` or `decoder.mid_block`).
    pub(super) fn new(p: &Params, c: &VaeConfig, channels: usize) -> EngineResult<Self> {
        let attention = if c.mid_block_add_attention {
            let ap = p.pp("attentions.0");
            Some((
                ap.pp("group_norm")
                    .group_norm(c.norm_num_groups, channels, VAE_NORM_EPS)?,
                Attention::new(&ap, channels, channels, 1, channels, true)?,
            ))
        } else {
            None
        };
        let resnet = vae_resnet(c, channels, channels);
        Ok(Self {
            resnets: [
                ResnetBlock::new(&p.pp("resnets.0"), resnet)?,
                ResnetBlock::new(&p.pp("resnets.1"), resnet)?,
            ],
            attention,
        })
    }

    pub(super) fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(h, None)?;
        if let Some((norm, attention)) = &self.attention {
            let (b, c, height, width) = h.dims4()?;
            let tokens = norm
                .forward(&h)?
                .reshape((b, c, height * width))?
                .transpose(1, 2)?;
            let out = attention.forward(&tokens, None)?;
            let out = out.transpose(1, 2)?.reshape((b, c, height, width))?;
            h = (out + h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// The decoder half of diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub(crate) struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: VaeMidBlock,
    up: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Builds the decoder described by `c` from the VAE weights root `p`.
    pub(crate) fn new(p: &Params, c: &VaeConfig) -> EngineResult<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let top = ch[n - 1];
        let resnet = |input, output| vae_resnet(c, input, output);
        let d = p.pp("decoder");
        let mut up = Vec::with_capacity(n);
        let mut prev = top;
        for i in 0..n {
            let bp = d.pp("up_blocks").pp(i);
            let output = ch[n - 1 - i];
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let input = if j == 0 { prev } else { output };
                    ResnetBlock::new(&bp.pp("resnets").pp(j), resnet(input, output))
                })
                .collect::<EngineResult<_>>()?;
            let upsample = (i + 1 < n)
                .then(|| Upsample::new(&bp.pp("upsamplers.0"), output))
                .transpose()?;
            up.push((resnets, upsample));
            prev = output;
        }
        let latent = c.latent_channels;
        Ok(Self {
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| p.pp("post_quant_conv").conv2d(latent, latent, 1, 1, 0))
                .transpose()?,
            conv_in: d.pp("conv_in").conv2d(latent, top, 3, 1, 1)?,
            mid: VaeMidBlock::new(&d.pp("mid_block"), c, top)?,
            up,
            norm_out: GroupNorm::with_silu(
                &d.pp("conv_norm_out"),
                c.norm_num_groups,
                ch[0],
                VAE_NORM_EPS,
            )?,
            conv_out: d.pp("conv_out").conv2d(ch[0], c.out_channels, 3, 1, 1)?,
        })
    }

    /// Decodes already-unscaled latents (`latents / scaling_factor`) to `[b, 3, 8h, 8w]`.
    pub(crate) fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        let mut h = self.mid.forward(&self.conv_in.forward(&z)?)?;
        for (resnets, upsample) in &self.up {
            for resnet in resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(up) = upsample {
                h = up.forward(&h, None)?;
            }
        }
        let h = self.norm_out.forward(&h)?;
        self.conv_out.forward(&h)
    }
}
