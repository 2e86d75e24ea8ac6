//! Blocked ("flash") attention on the CPU: `softmax(q·kᵀ/√d + mask)·v` without the score matrix.
//!
//! Each task takes one block of queries of one (batch, head) and walks the keys in blocks: the
//! block's scores come from one GEMM (the `gemm` crate, the one candle uses), then an online
//! softmax keeps a running maximum and sum per query row, rescaling the partial output when the
//! maximum grows, and a second GEMM adds `probabilities · v` into the output rows; a last pass
//! divides by the sums. Memory beyond the output is one score block per task, whatever the
//! number of keys. Tasks run on rayon's global pool; within a task the GEMMs are sequential.
//! With few keys (cross-attention's 77, all in one block) this is an ordinary softmax over
//! complete rows.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::simd::{exp, multiversion};
use crate::{KernelError, check_len};

/// Queries per task. Measured on SD1.5's 8×4096×40 self-attention (2026-12-06, 2 threads):
/// 256 queries against 512 keys took about 15 % less CPU time than 64 or 128 against 256 or 512.
const QUERY_BLOCK: usize = 256;
/// Keys per score block: a `QUERY_BLOCK × KEY_BLOCK` f32 block is 512 KiB, within L2.
const KEY_BLOCK: usize = 512;

/// Sizes of one attention call. `q` and the output are `[batch, heads, queries, head_dim]`,
/// `k` and `v` are `[batch, heads, keys, head_dim]`, all contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Heads per batch item.
    pub heads: usize,
    /// Query tokens.
    pub queries: usize,
    /// Key (and value) tokens.
    pub keys: usize,
    /// Channels per head, of queries, keys and values alike.
    pub head_dim: usize,
}

/// An additive mask, broadcast to `[batch, heads, queries, keys]`: element
/// `(b, h, i, j)` is `data[b·strides[0] + h·strides[1] + i·strides[2] + j]` (a stride of 0
/// repeats a dimension; keys are contiguous). `-∞` hides a key.
#[derive(Clone, Copy, Debug)]
pub struct AttentionMask<'a> {
    /// The mask values.
    pub data: &'a [f32],
    /// Strides of the batch, head and query dimensions, in elements.
    pub strides: [usize; 3],
}

/// Writes `softmax(q·kᵀ/√head_dim + mask)·v` into `out`.
///
/// The queries are scaled by `1/√head_dim` rounded to f32 before the product, as candle's
/// `q * scale` does. A query row whose keys are all masked gives NaN, as the unfused softmax
/// does.
pub fn attention(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<AttentionMask<'_>>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let AttentionShape {
        batch,
        heads,
        queries,
        keys,
        head_dim,
    } = shape;
    if batch == 0 || heads == 0 || queries == 0 || keys == 0 || head_dim == 0 {
        return Err(KernelError::Shape(format!(
            "{shape:?} has an empty dimension"
        )));
    }
    let q_len = batch * heads * queries * head_dim;
    let kv_len = batch * heads * keys * head_dim;
    check_len("q", q, q_len)?;
    check_len("k", k, kv_len)?;
    check_len("v", v, kv_len)?;
    check_len("out", out, q_len)?;
    if let Some(m) = &mask {
        let [sb, sh, sq] = m.strides;
        let last = (batch - 1) * sb + (heads - 1) * sh + (queries - 1) * sq + keys;
        if m.data.len() < last {
            return Err(KernelError::Length {
                what: "mask",
                expected: last,
                got: m.data.len(),
            });
        }
    }
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let per_head = queries * head_dim;
    out.par_chunks_mut(per_head)
        .enumerate()
        .for_each(|(bh, out_head)| {
            let kv = bh * keys * head_dim..(bh + 1) * keys * head_dim;
            // kᵀ, `[head_dim, keys]`: the score GEMM's best operand layout.
            let mut k_t = vec![0f32; keys * head_dim];
            for (j, row) in k[kv.clone()].chunks_exact(head_dim).enumerate() {
                for (c, &x) in row.iter().enumerate() {
                    k_t[c * keys + j] = x;
                }
            }
            let head = Head {
                q: &q[bh * per_head..(bh + 1) * per_head],
                k_t: &k_t,
                v: &v[kv],
                mask: mask.map(|m| {
                    let (b, h) = (bh / heads, bh % heads);
                    (m.data, b * m.strides[0] + h * m.strides[1], m.strides[2])
                }),
                keys,
                head_dim,
                scale,
            };
            out_head
                .par_chunks_mut(QUERY_BLOCK * head_dim)
                .enumerate()
                .for_each(|(block, out_rows)| head.query_block(block * QUERY_BLOCK, out_rows));
        });
    Ok(())
}

