//! Fused elementwise passes: the GEGLU gate, CLIP's quick GELU, and group norm with an optional
//! SiLU.
//!
//! Each reads its input once and writes its output once, where the unfused tensor code takes
//! a pass (and a fresh buffer) per operation: GEGLU's split, GELU and product; quick GELU's
//! scale, sigmoid and product; group norm's mean, centring, variance, normalisation, scale and
//! shift, then SiLU.

use rayon::prelude::*;

use crate::simd::{gelu, multiversion, sigmoid, silu};
use crate::{KernelError, check_len};

/// Elements per parallel task of the elementwise maps, GEGLU and quick GELU (about 256 KiB of
/// output).
const MAP_TASK: usize = 1 << 16;

/// diffusers' GEGLU gate: for each row of `x` (`2·inner` wide), `out = x[..inner] ·
/// gelu(x[inner..])` with the exact (erf) GELU; `out` has rows `inner` wide.
///
/// GELU goes through `erfc`, so it keeps a relative error of about 1e-6 down to x ≈ −6, where
/// `0.5·x·(1 + erf(x/√2))`, as PyTorch and candle write it, loses its relative accuracy from
/// x ≈ −3 on; the absolute difference between the two is under about 1e-7·|x|.
pub fn geglu(x: &[f32], inner: usize, out: &mut [f32]) -> Result<(), KernelError> {
    if inner == 0 || !out.len().is_multiple_of(inner) {
        return Err(KernelError::Shape(format!(
            "{} outputs are not rows of {inner}",
            out.len()
        )));
    }
    check_len("x", x, out.len() * 2)?;
    let rows_per_task = (MAP_TASK / inner).max(1);
    out.par_chunks_mut(rows_per_task * inner)
        .zip(x.par_chunks(rows_per_task * inner * 2))
        .for_each(|(out, x)| {
            for (out, x) in out.chunks_exact_mut(inner).zip(x.chunks_exact(2 * inner)) {
                let (hidden, gate) = x.split_at(inner);
                geglu_row(out, hidden, gate);
            }
        });
    Ok(())
}

multiversion! {
    fn geglu_row(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * gelu(g);
        }
    }
}

/// OpenAI CLIP's activation (transformers' `QuickGELUActivation`, SD1.5's text encoder):
/// `out = x·sigmoid(1.702·x)`, elementwise.
pub fn quick_gelu(x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    check_len("x", x, out.len())?;
    out.par_chunks_mut(MAP_TASK)
        .zip(x.par_chunks(MAP_TASK))
        .for_each(|(out, x)| quick_gelu_run(out, x));
    Ok(())
}

multiversion! {
    fn quick_gelu_run(out: &mut [f32], x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * sigmoid(1.702 * v);
        }
    }
}

/// Sizes of a group norm over NC… data: `batch × channels × spatial`, contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupNormShape {
    /// Batch size.
    pub batch: usize,
    /// Channels, a multiple of `groups`.
    pub channels: usize,
    /// Elements per channel (height × width).
    pub spatial: usize,
    /// Groups of consecutive channels normalised together.
    pub groups: usize,
}

/// `nn.GroupNorm(groups, channels, eps)` with affine `weight` and `bias` (one per channel),
/// followed by SiLU when `then_silu`.
///
/// Means and variances (biased, of the centred values, as PyTorch's) are summed in f64; the
/// output is `(x − mean)·(weight/√(var + eps)) + bias`.
pub fn group_norm(
    shape: GroupNormShape,
    eps: f32,
    weight: &[f32],
    bias: &[f32],
    then_silu: bool,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let GroupNormShape {
        batch,
        channels,
        spatial,
        groups,
    } = shape;
    if groups == 0 || !channels.is_multiple_of(groups) || spatial == 0 {
        return Err(KernelError::Shape(format!(
            "{shape:?}: channels must split into groups, spatial must not be empty"
        )));
    }
    check_len("weight", weight, channels)?;
    check_len("bias", bias, channels)?;
    check_len("x", x, batch * channels * spatial)?;
    check_len("out", out, batch * channels * spatial)?;
    let per_group = channels / groups;
    let group_len = per_group * spatial;
    out.par_chunks_mut(group_len)
        .zip(x.par_chunks(group_len))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let first = (i % groups) * per_group;
            let (mean, var) = mean_var(x);
            let inv_std = 1.0 / ((var as f32) + eps).sqrt();
            for (c, (out, x)) in out
                .chunks_exact_mut(spatial)
                .zip(x.chunks_exact(spatial))
                .enumerate()
            {
                let a = weight[first + c] * inv_std;
                let b = bias[first + c] - mean as f32 * a;
                affine(out, x, a, b, then_silu);
            }
        });
    Ok(())
}

/// Mean and biased variance of `x`, accumulated in f64.
fn mean_var(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = sum(x) / n;
    (mean, centred_squares(x, mean) / n)
}

/// f64 lanes of the group-norm sums.
const LANES: usize = 8;

multiversion! {
    fn sum(x: &[f32]) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += v as f64;
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}

multiversion! {
    fn centred_squares(x: &[f32], mean: f64) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                let c = v as f64 - mean;
                *a += c * c;
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}

multiversion! {
    /// `out = x·a + b`, then SiLU when `then_silu`.
    fn affine(out: &mut [f32], x: &[f32], a: f32, b: f32, then_silu: bool) {
        if then_silu {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = silu(v * a + b);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * a + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_matches_the_definition() {
        let shape = GroupNormShape {
            batch: 2,
            channels: 6,
            spatial: 37,
            groups: 3,
        };
        let n = 2 * 6 * 37;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 3.0)
            .collect();
        let weight: Vec<f32> = (0..6).map(|c| 0.5 + c as f32 * 0.25).collect();
        let bias: Vec<f32> = (0..6).map(|c| c as f32 * 0.1 - 0.2).collect();
        for silu_after in [false, true] {
            let mut out = vec![0f32; n];
            group_norm(shape, 1e-5, &weight, &bias, silu_after, &x, &mut out).unwrap();
            for (g, (x, out)) in x.chunks(74).zip(out.chunks(74)).enumerate() {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 74.0;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 74.0;
                for (i, (&v, &o)) in x.iter().zip(out).enumerate() {
                    let c = (g % 3) * 2 + i / 37;
                    let y =
                        (v as f64 - mean) / (var + 1e-5).sqrt() * weight[c] as f64 + bias[c] as f64;
                    let want = if silu_after {
                        y / (1.0 + (-y).exp())
                    } else {
                        y
                    };
                    assert!(
                        (o as f64 - want).abs() < 2e-6 * (1.0 + want.abs()),
                        "{o} {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn quick_gelu_matches_the_definition() {
        // Across the range where the sigmoid saturates both ways, and a length that leaves a
        // remainder in every vector width and task.
        let x: Vec<f32> = (0..70_001).map(|i| (i as f32 - 35_000.0) * 6e-4).collect();
        let mut out = vec![0f32; x.len()];
        quick_gelu(&x, &mut out).unwrap();
        for (&v, &o) in x.iter().zip(&out) {
            let v = v as f64;
            let want = v / (1.0 + (-(1.702f32 as f64) * v).exp());
            assert!(
                (o as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{v}: {o} against {want}"
            );
        }
        assert!(quick_gelu(&x, &mut out[1..]).is_err());
    }
}
