//! `nn.Conv2d` for the networks: on the CPU in f32 through `kiln_kernels`' im2col + `gemm`
//! kernel, elsewhere through candle's own convolution.
//!
//! Owns [`Conv2d`] and the candle op that hands a CPU tensor's storage to the kernel. The weight
//! is kept exactly as loaded (`[out, in, k, k]`, contiguous): that layout already is the
//! kernel's matrix operand, so nothing is re-laid per call or at load, and on the CPU in f32 the
//! layer shares the loaded (or LoRA-merged) tensor's storage instead of holding a copy. Every
//! call counts as [`OpKind::Convolution`] in [`crate::engine::profile`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Module, Shape, Tensor};
use candle_nn::Conv2dConfig;
use kiln_kernels::conv::{Conv2dGeometry, conv2d};

use crate::engine::error::Result;
use crate::engine::profile::{OpKind, timed};

/// `nn.Conv2d(in, out, kernel, stride, padding)` with a bias; square kernels, no dilation or
/// groups.
#[derive(Clone, Debug)]
pub(crate) struct Conv2d {
    /// candle's layer over the same tensors: the path on GPUs and in other dtypes.
    candle: candle_nn::Conv2d,
    op: CpuConv,
}

impl Conv2d {
    /// A layer over `weight` (`[out, in, k, k]`) and `bias` (`[out]`).
    pub(crate) fn new(weight: Tensor, bias: Tensor, stride: usize, padding: usize) -> Result<Self> {
        // A no-op for loaded and merged weights, which are contiguous already.
        let weight = weight.contiguous()?;
        let bias = bias.contiguous()?;
        let config = Conv2dConfig {
            padding,
            stride,
            ..Conv2dConfig::default()
        };
        Ok(Self {
            candle: candle_nn::Conv2d::new(weight, Some(bias), config),
            op: CpuConv { stride, padding },
        })
    }

    fn forward_inner(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let weight = self.candle.weight();
        let kiln = x.device().is_cpu()
            && x.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && x.rank() == 4;
        match (kiln, self.candle.bias()) {
            (true, Some(bias)) => x.apply_op3_no_bwd(weight, bias, &self.op),
            _ => self.candle.forward(x),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed(OpKind::Convolution, || self.forward_inner(x))
    }
}

/// The CPU f32 convolution as a candle op over (input, weight, bias).
#[derive(Clone, Copy, Debug)]
struct CpuConv {
    stride: usize,
    padding: usize,
}

/// The `f32` values of `storage` from `layout`'s offset on.
fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(v) => Ok(&v[layout.start_offset()..]),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(
            other.dtype(),
            "kiln conv2d",
        )),
    }
}

impl candle_core::CustomOp3 for CpuConv {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, in_channels, height, width) = input_l.shape().dims4()?;
        let (out_channels, weight_in, kernel, kernel_w) = weight_l.shape().dims4()?;
        if weight_in != in_channels || kernel != kernel_w || bias_l.shape().dims1()? != out_channels
        {
            return Err(candle_core::Error::Msg(format!(
                "kiln conv2d: input {:?}, weight {:?}, bias {:?}",
                input_l.dims(),
                weight_l.dims(),
                bias_l.dims()
            )));
        }
        if !weight_l.is_contiguous() || !bias_l.is_contiguous() {
            return Err(candle_core::Error::RequiresContiguous { op: "kiln conv2d" });
        }
        let strides: [usize; 4] = input_l
            .stride()
            .try_into()
            .map_err(|_| candle_core::Error::Msg("kiln conv2d: input is not 4-D".into()))?;
        let geometry = Conv2dGeometry {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel,
            stride: self.stride,
            padding: self.padding,
        };
        let out = conv2d(
            f32s(input, input_l)?,
            strides,
            f32s(weight, weight_l)?,
            Some(f32s(bias, bias_l)?),
            &geometry,
            candle_core::utils::get_num_threads(),
        )
        .map_err(candle_core::Error::wrap)?;
        let shape = Shape::from((
            batch,
            out_channels,
            geometry.out_height(),
            geometry.out_width(),
        ));
        Ok((CpuStorage::F32(out), shape))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// Our layer against candle's on the same tensors: largest difference relative to the
    /// largest output magnitude.
    fn relative_error(x: &Tensor, layer: &Conv2d) -> f32 {
        let ours = layer.forward(x).unwrap();
        let theirs = layer.candle.forward(x).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let scale = theirs.abs().unwrap().max_all().unwrap();
        let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
        (diff / scale).unwrap().to_scalar::<f32>().unwrap()
    }

    fn layer(input: usize, output: usize, kernel: usize, stride: usize, padding: usize) -> Conv2d {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (output, input, kernel, kernel), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, output, &dev).unwrap();
        Conv2d::new(w, b, stride, padding).unwrap()
    }

    #[test]
    fn matches_candles_convolution() {
        let dev = Device::Cpu;
        // (in, out, kernel, stride, padding) × (batch, height, width): odd sizes, channel counts
        // off every block size, the UNet's stride-2 downsampler, 1×1 projections.
        let layers = [
            (3, 5, 1, 1, 0),
            (7, 13, 3, 1, 1),
            (37, 19, 3, 2, 1),
            (16, 16, 3, 2, 0),
            (9, 70, 3, 1, 0),
            (65, 33, 1, 2, 0),
        ];
        let images = [(1, 9, 7), (2, 15, 17), (2, 1, 3), (1, 32, 32)];
        for &(i, o, k, s, p) in &layers {
            let layer = layer(i, o, k, s, p);
            for &(b, h, w) in &images {
                if h + 2 * p < k || w + 2 * p < k {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (b, i, h, w), &dev).unwrap();
                let err = relative_error(&x, &layer);
                assert!(err <= 1e-5, "({i},{o},{k},{s},{p}) on ({b},{h},{w}): {err}");
            }
        }
    }

    #[test]
    fn reads_strided_and_offset_inputs_in_place() {
        let dev = Device::Cpu;
        // Channels-last data viewed as NCHW (the transformer's `proj_out` input) and a slice
        // of a larger batch (a nonzero storage offset).
        let nhwc = Tensor::randn(0f32, 1.0, (2, 6, 5, 24), &dev).unwrap();
        let x = nhwc.permute((0, 3, 1, 2)).unwrap();
        for (k, s, p) in [(1, 1, 0), (3, 1, 1), (3, 2, 1)] {
            let layer = layer(24, 10, k, s, p);
            assert!(relative_error(&x, &layer) <= 1e-5);
            let tail = x.i(1..2).unwrap();
            assert!(relative_error(&tail, &layer) <= 1e-5);
        }
    }

    #[test]
    fn other_dtypes_take_candles_path() {
        let layer = layer(4, 6, 3, 1, 1);
        let x = Tensor::randn(0f32, 1.0, (1, 4, 5, 5), &Device::Cpu).unwrap();
        let f16 = Conv2d::new(
            layer.candle.weight().to_dtype(DType::F16).unwrap(),
            layer.candle.bias().unwrap().to_dtype(DType::F16).unwrap(),
            1,
            1,
        )
        .unwrap();
        let y = f16.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        assert_eq!(y.dims(), &[1, 6, 5, 5]);
    }
}
