//! Vectorised math shared by the kernels: a per-CPU dispatch macro, `exp`, `erfc` and the
//! activations built on them.
//!
//! The functions here are scalar, branch-free and `#[inline(always)]`, so that a loop over a
//! slice that calls them vectorises in whichever instruction set [`multiversion!`] compiled
//! the loop for (AVX-512F, AVX2, or the baseline). They use plain multiplies and adds (no
//! fused multiply-add), so every code path rounds alike and gives bit-identical results.

/// Defines `fn $name` that runs its body compiled for AVX-512F or AVX2 when the CPU has them
/// (checked at run time; the check is a cached load), else for the baseline target.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: this CPU has AVX-512F, checked on the line above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: this CPU has AVX2, checked on the line above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Below this `exp` returns 0 (the true value is under 1.7e-38, near the subnormals).
const EXP_LO: f32 = -87.0;
/// Above this `exp` returns +∞ (the true value is over 1.6e38).
const EXP_HI: f32 = 88.0;
/// 1.5·2²³: adding it to a float of magnitude < 2²² rounds that float to an integer held in
/// the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// ln 2 split so that `n · LN2_HI` is exact for |n| < 2⁹ (Cody and Waite's reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `eˣ` with a relative error under 2e-7 on [−87, 88] (1.02e-7 measured in the tests); 0
/// below, +∞ above, NaN for NaN.
///
/// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor series to degree 7 (truncation
/// under 6e-9), then `2ⁿ` put straight into the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    let t = xc * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [−126, 127], so n + 127 is a normal float's biased exponent.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    let y = p * scale;
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// The complementary error function, with a relative error under 6e-7 for |z| ≤ 2 that grows
/// as about 2e-7·z² beyond (the rounding of z² in f32 inside the exponential), and an absolute
/// error under 5e-7 everywhere (measured in this module's tests).
///
/// The Chebyshev-fitted form `erfc(z) ≈ t·exp(−z² + P(t))`, `t = 1/(1 + |z|/2)`, whose own
/// fractional error is under 1.2e-7 (Press et al., *Numerical Recipes in C*, 2nd ed., §6.2;
/// its coefficients, rounded to f32),
/// and `erfc(−z) = 2 − erfc(z)`. Unlike `1 − erf(z)` it keeps its relative accuracy in the
/// tail, where `erfc` is tiny.
#[inline(always)]
pub(crate) fn erfc(z: f32) -> f32 {
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let p = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let y = t * exp(p - a * a);
    if z < 0.0 { 2.0 - y } else { y }
}

/// `x·Φ(x) = x·erfc(−x/√2)/2`: PyTorch's exact (`approximate="none"`) GELU.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * erfc(-x * std::f32::consts::FRAC_1_SQRT_2)
}

/// `1/(1 + e⁻ˣ)`, as PyTorch's `sigmoid`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `x·sigmoid(x)`, written as PyTorch and candle write it: `x / (1 + e⁻ˣ)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erfc in f64 by its continued fraction (large z) or the series of erf (small z), to
    /// ~1e-15 relative: a reference independent of the form under test.
    fn erfc_f64(z: f64) -> f64 {
        if z < 0.0 {
            return 2.0 - erfc_f64(-z);
        }
        if z < 3.0 {
            // erf(z) = 2/√π · Σ (−1)ⁿ z^(2n+1) / (n! (2n+1))
            let mut term = z;
            let mut sum = z;
            for n in 1..200 {
                term *= -z * z / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // Lentz-free backward evaluation of the continued fraction.
            let mut f = 0.0;
            for n in (1..200).rev() {
                f = n as f64 / 2.0 / (z + f);
            }
            (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f)
        }
    }

    #[test]
    fn exp_is_accurate_over_its_range_and_saturates_outside() {
        let mut worst = 0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = EXP_LO + (EXP_HI - EXP_LO) * i as f32 / steps as f32;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        eprintln!("exp: max relative error {worst:e}");
        assert!(worst < 2e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erfc_keeps_its_relative_accuracy_in_the_tail() {
        let (mut near, mut tail, mut absolute) = (0f64, 0f64, 0f64);
        for i in -40_000..=90_000 {
            let z = i as f32 * 1e-4;
            let want = erfc_f64(z as f64);
            let err = (erfc(z) as f64 - want).abs();
            absolute = absolute.max(err);
            if z.abs() <= 2.0 {
                near = near.max(err / want);
            } else {
                tail = tail.max(err / want / (z as f64).powi(2));
            }
        }
        eprintln!(
            "erfc: relative {near:e} (|z| <= 2), relative/z² {tail:e}, absolute {absolute:e}"
        );
        assert!(near < 6e-7, "max relative error for |z| <= 2: {near:e}");
        assert!(tail < 2e-7, "max relative error / z² for |z| > 2: {tail:e}");
        assert!(absolute < 5e-7, "max absolute error {absolute:e}");
    }
}
