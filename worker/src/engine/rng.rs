//! Gaussian noise that matches PyTorch's CPU generator bit for bit.
//!
//! Owns [`TorchRng`], which reproduces
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`
//! and keeps drawing from the same stream across calls, as one Python generator would. It knows
//! nothing about tensors or shapes beyond an element count: callers reshape the values.
//!
//! # What PyTorch does (torch 2.15, read in the wheel's headers and symbols)
//!
//! - **Engine** (`aten/src/ATen/core/MT19937RNGEngine.h`): a plain 32-bit MT19937. Seeding
//!   (`init_with_uint32`) keeps only `seed & 0xffff_ffff`, so seeds `s` and `s + 2^32` give the
//!   same stream. `manual_seed` takes any `u64` (`CPUGeneratorImpl::set_current_seed` in
//!   `aten/src/ATen/CPUGeneratorImpl.cpp`) and also clears the cached normal sample.
//! - **Uniforms** (`aten/src/ATen/core/TransformationHelper.h`, `uniform_real`): a float takes
//!   the low 24 bits of one 32-bit draw times 2^-24; a double takes the low 53 bits of
//!   `random64()` times 2^-53, where `random64()` is `(first draw << 32) | second draw`.
//! - **numel >= 16** (`aten/src/ATen/native/cpu/DistributionTemplates.h`, `normal_fill`): fill
//!   the whole buffer with float uniforms first, then run Box–Muller in place on each full block
//!   of 16: for `j` in 0..8, `u1 = 1 - data[j]`, `u2 = data[j + 8]`, `r = sqrt(-2 ln u1)`,
//!   `θ = 2π·u2`, `data[j] = r·cos θ`, `data[j + 8] = r·sin θ`. When numel is not a multiple of
//!   16, 16 fresh uniforms overwrite the *last* 16 slots (overlapping the previous block) and
//!   that window is transformed again. How `ln`, `cos` and `sin` are evaluated depends on the
//!   kernel torch dispatches to, see [`NormalKernel`].
//! - **numel < 16** (same file, `normal_kernel` fallback; `normal_distribution<double>` in
//!   `aten/src/ATen/core/DistributionsHelper.h`): each element is a double Box–Muller sample cast
//!   to float: `u1`, `u2` are double uniforms drawn in that order, `r = sqrt(-2 log1p(-u2))`,
//!   `θ = 2π·u1`; `r·cos θ` is returned and `r·sin θ` is cached in the generator and returned
//!   by the next small-path request, even one in a later `randn` call. The large path neither
//!   reads nor clears that cache. This path is the same on every CPU.

/// MT19937 state size (`MERSENNE_STATE_N`).
const STATE_N: usize = 624;
/// MT19937 shift size (`MERSENNE_STATE_M`).
const STATE_M: usize = 397;
/// 2^-24: one float uniform step (`uniform_real<float>`).
const FLOAT_DIVISOR: f32 = 1.0 / (1u32 << 24) as f32;
/// 2^-53: one double uniform step (`uniform_real<double>`).
const DOUBLE_DIVISOR: f64 = 1.0 / (1u64 << 53) as f64;
/// Below this many elements torch samples each value with the scalar double path.
const VECTOR_FILL_MIN: usize = 16;

/// The 32-bit Mersenne Twister exactly as `at::mt19937` seeds and steps it.
#[derive(Clone, Debug)]
struct Mt19937 {
    state: [u32; STATE_N],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; STATE_N];
        state[0] = seed;
        for j in 1..STATE_N {
            let prev = state[j - 1];
            // `j < 624`, so the cast is lossless.
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            index: STATE_N,
        }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= STATE_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random64()`: the first draw fills the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (hi << 32) | lo
    }

    fn twist(&mut self) {
        for i in 0..STATE_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % STATE_N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + STATE_M) % STATE_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }
}

