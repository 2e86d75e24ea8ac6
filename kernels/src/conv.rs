//! 2-D convolution in f32 as blocked matrix products.
//!
//! Owns [`conv2d`]. The weight stays in PyTorch's `[out, in, k, k]` layout, which read row-major
//! is already the `[out, in·k·k]` left operand of the product; the input columns are gathered
//! in the matching `(channel, ky, kx)` order, so no weight is ever copied or reordered per
//! call. The output is written in place, NCHW, bias included. Two paths:
//!
//! - On CPUs with AVX-512F, `blocked`'s kernel with the im2col matrix never built:
//!   each task gathers the panel it needs (256 taps × 64 output pixels) straight from the
//!   input into the kernel's order, and the bias goes in with the first store.
//! - Elsewhere, and for 1×1 convolutions and images under 256 output pixels where it was
//!   faster: im2col tiles into `gemm`, each tile's output block filled with the bias first and
//!   `gemm` accumulating onto it. A 1×1, stride-1, unpadded convolution skips the gather: its
//!   input already is the right operand. Many tiles run one per thread, each with a
//!   single-threaded `gemm` and its own gather buffer; few large tiles (small images with many
//!   channels) run one after another with the gather and `gemm` spread over the threads.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::blocked::{self, Bias, NR, Packer, Product};

/// Bytes of one gathered im2col tile: a few MiB keeps it near the caches `gemm` packs from.
const TILE_BYTES: usize = 4 << 20;
/// Fewest output pixels per gathered tile; below this `gemm`'s per-call packing dominates.
const MIN_TILE_PIXELS: usize = 64;
/// Fewest output pixels per image for the blocked kernel.
const BLOCKED_MIN_PIXELS: usize = 256;
/// Output pixels per job of a 1×1 convolution, which gathers nothing.
const DIRECT_TILE_PIXELS: usize = 1024;

/// Why a convolution could not run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvError {
    /// The sizes describe no convolution (a zero size, or a kernel larger than the padded input).
    #[error("invalid convolution geometry: {0}")]
    Geometry(&'static str),
    /// A slice is shorter than its sizes and strides need.
    #[error("the {what} holds {found} values, {needed} needed")]
    Length {
        what: &'static str,
        needed: usize,
        found: usize,
    },
}

/// The sizes of one convolution: a square kernel, the same stride and zero padding on both
/// axes, no dilation or groups (what SD1.5's networks use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Images in the batch.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: usize,
    /// Step between output pixels, in input pixels.
    pub stride: usize,
    /// Zeros added on every side.
    pub padding: usize,
}

impl Conv2dGeometry {
    /// Output height.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Output width.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Values in the NCHW output.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_height() * self.out_width()
    }

    /// Length of one weight row: `in · k · k`.
    fn depth(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    fn validate(&self) -> Result<(), ConvError> {
        let sizes = [
            self.batch,
            self.in_channels,
            self.height,
            self.width,
            self.out_channels,
            self.kernel,
            self.stride,
        ];
        if sizes.contains(&0) {
            return Err(ConvError::Geometry("a size or the stride is zero"));
        }
        if self.height + 2 * self.padding < self.kernel
            || self.width + 2 * self.padding < self.kernel
        {
            return Err(ConvError::Geometry("kernel larger than the padded input"));
        }
        Ok(())
    }
}

/// Convolves `input` with `weight` (`[out, in, k, k]`, contiguous) and adds `bias` (`[out]`),
/// returning the contiguous NCHW output. `input` is NCHW with element strides
/// `input_strides` (any strides: a permuted view is read in place). `threads` is how many
/// threads the work is spread over, on the current rayon pool.
pub fn conv2d(
    input: &[f32],
    input_strides: [usize; 4],
    weight: &[f32],
    bias: Option<&[f32]>,
    geometry: &Conv2dGeometry,
    threads: usize,
) -> Result<Vec<f32>, ConvError> {
    geometry.validate()?;
    let g = geometry;
    // The blocked kernel gathers every panel it packs: where `gemm` reads the input in place
    // (a 1×1 convolution, `direct`), or where an image has too few pixels to spread that
    // gather over (the 8×8 UNet level), im2col into `gemm` was faster
    // (`worker/benches/conv.rs`).
    let path = if blocked::available()
        && !is_direct(g, input_strides)
        && g.out_height() * g.out_width() >= BLOCKED_MIN_PIXELS
    {
        Path::Blocked
    } else {
        Path::Gemm
    };
    conv2d_on(path, input, input_strides, weight, bias, geometry, threads)
}

