//! The attention core, `softmax(q·kᵀ/√d + mask)·v` over `[batch, heads, tokens, head_dim]`, for
//! every attention of the networks (UNet self and cross, the VAE's single-head spatial one,
//! CLIP's causal one).
//!
//! On the CPU in f32 it runs `kiln_kernels::attention`, a blocked kernel with an online softmax
//! that never holds the score matrix; anywhere else (GPUs, f16/bf16) it computes the scores
//! with candle's matmul and softmax, in query slices when the score matrix would be large. It
//! knows nothing of the projections around it ([`super::layers::Attention`]).

use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};

use crate::engine::profile::{OpKind, timed};

/// Largest score matrix one attention call builds, bytes. Self-attention at the UNet's first
/// level is `batch × heads × n²` scores with `n = (w/8)·(h/8)`: in f32, 512 MiB for one 512²
/// image and 2.5 GiB at 768², and CFG and `--batch` multiply it, which is what runs a GPU out
/// of memory.
/// Past this bound the queries are taken in slices (rows of a softmax are independent, so
/// the result is the same); below it nothing changes.
const MAX_SCORES_BYTES: usize = 512 << 20;

/// `softmax(q·kᵀ/sqrt(d) + mask)·v` over `[b, heads, n, d]`: [`blocked_attention`] on the CPU in
/// f32, else in query slices whose scores stay under [`MAX_SCORES_BYTES`].
pub(crate) fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    timed(OpKind::Attention, || {
        if blocked_applies(q, k, v) {
            blocked_attention(q, k, v, mask)
        } else {
            sliced_attention(q, k, v, mask, MAX_SCORES_BYTES)
        }
    })
}

/// [`scaled_dot_product_attention`] as it runs off the CPU (candle's matmul and softmax in
/// query slices), on any device: the baseline of the kernel's tests and benchmark.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn unfused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    sliced_attention(q, k, v, mask, MAX_SCORES_BYTES)
}

/// [`attention_core`] over slices of the queries whose scores take at most `max_bytes`.
fn sliced_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    max_bytes: usize,
) -> Result<Tensor> {
    let (b, heads, n, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let row_bytes = (b * heads * keys * q.dtype().size_in_bytes()).max(1);
    let rows = (max_bytes / row_bytes).max(1);
    // A mask broadcast over the queries is sliced with them; one of a single row is shared.
    let sliceable = mask.is_some_and(|m| m.rank() >= 2 && m.dim(D::Minus2).ok() == Some(n));
    if rows >= n {
        return attention_core(q, k, v, mask);
    }
    let mut out = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let q_part = q.narrow(2, start, len)?;
        let mask_part = match mask {
            Some(m) if sliceable => Some(m.narrow(m.rank() - 2, start, len)?),
            other => other.cloned(),
        };
        out.push(attention_core(&q_part, k, v, mask_part.as_ref())?);
        start += len;
    }
    Tensor::cat(&out, 2)
}

fn attention_core(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    // Scores in the inputs' dtype: f32 on the CPU; f16 on a GPU, as diffusers' fp16 SDPA keeps
    // them for SD1.5 (`upcast_attention = false`), with candle's softmax summing f16 rows in
    // f32.
    let head_dim = q.dim(D::Minus1)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // Scaling q (tokens × head_dim) instead of the scores (tokens × tokens) saves a full pass
    // over the largest tensor of the step; the rounding difference is far below 1e-6.
    let q = (q * scale)?;
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}

/// `attention_core` on the CPU in f32 without the score matrix: `kiln_kernels::attention`.
fn blocked_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (batch, heads, queries, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let mask = mask
        .map(|m| HostMask::new(m, [batch, heads, queries, keys]))
        .transpose()?;
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &BlockedAttention { mask },
    )
}

/// Whether [`blocked_attention`] serves these inputs: all on the CPU, all f32.
fn blocked_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
}

/// An additive mask copied to the host in f32, with the strides that broadcast it to
/// `[batch, heads, queries, keys]` (0 where it repeats).
#[derive(Debug)]
struct HostMask {
    data: Vec<f32>,
    strides: [usize; 3],
}

impl HostMask {
    fn new(mask: &Tensor, target: [usize; 4]) -> Result<Self> {
        if mask.rank() > 4 {
            candle_core::bail!("attention mask of rank {} (at most 4)", mask.rank());
        }
        // Left-pad the shape with ones to rank 4, as broadcasting does.
        let mut dims = [1usize; 4];
        dims[4 - mask.rank()..].copy_from_slice(mask.dims());
        if dims.iter().zip(&target).any(|(&d, &t)| d != t && d != 1) {
            candle_core::bail!(
                "attention mask {:?} does not broadcast to {target:?}",
                mask.dims()
            );
        }
        let mut mask = mask.to_dtype(DType::F32)?.reshape(&dims[..])?;
        // The kernel reads keys contiguously: a mask shared by all keys is spelt out.
        if dims[3] != target[3] {
            dims[3] = target[3];
            mask = mask.broadcast_as(&dims[..])?;
        }
        let mask = mask.contiguous()?;
        let data = mask.flatten_all()?.to_vec1::<f32>()?;
        let stride = |i: usize| {
            if dims[i] == 1 {
                0
            } else {
                dims[i + 1..].iter().product()
            }
        };
        Ok(Self {
            data,
            strides: [stride(0), stride(1), stride(2)],
        })
    }
}

