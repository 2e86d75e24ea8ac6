//! The DDIM sampler, as diffusers' `DDIMScheduler` (0.42, `schedulers/scheduling_ddim.py`).
//!
//! Owns DDIM's timestep schedule (its own `set_timesteps`: `leading` by default, which SD1.5's
//! config keeps), the jump to the previous timestep `t − N/steps` and the update
//! `sqrt(ᾱ_prev)·x₀ + sqrt(1 − ᾱ_prev − σ²)·ε + σ·z` with `σ = η·sqrt(variance)`. `η = 0`
//! (the default, as in diffusers' pipelines) is deterministic and draws no noise; `η > 0` draws
//! one noise tensor on every step, the last included, as diffusers does with the pipeline's
//! generator. It also holds the timestep-spacing helpers UniPC shares. `use_clipped_model_output`
//! and img2img `strength` are not supported.

use super::{
    PredictionType, Sampler, ScheduleConfig, SchedulerError, StepOutput, TimestepSpacing,
    alphas_cumprod, check_step,
};
use crate::engine::rng::Randn;

const NAME: &str = "DDIM";

/// diffusers' `DDIMScheduler`.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    timesteps: Vec<usize>,
    /// `timesteps` as the UNet receives them.
    timesteps_f32: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    /// ᾱ after the last step: 1 with `set_alpha_to_one`, else ᾱ₀ (SD1.5).
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // steps`: how far back each step jumps.
    step_ratio: usize,
    prediction_type: PredictionType,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
    eta: f64,
}

impl DdimScheduler {
    /// The schedule for `steps` inference steps, `1..=num_train_timesteps`, with `η = 0`.
    ///
    /// `timestep_spacing` defaults to `leading`, diffusers' default for this scheduler.
    pub fn new(config: &ScheduleConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        let train = config.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(SchedulerError::StepCount {
                sampler: NAME,
                steps,
                min: 1,
                max: train,
            });
        }
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let timesteps = match spacing {
            // `np.linspace(0, N-1, steps).round()[::-1]`.
            TimestepSpacing::Linspace => {
                let mut points = linspace_rounded((train - 1) as f64, steps);
                points.reverse();
                points
            }
            // `(arange(steps) · (N // steps)).round()[::-1] + steps_offset`.
            TimestepSpacing::Leading => (0..steps)
                .rev()
                .map(|i| i * (train / steps) + config.steps_offset)
                .collect(),
            TimestepSpacing::Trailing => trailing_timesteps(train, steps),
        };
        check_timesteps(NAME, &timesteps, train)?;
        let alphas_cumprod = alphas_cumprod(config);
        Ok(Self {
            // Timesteps are below num_train_timesteps, exact in f32.
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            final_alpha_cumprod: if config.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            step_ratio: train / steps,
            prediction_type: config.prediction_type,
            clip: config
                .clip_sample
                .then_some(config.clip_sample_range as f32),
            eta: 0.0,
        })
    }

    /// The same schedule with noise weight `eta` (0: DDIM, 1: DDPM-like); diffusers passes it to
    /// every `step` (the pipeline's `eta` argument). Must be finite and non-negative.
    pub fn with_eta(mut self, eta: f64) -> Result<Self, SchedulerError> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(SchedulerError::InvalidConfig(format!(
                "DDIM eta must be finite and >= 0, got {eta}"
            )));
        }
        self.eta = eta;
        Ok(self)
    }

    /// The noise weight η.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The discrete training timesteps of the schedule, first to last (SD1.5, 4 steps: 751,
    /// 501, 251, 1).
    pub fn discrete_timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// ᾱ at `t − step_ratio`, or the final ᾱ when that is below 0.
    fn alpha_prev(&self, timestep: usize) -> f32 {
        timestep
            .checked_sub(self.step_ratio)
            .map_or(self.final_alpha_cumprod, |prev| self.alphas_cumprod[prev])
    }
}

impl Sampler for DdimScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    /// DDIM starts from unit-variance noise.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// DDIM feeds the latent to the UNet unchanged.
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError> {
        if index >= self.timesteps.len() {
            return Err(SchedulerError::StepIndex {
                index,
                steps: self.timesteps.len(),
            });
        }
        Ok(sample.to_vec())
    }

    /// One DDIM step from `t` to `t − N/steps`, in diffusers' float32 order of operations.
    fn step(
        &self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        rng: &mut dyn Randn,
    ) -> Result<StepOutput, SchedulerError> {
        check_step(index, self.timesteps.len(), model_output, sample)?;
        let timestep = self.timesteps[index];
        let alpha = self.alphas_cumprod[timestep];
        let alpha_prev = self.alpha_prev(timestep);
        let beta = 1.0 - alpha;
        let (sqrt_a, sqrt_b) = (alpha.sqrt(), beta.sqrt());

        let (mut x0, eps): (Vec<f32>, Vec<f32>) = match self.prediction_type {
            PredictionType::Epsilon => (
                model_output
                    .iter()
                    .zip(sample)
                    .map(|(&e, &x)| (x - sqrt_b * e) / sqrt_a)
                    .collect(),
                model_output.to_vec(),
            ),
            PredictionType::Sample => (
                model_output.to_vec(),
                model_output
                    .iter()
                    .zip(sample)
                    .map(|(&x0, &x)| (x - sqrt_a * x0) / sqrt_b)
                    .collect(),
            ),
            PredictionType::VPrediction => model_output
                .iter()
                .zip(sample)
                .map(|(&v, &x)| (sqrt_a * x - sqrt_b * v, sqrt_a * v + sqrt_b * x))
                .unzip(),
        };
        if let Some(range) = self.clip {
            x0.iter_mut().for_each(|v| *v = v.clamp(-range, range));
        }

        // `_get_variance`, then `std = η·sqrt(variance)` with η rounded to float32 by torch.
        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta) * (1.0 - alpha / alpha_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let sqrt_a_prev = alpha_prev.sqrt();
        let mut prev_sample: Vec<f32> = x0
            .iter()
            .zip(&eps)
            .map(|(&x0, &e)| sqrt_a_prev * x0 + direction * e)
            .collect();
        if self.eta > 0.0 {
            let noise = rng.randn(sample.len());
            prev_sample
                .iter_mut()
                .zip(&noise)
                .for_each(|(x, &z)| *x += std_dev * z);
        }
        Ok(StepOutput {
            prev_sample,
            denoised: x0,
        })
    }
}

