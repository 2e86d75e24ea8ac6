//! Dense layers in f32: `y = x·Wᵀ + b` with PyTorch's `nn.Linear` weight layout `[out, in]`.
//!
//! Owns [`linear`]. On CPUs with AVX-512F the product runs in this module's register-blocked
//! kernel: the output is cut into tasks of up to [`TASK_ROWS`] rows × a few column panels
//! [`NR`] outputs wide; a task copies each panel's weights, [`KC`] inputs deep, into a small
//! buffer in the order the kernel reads them (`KC × NR`, a few tens of KiB, reused by every row
//! of the task), then an `MR × NR` block of the output at a time accumulates in 24 vector
//! registers while the input rows are read in place. The bias goes in with the first block's
//! store, so nothing is zero-filled first and no weight is copied whole or kept twice. On
//! other CPUs the same call goes to `gemm`, as candle's matmul would.
//!
//! Why not `gemm` everywhere: with few rows (a prompt's 77 tokens, the text encoder's every
//! product) `gemm` split the work poorly and ran at a third of this kernel's speed (figures in
//! BENCHMARKS.md, `worker/benches/dense.rs`).

use rayon::prelude::*;

use crate::{KernelError, check_len};

/// Output rows per kernel call.
const MR: usize = 6;
/// Outputs per column panel: four AVX-512 vectors.
const NR: usize = 64;
/// Inputs per block: one panel's packed weights are `KC × NR` floats (64 KiB).
const KC: usize = 256;
/// Most rows of one task: its input block (`TASK_ROWS × KC`) stays in a core's L2 cache
/// while the task's panels pass over it.
const TASK_ROWS: usize = 16 * MR * 5;
/// What packing one panel costs, in rows of kernel work (measured with
/// `worker/benches/dense.rs`: about a sixth of a 77-row task).
const PACK_COST_ROWS: usize = 12;

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
    let path = if avx512_available() {
        Path::Avx512
    } else {
        Path::Gemm
    };
    linear_on(path, x, weight, bias, in_features, out_features, out)
}

/// Which code computes the product: this module's kernel or `gemm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Avx512,
    Gemm,
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
    let problem = Problem {
        x,
        weight,
        bias,
        rows,
        k: in_features,
        n: out_features,
    };
    match path {
        Path::Avx512 => problem.run_tasks(out),
        Path::Gemm => problem.gemm(out),
    }
    Ok(())
}

/// One validated product.
#[derive(Clone, Copy)]
struct Problem<'a> {
    x: &'a [f32],
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    rows: usize,
    /// Inputs per row.
    k: usize,
    /// Outputs per row.
    n: usize,
}