/// [`blocked_attention`] as a candle operation on `(q, k, v)`, CPU only.
struct BlockedAttention {
    mask: Option<HostMask>,
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "kiln-blocked-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, queries, head_dim) = q_layout.shape().dims4()?;
        let keys = k_layout.shape().dims4()?.2;
        if k_layout.shape().dims() != [batch, heads, keys, head_dim]
            || v_layout.shape() != k_layout.shape()
        {
            candle_core::bail!(
                "attention shapes q {:?}, k {:?}, v {:?} do not match",
                q_layout.shape(),
                k_layout.shape(),
                v_layout.shape()
            );
        }
        let shape = kiln_kernels::AttentionShape {
            batch,
            heads,
            queries,
            keys,
            head_dim,
        };
        let mask = self.mask.as_ref().map(|m| kiln_kernels::AttentionMask {
            data: &m.data,
            strides: m.strides,
        });
        let mut out = vec![0f32; q_layout.shape().elem_count()];
        kiln_kernels::attention(
            shape,
            host_f32(q, q_layout)?,
            host_f32(k, k_layout)?,
            host_f32(v, v_layout)?,
            mask,
            &mut out,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }
}

/// The f32 elements of a contiguous CPU tensor.
pub(super) fn host_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("expected a contiguous tensor"),
        _ => candle_core::bail!("expected an f32 tensor"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    fn randn(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::engine::rng::TorchRng::new(seed);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(rng.randn(n), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn sliced_attention_equals_the_whole_and_bounds_the_scores() {
        let (q, k, v) = (
            randn((2, 3, 37, 8), 1),
            randn((2, 3, 37, 8), 2),
            randn((2, 3, 37, 8), 3),
        );
        let whole = attention_core(&q, &k, &v, None).unwrap();
        // Rows of 2·3·37 f32 scores; a bound of 5 rows gives 8 slices, the last of 2 rows.
        let row = 2 * 3 * 37 * 4;
        for rows in [1, 5, 36, 37, 1000] {
            let sliced = sliced_attention(&q, &k, &v, None, rows * row).unwrap();
            assert_eq!(sliced.dims(), whole.dims());
            let diff = max_diff(&sliced, &whole);
            assert!(diff <= 1e-6, "{rows} rows a slice: max diff {diff}");
        }
    }

    #[test]
    fn a_per_query_mask_is_sliced_with_the_queries() {
        let (q, k, v) = (
            randn((1, 2, 9, 4), 4),
            randn((1, 2, 9, 4), 5),
            randn((1, 2, 9, 4), 6),
        );
        // Causal, as CLIP's: row i sees keys 0..=i.
        let mask: Vec<f32> = (0..81)
            .map(|i| {
                if i % 9 > i / 9 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (9, 9), &Device::Cpu).unwrap();
        let whole = attention_core(&q, &k, &v, Some(&mask)).unwrap();
        let sliced = sliced_attention(&q, &k, &v, Some(&mask), 2 * 2 * 9 * 4).unwrap();
        let diff = max_diff(&sliced, &whole);
        assert!(diff <= 1e-6, "max diff {diff}");
    }

    /// `max |blocked − attention_core| / max |attention_core|` on random inputs.
    fn blocked_vs_core(shape: (usize, usize, usize, usize, usize), mask: Option<&Tensor>) -> f32 {
        let (b, h, n, m, d) = shape;
        let (q, k, v) = (
            randn((b, h, n, d), 7),
            randn((b, h, m, d), 8),
            randn((b, h, m, d), 9),
        );
        let want = attention_core(&q, &k, &v, mask).unwrap();
        let got = scaled_dot_product_attention(&q, &k, &v, mask).unwrap();
        assert_eq!(got.dims(), want.dims());
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        max_diff(&got, &want) / scale.to_scalar::<f32>().unwrap()
    }

    /// SD1.5's head widths (40/80/160 in the UNet, 512 in the VAE), cross-attention's 77 keys,
    /// thousands of keys, and sizes that are no multiple of the kernel's blocks.
    #[test]
    fn the_blocked_kernel_matches_the_candle_core() {
        for shape in [
            (1, 8, 300, 77, 40),
            (2, 3, 129, 4099, 40),
            (1, 2, 257, 1030, 80),
            (2, 2, 100, 77, 160),
            (1, 1, 130, 4096, 512),
            (1, 3, 5, 3, 7),
        ] {
            let err = blocked_vs_core(shape, None);
            eprintln!("{shape:?}: {err:e}");
            assert!(err <= 1e-5, "{shape:?}: relative max diff {err:e}");
        }
    }

    #[test]
    fn the_blocked_kernel_applies_masks_as_the_candle_core_does() {
        let mask = |dims: &[usize], seed: u64| {
            let n = dims.iter().product();
            let mut rng = crate::engine::rng::TorchRng::new(seed);
            // Every third value hidden; the first key of each row stays visible.
            let values: Vec<f32> = rng
                .randn(n)
                .into_iter()
                .enumerate()
                .map(|(i, x)| {
                    if i % 3 == 2 && i % dims[dims.len() - 1] != 0 {
                        f32::NEG_INFINITY
                    } else {
                        x
                    }
                })
                .collect();
            Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
        };
        let (b, h, n, m) = (2, 3, 150, 300);
        for dims in [
            vec![n, m],
            vec![b, 1, n, m],
            vec![1, h, 1, m],
            vec![b, h, n, m],
            vec![n, 1],
        ] {
            let mask = mask(&dims, 11);
            let err = blocked_vs_core((b, h, n, m, 40), Some(&mask));
            eprintln!("mask {dims:?}: {err:e}");
            assert!(err <= 1e-5, "mask {dims:?}: relative max diff {err:e}");
        }
        // CLIP's causal mask, through the public entry point.
        let causal: Vec<f32> = (0..77 * 77)
            .map(|i| {
                if i % 77 > i / 77 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (77, 77), &Device::Cpu).unwrap();
        let err = blocked_vs_core((1, 12, 77, 77, 64), Some(&causal));
        assert!(err <= 1e-5, "causal: relative max diff {err:e}");
    }
}