/// Which of torch's Box–Muller kernels [`TorchRng::randn`] reproduces for 16+ elements.
///
/// torch 2.15's x86 wheels compile the normal kernel for the `DEFAULT` and `AVX2` CPU
/// capabilities only (`nm libtorch_cpu.so` lists `native::DEFAULT::` and `native::AVX2::`
/// instances of `normal_kernel`, no `AVX512::`), so every x86 CPU with AVX2, AVX512 ones
/// included, runs the AVX2 kernel. The two kernels differ by up to a few float32 ulps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalKernel {
    /// `NormalFill16<float>` under `CPU_CAPABILITY_AVX2`: `log256_ps` and `sincos256_ps` from
    /// `aten/src/ATen/native/cpu/avx_mathfun.h` (Cephes polynomials), `θ = (float)2π · u2` in
    /// float, and GCC's contraction of each multiply feeding an add into one FMA. What torch
    /// on a current x86 machine produces.
    #[default]
    Avx2,
    /// The generic `NormalFill16` (`ATEN_CPU_CAPABILITY=default`, non-x86 builds): libm
    /// `logf`/`cosf`/`sinf`, with `θ` rounded to float from a double product. Matches glibc's
    /// libm; other libms may differ in the last bit.
    Scalar,
}

/// A stream of standard normal float32 values: what samplers draw their noise from.
///
/// Successive calls continue one stream, as successive `torch.randn(..., generator=g)` calls do.
pub trait Randn {
    /// The next `numel` values, the row-major flattening of any shape with `numel` elements.
    fn randn(&mut self, numel: usize) -> Vec<f32>;

    /// The image's Brownian motion over `[sigma_min, sigma_max]` for DPM++ SDE (A1111 seeds it
    /// from the image's seed, not from this stream); `None` for a bare stream with no seed.
    fn brownian_tree(
        &self,
        _numel: usize,
        _sigma_min: f32,
        _sigma_max: f32,
    ) -> Option<crate::engine::brownian::BrownianTree> {
        None
    }
}

impl Randn for TorchRng {
    fn randn(&mut self, numel: usize) -> Vec<f32> {
        TorchRng::randn(self, numel)
    }
}

/// A seeded normal-noise stream identical to a `torch.Generator("cpu")` used with `torch.randn`.
///
/// Successive [`randn`](Self::randn) calls continue one stream, exactly as successive
/// `torch.randn(..., generator=g)` calls with the same `g` do.
#[derive(Clone, Debug)]
pub struct TorchRng {
    engine: Mt19937,
    kernel: NormalKernel,
    /// The `r·sin θ` half of the last scalar Box–Muller pair (`next_double_normal_sample_`).
    cached_normal: Option<f64>,
}

