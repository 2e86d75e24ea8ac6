//! Each image's noise: the initial latent noise and the stream its sampler draws from.
//!
//! Owns [`NoiseSpec`] (seed, generator kind and A1111's variation-seed settings) and
//! [`ImageNoise`], which hands out the initial noise once and then continues the image's seeded
//! generator for the sampler, in the order A1111's `ImageRNG` does (`first()`, then `next()`).
//! The generators themselves live in [`crate::engine::rng`] (CPU) and
//! [`crate::engine::philox`] (NV).
//!
//! # What A1111 does (`modules/rng.py`, webui 1.10: `ImageRNG.first`/`next`, `slerp`, `randn`)
//!
//! Per image, with `shape = (C, H, W)` latent cells and `noise_shape` the resize-from size
//! (`(C, from_h // 8, from_w // 8)`) when both resize-from sides are positive, else `shape`:
//!
//! 1. If the variation strength is not 0, the **subseed noise** is `randn(subseed,
//!    noise_shape)`: a freshly seeded generator (`manual_seed`), never the image's own. At
//!    strength 0 it is not drawn at all.
//! 2. The **seed noise** is the image's own generator's first draw when `noise_shape ==
//!    shape`; otherwise it comes from another freshly seeded generator for the seed.
//! 3. With subseed noise, the two are blended by `slerp(strength, noise, subnoise)` (see
//!    [`slerp`]).
//! 4. When resizing, the image's own generator draws a full `shape`, and the blended noise is
//!    pasted into it centred (see [`paste_centred`]); cells it does not cover keep the full
//!    draw's values.
//! 5. Either way the image's generator has made exactly one `shape` draw, and every later
//!    draw (`next()`, the sampler's noise) continues it.
//!
//! Not reproduced: A1111's "Eta noise seed delta" setting, which re-seeds the later draws.

use crate::engine::brownian::BrownianTree;
use crate::engine::philox::PhiloxRng;
use crate::engine::rng::{Randn, TorchRng};

/// Above this mean column cosine A1111's `slerp` interpolates linearly instead.
const SLERP_PARALLEL: f32 = 0.9995;

/// Which generator the noise comes from (A1111's "Random number generator source").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RngKind {
    /// torch's CPU generator (A1111 "CPU", diffusers on the CPU): the default.
    #[default]
    Cpu,
    /// torch's CUDA generator, computed on any device as A1111's `rng_philox` does (A1111
    /// "NV").
    Nv,
}

impl RngKind {
    /// The value A1111 writes as `RNG:` in its metadata.
    pub fn a1111_name(self) -> &'static str {
        match self {
            RngKind::Cpu => "CPU",
            RngKind::Nv => "NV",
        }
    }

    /// A fresh generator of this kind for `seed` (A1111's `create_generator`, or the global
    /// generator right after `manual_seed`).
    fn generator(self, seed: u64) -> Generator {
        match self {
            RngKind::Cpu => Generator::Cpu(Box::new(TorchRng::new(seed))),
            RngKind::Nv => Generator::Nv(PhiloxRng::new(seed)),
        }
    }
}

/// What decides one image's noise.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NoiseSpec {
    /// The image's seed.
    pub seed: u64,
    /// The generator.
    pub rng: RngKind,
    /// A1111's "Variation seed": the seed of the noise blended in by `subseed_strength`.
    pub subseed: u64,
    /// A1111's "Variation strength", `0..=1`: 0 is exactly the seed's noise (the subseed's is
    /// not even drawn), 1 the subseed's (up to rounding).
    pub subseed_strength: f32,
    /// A1111's "Resize seed from width/height", as `(height, width)` in latent cells: the
    /// seed (and subseed) noise is drawn at this size and pasted centred into the image's.
    /// `None`, or a zero side, draws at the image's size.
    pub resize_from: Option<(usize, usize)>,
}

