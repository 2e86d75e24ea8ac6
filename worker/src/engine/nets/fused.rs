//! Elementwise steps fused into one pass on the CPU: the GEGLU gate, CLIP's quick GELU, and group
//! norm (followed by SiLU where the network has one).
//!
//! On the CPU in f32 each runs a `kiln_kernels` pass that reads its input once; anywhere else
//! (GPUs, f16/bf16) the same candle operations as before, in the same order. Owns the
//! [`GroupNorm`] of the networks' resnets, attention blocks and output heads; knows nothing of
//! the layers around these steps.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Module, Result, Shape, Tensor};

use crate::engine::error::Result as EngineResult;
use crate::engine::load::weights::Params;
use crate::engine::nets::attention::host_f32;
use crate::engine::profile::{OpKind, timed};

/// diffusers' GEGLU gate on `[…, 2·inner]`: `x[.., :inner] · gelu(x[.., inner:])` with the
/// exact (erf) GELU.
pub(crate) fn geglu(projected: &Tensor) -> Result<Tensor> {
    if projected.device().is_cpu() && projected.dtype() == DType::F32 {
        return projected.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    unfused_geglu(projected)
}

/// [`geglu`] as separate candle operations: the path off the CPU or in f16/bf16.
pub(crate) fn unfused_geglu(projected: &Tensor) -> Result<Tensor> {
    let half = projected.dim(D::Minus1)? / 2;
    let hidden = projected.narrow(D::Minus1, 0, half)?;
    let gate = projected.narrow(D::Minus1, half, half)?;
    hidden * gate.gelu_erf()?
}

/// [`geglu`] as a candle operation, CPU only.
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "kiln-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = layout.shape().dims().to_vec();
        let Some(last) = dims.last_mut().filter(|d| **d % 2 == 0) else {
            candle_core::bail!(
                "GEGLU input {:?} has no even last dimension",
                layout.shape()
            );
        };
        *last /= 2;
        let inner = *last;
        let mut out = vec![0f32; layout.shape().elem_count() / 2];
        kiln_kernels::geglu(host_f32(storage, layout)?, inner, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// transformers' `QuickGELUActivation` (OpenAI CLIP's MLP): `x·sigmoid(1.702·x)`.
pub(crate) fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&QuickGelu);
    }
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// [`quick_gelu`] as a candle operation, CPU only.
struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "kiln-quick-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = vec![0f32; layout.shape().elem_count()];
        kiln_kernels::quick_gelu(host_f32(storage, layout)?, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `nn.GroupNorm(groups, channels, eps)` with affine parameters, over NCHW, followed by SiLU
/// when `silu`.
#[derive(Clone, Debug)]
pub(crate) struct GroupNorm {
    norm: candle_nn::GroupNorm,
    /// Weight and bias on the host, when the weights are CPU f32 (the fused path).
    host: Option<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNorm {
    /// The norm followed by SiLU, whose `weight` and `bias` are under `p`.
    pub(crate) fn with_silu(
        p: &Params,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> EngineResult<Self> {
        let weight = p.tensor("weight", &[channels])?;
        let bias = p.tensor("bias", &[channels])?;
        Ok(Self::from_tensors(weight, bias, groups, eps, true)?)
    }

    /// The norm over `weight` and `bias` (`[channels]` each), then SiLU when `silu`.
    pub(crate) fn from_tensors(
        weight: Tensor,
        bias: Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Self> {
        let channels = weight.dim(0)?;
        let host = (weight.device().is_cpu() && weight.dtype() == DType::F32)
            .then(|| Ok::<_, candle_core::Error>((weight.to_vec1()?, bias.to_vec1()?)))
            .transpose()?;
        Ok(Self {
            norm: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
            host,
            groups,
            eps,
            silu,
        })
    }

    /// `group_norm(x)`, then SiLU when the norm has it.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        timed(OpKind::Norm, || match &self.host {
            Some((weight, bias)) if x.dtype() == DType::F32 && x.device().is_cpu() => {
                x.contiguous()?.apply_op1_no_bwd(&GroupNormOp {
                    weight,
                    bias,
                    groups: self.groups,
                    eps: self.eps as f32,
                    silu: self.silu,
                })
            }
            _ => self.unfused(x),
        })
    }

    /// [`Self::forward`] as separate candle operations: the path off the CPU or in
    /// f16/bf16.
    pub(crate) fn unfused(&self, x: &Tensor) -> Result<Tensor> {
        let normed = self.norm.forward(x)?;
        if self.silu { normed.silu() } else { Ok(normed) }
    }
}

/// [`GroupNorm::forward`] as a candle operation, CPU only.
struct GroupNormOp<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp1 for GroupNormOp<'_> {
    fn name(&self) -> &'static str {
        "kiln-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group norm input {:?} has no channels", layout.shape());
        }
        let shape = kiln_kernels::GroupNormShape {
            batch: dims[0],
            channels: dims[1],
            spatial: dims[2..].iter().product(),
            groups: self.groups,
        };
        let mut out = vec![0f32; layout.shape().elem_count()];
        kiln_kernels::group_norm(
            shape,
            self.eps,
            self.weight,
            self.bias,
            self.silu,
            host_f32(storage, layout)?,
            &mut out,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn randn(dims: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = crate::engine::rng::TorchRng::new(seed);
        let n = dims.iter().product();
        let values = rng.randn(n).into_iter().map(|x| x * scale).collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .unwrap()
    }

    /// The unfused candle gate, in `dtype`.
    fn candle_geglu(x: &Tensor, dtype: DType) -> Tensor {
        unfused_geglu(&x.to_dtype(dtype).unwrap())
            .and_then(|t| t.to_dtype(DType::F32))
            .unwrap()
    }

    #[test]
    fn the_fused_geglu_matches_candle() {
        // UNet widths (2·1280, 2·2560 at 320 and 640 channels) and an odd one; gates out to
        // ±8 so that both tails of the GELU are covered.
        for (dims, scale) in [
            (vec![1, 257, 2 * 1280], 3.0),
            (vec![2, 64, 2 * 2560], 1.0),
            (vec![3, 5, 2 * 7], 8.0),
        ] {
            let x = randn(&dims, 3, scale);
            let got = geglu(&x).unwrap();
            // Against f64 (exact erf): relative to the output's scale.
            let exact = candle_geglu(&x, DType::F64);
            let err = max_abs(&(&got - &exact).unwrap()) / max_abs(&exact);
            eprintln!("GEGLU {dims:?}: from f64 {err:e}");
            assert!(err <= 1e-6, "{dims:?}: relative max diff from f64 {err:e}");
            // Against candle's f32 path, which loses accuracy to 1 + erf's cancellation.
            let unfused = candle_geglu(&x, DType::F32);
            let err = max_abs(&(&got - &unfused).unwrap()) / max_abs(&unfused);
            eprintln!("GEGLU {dims:?}: from f32 {err:e}");
            assert!(err <= 1e-6, "{dims:?}: relative max diff from f32 {err:e}");
        }
    }

    #[test]
    fn the_fused_group_norm_with_and_without_silu_matches_candle() {
        // The UNet's 320 channels at 64×64, the VAE's 512 channels, a batch of two, and a
        // shifted, scaled input (mean 3, sd 0.5).
        for (dims, groups, eps, shift) in [
            (vec![1, 320, 64, 64], 32, 1e-5, 0.0),
            (vec![2, 64, 9, 7], 32, 1e-6, 3.0),
            (vec![1, 512, 16, 16], 32, 1e-6, 0.0),
        ] {
            let channels = dims[1];
            let x = (randn(&dims, 5, 0.5) + shift).unwrap();
            let weight = (randn(&[channels], 6, 0.3) + 1.0).unwrap();
            let bias = randn(&[channels], 7, 0.3);
            for silu in [true, false] {
                let norm = GroupNorm::from_tensors(weight.clone(), bias.clone(), groups, eps, silu)
                    .unwrap();
                let got = norm.forward(&x).unwrap();
                let unfused = norm.unfused(&x).unwrap();
                let err = max_abs(&(&got - &unfused).unwrap()) / max_abs(&unfused);
                eprintln!("group norm, SiLU {silu}, {dims:?}: {err:e}");
                assert!(
                    err <= 1e-5,
                    "{dims:?}, SiLU {silu}: relative max diff {err:e}"
                );
            }
        }
    }
}
