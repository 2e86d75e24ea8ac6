//! Dense layers in f32: `y = x·Wᵀ + b` with PyTorch's `nn.Linear` weight layout `[out, in]`.
//!
//! Owns [`linear`]. On CPUs with AVX-512F the product runs in `blocked`'s
//! register-blocked kernel, with `x` as its row-major left operand and the weight, read as
//! stored, transposed panel by panel (16 × 16 blocks in registers) into the order the kernel
//! reads: no weight is copied whole or kept twice. On other CPUs the same call goes to
//! `gemm`, as candle's matmul would.
//!
//! Why not `gemm` everywhere: with few rows (a prompt's 77 tokens, the text encoder's every
//! product) `gemm` ran at 27–93 % of this kernel's speed (27 % for the 3072 → 768 product),
//! and at a 64-token UNet level at 40 % (figures in BENCHMARKS.md, `worker/benches/dense.rs`).

use crate::blocked::{self, Bias, NR, Packer, Product};
use crate::{KernelError, check_len};

/// Computes `out = x·Wᵀ + bias` for every row of `x`: `x` is `rows × in_features`, `weight`
/// `out_features × in_features`, `bias` `out_features`, `out` `rows × out_features`, all
/// row-major and contiguous. Runs on the current rayon pool.
pub fn linear(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let path = if blocked::available() {
        Path::Avx512
    } else {
        Path::Gemm
    };
    linear_on(path, x, weight, bias, in_features, out_features, out)
}

/// Which code computes the product: `blocked`'s kernel or `gemm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Avx512,
    Gemm,
}

fn linear_on(
    path: Path,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    if in_features == 0 || out_features == 0 {
        return Err(KernelError::Shape(format!(
            "a dense layer of {in_features} inputs and {out_features} outputs"
        )));
    }
    if !x.len().is_multiple_of(in_features) {
        return Err(KernelError::Shape(format!(
            "{} inputs are not rows of {in_features}",
            x.len()
        )));
    }
    let rows = x.len() / in_features;
    check_len("weight", weight, out_features * in_features)?;
    if let Some(bias) = bias {
        check_len("bias", bias, out_features)?;
    }
    check_len("out", out, rows * out_features)?;
    if rows == 0 {
        return Ok(());
    }
    match path {
        Path::Avx512 => {
            let product = Product {
                a: x,
                rows,
                k: in_features,
                cols: out_features,
                bias: bias.map_or(Bias::None, Bias::Columns),
                packer: WeightPacker {
                    weight,
                    k: in_features,
                },
            };
            // SAFETY: this path is taken only where `blocked::available()` holds.
            unsafe { product.run(out, out_features) };
        }
        Path::Gemm => with_gemm(x, weight, bias, in_features, out_features, out),
    }
    Ok(())
}