/// A 1×1, stride-1, unpadded convolution whose height and width merge into one axis: its
/// input already is `gemm`'s right operand.
fn is_direct(g: &Conv2dGeometry, [_, _, s2, s3]: [usize; 4]) -> bool {
    g.kernel == 1 && g.stride == 1 && g.padding == 0 && s2 == g.width * s3
}

/// Which code computes the products: `blocked`'s kernel (AVX-512F) or im2col tiles into `gemm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Blocked,
    Gemm,
}

fn conv2d_on(
    path: Path,
    input: &[f32],
    input_strides: [usize; 4],
    weight: &[f32],
    bias: Option<&[f32]>,
    geometry: &Conv2dGeometry,
    threads: usize,
) -> Result<Vec<f32>, ConvError> {
    let g = *geometry;
    g.validate()?;
    let dims = [g.batch, g.in_channels, g.height, g.width];
    let extent = 1 + dims
        .iter()
        .zip(input_strides)
        .map(|(d, s)| (d - 1) * s)
        .sum::<usize>();
    check_len("input", extent, input.len())?;
    check_len("weight", g.out_channels * g.depth(), weight.len())?;
    if let Some(bias) = bias {
        check_len("bias", g.out_channels, bias.len())?;
    }

    let pixels = g.out_height() * g.out_width();
    let mut out = vec![0.0f32; g.output_len()];
    let src = Source {
        g,
        input,
        strides: input_strides,
    };
    if path == Path::Blocked {
        let per_image = g.out_channels * pixels;
        for (image, out) in out.chunks_exact_mut(per_image).enumerate() {
            let product = Product {
                a: &weight[..g.out_channels * g.depth()],
                rows: g.out_channels,
                k: g.depth(),
                cols: pixels,
                bias: bias.map_or(Bias::None, Bias::Rows),
                packer: Gather { src: &src, image },
            };
            // SAFETY: `blocked::available()` holds.
            unsafe { product.run(out, pixels) };
        }
        return Ok(out);
    }
    let s1 = input_strides[1];
    let direct = is_direct(&g, input_strides);
    let tile = if direct {
        DIRECT_TILE_PIXELS
    } else {
        (TILE_BYTES / (4 * g.depth())).max(MIN_TILE_PIXELS)
    }
    .min(pixels);
    let per_image = pixels.div_ceil(tile);
    let jobs = g.batch * per_image;
    let threads = threads.max(1);
    let plan = Plan {
        src,
        weight: &weight[..g.out_channels * g.depth()],
        bias: bias.map(|b| &b[..g.out_channels]),
        pixels,
        tile,
        direct,
        rhs_rows: if direct { s1 } else { 0 },
        out: OutPtr(out.as_mut_ptr()),
    };
    let job = |j: usize| (j / per_image, (j % per_image) * tile);
    if threads > 1 && jobs >= 2 * threads {
        (0..jobs).into_par_iter().for_each_init(Vec::new, |col, j| {
            let (image, first) = job(j);
            plan.run(image, first, col, None);
        });
    } else {
        let spread = (threads > 1).then_some(threads);
        let mut col = Vec::new();
        for j in 0..jobs {
            let (image, first) = job(j);
            plan.run(image, first, &mut col, spread);
        }
    }
    Ok(out)
}

fn check_len(what: &'static str, needed: usize, found: usize) -> Result<(), ConvError> {
    if found < needed {
        return Err(ConvError::Length {
            what,
            needed,
            found,
        });
    }
    Ok(())
}

/// The output buffer's start, shared by the jobs, each of which writes only its own pixels.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only dereferenced by `Plan::run`, whose jobs write disjoint output
// pixels of a buffer that outlives every job (`conv2d` joins them before returning it).
unsafe impl Send for OutPtr {}
// SAFETY: as above; no job reads what another writes.
unsafe impl Sync for OutPtr {}

/// One validated convolution, split into jobs of `tile` output pixels of one image.
struct Plan<'a> {
    src: Source<'a>,
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    /// Output pixels per image.
    pixels: usize,
    tile: usize,
    /// 1×1, stride 1, no padding, height and width mergeable: `gemm` reads the input in place.
    direct: bool,
    /// Element stride between input channels when `direct`.
    rhs_rows: usize,
    out: OutPtr,
}

