//! Gaussian noise as torch's CUDA generator gives it, computed on any device (A1111's "NV"
//! random number generator source).
//!
//! Owns [`PhiloxRng`], which reproduces AUTOMATIC1111's `modules/rng_philox.py` (`Generator`):
//! its CPU imitation of
//! `torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")`.
//! Like [`crate::engine::rng`] it knows only element counts, never shapes or devices.
//!
//! # What A1111 does (`modules/rng_philox.py`, read at webui master)
//!
//! - **Block cipher** (`philox4_32`, `philox4_round`): Philox 4×32 with 10 rounds and the
//!   Random123 constants: multipliers `0xD2511F53` (counter word 0) and `0xCD9E8D57` (word 2),
//!   key bumps `0x9E3779B9` and `0xBB67AE85` between rounds. One round maps
//!   `(c0, c1, c2, c3)` to `(hi(c2·M1) ^ c1 ^ k0, lo(c2·M1), hi(c0·M0) ^ c3 ^ k1, lo(c0·M0))`.
//! - **Layout** (`Generator.randn`): the key is the 64-bit seed split into `(low, high)` u32
//!   halves; element `i` of a draw uses the counter `(offset, 0, i, 0)`, so each element is its
//!   own Philox block (as each CUDA thread is its own curand subsequence), and `offset` grows by
//!   one per `randn` call, whatever its size. Element indices are u32: a single draw holds at
//!   most 2^32 values.
//! - **Box–Muller** (`box_muller`): only the first two output words are used and only the
//!   `sin` half is kept: `u = x·C + C/2`, `v = y·C₂π + C₂π/2`, `value = sqrt(-2 ln u)·sin v`,
//!   where `C = f32(2.3283064e-10)` and `C₂π = f32(2.3283064e-10 · 6.2831855)` (the product
//!   taken in double, then rounded). The constants are float32, but numpy promotes a `uint32`
//!   array times a `float32` array to float64, so the arithmetic runs in double and is rounded
//!   to float32 once at the end. curand computes the same formula in float32 with its own
//!   `logf`/`sinf`, so torch CUDA and this generator can differ by an ulp or so.

/// Philox multiplier for counter word 0 (`philox_m[0]`).
const MUL_0: u32 = 0xD251_1F53;
/// Philox multiplier for counter word 2 (`philox_m[1]`).
const MUL_2: u32 = 0xCD9E_8D57;
/// Added to key word 0 after every round but the last (`philox_w[0]`, the golden ratio).
const BUMP_0: u32 = 0x9E37_79B9;
/// Added to key word 1 after every round but the last (`philox_w[1]`, √3 − 1).
const BUMP_1: u32 = 0xBB67_AE85;
/// Philox 4×32-10.
const ROUNDS: usize = 10;

/// 2^-32 as A1111 writes it (`two_pow32_inv`), a float32.
const TWO_POW32_INV: f32 = 2.328_306_4e-10;
/// `two_pow32_inv_2pi`: the double product `2.3283064e-10 * 6.2831855` rounded to float32.
/// (curand's `CURAND_2POW32_INV_2PI`.)
#[allow(
    clippy::approx_constant,
    reason = "A1111's literal 6.2831855, kept as written: the double product must round as the \
              Python does"
)]
const TWO_POW32_INV_2PI: f32 = (2.328_306_4e-10_f64 * 6.283_185_5_f64) as f32;

/// A seeded normal-noise stream identical to A1111's `rng_philox.Generator(seed)`, which
/// imitates a `torch.Generator("cuda")` used with `torch.randn`.
///
/// Successive [`randn`](Self::randn) calls continue one stream: each call uses the next
/// Philox offset, as successive CUDA `torch.randn(..., generator=g)` calls do.
#[derive(Clone, Debug)]
pub struct PhiloxRng {
    key: [u32; 2],
    offset: u32,
}

impl PhiloxRng {
    /// A generator in the state `rng_philox.Generator(seed)` starts in (offset 0). All 64 bits
    /// of `seed` form the key.
    pub fn new(seed: u64) -> Self {
        // Splitting the seed into its two 32-bit halves is the point.
        let low = (seed & 0xffff_ffff) as u32;
        let high = (seed >> 32) as u32;
        Self {
            key: [low, high],
            offset: 0,
        }
    }

