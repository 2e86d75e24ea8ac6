//! The VAE encoder: diffusers' `AutoencoderKL.encode`, for img2img and hires fix.
//!
//! Owns the path from an image in [-1, 1] to the diagonal Gaussian over latents: `conv_in`,
//! `DownEncoderBlock2D`s (resnets, then a stride-2 convolution after diffusers' asymmetric
//! right/bottom padding on every level but the last), the mid block shared with the decoder,
//! `conv_norm_out`, SiLU, `conv_out` to twice the latent channels and `quant_conv`; then the
//! split into mean and log-variance, the latter clamped to [-30, 20] as
//! `DiagonalGaussianDistribution` does. It reads the same `vae/` config and weights as
//! [`super::vae`]. Scaling by `scaling_factor` and drawing a sample are the caller's.

use candle_core::{Module, Result, Tensor};

use crate::engine::error::Result as EngineResult;
use crate::engine::load::weights::{Conv2d, GroupNorm, Params};
use crate::engine::nets::layers::{Downsample, ResnetBlock};
use crate::engine::nets::vae::{VAE_NORM_EPS, VaeConfig, VaeMidBlock, vae_resnet};

/// `DiagonalGaussianDistribution` clamps the log-variance to this range.
const LOGVAR_RANGE: (f32, f32) = (-30.0, 20.0);

/// The encoder half of diffusers' `AutoencoderKL`, with `quant_conv`.
#[derive(Debug)]
pub(crate) struct VaeEncoder {
    in_channels: usize,
    latent_channels: usize,
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid: VaeMidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    /// Builds the encoder described by `c` from the VAE weights root `p`.
    pub(crate) fn new(p: &Params, c: &VaeConfig) -> EngineResult<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let top = ch[n - 1];
        let e = p.pp("encoder");
        let mut down = Vec::with_capacity(n);
        let mut prev = ch[0];
        for (i, &output) in ch.iter().enumerate() {
            let bp = e.pp("down_blocks").pp(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let input = if j == 0 { prev } else { output };
                    ResnetBlock::new(&bp.pp("resnets").pp(j), vae_resnet(c, input, output))
                })
                .collect::<EngineResult<_>>()?;
            // `downsample_padding=0`: diffusers pads (0, 1, 0, 1) and convolves unpadded.
            let downsample = (i + 1 < n)
                .then(|| Downsample::new(&bp.pp("downsamplers.0"), output, 0))
                .transpose()?;
            down.push((resnets, downsample));
            prev = output;
        }
        let moments = 2 * c.latent_channels;
        Ok(Self {
            in_channels: c.in_channels,
            latent_channels: c.latent_channels,
            conv_in: e.pp("conv_in").conv2d(c.in_channels, ch[0], 3, 1, 1)?,
            down,
            mid: VaeMidBlock::new(&e.pp("mid_block"), c, top)?,
            norm_out: GroupNorm::with_silu(
                &e.pp("conv_norm_out"),
                c.norm_num_groups,
                top,
                VAE_NORM_EPS,
            )?,
            conv_out: e.pp("conv_out").conv2d(top, moments, 3, 1, 1)?,
            quant_conv: c
                .use_quant_conv
                .then(|| p.pp("quant_conv").conv2d(moments, moments, 1, 1, 0))
                .transpose()?,
        })
    }

    /// Channels of the image it takes (3 for RGB).
    pub(crate) fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Encodes `[b, in_channels, h, w]` (values in [-1, 1]) to the mean and the clamped
    /// log-variance, each `[b, latent_channels, h/8, w/8]`, unscaled, in the input's dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, downsample) in &self.down {
            for resnet in resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(down) = downsample {
                h = down.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        let h = self.norm_out.forward(&h)?;
        let mut moments = self.conv_out.forward(&h)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let c = self.latent_channels;
        let mean = moments.narrow(1, 0, c)?.contiguous()?;
        let logvar = moments
            .narrow(1, c, c)?
            .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?;
        Ok((mean, logvar))
    }
}