/// One generator of either kind (the CPU one boxed: its state is 2.5 KB, Philox's 12 bytes).
#[derive(Clone, Debug)]
enum Generator {
    Cpu(Box<TorchRng>),
    Nv(PhiloxRng),
}

impl Randn for Generator {
    fn randn(&mut self, numel: usize) -> Vec<f32> {
        match self {
            Generator::Cpu(rng) => rng.randn(numel),
            Generator::Nv(rng) => rng.randn(numel),
        }
    }
}

/// One image's noise stream: [`first`](Self::first) once, then [`Randn::randn`] for every
/// draw the sampler makes.
pub struct ImageNoise {
    spec: NoiseSpec,
    /// The image's own generator (`ImageRNG.generators[i]`).
    generator: Generator,
}

impl ImageNoise {
    /// The stream for `spec`.
    pub fn new(spec: &NoiseSpec) -> Self {
        Self {
            spec: *spec,
            generator: spec.rng.generator(spec.seed),
        }
    }

    /// The initial latent noise of shape `[channels, height, width]` (latent cells), before
    /// the sampler scales it: A1111's `ImageRNG.first()` for one image.
    pub fn first(&mut self, shape: [usize; 3]) -> Vec<f32> {
        let spec = self.spec;
        let noise_shape = match spec.resize_from {
            Some((h, w)) if h > 0 && w > 0 => [shape[0], h, w],
            _ => shape,
        };
        let numel = noise_shape.iter().product();
        let subnoise =
            (spec.subseed_strength != 0.0).then(|| spec.rng.generator(spec.subseed).randn(numel));
        let resized = noise_shape != shape;
        let mut noise = if resized {
            spec.rng.generator(spec.seed).randn(numel)
        } else {
            self.generator.randn(numel)
        };
        if let Some(subnoise) = subnoise {
            noise = slerp(spec.subseed_strength, &noise, &subnoise, noise_shape);
        }
        if resized {
            let mut full = self.generator.randn(shape.iter().product());
            paste_centred(&noise, noise_shape, &mut full, shape);
            noise = full;
        }
        noise
    }
}

impl Randn for ImageNoise {
    /// The image generator's next draw (A1111's `ImageRNG.next()` after the first).
    fn randn(&mut self, numel: usize) -> Vec<f32> {
        self.generator.randn(numel)
    }

    /// A1111's `BrownianTreeNoiseSampler` for this image's seed. Its nodes draw from torch's
    /// CPU generator, or with NV noise from the CUDA generator (what A1111 on an NVIDIA card
    /// uses for these trees whatever its RNG source says).
    fn brownian_tree(&self, numel: usize, sigma_min: f32, sigma_max: f32) -> Option<BrownianTree> {
        let seed = self.spec.seed;
        Some(match self.spec.rng {
            RngKind::Cpu => BrownianTree::new(seed, numel, sigma_min, sigma_max),
            RngKind::Nv => BrownianTree::with_source(seed, numel, sigma_min, sigma_max, |s, n| {
                PhiloxRng::new(s).randn(n)
            }),
        })
    }
}

