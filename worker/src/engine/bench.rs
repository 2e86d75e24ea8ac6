//! Test- and bench-only (`testing` feature): the engine's fused CPU steps next to the candle
//! code they replace, on random f32 inputs, for `worker/benches/attention.rs`.
//!
//! Owns no engine logic: each [`OpCase`] holds its inputs and calls the two paths the
//! networks choose between. Tensors stay inside; the API speaks sizes and seconds.

use candle_core::{Device, Tensor};

use crate::engine::error::Result;
use crate::engine::nets::attention::{scaled_dot_product_attention, unfused_attention};
use crate::engine::nets::fused::{GroupNorm, geglu, unfused_geglu};
use crate::engine::rng::TorchRng;

/// One operation on fixed random inputs.
pub struct OpCase(Case);

enum Case {
    Attention { q: Tensor, k: Tensor, v: Tensor },
    Geglu { x: Tensor },
    GroupNormSilu { x: Tensor, norm: GroupNorm },
}

fn randn(dims: &[usize], rng: &mut TorchRng) -> Result<Tensor> {
    let n = dims.iter().product();
    Ok(Tensor::from_vec(rng.randn(n), dims, &Device::Cpu)?)
}

impl OpCase {
    /// The attention core over `[1, heads, queries, head_dim]` queries and
    /// `[1, heads, keys, head_dim]` keys and values.
    pub fn attention(heads: usize, queries: usize, keys: usize, head_dim: usize) -> Result<Self> {
        let mut rng = TorchRng::new(1);
        Ok(Self(Case::Attention {
            q: randn(&[1, heads, queries, head_dim], &mut rng)?,
            k: randn(&[1, heads, keys, head_dim], &mut rng)?,
            v: randn(&[1, heads, keys, head_dim], &mut rng)?,
        }))
    }

    /// The GEGLU gate on `[1, tokens, 2·inner]`.
    pub fn geglu(tokens: usize, inner: usize) -> Result<Self> {
        let mut rng = TorchRng::new(2);
        Ok(Self(Case::Geglu {
            x: randn(&[1, tokens, 2 * inner], &mut rng)?,
        }))
    }

    /// Group norm then SiLU on `[1, channels, height, width]`.
    pub fn group_norm_silu(
        channels: usize,
        height: usize,
        width: usize,
        groups: usize,
    ) -> Result<Self> {
        let mut rng = TorchRng::new(3);
        let x = randn(&[1, channels, height, width], &mut rng)?;
        let weight = ((randn(&[channels], &mut rng)? * 0.2)? + 1.0)?;
        let bias = (randn(&[channels], &mut rng)? * 0.2)?;
        let norm = GroupNorm::from_tensors(weight, bias, groups, 1e-5, true)?;
        Ok(Self(Case::GroupNormSilu { x, norm }))
    }

    fn output(&self, fused: bool) -> Result<Tensor> {
        Ok(match (&self.0, fused) {
            (Case::Attention { q, k, v }, true) => scaled_dot_product_attention(q, k, v, None)?,
            (Case::Attention { q, k, v }, false) => unfused_attention(q, k, v, None)?,
            (Case::Geglu { x }, true) => geglu(x)?,
            (Case::Geglu { x }, false) => unfused_geglu(x)?,
            (Case::GroupNormSilu { x, norm }, true) => norm.forward(x)?,
            (Case::GroupNormSilu { x, norm }, false) => norm.unfused(x)?,
        })
    }

    /// Runs the fused CPU path (`fused`) or the candle operations it replaces once; seconds.
    pub fn time(&self, fused: bool) -> Result<f64> {
        let start = std::time::Instant::now();
        self.output(fused)?;
        Ok(start.elapsed().as_secs_f64())
    }

    /// `max |fused − unfused| / max |unfused|`.
    pub fn relative_difference(&self) -> Result<f32> {
        let (new, old) = (self.output(true)?, self.output(false)?);
        let max =
            |t: &Tensor| -> Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?) };
        Ok(max(&(&new - &old)?)? / max(&old)?)
    }
}