/// One (batch, head): its queries, keys, values and mask rows.
struct Head<'a> {
    q: &'a [f32],
    /// The keys transposed, `[head_dim, keys]`.
    k_t: &'a [f32],
    v: &'a [f32],
    /// Mask data, this head's offset into it and its query stride.
    mask: Option<(&'a [f32], usize, usize)>,
    keys: usize,
    head_dim: usize,
    scale: f32,
}

impl Head<'_> {
    /// Attention of the queries from `first` on, as many as `out` has rows, into `out`.
    fn query_block(&self, first: usize, out: &mut [f32]) {
        let d = self.head_dim;
        let rows = out.len() / d;
        let q: Vec<f32> = self.q[first * d..(first + rows) * d]
            .iter()
            .map(|x| x * self.scale)
            .collect();
        let mut scores = vec![0f32; rows * KEY_BLOCK.min(self.keys)];
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut rescale = vec![0f32; rows];
        out.fill(0.0);
        for start in (0..self.keys).step_by(KEY_BLOCK) {
            let cols = KEY_BLOCK.min(self.keys - start);
            let scores = &mut scores[..rows * cols];
            let v = &self.v[start * d..(start + cols) * d];
            // scores = q · kᵀ, over columns start.. of kᵀ.
            let k_t = Mat {
                data: &self.k_t[start..],
                rows: d,
                cols,
                row_stride: self.keys,
                col_stride: 1,
            };
            matmul(scores, cols, false, Mat::rows(&q, rows, d), k_t);
            if let Some((mask, offset, stride)) = self.mask {
                for (r, row) in scores.chunks_exact_mut(cols).enumerate() {
                    let at = offset + (first + r) * stride + start;
                    add_into(row, &mask[at..at + cols]);
                }
            }
            online_softmax(scores, cols, &mut max, &mut sum, &mut rescale);
            if start > 0 {
                scale_rows(out, d, &rescale);
            }
            // out += probabilities · v
            matmul(
                out,
                d,
                true,
                Mat::rows(scores, rows, cols),
                Mat::rows(v, cols, d),
            );
        }
        for x in &mut sum {
            *x = 1.0 / *x;
        }
        scale_rows(out, d, &sum);
    }
}

