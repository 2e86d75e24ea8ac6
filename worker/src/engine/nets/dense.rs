//! `nn.Linear` for the networks: on the CPU in f32 through `kiln_kernels::dense`, elsewhere
//! through candle's matmul.
//!
//! Owns [`Linear`] and the candle ops that hand a CPU tensor's storage to the kernel. The
//! weight is kept as loaded (`[out, in]`, contiguous), shared with the loaded (or LoRA-merged)
//! tensor, never copied at load; the kernel reads it in that layout. Every call counts as
//! [`OpKind::Linear`] in [`crate::engine::profile`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Tensor};

use crate::engine::error::Result;
use crate::engine::profile::{OpKind, timed};

/// `nn.Linear(in, out, bias)`.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    /// candle's layer over the same tensors: the path on GPUs and in other dtypes.
    candle: candle_nn::Linear,
}

impl Linear {
    /// A layer over `weight` (`[out, in]`) and an optional `bias` (`[out]`).
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        // A no-op for loaded and merged weights, which are contiguous already.
        let weight = weight.contiguous()?;
        let bias = bias.map(|b| b.contiguous()).transpose()?;
        Ok(Self {
            candle: candle_nn::Linear::new(weight, bias),
        })
    }

    fn forward_inner(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let weight = self.candle.weight();
        let kiln = x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32;
        if !kiln {
            return self.candle.forward(x);
        }
        let x = x.contiguous()?;
        match self.candle.bias() {
            Some(bias) => x.apply_op3_no_bwd(weight, bias, &CpuLinear),
            None => x.apply_op2_no_bwd(weight, &CpuLinear),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed(OpKind::Linear, || self.forward_inner(x))
    }
}

/// The CPU f32 dense layer as a candle op over (input, weight) or (input, weight, bias).
#[derive(Clone, Copy, Debug)]
struct CpuLinear;

/// The contiguous `f32` values of `storage` under `layout`.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => {
            Err(candle_core::Error::RequiresContiguous { op: "kiln linear" })
        }
        (other, _) => Err(candle_core::Error::UnsupportedDTypeForOp(
            other.dtype(),
            "kiln linear",
        )),
    }
}

impl CpuLinear {
    fn run(
        x: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out_features, in_features) = weight.1.shape().dims2()?;
        let mut dims = x.1.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == in_features => *last = out_features,
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "kiln linear: input {:?} against weight {:?}",
                    x.1.dims(),
                    weight.1.dims()
                )));
            }
        }
        let bias = bias.map(|(s, l)| contiguous_f32(s, l)).transpose()?;
        let mut out = vec![0f32; dims.iter().product()];
        kiln_kernels::dense::linear(
            contiguous_f32(x.0, x.1)?,
            contiguous_f32(weight.0, weight.1)?,
            bias,
            in_features,
            out_features,
            &mut out,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

impl CustomOp2 for CpuLinear {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::run((x, x_l), (weight, weight_l), None)
    }
}

impl CustomOp3 for CpuLinear {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::run((x, x_l), (weight, weight_l), Some((bias, bias_l)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn the_cpu_kernel_computes_what_candles_linear_does() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (130, 96), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 130, &dev).unwrap();
        // 3-D input as the networks give it, and a transposed (non-contiguous) one. candle
        // is given the latter as a contiguous copy: candle-nn 0.11.1's `Linear` on this
        // `[2, 77, 96]` view (strides `[7392, 1, 77]`) returns values up to 54 off (seen
        // while writing this test; the networks never hand a layer such a view).
        let x = Tensor::randn(0f32, 1.0, (2, 77, 96), &dev).unwrap();
        let xt = Tensor::randn(0f32, 1.0, (2, 96, 77), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        for bias in [Some(b.clone()), None] {
            let ours = Linear::new(w.clone(), bias.clone()).unwrap();
            let candle = candle_nn::Linear::new(w.clone(), bias);
            for x in [&x, &xt] {
                let got = ours.forward(x).unwrap();
                let want = candle.forward(&x.contiguous().unwrap()).unwrap();
                assert_eq!(got.dims(), want.dims());
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-4,
                    "max difference {diff}, input {:?}, bias {}",
                    x.layout(),
                    ours.candle.bias().is_some()
                );
            }
        }
    }
}
