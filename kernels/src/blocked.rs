//! The register-blocked f32 matrix product behind the dense layers and the convolutions on
//! CPUs with AVX-512F: `out[i][j] = Σₖ a[i][k] · b[k][j] (+ bias)`.
//!
//! Owns the micro-kernel, the cut of a product into tasks ([`Split`]) and the task loop
//! ([`Product::run`]). `a` is read in place (row-major, `k` values a row); `b` is never held
//! whole: each task asks the caller's [`Packer`] for one panel at a time — [`KC`] values of
//! `k` × [`NR`] columns, laid out as the kernel reads them (a few tens of KiB, reused by every
//! row of the task) — so a dense layer packs from its weight as stored and a convolution
//! gathers its input straight into the panel (implicit im2col). The kernel keeps an
//! `MR × NR` block of the output in 24 vector registers over a panel's depth; the bias goes in
//! with the first block's store, so nothing is zero-filled first. A task whose block of the
//! output is larger than a cache (the VAE's 512² convolutions) takes its panels in chunks that
//! stay in L2 over the whole depth, so that block goes to memory once rather than once per
//! [`KC`] of depth (measured: a 512² VAE decode 5 % faster).
//!
//! Every output is summed in the same order (blocks of `k` in turn, each from its first value
//! to its last) whatever task or position in a block it falls in, so a row's result does not
//! depend on what else is in the batch.

use rayon::prelude::*;

/// Output rows per kernel call.
pub(crate) const MR: usize = 6;
/// Columns per panel: four AVX-512 vectors.
pub(crate) const NR: usize = 64;
/// Depth of a panel: `KC × NR` floats (64 KiB).
pub(crate) const KC: usize = 256;
/// Most rows of one task: its block of `a` (`TASK_ROWS × KC`) stays in a core's L2 cache
/// while the task's panels pass over it.
const TASK_ROWS: usize = 16 * MR * 5;
/// Most output floats a task's chunk of panels holds (256 KiB, a quarter of a Zen 4 core's
/// L2 and of most others'): the chunk stays in L2 while every block of `k` passes over it.
const CHUNK_OUT_FLOATS: usize = 64 * 1024;
/// Output floats of a task past which it works in chunks (8 MiB: more than stays in a
/// core's share of L3 between two blocks of `k`).
pub(crate) const CHUNK_ABOVE_FLOATS: usize = 2 << 20;
/// What packing one panel costs, in rows of kernel work (measured with
/// `worker/benches/dense.rs`: about a sixth of a 77-row task).
const PACK_COST_ROWS: usize = 12;

/// Whether this CPU can run [`Product::run`].
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Supplies `b` one panel at a time.
pub(crate) trait Packer: Sync {
    /// Writes `b[k0 + kk][c0 + j]` to `pack[kk·NR + j]` for `kk < kl`, `j < width`, and zero
    /// for `width ≤ j < NR`.
    ///
    /// # Safety
    /// Called only where [`available`] holds, so an implementation may use AVX-512F.
    unsafe fn pack(&self, c0: usize, width: usize, k0: usize, kl: usize, pack: &mut [f32]);
}

/// What the products start from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Bias<'a> {
    /// Nothing.
    None,
    /// One value per column of the output (a dense layer's outputs).
    Columns(&'a [f32]),
    /// One value per row of the output (a convolution's output channels).
    Rows(&'a [f32]),
}

/// One product, `rows × cols` outputs of depth `k`.
pub(crate) struct Product<'a, P> {
    /// `rows × k`, row-major.
    pub(crate) a: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) k: usize,
    pub(crate) cols: usize,
    pub(crate) bias: Bias<'a>,
    pub(crate) packer: P,
}

