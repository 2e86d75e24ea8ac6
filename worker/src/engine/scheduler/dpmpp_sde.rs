//! k-diffusion's DPM++ SDE sampler (`sample_dpmpp_sde`, k-diffusion 0.1.1), as A1111's
//! "DPM++ SDE" and "DPM++ SDE Karras" run it: `eta = 1`, `s_noise = 1`, `r = 1/2`, noise from
//! one [`BrownianTree`] per image (A1111's `create_noise_sampler`).
//!
//! Owns the sampling loop only: the sigma schedule, the model call (a closure returning denoised
//! estimates) and the trees come from the caller. Each step evaluates the model twice (at σ and
//! at the midpoint σ_s in log-σ), except the last step to σ = 0, an Euler step with one
//! evaluation. Arithmetic is float32 in the order of the torch expressions it mirrors
//! (`t = −ln σ`, `σ = exp(−t)`, so noise is queried at `exp(ln σ)`, not at σ itself).

use super::ModelFn;
use crate::engine::brownian::BrownianTree;
use crate::engine::error::EngineError;

/// Ancestral noise fraction (`eta`).
const ETA: f32 = 1.0;
/// Noise multiplier (`s_noise`).
const S_NOISE: f32 = 1.0;
/// Where the first stage stops, as a fraction of the log-σ step (`r`).
const R: f32 = 0.5;

/// Runs `sample_dpmpp_sde` over `sigmas` (noise levels from the noisiest down, ending in 0) on
/// every image of `xs` in place (initial noise already scaled by `sigmas[0]`), image `i`'s
/// noise from `trees[i]`. `denoise(xs, σ)` ([`ModelFn`]: `FnMut(&[Vec<f32>], f32) ->
/// Result<Vec<Vec<f32>>, EngineError>`) returns the denoised estimate of each image;
/// `on_step(n, xs)` sees the latents after each of the `n` finished steps.
pub fn sample_dpmpp_sde(
    sigmas: &[f32],
    xs: &mut [Vec<f32>],
    trees: &mut [BrownianTree],
    denoise: &mut ModelFn<'_>,
    on_step: &mut dyn FnMut(usize, &[Vec<f32>]),
) -> Result<(), EngineError> {
    assert_eq!(xs.len(), trees.len(), "one Brownian tree per image");
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, next) = (sigmas[i], sigmas[i + 1]);
        let denoised = denoise(xs, sigma)?;
        if next == 0.0 {
            // Euler: x + (x − denoised) / σ · (σ_next − σ).
            let dt = next - sigma;
            for (x, dn) in xs.iter_mut().zip(&denoised) {
                for (x, &dn) in x.iter_mut().zip(dn) {
                    let d = (*x - dn) / sigma;
                    *x += d * dt;
                }
            }
        } else {
            let t = t_fn(sigma);
            let t_next = t_fn(next);
            let h = t_next - t;
            let s = t + h * R;
            let fac = 1.0 / (2.0 * R);
            let sigma_t = sigma_fn(t);
            let sigma_s = sigma_fn(s);

            // Stage 1: to σ_s, then its share of the noise.
            let (down, up) = ancestral_step(sigma_t, sigma_s);
            let s_ = t_fn(down);
            let (ratio, coef) = (sigma_fn(s_) / sigma_t, (t - s_).exp_m1());
            let mut x2: Vec<Vec<f32>> = xs
                .iter()
                .zip(&denoised)
                .map(|(x, dn)| {
                    x.iter()
                        .zip(dn)
                        .map(|(&x, &dn)| ratio * x - coef * dn)
                        .collect()
                })
                .collect();
            add_noise(&mut x2, trees, sigma_t, sigma_s, up);
            let denoised2 = denoise(&x2, sigma_s)?;

            // Stage 2: the whole step with the blended estimate.
            let sigma_next = sigma_fn(t_next);
            let (down, up) = ancestral_step(sigma_t, sigma_next);
            let t_next_ = t_fn(down);
            let (ratio, coef) = (sigma_fn(t_next_) / sigma_t, (t - t_next_).exp_m1());
            for ((x, dn), dn2) in xs.iter_mut().zip(&denoised).zip(&denoised2) {
                for ((x, &dn), &dn2) in x.iter_mut().zip(dn).zip(dn2) {
                    let blended = (1.0 - fac) * dn + fac * dn2;
                    *x = ratio * *x - coef * blended;
                }
            }
            add_noise(xs, trees, sigma_t, sigma_next, up);
        }
        on_step(i + 1, xs);
    }
    Ok(())
}

/// `t_fn`: `−ln σ`.
fn t_fn(sigma: f32) -> f32 {
    -sigma.ln()
}

/// `sigma_fn`: `exp(−t)`.
fn sigma_fn(t: f32) -> f32 {
    (-t).exp()
}

/// `get_ancestral_step(σ_from, σ_to, eta)`: the level to step down to and the noise to add.
fn ancestral_step(from: f32, to: f32) -> (f32, f32) {
    let up = to.min(ETA * (to * to * (from * from - to * to) / (from * from)).sqrt());
    let down = (to * to - up * up).sqrt();
    (down, up)
}

/// `x + noise_sampler(σ, σ_next) · s_noise · σ_up`, each image from its own tree.
fn add_noise(xs: &mut [Vec<f32>], trees: &mut [BrownianTree], sigma: f32, next: f32, up: f32) {
    for (x, tree) in xs.iter_mut().zip(trees.iter_mut()) {
        let z = tree.noise(sigma, next);
        for (x, &z) in x.iter_mut().zip(&z) {
            *x += z * S_NOISE * up;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ancestral_split_keeps_the_variance() {
        let (down, up) = ancestral_step(3.0, 2.0);
        assert!((down * down + up * up - 4.0).abs() < 1e-5);
        assert!(up <= 2.0 && down > 0.0);
    }

    #[test]
    fn a_single_step_to_zero_is_one_euler_step_without_noise() {
        let mut xs = vec![vec![1.0_f32, -2.0]];
        let mut trees = vec![BrownianTree::new(1, 2, 1.0, 1.0)];
        let mut calls = Vec::new();
        let mut denoise = |xs: &[Vec<f32>], sigma: f32| {
            calls.push(sigma);
            Ok(xs
                .iter()
                .map(|x| x.iter().map(|v| v * 0.5).collect())
                .collect())
        };
        let mut steps = Vec::new();
        sample_dpmpp_sde(
            &[1.0, 0.0],
            &mut xs,
            &mut trees,
            &mut denoise,
            &mut |n, _| steps.push(n),
        )
        .unwrap();
        assert_eq!(calls, vec![1.0]);
        assert_eq!(steps, vec![1]);
        assert_eq!(xs, vec![vec![0.5, -1.0]]);
    }
}