impl TorchRng {
    /// A generator in the state `torch.Generator("cpu").manual_seed(seed)` leaves, reproducing
    /// torch's AVX2 kernel.
    ///
    /// Only the low 32 bits of `seed` reach the engine, as in torch.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::default())
    }

    /// Like [`new`](Self::new), reproducing the given torch kernel for 16+ element draws.
    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        // Truncation is the point: torch's `init_with_uint32` keeps `seed & 0xffffffff`.
        let low = (seed & 0xffff_ffff) as u32;
        Self {
            engine: Mt19937::new(low),
            kernel,
            cached_normal: None,
        }
    }

    /// The next `numel` values of `torch.randn(numel, generator=g, dtype=torch.float32)`.
    ///
    /// The result is the row-major flattening of any shape with `numel` elements.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel >= VECTOR_FILL_MIN {
            self.randn_blocks(numel)
        } else {
            // torch computes the sample in double and casts it, so rounding here is intended.
            (0..numel).map(|_| self.normal_f64() as f32).collect()
        }
    }

    /// `normal_fill`: uniforms first, then Box–Muller over blocks of 16 in place.
    fn randn_blocks(&mut self, numel: usize) -> Vec<f32> {
        let transform = match self.kernel {
            NormalKernel::Avx2 => box_muller_16_avx2,
            NormalKernel::Scalar => box_muller_16_scalar,
        };
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(VECTOR_FILL_MIN) {
            transform(block);
        }
        if !numel.is_multiple_of(VECTOR_FILL_MIN) {
            // Redraw the last 16 slots; they overlap the final full block on purpose.
            let tail = &mut data[numel - VECTOR_FILL_MIN..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            transform(tail);
        }
        data
    }

    fn uniform_f32(&mut self) -> f32 {
        // The masked value is below 2^24, so the conversion to f32 is exact.
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * FLOAT_DIVISOR
    }

    fn uniform_f64(&mut self) -> f64 {
        // The masked value is below 2^53, so the conversion to f64 is exact.
        (self.engine.next_u64() & ((1u64 << 53) - 1)) as f64 * DOUBLE_DIVISOR
    }

    /// `normal_distribution<double>` with mean 0 and std 1, including torch's cached pair.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

/// The generic `NormalFill16` with mean 0 and std 1 (its `fma(x, 1, 0)` is `x`).
fn box_muller_16_scalar(block: &mut [f32]) {
    let (cos_half, sin_half) = block.split_at_mut(VECTOR_FILL_MIN / 2);
    for (first, second) in cos_half.iter_mut().zip(sin_half.iter_mut()) {
        let u1 = 1.0 - *first;
        let radius = (-2.0 * u1.ln()).sqrt();
        // torch multiplies `2.0f * pi<double>` by the float in double, then stores a float.
        let theta = (2.0 * std::f64::consts::PI * f64::from(*second)) as f32;
        *first = radius * theta.cos();
        *second = radius * theta.sin();
    }
}

/// The AVX2 `NormalFill16` with mean 0 and std 1, one lane at a time.
fn box_muller_16_avx2(block: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: the double 2π rounded to float once.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let (cos_half, sin_half) = block.split_at_mut(VECTOR_FILL_MIN / 2);
    for (first, second) in cos_half.iter_mut().zip(sin_half.iter_mut()) {
        let radius = (-2.0 * cephes::log(1.0 - *first)).sqrt();
        let (sin, cos) = cephes::sin_cos(two_pi * *second);
        *first = radius * cos;
        *second = radius * sin;
    }
}

/// Single-lane versions of `log256_ps` and `sincos256_ps` (Cephes `logf`/`sinf`/`cosf` as
/// ported by Julien Pommier's `sse_mathfun`), exactly as torch's AVX2 build evaluates them.
///
/// Every `a * b + c` written with `mul_add` is a multiply-add that GCC fuses into one FMA in
/// that build (`-mfma`, default `-ffp-contract=fast`); every plain `*` and `+` stays separate.
/// This is what makes the results bit-identical to torch, checked against `rng.json`.
#[allow(
    clippy::excessive_precision,
    reason = "the header's literals, kept digit for digit so they round as the C++ does"
)]
mod cephes {
    // The literals are the header's, written as doubles and rounded to float once, as the
    // C++ initializers `static const float x[8] = { 7.0376836292E-2, ... }` do.
    const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    /// `logf` polynomial, highest degree first.
    const LOG_P: [f32; 9] = [
        7.0376836292E-2_f64 as f32,
        -1.1514610310E-1_f64 as f32,
        1.1676998740E-1_f64 as f32,
        -1.2420140846E-1_f64 as f32,
        1.4249322787E-1_f64 as f32,
        -1.6668057665E-1_f64 as f32,
        2.0000714765E-1_f64 as f32,
        -2.4999993993E-1_f64 as f32,
        3.3333331174E-1_f64 as f32,
    ];
    /// ln 2 split in a short head and a small tail.
    const LN2_TAIL: f32 = -2.12194440e-4_f64 as f32;
    const LN2_HEAD: f32 = 0.693359375;
    /// π/4 split in three parts, negated (Cody–Waite reduction).
    const MINUS_PI_4: [f32; 3] = [
        -0.78515625,
        -2.4187564849853515625e-4_f64 as f32,
        -3.77489497744594108e-8_f64 as f32,
    ];
    const SIN_P: [f32; 3] = [
        -1.9515295891E-4_f64 as f32,
        8.3321608736E-3_f64 as f32,
        -1.6666654611E-1_f64 as f32,
    ];
    const COS_P: [f32; 3] = [
        2.443315711809948E-005_f64 as f32,
        -1.388731625493765E-003_f64 as f32,
        4.166664568298827E-002_f64 as f32,
    ];
    const FOUR_OVER_PI: f32 = 1.27323954473516_f64 as f32;

