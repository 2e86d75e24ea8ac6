//! Resizing 8-bit RGB pictures exactly as PIL's `Image.resize(size, resample=Image.LANCZOS)`
//! does, for A1111's "Lanczos" hires-fix upscaler.
//!
//! Owns [`resize_lanczos`]: Pillow 13's separable convolution (`src/libImaging/Resample.c`)
//! with `Image.resize`'s defaults (the whole image as the box, `reducing_gap=None`): per output
//! pixel, taps over `center ± 3·max(in/out, 1)` source pixels, weighted by `sinc(x)·sinc(x/3)`
//! in f64 and normalised to sum 1, then rounded to fixed point with 22 fractional bits; one
//! pass per axis into an 8-bit intermediate (rounded and clipped), horizontal first unless the
//! height shrinks by more than twice as many pixels as the width.
//!
//! Hand-written because no crate gives PIL's bytes on `tests/fixtures/reference/lanczos.json`:
//! `image` 0.25 (`imageops::resize`, `Lanczos3`; f32 intermediate, no rounding between passes)
//! is off by 1 on up to 20% of the bytes of smooth pictures and by up to 32 levels on a
//! high-contrast pattern; `fast_image_resize` 6.1 (another fixed-point precision) by up to 43.
//! It knows nothing of models or latents.

use std::f64::consts::PI;

use crate::engine::image::RgbImage;

/// Pillow's `LANCZOS.support`: the filter is zero outside `[-3, 3)`.
const SUPPORT: f64 = 3.0;

/// Pillow's `PRECISION_BITS`: 8 bits of result and 2 of headroom for the filter's negative
/// lobes leave 22 fractional bits in an `i32`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resizes `image` to `width × height` with PIL's Lanczos filter; the bytes equal PIL's
/// `image.resize((width, height), resample=Image.LANCZOS)` on mode "RGB".
///
/// # Panics
/// When a size is 0 or `image.pixels` is not `width · height · 3` bytes.
pub fn resize_lanczos(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (image.width as usize, image.height as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    assert!(
        in_w > 0 && in_h > 0 && out_w > 0 && out_h > 0,
        "cannot resize {in_w}×{in_h} to {out_w}×{out_h}"
    );
    assert_eq!(
        image.pixels.len(),
        in_w * in_h * 3,
        "{in_w}×{in_h} RGB image"
    );

    // `ImagingResampleInner`: an axis that keeps its size gets no pass (`Image.resize` returns
    // a copy when both do). Since Pillow 13 (python-pillow/Pillow#9549) the vertical pass runs
    // first when the height shrinks by more than twice as many pixels as the width; the passes
    // round to 8 bits in between, so the order changes the bytes.
    let rows = (out_h != in_h).then(|| Taps::new(in_h, out_h));
    let cols = (out_w != in_w).then(|| Taps::new(in_w, out_w));
    let (dx, dy) = (in_w as i64 - out_w as i64, in_h as i64 - out_h as i64);
    let pixels = match (&cols, &rows) {
        (None, None) => image.pixels.clone(),
        (Some(cols), None) => horizontal(&image.pixels, in_w, cols, 0..in_h),
        (None, Some(rows)) => vertical(&image.pixels, in_w, rows, 0),
        (Some(cols), Some(rows)) if dy > 0 && dy > 2 * dx => {
            let short = vertical(&image.pixels, in_w, rows, 0);
            horizontal(&short, in_w, cols, 0..out_h)
        }
        (Some(cols), Some(rows)) => {
            // Only the source rows the vertical taps reach go through the horizontal pass.
            let (first, last) = rows.span();
            let wide = horizontal(&image.pixels, in_w, cols, first..last);
            vertical(&wide, out_w, rows, first)
        }
    };
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// The fixed-point filter taps of one axis (`precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Taps {
    /// Per output index: the first source index and the number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out · ksize` weights with `PRECISION_BITS` fractional bits; unused slots are 0.
    weights: Vec<i32>,
    /// The weight row length, `2·⌈support⌉ + 1`.
    ksize: usize,
}

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Self {
        // The box is `float[4]` in C: `(double)(in1 - in0)` with in0 = 0 is the f32 width.
        let scale = f64::from(in_size as f32) / out_size as f64;
        // Downscaling widens the filter by the scale factor; upscaling keeps it at 3.
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for (xx, row) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, then clamps to the image.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut ww = 0.0;
            for (x, w) in k[..xmax].iter_mut().enumerate() {
                *w = lanczos(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *w;
            }
            for (w, fixed) in k[..xmax].iter().zip(row.iter_mut()) {
                let w = if ww == 0.0 { *w } else { w / ww };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                // Round half away from zero, then C's truncating cast.
                let rounded = if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 };
                *fixed = rounded as i32;
            }
            bounds.push((xmin, xmax));
        }
        Self {
            bounds,
            weights,
            ksize,
        }
    }

    /// The source range `[first, last)` that any output index reads.
    fn span(&self) -> (usize, usize) {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let last = self.bounds.last().map_or(0, |b| b.0 + b.1);
        (first, last)
    }

    /// Output index `o`'s first source index and its weights.
    fn of(&self, o: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[o];
        (start, &self.weights[o * self.ksize..][..len])
    }
}