/// A read-only matrix view for [`matmul`]: `rows × cols` with the given strides.
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows > 0
            && self.cols > 0
            && (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst (+)= lhs · rhs` with `dst` row-major, `dst_cols` wide; adds when `accumulate`.
/// Single-threaded: callers parallelise over blocks.
fn matmul(dst: &mut [f32], dst_cols: usize, accumulate: bool, lhs: Mat<'_>, rhs: Mat<'_>) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        lhs.in_bounds() && rhs.in_bounds() && rhs.rows == k && dst_cols == n && dst.len() == m * n,
        "matmul operands out of bounds"
    );
    // SAFETY: the assertion above keeps every element gemm reads (lhs, rhs: rows × cols at
    // their strides) and writes (dst: m × n row-major) inside its slice; `dst` is borrowed
    // mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

multiversion! {
    /// `row += mask`.
    fn add_into(row: &mut [f32], mask: &[f32]) {
        for (x, m) in row.iter_mut().zip(mask) {
            *x += m;
        }
    }
}

multiversion! {
    /// One key block of the online softmax. Turns each row of `scores` (`cols` wide) into
    /// `exp(score − new max)`, updates the row's running `max` and `sum`, and leaves in
    /// `rescale` the factor the row's partial output must be multiplied by,
    /// `exp(old max − new max)`.
    fn online_softmax(
        scores: &mut [f32],
        cols: usize,
        max: &mut [f32],
        sum: &mut [f32],
        rescale: &mut [f32],
    ) {
        for (r, row) in scores.chunks_exact_mut(cols).enumerate() {
            let block_max = row_max(row);
            let old = max[r];
            let new = if block_max > old { block_max } else { old };
            // A row masked out so far keeps max −∞: its scores (all −∞) give zeros, and the
            // rescale of its still-zero output is a no-op.
            let shift = if new == f32::NEG_INFINITY { 0.0 } else { new };
            let factor = if old == f32::NEG_INFINITY { 0.0 } else { exp(old - shift) };
            let block_sum = exp_sum(row, shift);
            max[r] = new;
            sum[r] = sum[r] * factor + block_sum;
            rescale[r] = factor;
        }
    }
}

/// Lanes of the partial results in the row reductions: 16 f32, one AVX-512 register.
const LANES: usize = 16;

#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = if x > *a { x } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(tail) {
        m = if x > m { x } else { m };
    }
    m
}

/// `row[j] = exp(row[j] − shift)`; returns their sum.
#[inline(always)]
fn exp_sum(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *x = exp(*x - shift);
            *a += *x;
        }
    }
    let mut total = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        total += *x;
    }
    acc.iter().sum::<f32>() + total
}

multiversion! {
    /// Multiplies row `r` of the row-major `rows × cols` matrix `m` by `factors[r]`.
    fn scale_rows(m: &mut [f32], cols: usize, factors: &[f32]) {
        for (row, &f) in m.chunks_exact_mut(cols).zip(factors) {
            for x in row {
                *x *= f;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, row by row, straight from the definition.
    fn reference(
        s: AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<AttentionMask<'_>>,
    ) -> Vec<f32> {
        let d = s.head_dim;
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0f32; q.len()];
        for bh in 0..s.batch * s.heads {
            for i in 0..s.queries {
                let qi = &q[(bh * s.queries + i) * d..][..d];
                let scores: Vec<f64> = (0..s.keys)
                    .map(|j| {
                        let kj = &k[(bh * s.keys + j) * d..][..d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let m = mask.map_or(0.0, |m| {
                            let (b, h) = (bh / s.heads, bh % s.heads);
                            m.data[b * m.strides[0] + h * m.strides[1] + i * m.strides[2] + j]
                                as f64
                        });
                        dot * scale + m
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for c in 0..d {
                    let acc: f64 = (0..s.keys)
                        .map(|j| e[j] * v[(bh * s.keys + j) * d + c] as f64)
                        .sum();
                    out[(bh * s.queries + i) * d + c] = (acc / total) as f32;
                }
            }
        }
        out
    }

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        // xorshift, mapped to about [-2, 2)
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_across_block_edges_and_with_a_mask() {
        for (batch, heads, queries, keys, d) in
            [(1, 2, 5, 3, 4), (2, 1, 130, 257, 8), (1, 1, 129, 513, 40)]
        {
            let s = AttentionShape {
                batch,
                heads,
                queries,
                keys,
                head_dim: d,
            };
            let q = noise(batch * heads * queries * d, 1);
            let k = noise(batch * heads * keys * d, 2);
            let v = noise(batch * heads * keys * d, 3);
            // A [queries, keys] mask shared by batch and heads: causal where it can be.
            let mask: Vec<f32> = (0..queries * keys)
                .map(|x| {
                    if x % keys > x / keys {
                        f32::NEG_INFINITY
                    } else {
                        0.1
                    }
                })
                .collect();
            for m in [
                None,
                Some(AttentionMask {
                    data: &mask,
                    strides: [0, 0, keys],
                }),
            ] {
                let mut out = vec![f32::NAN; q.len()];
                attention(s, &q, &k, &v, m, &mut out).unwrap();
                let want = reference(s, &q, &k, &v, m);
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 2e-6, "{s:?} mask {}: {worst:e}", m.is_some());
            }
        }
    }

    #[test]
    fn refuses_slices_that_do_not_fit_the_shape() {
        let s = AttentionShape {
            batch: 1,
            heads: 1,
            queries: 2,
            keys: 2,
            head_dim: 2,
        };
        let x = [0f32; 4];
        let mut out = [0f32; 3];
        assert!(matches!(
            attention(s, &x, &x, &x, None, &mut out),
            Err(KernelError::Length { what: "out", .. })
        ));
    }
}