    /// `log256_ps` for positive, finite `x` (the only inputs Box–Muller gives it).
    pub(super) fn log(x: f32) -> f32 {
        let x = x.max(f32::MIN_POSITIVE);
        // Unbiased exponent + 1, with the mantissa moved into [0.5, 1).
        let mut exponent = ((x.to_bits() >> 23) as i32 - 0x7f) as f32 + 1.0;
        let mut m = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
        let below = m < SQRT_HALF;
        let doubled_part = if below { m } else { 0.0 };
        m -= 1.0;
        exponent -= if below { 1.0 } else { 0.0 };
        m += doubled_part;

        let z = m * m;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(m, p);
        }
        y *= m;
        y = y.mul_add(z, exponent * LN2_TAIL);
        y = (-z).mul_add(0.5, y);
        exponent.mul_add(LN2_HEAD, m + y)
    }

    /// `sincos256_ps` for finite `x`: `(sin x, cos x)`.
    pub(super) fn sin_cos(x: f32) -> (f32, f32) {
        let sign_in = x.to_bits() & 0x8000_0000;
        let mut x = x.abs();
        // Octant index rounded up to even; `cvttps` truncates toward zero.
        let octant = ((x * FOUR_OVER_PI) as i32 + 1) & !1;
        let y = octant as f32;
        let sin_sign = sign_in ^ (((octant & 4) as u32) << 29);
        let cos_sign = ((!(octant - 2) & 4) as u32) << 29;
        let use_sin_poly_for_sin = octant & 2 == 0;

        for part in MINUS_PI_4 {
            x = y.mul_add(part, x);
        }
        let z = x * x;

        let mut cos_poly = COS_P[0].mul_add(z, COS_P[1]);
        cos_poly = cos_poly.mul_add(z, COS_P[2]);
        cos_poly *= z;
        cos_poly = cos_poly.mul_add(z, -(z * 0.5));
        cos_poly += 1.0;

        let mut sin_poly = SIN_P[0].mul_add(z, SIN_P[1]);
        sin_poly = sin_poly.mul_add(z, SIN_P[2]);
        sin_poly *= z;
        sin_poly = sin_poly.mul_add(x, x);

        let (sin, cos) = if use_sin_poly_for_sin {
            (sin_poly, cos_poly)
        } else {
            (cos_poly, sin_poly)
        };
        (
            f32::from_bits(sin.to_bits() ^ sin_sign),
            f32::from_bits(cos.to_bits() ^ cos_sign),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard fixes the 10000th output of a default-seeded (5489) mt19937.
        let mut engine = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = engine.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seeds_differing_above_bit_32_share_a_stream() {
        let mut low = TorchRng::new(7);
        let mut high = TorchRng::new(7 + (1u64 << 32));
        assert_eq!(low.randn(40), high.randn(40));
    }

    #[test]
    fn small_draws_use_the_cached_second_sample() {
        // One scalar pair feeds two single-element draws.
        let mut rng = TorchRng::new(0);
        let first = rng.randn(1);
        let second = rng.randn(1);
        let mut both = TorchRng::new(0);
        assert_eq!(both.randn(2), [first[0], second[0]]);
    }

    #[test]
    fn zero_elements_draw_nothing() {
        let mut rng = TorchRng::new(3);
        assert!(rng.randn(0).is_empty());
        assert_eq!(rng.randn(16), TorchRng::new(3).randn(16));
    }
}