/// A1111's `slerp(val, low, high)` (`modules/rng.py`) on one image's `[C, H, W]` noise.
///
/// A1111 calls it on 3-D tensors, so its `dim=1` is the **height** axis: each `(channel,
/// column)` pair is one vector of `H` values. Every column is normalised, and its cosine is
/// the sum of products of the normalised columns. When the **mean** cosine over all columns
/// exceeds 0.9995 the result is `low·val + high·(1 − val)` (note: the weights are the
/// reverse of the slerp below, as in A1111). Otherwise, per column with `ω = acos(cos)`:
/// `sin((1 − val)ω)/sin ω · low + sin(val·ω)/sin ω · high`. Computed in float32 as torch
/// does, with `1 − val` taken in double first (Python's `1.0 - val`).
fn slerp(val: f32, low: &[f32], high: &[f32], shape: [usize; 3]) -> Vec<f32> {
    let [channels, height, width] = shape;
    let at = |c: usize, i: usize, j: usize| (c * height + i) * width + j;
    let column_norm = |data: &[f32], c: usize, j: usize| {
        (0..height)
            .map(|i| data[at(c, i, j)] * data[at(c, i, j)])
            .sum::<f32>()
            .sqrt()
    };
    let mut cosines = Vec::with_capacity(channels * width);
    for c in 0..channels {
        for j in 0..width {
            let (low_norm, high_norm) = (column_norm(low, c, j), column_norm(high, c, j));
            let dot: f32 = (0..height)
                .map(|i| (low[at(c, i, j)] / low_norm) * (high[at(c, i, j)] / high_norm))
                .sum();
            cosines.push(dot);
        }
    }
    // Rounding to float32 is what torch does with the Python scalar `1.0 - val`.
    let rest = (1.0 - f64::from(val)) as f32;
    let mean = cosines.iter().sum::<f32>() / cosines.len().max(1) as f32;
    if mean > SLERP_PARALLEL {
        return low
            .iter()
            .zip(high)
            .map(|(&l, &h)| l * val + h * rest)
            .collect();
    }
    let mut out = vec![0.0; low.len()];
    for c in 0..channels {
        for j in 0..width {
            let omega = cosines[c * width + j].acos();
            let so = omega.sin();
            let (a, b) = ((rest * omega).sin() / so, (val * omega).sin() / so);
            for i in 0..height {
                let k = at(c, i, j);
                out[k] = a * low[k] + b * high[k];
            }
        }
    }
    out
}

/// Where one axis of the resize-from noise lands in the image (the centring arithmetic of
/// A1111's `ImageRNG.first`): `(target start, source start, length)`.
///
/// The offset is `(target − source) // 2` with Python's floor division. A smaller source is
/// placed whole at that offset; a larger one is cropped by `−offset` on the leading side and
/// keeps `source + 2·offset` cells, so an odd surplus loses one more cell at the end and the
/// image's last cell then keeps its own noise.
fn centre(target: usize, source: usize) -> (usize, usize, usize) {
    if source <= target {
        ((target - source) / 2, 0, source)
    } else {
        // floor((target − source) / 2) = −ceil(surplus / 2).
        let crop = (source - target).div_ceil(2);
        (0, crop, source - 2 * crop)
    }
}