    /// The next `numel` values of `torch.randn(numel, generator=g, device="cuda")`.
    ///
    /// The result is the row-major flattening of any shape with `numel` elements.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        let offset = self.offset;
        self.offset = self.offset.wrapping_add(1);
        (0..numel)
            .map(|index| {
                // A1111 stores the index in a u32 counter word (`np.arange(n, dtype=np.uint32)`).
                let block = philox4x32_10([offset, 0, index as u32, 0], self.key);
                box_muller(block[0], block[1])
            })
            .collect()
    }
}

impl crate::engine::rng::Randn for PhiloxRng {
    fn randn(&mut self, numel: usize) -> Vec<f32> {
        PhiloxRng::randn(self, numel)
    }
}

/// `(high, low)` halves of the 64-bit product.
fn mul_hi_lo(a: u32, b: u32) -> (u32, u32) {
    let product = u64::from(a) * u64::from(b);
    // Truncation to the two halves is the point.
    ((product >> 32) as u32, product as u32)
}

/// One Philox 4×32 round (`philox4_round`).
fn round(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mul_hi_lo(counter[0], MUL_0);
    let (hi2, lo2) = mul_hi_lo(counter[2], MUL_2);
    [
        hi2 ^ counter[1] ^ key[0],
        lo2,
        hi0 ^ counter[3] ^ key[1],
        lo0,
    ]
}

/// Philox 4×32-10 (`philox4_32`): ten rounds, the key bumped between them.
fn philox4x32_10(mut counter: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for _ in 0..ROUNDS - 1 {
        counter = round(counter, key);
        key = [key[0].wrapping_add(BUMP_0), key[1].wrapping_add(BUMP_1)];
    }
    round(counter, key)
}

/// `box_muller`: the `sin` half of one Box–Muller pair, computed in double from float32
/// constants as numpy evaluates A1111's expression, rounded to float32 once.
fn box_muller(x: u32, y: u32) -> f32 {
    // `two_pow32_inv / 2` is a float32 array divided by an int: halved in float32 (exact).
    let u = f64::from(x) * f64::from(TWO_POW32_INV) + f64::from(TWO_POW32_INV / 2.0);
    let v = f64::from(y) * f64::from(TWO_POW32_INV_2PI) + f64::from(TWO_POW32_INV_2PI / 2.0);
    let radius = (-2.0 * u.ln()).sqrt();
    // Rounding to float32 once, at the end, is what `.astype(np.float32)` does.
    (radius * v.sin()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_round_as_numpy_does() {
        // `np.array([2.3283064e-10], dtype=np.float32)` and the 2π product, bit for bit.
        assert_eq!(TWO_POW32_INV.to_bits(), 0x2f80_0000);
        assert_eq!(TWO_POW32_INV_2PI.to_bits(), 0x30c9_0fdb);
    }

    #[test]
    fn block_cipher_matches_random123_known_answers() {
        // Random123's `kat_vectors` for philox4x32_10 (also in TensorFlow's
        // `random/philox_test` and XLA's stateful random tests).
        let cases = [
            (
                [0; 4],
                [0; 2],
                [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
            ),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (counter, key, want) in cases {
            assert_eq!(philox4x32_10(counter, key), want, "{counter:x?} {key:x?}");
        }
    }

    #[test]
    fn seed_halves_form_the_key() {
        let rng = PhiloxRng::new(0x1234_5678_9abc_def0);
        assert_eq!(rng.key, [0x9abc_def0, 0x1234_5678]);
    }

    #[test]
    fn each_call_takes_the_next_offset() {
        // A draw of n is the first n values of a longer draw at the same offset, and a
        // second call starts over at element 0 of offset 1.
        let mut short = PhiloxRng::new(5);
        let mut long = PhiloxRng::new(5);
        let first = short.randn(4);
        assert_eq!(first, long.randn(9)[..4]);
        assert_eq!(short.randn(9), long.randn(9));
        assert_ne!(first, short.randn(4));
    }

    #[test]
    fn the_whole_seed_matters() {
        // Unlike torch's CPU generator, seeds differing above bit 32 give different streams.
        let a = PhiloxRng::new(7).randn(8);
        let b = PhiloxRng::new(7 + (1u64 << 32)).randn(8);
        assert_ne!(a, b);
    }

    #[test]
    fn extreme_words_stay_finite() {
        // x = 0 gives the smallest u (2^-33), x = u32::MAX the largest (just below 1).
        for (x, y) in [(0, 0), (u32::MAX, u32::MAX), (0, u32::MAX), (u32::MAX, 0)] {
            assert!(box_muller(x, y).is_finite(), "({x}, {y})");
        }
    }
}