impl Plan<'_> {
    /// Computes output pixels `first..first + tile` (clipped) of every output channel of
    /// `image`, gathering into `col`; `threads` (more than one) spreads this one job over the
    /// pool, `None` runs it on the calling thread.
    fn run(&self, image: usize, first: usize, col: &mut Vec<f32>, threads: Option<usize>) {
        let g = &self.src.g;
        let end = (first + self.tile).min(self.pixels);
        let width = end - first;
        let depth = g.depth();
        let [s0, _, _, s3] = self.src.strides;
        // SAFETY: `image < batch` and `first < pixels`, so the offset lies inside the output
        // (`batch · out_channels · pixels` values).
        let dst = unsafe {
            self.out
                .0
                .add((image * g.out_channels) * self.pixels + first)
        };
        if let Some(bias) = self.bias {
            for (o, &b) in bias.iter().enumerate() {
                // SAFETY: row `o` of this job is `width` values at `o · pixels` from `dst`,
                // inside the output and written by this job alone.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(dst.add(o * self.pixels), width) };
                row.fill(b);
            }
        }
        let (rhs, rhs_rs, rhs_cs) = if self.direct {
            // Pixel p of a mergeable image sits at p · s3.
            let offset = image * s0 + first * s3;
            (self.src.input[offset..].as_ptr(), self.rhs_rows, s3)
        } else {
            if col.len() < depth * width {
                col.resize(depth * width, 0.0);
            }
            let col = &mut col[..depth * width];
            let fill = |(r, row): (usize, &mut [f32])| self.src.gather_row(row, image, r, first);
            match threads {
                Some(_) => col.par_chunks_mut(width).enumerate().for_each(fill),
                None => col.chunks_mut(width).enumerate().for_each(fill),
            }
            (col.as_ptr(), width, 1)
        };
        let parallelism = threads.map_or(Parallelism::None, Parallelism::Rayon);
        let with_bias = self.bias.is_some();
        // SAFETY: dst is `out_channels × width` with row stride `pixels` inside this job's part
        // of the output (see above); lhs is the `out_channels × depth` row-major weight, whose
        // length `conv2d` checked; rhs is `depth × width`: either the gathered tile just
        // written, or (direct) input channels × pixels `first..end` of `image`, all inside the
        // extent `conv2d` checked against the input's length.
        unsafe {
            gemm::gemm(
                g.out_channels,
                width,
                depth,
                dst,
                1,
                self.pixels as isize,
                with_bias,
                self.weight.as_ptr(),
                1,
                depth as isize,
                rhs,
                rhs_cs as isize,
                rhs_rs as isize,
                if with_bias { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// Where a convolution reads its input: the geometry, the values and their strides.
struct Source<'a> {
    g: Conv2dGeometry,
    input: &'a [f32],
    strides: [usize; 4],
}

impl Source<'_> {
    /// Fills `row` with im2col row `r` (input channel, ky, kx) for output pixels
    /// `first..first + row.len()` of `image`: the input value each pixel's kernel tap reads,
    /// or zero where the tap falls in the padding.
    fn gather_row(&self, row: &mut [f32], image: usize, r: usize, first: usize) {
        let g = &self.g;
        let (k, stride, pad) = (g.kernel, g.stride, g.padding);
        let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
        let [s0, s1, s2, s3] = self.strides;
        let out_w = g.out_width();
        // Output columns whose tap lands inside the input: ox·stride + kx - pad ∈ [0, width).
        let lo = pad.saturating_sub(kx).div_ceil(stride);
        let hi = if g.width + pad > kx {
            (g.width + pad - kx - 1) / stride + 1
        } else {
            0
        };
        let mut pixel = first;
        let mut done = 0;
        while done < row.len() {
            let (oy, ox0) = (pixel / out_w, pixel % out_w);
            let ox1 = out_w.min(ox0 + row.len() - done);
            let seg = &mut row[done..done + ox1 - ox0];
            let iy = oy * stride + ky;
            if iy < pad || iy - pad >= g.height {
                seg.fill(0.0);
            } else {
                let a = lo.clamp(ox0, ox1);
                let z = hi.clamp(a, ox1);
                seg[..a - ox0].fill(0.0);
                seg[z - ox0..].fill(0.0);
                let mid = &mut seg[a - ox0..z - ox0];
                if a < z {
                    let base = image * s0 + c * s1 + (iy - pad) * s2;
                    let ix0 = a * stride + kx - pad;
                    if stride == 1 && s3 == 1 {
                        mid.copy_from_slice(&self.input[base + ix0..base + ix0 + mid.len()]);
                    } else {
                        let src = &self.input[base + ix0 * s3..];
                        for (d, v) in mid.iter_mut().zip(src.iter().step_by(stride * s3)) {
                            *d = *v;
                        }
                    }
                }
            }
            done += ox1 - ox0;
            pixel += ox1 - ox0;
        }
    }
}

/// Packs panels of the im2col matrix (taps × output pixels) of one image straight from the
/// input: the implicit im2col of the blocked path.
struct Gather<'a> {
    src: &'a Source<'a>,
    image: usize,
}

impl Packer for Gather<'_> {
    /// Taps `k0..k0 + kl` for output pixels `c0..c0 + width`.
    unsafe fn pack(&self, c0: usize, width: usize, k0: usize, kl: usize, pack: &mut [f32]) {
        let g = &self.src.g;
        let out_w = g.out_width();
        let (oy, ox0) = (c0 / out_w, c0 % out_w);
        let pack = &mut pack[..kl * NR];
        if g.stride != 1 || self.src.strides[3] != 1 || ox0 + width > out_w {
            for (kk, row) in pack.chunks_exact_mut(NR).enumerate() {
                let (taps, rest) = row.split_at_mut(width);
                self.src.gather_row(taps, self.image, k0 + kk, c0);
                rest.fill(0.0);
            }
            return;
        }
        // The panel's pixels lie in one output row and the stride is 1: each tap reads one
        // run of one input row, zero where it falls in the padding. The tap's (channel, ky,
        // kx) steps along instead of being divided out per row.
        let [s0, s1, s2, _] = self.src.strides;
        let (k, pad) = (g.kernel, g.padding);
        let (mut c, mut ky, mut kx) = (k0 / (k * k), (k0 / k) % k, k0 % k);
        let end = ox0 + width;
        for row in pack.chunks_exact_mut(NR) {
            let (taps, rest) = row.split_at_mut(width);
            rest.fill(0.0);
            // Output columns whose input column ox + kx - pad lies in 0..g.width.
            let lo = pad.saturating_sub(kx).clamp(ox0, end);
            let hi = (g.width + pad).saturating_sub(kx).clamp(lo, end);
            let iy = oy + ky;
            if iy < pad || iy - pad >= g.height || lo == hi {
                taps.fill(0.0);
            } else {
                taps[..lo - ox0].fill(0.0);
                taps[hi - ox0..].fill(0.0);
                let from = self.image * s0 + c * s1 + (iy - pad) * s2 + lo + kx - pad;
                taps[lo - ox0..hi - ox0].copy_from_slice(&self.src.input[from..from + hi - lo]);
            }
            kx += 1;
            if kx == k {
                kx = 0;
                ky += 1;
                if ky == k {
                    ky = 0;
                    c += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reproducible value in [-1, 1) for index `i` of stream `seed`.
    fn value(seed: u64, i: usize) -> f32 {
        let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn values(seed: u64, n: usize) -> Vec<f32> {
        (0..n).map(|i| value(seed, i)).collect()
    }

    /// Direct convolution summed in f64: the reference.
    fn reference(
        x: &[f32],
        strides: [usize; 4],
        w: &[f32],
        b: Option<&[f32]>,
        g: &Conv2dGeometry,
    ) -> Vec<f64> {
        let (oh, ow, k) = (g.out_height(), g.out_width(), g.kernel);
        let mut out = vec![0.0; g.output_len()];
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = b.map_or(0.0, |b| f64::from(b[o]));
                        for c in 0..g.in_channels {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= g.height as isize
                                        || ix >= g.width as isize
                                    {
                                        continue;
                                    }
                                    let xi = n * strides[0]
                                        + c * strides[1]
                                        + iy as usize * strides[2]
                                        + ix as usize * strides[3];
                                    let wi = ((o * g.in_channels + c) * k + ky) * k + kx;
                                    acc += f64::from(x[xi]) * f64::from(w[wi]);
                                }
                            }
                        }
                        out[((n * g.out_channels + o) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        out
    }

    /// Largest error relative to the largest reference magnitude.
    fn check(g: Conv2dGeometry, channels_last: bool, bias: bool, threads: usize) {
        let (c, h, w) = (g.in_channels, g.height, g.width);
        let strides = if channels_last {
            [h * w * c, 1, w * c, c]
        } else {
            [c * h * w, h * w, w, 1]
        };
        let x = values(1, g.batch * c * h * w);
        let wt = values(2, g.out_channels * g.depth());
        let b = values(3, g.out_channels);
        let b = bias.then_some(&b[..]);
        let want = reference(&x, strides, &wt, b, &g);
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        let mut paths = vec![Path::Gemm];
        if blocked::available() {
            paths.push(Path::Blocked);
        }
        for path in paths {
            let got = conv2d_on(path, &x, strides, &wt, b, &g, threads).unwrap();
            assert_eq!(got.len(), want.len());
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
            assert!(
                err / scale <= 1e-5,
                "{path:?} {g:?} channels_last={channels_last} threads={threads}: relative error {}",
                err / scale
            );
        }
    }

    fn geometry(
        batch: usize,
        (in_channels, height, width): (usize, usize, usize),
        out_channels: usize,
        (kernel, stride, padding): (usize, usize, usize),
    ) -> Conv2dGeometry {
        Conv2dGeometry {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel,
            stride,
            padding,
        }
    }

    #[test]
    fn matches_a_direct_f64_convolution() {
        // (channels, height, width); rows of 131 put whole panels of 64 pixels inside one
        // output row (the blocked path's fast gather) and others across two.
        let shapes = [
            (3, 7, 9),
            (17, 13, 11),
            (5, 1, 6),
            (33, 20, 20),
            (5, 4, 131),
        ];
        let kernels = [
            (1, 1, 0),
            (3, 1, 1),
            (3, 2, 1),
            (3, 2, 0),
            (3, 1, 0),
            (1, 2, 0),
        ];
        for batch in [1, 2] {
            for &shape in &shapes {
                for &kernel in &kernels {
                    if shape.1 + 2 * kernel.2 < kernel.0 {
                        continue;
                    }
                    for threads in [1, 2, 3] {
                        check(geometry(batch, shape, 19, kernel), false, true, threads);
                    }
                    check(geometry(batch, shape, 8, kernel), true, false, 2);
                }
            }
        }
    }

    #[test]
    fn tiles_split_inside_rows_and_across_images() {
        // Depth 150·9 makes tiles of 776 pixels: they end mid-row of a 37-wide output.
        check(geometry(2, (150, 41, 37), 70, (3, 1, 1)), false, true, 2);
        check(geometry(3, (150, 41, 37), 5, (3, 2, 1)), false, true, 4);
        // A 1×1 convolution over more pixels than one direct job.
        check(geometry(2, (20, 50, 47), 9, (1, 1, 0)), false, true, 2);
        check(geometry(2, (20, 50, 47), 9, (1, 1, 0)), true, true, 2);
    }

    #[test]
    fn bad_sizes_are_errors_not_panics() {
        let g = geometry(1, (2, 4, 4), 3, (3, 1, 1));
        let x = vec![0.0; 32];
        let w = vec![0.0; 3 * 18];
        let b = vec![0.0; 3];
        let s = [32, 16, 4, 1];
        assert!(conv2d(&x, s, &w, Some(&b), &g, 1).is_ok());
        assert_eq!(
            conv2d(&x[..31], s, &w, Some(&b), &g, 1),
            Err(ConvError::Length {
                what: "input",
                needed: 32,
                found: 31
            })
        );
        assert!(matches!(
            conv2d(&x, s, &w[..10], None, &g, 1),
            Err(ConvError::Length { what: "weight", .. })
        ));
        assert!(matches!(
            conv2d(&x, s, &w, Some(&b[..2]), &g, 1),
            Err(ConvError::Length { what: "bias", .. })
        ));
        let big = geometry(1, (2, 4, 4), 3, (7, 1, 1));
        assert!(matches!(
            conv2d(&x, s, &w, None, &big, 1),
            Err(ConvError::Geometry(_))
        ));
        let zero = geometry(1, (2, 4, 4), 3, (3, 0, 1));
        assert!(matches!(
            conv2d(&x, s, &w, None, &zero, 1),
            Err(ConvError::Geometry(_))
        ));
    }
}