/// Pillow's `lanczos_filter`: `sinc(x)·sinc(x/3)` on `[-3, 3)`, in that order of operations.
fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * PI;
        x.sin() / x
    }
}

/// The accumulator's start: half a unit of the result, so the final shift rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// `clip8`: drops the fractional bits (arithmetic shift, so flooring) and clamps to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples source rows `rows` of an `in_w`-wide image along x; the result has
/// `rows.len()` rows of `cols.bounds.len()` pixels.
fn horizontal(src: &[u8], in_w: usize, cols: &Taps, rows: std::ops::Range<usize>) -> Vec<u8> {
    let out_w = cols.bounds.len();
    let mut out = Vec::with_capacity(rows.len() * out_w * 3);
    for row in src.chunks_exact(in_w * 3).take(rows.end).skip(rows.start) {
        for xx in 0..out_w {
            let (start, k) = cols.of(xx);
            let mut acc = [HALF; 3];
            for (px, &w) in row[start * 3..].chunks_exact(3).zip(k) {
                for (a, &v) in acc.iter_mut().zip(px) {
                    *a += i32::from(v) * w;
                }
            }
            out.extend(acc.map(clip8));
        }
    }
    out
}

/// Resamples a `width`-wide image along y; `rows.bounds` index source rows, of which `src`
/// starts at row `row0`.
fn vertical(src: &[u8], width: usize, rows: &Taps, row0: usize) -> Vec<u8> {
    let stride = width * 3;
    let mut out = Vec::with_capacity(rows.bounds.len() * stride);
    let mut acc = vec![HALF; stride];
    for yy in 0..rows.bounds.len() {
        let (start, k) = rows.of(yy);
        acc.fill(HALF);
        // Whole rows at a time: integer sums, so the order of the terms cannot matter.
        for (line, &w) in src[(start - row0) * stride..].chunks(stride).zip(k) {
            for (a, &v) in acc.iter_mut().zip(line) {
                *a += i32::from(v) * w;
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(64, 96), (64, 128), (96, 64), (40, 27), (7, 3)] {
            let taps = Taps::new(input, output);
            for o in 0..output {
                let sum: i32 = taps.of(o).1.iter().sum();
                // Each weight rounds on its own: at most half a unit off per tap.
                let slack = taps.ksize as i32;
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= slack,
                    "{input}→{output}[{o}]"
                );
            }
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let image = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![0, 128, 255, 1, 2, 3],
        };
        assert_eq!(resize_lanczos(&image, 2, 1), image);
    }

    #[test]
    fn flat_colour_stays_flat() {
        let image = RgbImage {
            width: 5,
            height: 3,
            pixels: [10u8, 200, 77].repeat(15),
        };
        let out = resize_lanczos(&image, 8, 7);
        assert_eq!(out.pixels, [10u8, 200, 77].repeat(56));
    }
}