/// Copies the centred window of `noise` (`[C, h, w]`) over `full` (`[C, H, W]`), as A1111's
/// `x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]`.
fn paste_centred(noise: &[f32], from: [usize; 3], full: &mut [f32], to: [usize; 3]) {
    let (ty, sy, rows) = centre(to[1], from[1]);
    let (tx, sx, cols) = centre(to[2], from[2]);
    for c in 0..to[0] {
        for i in 0..rows {
            let src = (c * from[1] + sy + i) * from[2] + sx;
            let dst = (c * to[1] + ty + i) * to[2] + tx;
            full[dst..dst + cols].copy_from_slice(&noise[src..src + cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: [usize; 3] = [4, 8, 8];

    fn spec(strength: f32, resize_from: Option<(usize, usize)>) -> NoiseSpec {
        NoiseSpec {
            seed: 42,
            rng: RngKind::Cpu,
            subseed: 7,
            subseed_strength: strength,
            resize_from,
        }
    }

    #[test]
    fn strength_zero_is_the_plain_seed_and_keeps_its_stream() {
        let mut plain = TorchRng::new(42);
        let mut noise = ImageNoise::new(&spec(0.0, None));
        assert_eq!(noise.first(SHAPE), plain.randn(256));
        assert_eq!(noise.randn(256), plain.randn(256));
    }

    #[test]
    fn variation_never_changes_which_generator_continues() {
        for resize in [None, Some((6, 10))] {
            let mut noise = ImageNoise::new(&spec(0.3, resize));
            noise.first(SHAPE);
            let mut plain = TorchRng::new(42);
            plain.randn(256);
            assert_eq!(noise.randn(256), plain.randn(256), "{resize:?}");
        }
    }

    #[test]
    fn resize_from_the_same_size_is_no_resize() {
        let same = ImageNoise::new(&spec(0.3, Some((8, 8)))).first(SHAPE);
        assert_eq!(same, ImageNoise::new(&spec(0.3, None)).first(SHAPE));
        let zero = ImageNoise::new(&spec(0.3, Some((0, 6)))).first(SHAPE);
        assert_eq!(zero, same);
    }

    #[test]
    fn centring_follows_python_floor_division() {
        assert_eq!(centre(8, 6), (1, 0, 6));
        assert_eq!(centre(8, 5), (1, 0, 5)); // 3 // 2 = 1
        assert_eq!(centre(8, 10), (0, 1, 8));
        assert_eq!(centre(8, 11), (0, 2, 7)); // -3 // 2 = -2: one cell short
        assert_eq!(centre(8, 8), (0, 0, 8));
    }

    #[test]
    fn paste_keeps_uncovered_cells() {
        let noise: Vec<f32> = (0..2 * 3).map(|v| v as f32 + 100.0).collect();
        let mut full = vec![0.0; 2 * 5];
        paste_centred(&noise, [1, 2, 3], &mut full, [1, 2, 5]);
        assert_eq!(
            full,
            [0.0, 100.0, 101.0, 102.0, 0.0, 0.0, 103.0, 104.0, 105.0, 0.0]
        );
    }

    #[test]
    fn nearly_parallel_noise_is_mixed_linearly_with_a1111s_weights() {
        // One channel, two columns of height 2; high is low nudged, so every cosine is ~1.
        let low = [1.0, 3.0, 2.0, 4.0];
        let high = [1.0, 3.0001, 2.0, 4.0001];
        let out = slerp(0.25, &low, &high, [1, 2, 2]);
        for k in 0..4 {
            // `low·val + high·(1 − val)`: mostly `high` at val 0.25, as A1111 computes it.
            assert_eq!(out[k], low[k] * 0.25 + high[k] * 0.75);
        }
    }

    #[test]
    fn slerp_ends_are_its_inputs() {
        let low = TorchRng::new(1).randn(256);
        let high = TorchRng::new(2).randn(256);
        for (val, want) in [(0.0, &low), (1.0, &high)] {
            let out = slerp(val, &low, &high, SHAPE);
            let err = out
                .iter()
                .zip(want.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "val {val}: {err}");
        }
    }

    #[test]
    fn slerp_normalises_over_the_height_axis() {
        // Scaling one column of `high` by 3 leaves every result but that column's unchanged.
        let low = TorchRng::new(1).randn(256);
        let high = TorchRng::new(2).randn(256);
        let mut scaled = high.clone();
        for i in 0..8 {
            scaled[i * 8 + 5] *= 3.0;
        }
        let a = slerp(0.3, &low, &high, SHAPE);
        let b = slerp(0.3, &low, &scaled, SHAPE);
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            let in_column = k < 64 && k % 8 == 5;
            if !in_column {
                assert_eq!(x, y, "[{k}]");
            }
        }
    }

    #[test]
    fn nv_uses_philox_for_seed_and_subseed() {
        let nv = |strength| NoiseSpec {
            rng: RngKind::Nv,
            ..spec(strength, None)
        };
        let mut plain = ImageNoise::new(&nv(0.0));
        let mut philox = PhiloxRng::new(42);
        assert_eq!(plain.first(SHAPE), philox.randn(256));
        assert_eq!(plain.randn(256), philox.randn(256));

        let blended = ImageNoise::new(&nv(1.0)).first(SHAPE);
        let subseed = PhiloxRng::new(7).randn(256);
        let err = blended
            .iter()
            .zip(&subseed)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-5, "{err}");
        assert_eq!(RngKind::Nv.a1111_name(), "NV");
    }
}