/// The output's start, shared by the tasks, each of which writes only its own block.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of a buffer that outlives them (`run` joins every task
// before returning) and read nothing another task writes.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl<P: Packer> Product<'_, P> {
    /// Writes the product to `out`, whose row `i` starts at `i · ldc`, on the current rayon
    /// pool.
    ///
    /// # Panics
    /// When `a`, the bias or `out` is shorter than the sizes need, or `ldc < cols`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F ([`available`]).
    pub(crate) unsafe fn run(&self, out: &mut [f32], ldc: usize) {
        let (rows, cols) = (self.rows, self.cols);
        if rows == 0 || cols == 0 {
            return;
        }
        assert!(self.a.len() >= rows * self.k, "a is shorter than rows × k");
        assert!(
            ldc >= cols && out.len() >= (rows - 1) * ldc + cols,
            "out is too short"
        );
        match self.bias {
            Bias::None => {}
            Bias::Columns(b) => assert!(b.len() >= cols, "bias is shorter than cols"),
            Bias::Rows(b) => assert!(b.len() >= rows, "bias is shorter than rows"),
        }
        let panels = cols.div_ceil(NR);
        let plan = Split::choose(rows, panels, rayon::current_num_threads());
        let (row_step, panel_step) = (plan.rows_per_task, plan.panels_per_task);
        let column_tasks = panels.div_ceil(panel_step);
        let tasks = rows.div_ceil(row_step) * column_tasks;
        let ptr = OutPtr(out.as_mut_ptr());
        let task = |t: usize, pack: &mut Vec<f32>| {
            let (rt, ct) = (t / column_tasks, t % column_tasks);
            let rows = rt * row_step..((rt + 1) * row_step).min(rows);
            let panels = ct * panel_step..((ct + 1) * panel_step).min(panels);
            // SAFETY: `ptr` is `out`, checked above to hold `rows × cols` at stride `ldc`;
            // this task writes only `rows` × the columns of `panels`, which no other task
            // covers; AVX-512F per the caller.
            unsafe { self.task(rows, panels, ptr, ldc, pack) };
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
    /// `out` must point at the output (`rows × cols` at stride `ldc`), of which no other
    /// thread touches this block, and the CPU must have AVX-512F.
    unsafe fn task(
        &self,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        out: OutPtr,
        ldc: usize,
        pack: &mut Vec<f32>,
    ) {
        let k = self.k;
        pack.resize(KC * NR, 0.0);
        let mut edge_a = [0f32; MR * KC];
        let mut edge_out = [0f32; MR * NR];
        let mut column_bias = [0f32; NR];
        let mut row_bias = [0f32; MR];
        // A task whose block of the output is larger than a cache takes its panels in chunks
        // whose block stays in L2 while every block of `k` passes over it, so the output goes
        // to memory once, not once per block of `k` (each chunk reads all of its rows of `a`
        // again, which smaller outputs are better off without).
        let row_floats = rows.len().next_multiple_of(MR) * NR;
        let chunk = if row_floats * panels.len() > CHUNK_ABOVE_FLOATS {
            (CHUNK_OUT_FLOATS / row_floats).max(1)
        } else {
            panels.len()
        };
        let chunks = (panels.start..panels.end)
            .step_by(chunk)
            .map(|c| c..(c + chunk).min(panels.end));
        for chunk in chunks {
            for k0 in (0..k).step_by(KC) {
                let kl = KC.min(k - k0);
                let first = k0 == 0;
                for panel in chunk.clone() {
                    let c0 = panel * NR;
                    let width = NR.min(self.cols - c0);
                    // SAFETY: AVX-512F, per this function's caller.
                    unsafe { self.packer.pack(c0, width, k0, kl, pack) };
                    if let (true, Bias::Columns(b)) = (first, self.bias) {
                        column_bias[..width].copy_from_slice(&b[c0..c0 + width]);
                        column_bias[width..].fill(0.0);
                    }
                    let mut r = rows.start;
                    while r < rows.end {
                        let height = MR.min(rows.end - r);
                        let start = match (first, self.bias) {
                            (false, _) => Start::Accumulate,
                            (true, Bias::None) => Start::Zero,
                            (true, Bias::Columns(_)) => Start::Columns(&column_bias),
                            (true, Bias::Rows(b)) => {
                                row_bias[..height].copy_from_slice(&b[r..r + height]);
                                row_bias[height..].fill(0.0);
                                Start::Rows(&row_bias)
                            }
                        };
                        // SAFETY: `r + height ≤ rows.end ≤ self.rows` and columns
                        // `c0..c0 + width ≤ cols`, inside the output; the block is this task's.
                        let dst = unsafe { out.0.add(r * ldc + c0) };
                        if height == MR && width == NR {
                            // SAFETY: rows `r..r + MR` of `a` hold `k0 + kl ≤ k` values each;
                            // `pack` holds `kl × NR`; dst is `MR × NR` at stride `ldc`; AVX-512F
                            // per the caller.
                            unsafe {
                                let a = self.a.as_ptr().add(r * k + k0);
                                kernel(kl, a, k, pack, dst, ldc, &start);
                            }
                        } else {
                            // A partial block: the rows copied into a full-height buffer (the
                            // last row repeated), the output through a full-size one.
                            for i in 0..MR {
                                let src = (r + i.min(height - 1)) * k + k0;
                                edge_a[i * kl..(i + 1) * kl]
                                    .copy_from_slice(&self.a[src..src + kl]);
                            }
                            for i in 0..height {
                                // SAFETY: row `r + i` of the block, `width` columns, as above.
                                let row =
                                    unsafe { std::slice::from_raw_parts(dst.add(i * ldc), width) };
                                edge_out[i * NR..i * NR + width].copy_from_slice(row);
                            }
                            // SAFETY: `edge_a` holds `MR × kl`, `edge_out` `MR × NR`; AVX-512F
                            // as above.
                            unsafe {
                                kernel(
                                    kl,
                                    edge_a.as_ptr(),
                                    kl,
                                    pack,
                                    edge_out.as_mut_ptr(),
                                    NR,
                                    &start,
                                );
                            }
                            for i in 0..height {
                                // SAFETY: as above.
                                let row = unsafe {
                                    std::slice::from_raw_parts_mut(dst.add(i * ldc), width)
                                };
                                row.copy_from_slice(&edge_out[i * NR..i * NR + width]);
                            }
                        }
                        r += height;
                    }
                }
            }
        }
    }
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
    /// times its panels; tasks at most [`TASK_ROWS`] rows, so that their block of `a` stays in
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
// Read only by the x86-64 kernel; elsewhere `run` is never reached (`available()` is false).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Start<'a> {
    /// A value per column (zero-padded): the first block of a product with column bias.
    Columns(&'a [f32; NR]),
    /// A value per row (zero-padded): the first block of a product with row bias.
    Rows(&'a [f32; MR]),
    /// Nothing: the first block of a product without bias.
    Zero,
    /// The output already there: every later block.
    Accumulate,
}

/// `dst[i][j] (+)= Σₖ a[i·lda + k] · pack[k·NR + j]` for an `MR × NR` block.
///
/// # Safety
/// `a` must hold `MR` rows of `kl` floats at stride `lda`, `pack` at least `kl × NR`, `dst`
/// `MR` rows of `NR` at stride `ldc`, and the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(
    kl: usize,
    a: *const f32,
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
        // SAFETY: `kk < kl`, inside `pack` and each of the `MR` rows of `a` (caller).
        unsafe {
            let bv: [__m512; NV] =
                std::array::from_fn(|v| _mm512_loadu_ps(b.add(kk * NR + v * 16)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * lda + kk));
                for (sum, &bv) in acc.iter_mut().zip(&bv) {
                    *sum = _mm512_fmadd_ps(av, bv, *sum);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (v, &sum) in acc.iter().enumerate() {
            // SAFETY: row `i < MR`, columns `v·16..v·16 + 16 ≤ NR` of `dst` (caller).
            unsafe {
                let p = dst.add(i * ldc + v * 16);
                let value = match start {
                    Start::Columns(bias) => {
                        _mm512_add_ps(_mm512_loadu_ps(bias.as_ptr().add(v * 16)), sum)
                    }
                    Start::Rows(bias) => _mm512_add_ps(_mm512_set1_ps(bias[i]), sum),
                    Start::Zero => sum,
                    Start::Accumulate => _mm512_add_ps(_mm512_loadu_ps(p), sum),
                };
                _mm512_storeu_ps(p, value);
            }
        }
    }
}

/// Never called: [`Product::run`] requires AVX-512F.
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
    unreachable!("the AVX-512 kernel on a CPU without it")
}