/// The output's start, shared by the tasks, each of which writes only its own block.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of a buffer that outlives them (`run_tasks` joins every
// task before returning) and read nothing another task writes.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl Problem<'_> {
    /// `gemm` on the weight as stored (read transposed), the bias copied into `out` first.
    fn gemm(&self, out: &mut [f32]) {
        let (m, n, k) = (self.rows, self.n, self.k);
        if let Some(bias) = self.bias {
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
                self.bias.is_some(),
                self.x.as_ptr(),
                1,
                k as isize,
                self.weight.as_ptr(),
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

    /// Splits the output into tasks of rows × panels and runs them on the rayon pool.
    fn run_tasks(&self, out: &mut [f32]) {
        let panels = self.n.div_ceil(NR);
        let plan = Split::choose(self.rows, panels, rayon::current_num_threads());
        let (row_step, panel_step) = (plan.rows_per_task, plan.panels_per_task);
        let column_tasks = panels.div_ceil(panel_step);
        let tasks = self.rows.div_ceil(row_step) * column_tasks;
        let ptr = OutPtr(out.as_mut_ptr());
        let task = |t: usize, pack: &mut Vec<f32>| {
            let (rt, ct) = (t / column_tasks, t % column_tasks);
            let rows = rt * row_step..((rt + 1) * row_step).min(self.rows);
            let panels = ct * panel_step..((ct + 1) * panel_step).min(panels);
            // SAFETY: `ptr` is `out`, `rows × n`; this task writes only `rows` × the
            // columns of `panels`, which no other task covers.
            unsafe { self.task(rows, panels, ptr, pack) };
        };
        if tasks == 1 {
            task(0, &mut Vec::new());
        } else {
            (0..tasks)
                .into_par_iter()
                .for_each_init(Vec::new, |pack, t| task(t, pack));
        }
    }

    /// Computes the output block `rows × panels` (panels of [`NR`] columns).
    ///
    /// # Safety
    /// `out` must point at the `rows × n` output, of which no other thread touches this block,
    /// and the CPU must have AVX-512F.
    unsafe fn task(
        &self,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        out: OutPtr,
        pack: &mut Vec<f32>,
    ) {
        let (k, n) = (self.k, self.n);
        pack.resize(KC * NR, 0.0);
        let mut edge_x = [0f32; MR * KC];
        let mut edge_out = [0f32; MR * NR];
        let mut padded_bias = [0f32; NR];
        for k0 in (0..k).step_by(KC) {
            let kl = KC.min(k - k0);
            let first = k0 == 0;
            for panel in panels.clone() {
                let c0 = panel * NR;
                let width = NR.min(n - c0);
                // SAFETY: AVX-512F, per this function's caller.
                unsafe { self.pack_panel(c0, width, k0, kl, pack) };
                let bias = match (first, self.bias) {
                    (true, Some(b)) => {
                        padded_bias[..width].copy_from_slice(&b[c0..c0 + width]);
                        padded_bias[width..].fill(0.0);
                        Start::Bias(&padded_bias)
                    }
                    (true, None) => Start::Zero,
                    (false, _) => Start::Accumulate,
                };
                let mut r = rows.start;
                while r < rows.end {
                    let height = MR.min(rows.end - r);
                    // SAFETY: `r + height ≤ rows.end ≤ self.rows`, and the column block
                    // `c0..c0 + width` lies inside `n`; the block belongs to this task.
                    let dst = unsafe { out.0.add(r * n + c0) };
                    if height == MR && width == NR {
                        // SAFETY: rows `r..r + MR` of `x` hold `k0 + kl ≤ k` inputs each;
                        // `pack` holds `kl × NR`; dst is `MR × NR` with row stride `n`; the
                        // caller guarantees AVX-512F.
                        unsafe {
                            kernel(kl, self.x.as_ptr().add(r * k + k0), k, pack, dst, n, &bias);
                        }
                    } else {
                        // A partial block: the rows copied into a full-height buffer (the
                        // last row repeated), the output through a full-size one.
                        for i in 0..MR {
                            let src = (r + i.min(height - 1)) * k + k0;
                            edge_x[i * kl..(i + 1) * kl].copy_from_slice(&self.x[src..src + kl]);
                        }
                        for i in 0..height {
                            // SAFETY: row `r + i` of the block, `width` columns, as above.
                            let row = unsafe { std::slice::from_raw_parts(dst.add(i * n), width) };
                            edge_out[i * NR..i * NR + width].copy_from_slice(row);
                        }
                        // SAFETY: `edge_x` holds `MR × kl`, `edge_out` `MR × NR`; AVX-512F
                        // as above.
                        unsafe {
                            kernel(
                                kl,
                                edge_x.as_ptr(),
                                kl,
                                pack,
                                edge_out.as_mut_ptr(),
                                NR,
                                &bias,
                            );
                        }
                        for i in 0..height {
                            // SAFETY: as above.
                            let row =
                                unsafe { std::slice::from_raw_parts_mut(dst.add(i * n), width) };
                            row.copy_from_slice(&edge_out[i * NR..i * NR + width]);
                        }
                    }
                    r += height;
                }
            }
        }
    }

    /// Copies weights of outputs `c0..c0 + width` and inputs `k0..k0 + kl` into `pack` as
    /// `kl` rows of [`NR`] (outputs past `width` zero): 16 × 16 blocks transposed in
    /// registers, the ragged edges one value at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    unsafe fn pack_panel(&self, c0: usize, width: usize, k0: usize, kl: usize, pack: &mut [f32]) {
        let pack = &mut pack[..kl * NR];
        if width < NR {
            pack.fill(0.0);
        }
        let (full_j, full_k) = (width / 16 * 16, kl / 16 * 16);
        for j in (0..full_j).step_by(16) {
            for kk in (0..full_k).step_by(16) {
                let src = &self.weight[(c0 + j) * self.k + k0 + kk..];
                debug_assert!(src.len() >= 15 * self.k + 16);
                // SAFETY: rows `c0 + j..c0 + j + 16 ≤ n` of the weight hold inputs
                // `k0 + kk..k0 + kk + 16 ≤ k`; pack rows `kk..kk + 16 ≤ kl`, columns
                // `j..j + 16 ≤ NR`; AVX-512F per the caller.
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

/// How one product is cut into tasks: rows × column panels each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Split {
    rows_per_task: usize,
    panels_per_task: usize,
}

impl Split {
    /// The split that finishes first by a simple model: tasks run in rounds of `threads`; a
    /// task costs its padded rows (a multiple of [`MR`]) plus [`PACK_COST_ROWS`] for packing,
    /// times its panels; tasks at most [`TASK_ROWS`] rows, so that their input block stays in
    /// L2. Ties go to fewer tasks.
    fn choose(rows: usize, panels: usize, threads: usize) -> Self {
        let threads = threads.max(1);
        let mut best = (
            usize::MAX,
            Split {
                rows_per_task: rows,
                panels_per_task: panels,
            },
        );
        let most_row_tasks = rows.div_ceil(MR).min(64);
        for row_tasks in rows.div_ceil(TASK_ROWS).max(1)..=most_row_tasks.max(1) {
            let rows_per_task = rows.div_ceil(row_tasks).next_multiple_of(MR);
            let row_tasks = rows.div_ceil(rows_per_task);
            for column_tasks in 1..=panels.min(64) {
                let panels_per_task = panels.div_ceil(column_tasks);
                let column_tasks = panels.div_ceil(panels_per_task);
                let rounds = (row_tasks * column_tasks).div_ceil(threads);
                let cost = rounds * (rows_per_task + PACK_COST_ROWS) * panels_per_task;
                if cost < best.0 {
                    best = (
                        cost,
                        Split {
                            rows_per_task,
                            panels_per_task,
                        },
                    );
                }
            }
        }
        best.1
    }
}

/// What a kernel call adds its products to.
enum Start<'a> {
    /// The bias (this panel's part, zero-padded): the first input block.
    Bias(&'a [f32; NR]),
    /// Nothing: the first block of a layer without bias.
    Zero,
    /// The output already there: every later block.
    Accumulate,
}

/// `dst[i][j] (+)= Σₖ x[i·lda + k] · pack[k·NR + j]` for an `MR × NR` block.
///
/// # Safety
/// `x` must hold `MR` rows of `kl` floats at stride `lda`, `pack` at least `kl × NR`, `dst`
/// `MR` rows of `NR` at stride `ldc`, and the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(
    kl: usize,
    x: *const f32,
    lda: usize,
    pack: &[f32],
    dst: *mut f32,
    ldc: usize,
    start: &Start<'_>,
) {
    use std::arch::x86_64::*;
    const NV: usize = NR / 16;
    debug_assert!(pack.len() >= kl * NR);
    let b = pack.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for kk in 0..kl {
        // SAFETY: `kk < kl`, inside `pack` and each of the `MR` rows of `x` (caller).
        unsafe {
            let bv: [__m512; NV] =
                std::array::from_fn(|v| _mm512_loadu_ps(b.add(kk * NR + v * 16)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(i * lda + kk));
                for (a, &bv) in acc.iter_mut().zip(&bv) {
                    *a = _mm512_fmadd_ps(xv, bv, *a);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (v, &a) in acc.iter().enumerate() {
            // SAFETY: row `i < MR`, columns `v·16..v·16 + 16 ≤ NR` of `dst` (caller).
            unsafe {
                let p = dst.add(i * ldc + v * 16);
                let value = match start {
                    Start::Bias(bias) => {
                        _mm512_add_ps(_mm512_loadu_ps(bias.as_ptr().add(v * 16)), a)
                    }
                    Start::Zero => a,
                    Start::Accumulate => _mm512_add_ps(_mm512_loadu_ps(p), a),
                };
                _mm512_storeu_ps(p, value);
            }
        }
    }
}

/// Never called: [`linear`] takes this path only where AVX-512F was detected.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(
    _: usize,
    _: *const f32,
    _: usize,
    _: &[f32],
    _: *mut f32,
    _: usize,
    _: &Start<'_>,
) {
    unreachable!("the AVX-512 dense kernel on a CPU without it")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        if avx512_available() {
            paths.push(Path::Avx512);
        } else {
            eprintln!("no AVX-512F here: only the gemm path is tested");
        }
        paths
    }

    #[test]
    fn matches_the_f64_product_at_every_edge_of_the_blocking() {
        for path in paths() {
            // Rows around MR and TASK_ROWS, inputs around KC, outputs around NR.
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
        if !avx512_available() {
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
    fn the_register_transpose_transposes() {
        if !avx512_available() {
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