/// `gemm` on the weight as stored (read transposed), the bias copied into `out` first; sizes
/// checked by [`linear_on`].
fn with_gemm(x: &[f32], weight: &[f32], bias: Option<&[f32]>, k: usize, n: usize, out: &mut [f32]) {
    let m = x.len() / k;
    if let Some(bias) = bias {
        out.chunks_exact_mut(n)
            .for_each(|row| row.copy_from_slice(bias));
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst is `m × n` row-major (`out`, checked), lhs `m × k` row-major (`x`,
    // checked), rhs `k × n` read from the `n × k` row-major weight (checked) with column
    // stride `k` and row stride 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Packs panels of `x·Wᵀ`'s right operand, `Wᵀ`, from the weight as stored.
struct WeightPacker<'a> {
    /// `out × k`, row-major.
    weight: &'a [f32],
    k: usize,
}

impl Packer for WeightPacker<'_> {
    /// Weights of outputs `c0..c0 + width`, inputs `k0..k0 + kl`: 16 × 16 blocks transposed in
    /// registers, the ragged edges one value at a time.
    unsafe fn pack(&self, c0: usize, width: usize, k0: usize, kl: usize, pack: &mut [f32]) {
        let pack = &mut pack[..kl * NR];
        if width < NR {
            pack.fill(0.0);
        }
        let (full_j, full_k) = (width / 16 * 16, kl / 16 * 16);
        for j in (0..full_j).step_by(16) {
            for kk in (0..full_k).step_by(16) {
                let src = &self.weight[(c0 + j) * self.k + k0 + kk..];
                assert!(src.len() >= 15 * self.k + 16);
                // SAFETY: 16 rows of 16 at stride `k` from `src` (checked on the line above);
                // pack rows `kk..kk + 16 ≤ kl`, columns `j..j + 16 ≤ NR`; AVX-512F per the
                // trait's contract.
                unsafe { transpose16(src.as_ptr(), self.k, pack[kk * NR + j..].as_mut_ptr(), NR) };
            }
        }
        for j in 0..width {
            let src = &self.weight[(c0 + j) * self.k + k0..][..kl];
            let from = if j < full_j { full_k } else { 0 };
            for (kk, &w) in src.iter().enumerate().skip(from) {
                pack[kk * NR + j] = w;
            }
        }
    }
}

/// Writes the transpose of the 16 × 16 block at `src` (row stride `lds`) to `dst` (row stride
/// `ldd`): three rounds of in-register shuffles (32-bit, 64-bit, then 128-bit lanes twice).
///
/// # Safety
/// `src` must hold 16 rows of 16 floats at stride `lds`, `dst` 16 rows of 16 at stride `ldd`,
/// and the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    // SAFETY: every load and store is inside the blocks the caller vouches for.
    unsafe {
        let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * lds)));
        // Pairs of rows interleaved by 32-bit values.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // Then by 64-bit pairs: rows 4q..4q + 4 now hold 4 × 4 transposed blocks.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let q = i / 4 * 4;
            let (a, b) = (
                _mm512_castps_pd(t[q + (i % 4) / 2]),
                _mm512_castps_pd(t[q + 2 + (i % 4) / 2]),
            );
            _mm512_castpd_ps(if i % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // 128-bit lanes: even lanes of two rows (0x88), odd lanes (0xdd), twice.
        let v: [__m512; 16] = std::array::from_fn(|i| {
            let (h, w) = (i / 8 * 8, i % 4);
            let (a, b) = (u[h + w], u[h + 4 + w]);
            if i % 8 < 4 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            }
        });
        for i in 0..16 {
            let (a, b) = (v[i % 8], v[8 + i % 8]);
            let row = if i < 8 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            };
            _mm512_storeu_ps(dst.add(i * ldd), row);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose16(_: *const f32, _: usize, _: *mut f32, _: usize) {
    unreachable!("the AVX-512 transpose on a CPU without it")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More rows than one task of `blocked` takes.
    const TASK_ROWS: usize = 480;

    /// Deterministic values in [−1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The product in f64, and for each output the sum of its terms' magnitudes (the scale
    /// of its rounding error).
    fn reference(x: &[f32], w: &[f32], b: Option<&[f32]>, k: usize, n: usize) -> Vec<(f64, f64)> {
        let rows = x.len() / k;
        let mut out = Vec::with_capacity(rows * n);
        for i in 0..rows {
            for j in 0..n {
                let mut sum = b.map_or(0.0, |b| b[j] as f64);
                let mut scale = sum.abs();
                for kk in 0..k {
                    let t = x[i * k + kk] as f64 * w[j * k + kk] as f64;
                    sum += t;
                    scale += t.abs();
                }
                out.push((sum, scale));
            }
        }
        out
    }

    fn check(path: Path, rows: usize, k: usize, n: usize, with_bias: bool) {
        let x = values(rows * k, (rows * 31 + k) as u64);
        let w = values(n * k, (n * 17 + k) as u64);
        let b = values(n, n as u64 + 5);
        let bias = with_bias.then_some(&b[..]);
        let mut out = vec![f32::NAN; rows * n];
        linear_on(path, &x, &w, bias, k, n, &mut out).unwrap();
        for (idx, (&got, &(want, scale))) in
            out.iter().zip(&reference(&x, &w, bias, k, n)).enumerate()
        {
            let err = (got as f64 - want).abs();
            assert!(
                err <= 4e-7 * scale + 1e-30,
                "{path:?} {rows}x{k}->{n} bias {with_bias}: output {idx}: {got} against {want} (scale {scale})"
            );
        }
    }

    fn paths() -> Vec<Path> {
        let mut paths = vec![Path::Gemm];
        if blocked::available() {
            paths.push(Path::Avx512);
        } else {
            eprintln!("no AVX-512F here: only the gemm path is tested");
        }
        paths
    }

    #[test]
    fn matches_the_f64_product_at_every_edge_of_the_blocking() {
        for path in paths() {
            // Rows around the kernel's 6 and a task's 480, inputs around 256, outputs around 64.
            for &(rows, k, n) in &[
                (1, 1, 1),
                (1, 320, 1280),
                (5, 3, 17),
                (6, 256, 64),
                (7, 257, 65),
                (77, 768, 768),
                (77, 768, 130),
                (TASK_ROWS + 1, 300, 200),
                (2 * TASK_ROWS + 13, 513, 64),
            ] {
                check(path, rows, k, n, true);
                check(path, rows, k, n, false);
            }
        }
    }

    #[test]
    fn the_same_rows_give_the_same_outputs_whatever_else_is_in_the_batch() {
        // A row's result does not depend on which task or block position it fell into, so a
        // batch gives each image exactly what it gets alone. (`gemm` does not promise this: its
        // edge kernels sum in another order, so that path is not held to it.)
        if !blocked::available() {
            eprintln!("no AVX-512F here: nothing to test");
            return;
        }
        {
            let path = Path::Avx512;
            let (k, n) = (300, 130);
            let w = values(n * k, 3);
            let b = values(n, 4);
            let one = values(k, 9);
            let mut batch = values(TASK_ROWS * 2 * k, 10);
            let at = TASK_ROWS + 5;
            batch[at * k..(at + 1) * k].copy_from_slice(&one);
            let mut alone = vec![0.0; n];
            linear_on(path, &one, &w, Some(&b), k, n, &mut alone).unwrap();
            let mut all = vec![0.0; TASK_ROWS * 2 * n];
            linear_on(path, &batch, &w, Some(&b), k, n, &mut all).unwrap();
            assert_eq!(alone, all[at * n..(at + 1) * n], "{path:?}");
        }
    }

    #[test]
    fn an_output_past_a_cache_is_made_in_chunks_with_the_same_sums() {
        if !blocked::available() {
            eprintln!("no AVX-512F here: nothing to test");
            return;
        }
        // On one thread the whole product is one task, whose output is past what `blocked`
        // makes in one pass, so it is made in chunks of panels; on the whole pool each task is
        // smaller (on a few cores, unchunked). Both must sum alike, bit for bit.
        let (rows, k, n): (usize, usize, usize) = (70, 300, 30_011);
        assert!(
            rows.next_multiple_of(blocked::MR) * n.next_multiple_of(blocked::NR)
                > blocked::CHUNK_ABOVE_FLOATS
        );
        let x = values(rows * k, 21);
        let w = values(n * k, 22);
        let b = values(n, 23);
        let product = || {
            let mut out = vec![f32::NAN; rows * n];
            linear_on(Path::Avx512, &x, &w, Some(&b), k, n, &mut out).unwrap();
            out
        };
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(product);
        assert_eq!(one_thread, product());
        for i in [0, 33, rows - 1] {
            for j in (0..n).step_by(97).chain([n - 1]) {
                let terms = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64);
                let want = b[j] as f64 + terms.clone().sum::<f64>();
                let scale = (b[j] as f64).abs() + terms.map(f64::abs).sum::<f64>();
                let got = one_thread[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 4e-7 * scale,
                    "output ({i}, {j}): {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn the_register_transpose_transposes() {
        if !blocked::available() {
            eprintln!("no AVX-512F here: nothing to test");
            return;
        }
        let src: Vec<f32> = (0..16 * 20).map(|v| v as f32).collect();
        let mut dst = vec![0f32; 16 * 24];
        // SAFETY: 16 rows of 20 and 16 rows of 24; AVX-512F checked above.
        unsafe { transpose16(src.as_ptr(), 20, dst.as_mut_ptr(), 24) };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(dst[i * 24 + j], src[j * 20 + i], "row {i}, column {j}");
            }
        }
    }

    #[test]
    fn sizes_that_do_not_fit_are_refused() {
        let mut out = vec![0.0; 6];
        let e = linear(&[0.0; 7], &[0.0; 6], None, 2, 3, &mut out).unwrap_err();
        assert_eq!(e, KernelError::Shape("7 inputs are not rows of 2".into()));
        let e = linear(&[0.0; 4], &[0.0; 5], None, 2, 3, &mut out).unwrap_err();
        assert!(
            matches!(e, KernelError::Length { what: "weight", .. }),
            "{e:?}"
        );
        let e = linear(&[0.0; 4], &[0.0; 6], Some(&[0.0; 2]), 2, 3, &mut out).unwrap_err();
        assert!(
            matches!(e, KernelError::Length { what: "bias", .. }),
            "{e:?}"
        );
        let e = linear(&[0.0; 4], &[0.0; 6], None, 2, 3, &mut out[..5]).unwrap_err();
        assert!(
            matches!(e, KernelError::Length { what: "out", .. }),
            "{e:?}"
        );
        assert!(linear(&[], &[], None, 0, 3, &mut []).is_err());
    }
}
