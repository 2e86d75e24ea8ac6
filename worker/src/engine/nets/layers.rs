//! Building blocks shared by the UNet and the VAE, written to compute what diffusers computes.
//!
//! Owns `ResnetBlock2D`, diffusers' `Attention` (self, cross and the VAE's single-head
//! spatial attention), `Transformer2DModel` with `BasicTransformerBlock` and an exact-erf
//! GEGLU feed-forward, the 2× down/upsamplers and the sinusoidal timestep embedding. Tensors
//! are NCHW as in PyTorch; weight names follow diffusers so LoRA keys map onto them.

use candle_core::{Device, Module, Result, Tensor};

use crate::engine::error::Result as EngineResult;
use crate::engine::load::weights::{Conv2d, GroupNorm, LayerNorm, Linear, Params};
use crate::engine::nets::attention::scaled_dot_product_attention;
use crate::engine::nets::fused;
use crate::engine::profile::{OpKind, timed};

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"` and SiLU.
#[derive(Debug)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Sizes of one [`ResnetBlock`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResnetConfig {
    pub(crate) input: usize,
    pub(crate) output: usize,
    /// Width of the time embedding, `None` in the VAE.
    pub(crate) temb: Option<usize>,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) output_scale_factor: f64,
}

impl ResnetBlock {
    pub(crate) fn new(p: &Params, c: ResnetConfig) -> EngineResult<Self> {
        Ok(Self {
            norm1: GroupNorm::with_silu(&p.pp("norm1"), c.groups, c.input, c.eps)?,
            conv1: p.pp("conv1").conv2d(c.input, c.output, 3, 1, 1)?,
            time_emb_proj: c
                .temb
                .map(|t| p.pp("time_emb_proj").linear(t, c.output, true))
                .transpose()?,
            norm2: GroupNorm::with_silu(&p.pp("norm2"), c.groups, c.output, c.eps)?,
            conv2: p.pp("conv2").conv2d(c.output, c.output, 3, 1, 1)?,
            conv_shortcut: (c.input != c.output)
                .then(|| p.pp("conv_shortcut").conv2d(c.input, c.output, 1, 1, 0))
                .transpose()?,
            output_scale_factor: c.output_scale_factor,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?)?;
        let x = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Attention`: multi-head scaled dot-product attention with `to_q/to_k/to_v` and
/// `to_out.0`.
#[derive(Debug)]
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `query_dim` → `heads × head_dim`; keys and values come from a `context_dim` context.
    pub(crate) fn new(
        p: &Params,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> EngineResult<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: p.pp("to_q").linear(query_dim, inner, qkv_bias)?,
            to_k: p.pp("to_k").linear(context_dim, inner, qkv_bias)?,
            to_v: p.pp("to_v").linear(context_dim, inner, qkv_bias)?,
            to_out: p.pp("to_out.0").linear(inner, query_dim, true)?,
            heads,
            head_dim,
        })
    }

    /// `x`: `[batch, tokens, query_dim]`; `context`: `[batch, ctx_tokens, context_dim]` or
    /// `None` for self-attention.
    pub(crate) fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = scaled_dot_product_attention(&q, &k, &v, None)?;
        let (b, _, n, _) = out.dims4()?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        self.to_out.forward(&out)
    }

    /// `[b, n, heads·d]` → `[b, heads, n, d]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// `GEGLU` + `Linear`: diffusers' `FeedForward(activation_fn="geglu")`, with the exact erf
/// GELU of `F.gelu`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(p: &Params, dim: usize) -> EngineResult<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: p.pp("net.0.proj").linear(dim, inner * 2, true)?,
            out: p.pp("net.2").linear(inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(x)?;
        let gated = timed(OpKind::Geglu, || fused::geglu(&projected))?;
        self.out.forward(&gated)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(p: &Params, dim: usize, context_dim: usize, heads: usize) -> EngineResult<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: p.pp("norm1").layer_norm(dim, 1e-5)?,
            attn1: Attention::new(&p.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: p.pp("norm2").layer_norm(dim, 1e-5)?,
            attn2: Attention::new(&p.pp("attn2"), dim, context_dim, heads, head_dim, false)?,
            norm3: p.pp("norm3").layer_norm(dim, 1e-5)?,
            ff: FeedForward::new(&p.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }
}

/// `proj_in`/`proj_out`: a 1×1 convolution (SD1.5) or a linear layer
/// (`use_linear_projection`, SD2).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Sizes of one [`Transformer2D`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct TransformerConfig {
    pub(crate) channels: usize,
    pub(crate) heads: usize,
    pub(crate) layers: usize,
    pub(crate) context_dim: usize,
    pub(crate) groups: usize,
    pub(crate) linear_projection: bool,
}

/// diffusers' `Transformer2DModel` for continuous (latent image) input.
#[derive(Debug)]
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    pub(crate) fn new(p: &Params, c: TransformerConfig) -> EngineResult<Self> {
        let ch = c.channels;
        let projection = |name: &str| -> EngineResult<Projection> {
            Ok(if c.linear_projection {
                Projection::Linear(p.pp(name).linear(ch, ch, true)?)
            } else {
                Projection::Conv(p.pp(name).conv2d(ch, ch, 1, 1, 0)?)
            })
        };
        let blocks = (0..c.layers)
            .map(|i| {
                TransformerBlock::new(
                    &p.pp("transformer_blocks").pp(i),
                    ch,
                    c.context_dim,
                    c.heads,
                )
            })
            .collect::<EngineResult<_>>()?;
        Ok(Self {
            // diffusers hard-codes eps 1e-6 for this norm.
            norm: p.pp("norm").group_norm(c.groups, ch, 1e-6)?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(linear) => to_image(&linear.forward(&tokens)?)?,
        };
        out + x
    }
}

/// diffusers' `Downsample2D` with a stride-2 3×3 convolution.
#[derive(Debug)]
pub(crate) struct Downsample {
    conv: Conv2d,
    /// `downsample_padding == 0`: pad right and bottom by one first, as diffusers does.
    pad_asymmetric: bool,
}

impl Downsample {
    pub(crate) fn new(p: &Params, channels: usize, padding: usize) -> EngineResult<Self> {
        Ok(Self {
            conv: p.pp("conv").conv2d(channels, channels, 3, 2, padding)?,
            pad_asymmetric: padding == 0,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_asymmetric {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour resize then a 3×3 convolution.
#[derive(Debug)]
pub(crate) struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub(crate) fn new(p: &Params, channels: usize) -> EngineResult<Self> {
        Ok(Self {
            conv: p.pp("conv").conv2d(channels, channels, 3, 1, 1)?,
        })
    }

    /// Resizes to `size` (`(h, w)`), or doubles when `None`.
    pub(crate) fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

/// diffusers' `get_timestep_embedding` for one timestep repeated over `batch`, in f32:
/// `exp(-ln(10000)·i/(half − shift))·t`, then `[sin, cos]` (or `[cos, sin]` when flipped).
pub(crate) fn timestep_embedding(
    timestep: f32,
    batch: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    // torch multiplies an f32 arange by the f64 constant rounded to f32, then divides.
    let log_period = -(10000f64.ln()) as f32;
    let divisor = (half as f64 - freq_shift) as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| timestep * (log_period * i as f32 / divisor).exp())
        .collect();
    let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
    let mut row = if flip_sin_to_cos {
        [cos, sin].concat()
    } else {
        [sin, cos].concat()
    };
    row.resize(dim, 0.0);
    Tensor::from_vec(row, (1, dim), device)?.repeat((batch, 1))
}

/// The guidance-scale embedding of diffusers' LCM pipelines (`get_guidance_scale_embedding`),
/// `[batch, dim]`: `w = (guidance_scale − 1)·1000`, then `[sin(w·f), cos(w·f)]` over
/// `f_i = exp(−i·ln(10000)/(dim/2 − 1))`, zero-padded to an odd `dim`; in f32 as torch computes it.
pub(crate) fn guidance_embedding(
    guidance_scale: f32,
    batch: usize,
    dim: usize,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let w = (guidance_scale - 1.0) * 1000.0;
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args.iter().map(|a| a.sin()).collect();
    row.extend(args.iter().map(|a| a.cos()));
    row.resize(dim, 0.0);
    Tensor::from_vec(row, (1, dim), device)?.repeat((batch, 1))
}