/// `np.linspace(0, last, points).round()` (float64, numpy's `i·step` with the last point pinned
/// to `last`, rounded half to even); one point gives `[0]`.
pub(super) fn linspace_rounded(last: f64, points: usize) -> Vec<usize> {
    if points < 2 {
        return vec![0; points];
    }
    let step = last / (points - 1) as f64;
    (0..points)
        .map(|i| {
            if i + 1 == points {
                last
            } else {
                i as f64 * step
            }
        })
        // Non-negative and at most `last`, which is an integer below 2^53.
        .map(|t| t.round_ties_even() as usize)
        .collect()
}

/// `np.round(np.arange(N, 0, -N/steps)) - 1`. numpy's float `arange` has
/// `ceil(N / (N/steps))` points, which is `steps + 1` for some counts (61, 103, ...; diffusers
/// keeps the extra step, and so do we), and fills them as `N + i·δ` with `δ = (N − N/steps) − N`;
/// numpy rounds half to even. (The same quirks as Euler ancestral's trailing spacing.)
pub(super) fn trailing_timesteps(train: usize, steps: usize) -> Vec<usize> {
    let start = train as f64;
    let ratio = start / steps as f64;
    let count = (start / ratio).ceil() as usize;
    let second = start - ratio;
    let delta = second - start;
    (0..count)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        // Every point is at least `ratio/2 > 0.5` before rounding, so the result is >= 0.
        .map(|t| t.round_ties_even() as usize - 1)
        .collect()
}

/// Rejects a schedule that indexes past the training timesteps (diffusers raises an
/// `IndexError` there, e.g. 1000 `leading` steps with `steps_offset` 1).
pub(super) fn check_timesteps(
    sampler: &'static str,
    timesteps: &[usize],
    train: usize,
) -> Result<(), SchedulerError> {
    match timesteps.iter().find(|&&t| t >= train) {
        Some(t) => Err(SchedulerError::InvalidConfig(format!(
            "{sampler}: {} steps reach timestep {t}, past num_train_timesteps {train}",
            timesteps.len()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rng::TorchRng;

    fn sd15(spacing: Option<TimestepSpacing>, steps: usize) -> DdimScheduler {
        let config = ScheduleConfig {
            timestep_spacing: spacing,
            ..ScheduleConfig::default()
        };
        DdimScheduler::new(&config, steps).expect("valid schedule")
    }

    #[test]
    fn spacings_follow_diffusers() {
        assert_eq!(sd15(None, 4).discrete_timesteps(), [751, 501, 251, 1]);
        assert_eq!(sd15(None, 1).discrete_timesteps(), [1]);
        assert_eq!(
            sd15(Some(TimestepSpacing::Linspace), 4).discrete_timesteps(),
            [999, 666, 333, 0]
        );
        assert_eq!(
            sd15(Some(TimestepSpacing::Trailing), 4).discrete_timesteps(),
            [999, 749, 499, 249]
        );
        // `np.linspace(0, 999, 3)` is [0, 499.5, 999]; 499.5 rounds to even.
        assert_eq!(
            sd15(Some(TimestepSpacing::Linspace), 3).discrete_timesteps(),
            [999, 500, 0]
        );
    }

    #[test]
    fn bad_step_counts_and_etas_are_rejected() {
        let config = ScheduleConfig::default();
        for steps in [0, 1001] {
            let err = DdimScheduler::new(&config, steps).map(|_| ());
            assert!(
                matches!(err, Err(SchedulerError::StepCount { .. })),
                "{err:?}"
            );
        }
        // 1000 leading steps with steps_offset 1 end on timestep 1000.
        let err = DdimScheduler::new(&config, 1000).map(|_| ());
        assert!(
            matches!(err, Err(SchedulerError::InvalidConfig(_))),
            "{err:?}"
        );
        for eta in [-0.1, f64::NAN, f64::INFINITY] {
            assert!(sd15(None, 4).with_eta(eta).is_err(), "{eta}");
        }
        let ddim = sd15(None, 2);
        let mut rng = TorchRng::new(0);
        assert!(ddim.scale_model_input(&[0.0], 2).is_err());
        let err = ddim.step(2, &[0.0], &[0.0], &mut rng);
        assert!(matches!(
            err,
            Err(SchedulerError::StepIndex { index: 2, steps: 2 })
        ));
    }

    #[test]
    fn noise_is_drawn_on_every_step_only_when_eta_is_positive() {
        let ddim = sd15(None, 1);
        let mut rng = TorchRng::new(3);
        ddim.step(0, &[0.1; 16], &[1.0; 16], &mut rng)
            .expect("step");
        assert_eq!(rng.randn(16), TorchRng::new(3).randn(16));

        let noisy = sd15(None, 1).with_eta(0.5).expect("eta");
        let mut rng = TorchRng::new(3);
        noisy
            .step(0, &[0.1; 16], &[1.0; 16], &mut rng)
            .expect("step");
        let mut fresh = TorchRng::new(3);
        fresh.randn(16);
        assert_eq!(rng.randn(16), fresh.randn(16));
    }
}
