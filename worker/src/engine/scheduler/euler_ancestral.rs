//! The Euler ancestral sampler ("Euler a"), as diffusers' `EulerAncestralDiscreteScheduler`
//! (0.42, `schedulers/scheduling_euler_ancestral_discrete.py`).
//!
//! Owns the sigma schedule (k-diffusion's `sigma = sqrt((1−ᾱ)/ᾱ)` interpolated at the
//! inference timesteps, plus a final 0), the input scaling `1/sqrt(σ²+1)` and the ancestral
//! update, which splits each step into a deterministic Euler move down to `σ_down` and fresh
//! noise of size `σ_up`. Karras sigmas and zero-terminal-SNR rescaling are not supported.

use super::{
    PredictionType, Sampler, ScheduleConfig, SchedulerError, StepOutput, TimestepSpacing,
    alphas_cumprod, check_step,
};
use crate::engine::rng::Randn;

const NAME: &str = "Euler ancestral";

/// diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Clone, Debug)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f32>,
    /// One sigma per step plus a trailing 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerAncestralScheduler {
    /// The schedule for `steps` inference steps, `1..=num_train_timesteps`.
    ///
    /// `timestep_spacing` defaults to `linspace`, diffusers' default for this scheduler.
    pub fn new(config: &ScheduleConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        if config.prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError for this parameterization too.
            return Err(SchedulerError::UnsupportedPrediction {
                sampler: NAME,
                prediction: config.prediction_type,
            });
        }
        let train = config.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(SchedulerError::StepCount {
                sampler: NAME,
                steps,
                min: 1,
                max: train,
            });
        }
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let timesteps = euler_timesteps(spacing, train, config.steps_offset, steps);
        let train_sigmas: Vec<f32> = alphas_cumprod(config)
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp(f64::from(t), &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);

        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: config.prediction_type,
        })
    }

    /// The noise levels: one per step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Sampler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// `sample / sqrt(σ² + 1)`: the UNet expects unit-variance (VP) inputs.
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError> {
        let steps = self.timesteps.len();
        let sigma = *self
            .sigmas
            .get(index)
            .filter(|_| index < steps)
            .ok_or(SchedulerError::StepIndex { index, steps })?;
        let scale = (sigma * sigma + 1.0).sqrt();
        Ok(sample.iter().map(|&x| x / scale).collect())
    }

    /// One ancestral step from `σ = sigmas[index]` to `σ_to = sigmas[index + 1]`:
    /// `σ_up = sqrt(σ_to²(σ² − σ_to²)/σ²)`, `σ_down = sqrt(σ_to² − σ_up²)`, an Euler move
    /// to `σ_down`, then `σ_up · z`. Noise is drawn on every step, the last included (where
    /// `σ_up = 0`), as diffusers does, so the stream position matches.
    fn step(
        &self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        rng: &mut dyn Randn,
    ) -> Result<StepOutput, SchedulerError> {
        check_step(index, self.timesteps.len(), model_output, sample)?;
        let sigma = self.sigmas[index];
        let sigma_to = self.sigmas[index + 1];
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;

        let denoised: Vec<f32> = match self.prediction_type {
            PredictionType::VPrediction => {
                let out_scale = -sigma / (from2 + 1.0).sqrt();
                let in_scale = from2 + 1.0;
                model_output
                    .iter()
                    .zip(sample)
                    .map(|(&v, &x)| v * out_scale + x / in_scale)
                    .collect()
            }
            // `new` rejects `Sample`, so everything else is epsilon.
            _ => model_output
                .iter()
                .zip(sample)
                .map(|(&eps, &x)| x - sigma * eps)
                .collect(),
        };
        let noise = rng.randn(sample.len());
        let prev_sample = sample
            .iter()
            .zip(&denoised)
            .zip(&noise)
            .map(|((&x, &x0), &z)| {
                let derivative = (x - x0) / sigma;
                (x + derivative * dt) + z * sigma_up
            })
            .collect();
        Ok(StepOutput {
            prev_sample,
            denoised,
        })
    }
}

/// Inference timesteps, first to last, as float32 (`set_timesteps`).
fn euler_timesteps(
    spacing: TimestepSpacing,
    train: usize,
    offset: usize,
    steps: usize,
) -> Vec<f32> {
    match spacing {
        // `np.linspace(0, N-1, steps, dtype=float32)[::-1]`: float64 `i·step`, the last point
        // pinned to `N-1`, then rounded to float32. One step gives `[0]`.
        TimestepSpacing::Linspace => {
            let last = (train - 1) as f64;
            let mut points: Vec<f32> = if steps == 1 {
                vec![0.0]
            } else {
                let step = last / (steps - 1) as f64;
                (0..steps).map(|i| (i as f64 * step) as f32).collect()
            };
            if steps > 1
                && let Some(end) = points.last_mut()
            {
                *end = last as f32;
            }
            points.reverse();
            points
        }
        // `(arange(steps) · (N // steps)).round()[::-1] + steps_offset`.
        TimestepSpacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + offset) as f32)
                .collect()
        }
        // `arange(N, 0, -N/steps).round() - 1`. numpy's float `arange` has
        // `ceil(N / (N/steps))` points, which is `steps + 1` for some counts (61, 103, ...;
        // diffusers keeps the extra step, and so do we), and fills them as `N + i·δ` with
        // `δ = (N − N/steps) − N`, not `N − i·N/steps`; the two round differently at .5
        // (48 steps). numpy rounds half to even.
        TimestepSpacing::Trailing => {
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
                .map(|t| (t.round_ties_even() - 1.0) as f32)
                .collect()
        }
    }
}

/// `np.interp(x, arange(len(ys)), ys)` in float64 for `x` in `[0, len-1]`.
fn interp(x: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if x <= 0.0 {
        return f64::from(ys[0]);
    }
    if x >= last as f64 {
        return f64::from(ys[last]);
    }
    // 0 < x < last, so the floor is a valid index below `last`.
    let j = x.floor() as usize;
    let (lo, hi) = (f64::from(ys[j]), f64::from(ys[j + 1]));
    (hi - lo) * (x - j as f64) + lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rng::TorchRng;

    fn sd15(spacing: Option<TimestepSpacing>, steps: usize) -> EulerAncestralScheduler {
        let config = ScheduleConfig {
            timestep_spacing: spacing,
            ..ScheduleConfig::default()
        };
        EulerAncestralScheduler::new(&config, steps).expect("valid schedule")
    }

    #[test]
    fn spacings_follow_diffusers() {
        assert_eq!(sd15(None, 4).timesteps(), [999.0, 666.0, 333.0, 0.0]);
        assert_eq!(
            sd15(Some(TimestepSpacing::Leading), 4).timesteps(),
            [751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            sd15(Some(TimestepSpacing::Trailing), 4).timesteps(),
            [999.0, 749.0, 499.0, 249.0]
        );
    }

    #[test]
    fn trailing_spacing_reproduces_numpy_arange_quirks() {
        // numpy 2.4: `(np.arange(1000, 0, -1000/48).round() - 1)[[3, 15, 27, 39]]` is
        // 936, 686, 436, 186; evaluating `1000 - i·1000/48` instead rounds each up by one.
        let t48 = sd15(Some(TimestepSpacing::Trailing), 48);
        let picked: Vec<f32> = [3, 15, 27, 39]
            .iter()
            .map(|&i| t48.timesteps()[i])
            .collect();
        assert_eq!(picked, [936.0, 686.0, 436.0, 186.0]);
        // `len(np.arange(1000, 0, -1000/61)) == 62`.
        assert_eq!(
            sd15(Some(TimestepSpacing::Trailing), 61).timesteps().len(),
            62
        );
    }

    #[test]
    fn sigmas_end_at_zero_and_scale_the_first_input() {
        let euler = sd15(None, 6);
        assert_eq!(euler.sigmas().len(), 7);
        assert_eq!(euler.sigmas()[6], 0.0);
        // tech-notes §7: sigma_max 14.6146 at t=999.
        assert!((euler.init_noise_sigma() - 14.6146).abs() < 1e-3);
        let scaled = euler.scale_model_input(&[1.0], 0).expect("index 0");
        let want = 1.0 / (14.6146f32 * 14.6146 + 1.0).sqrt();
        assert!((scaled[0] - want).abs() < 1e-6);
    }

    #[test]
    fn bad_step_counts_indices_and_predictions_are_rejected() {
        let config = ScheduleConfig::default();
        for steps in [0, 1001] {
            let err = EulerAncestralScheduler::new(&config, steps).map(|_| ());
            assert!(
                matches!(err, Err(SchedulerError::StepCount { .. })),
                "{err:?}"
            );
        }
        let sample_prediction = ScheduleConfig {
            prediction_type: PredictionType::Sample,
            ..ScheduleConfig::default()
        };
        let err = EulerAncestralScheduler::new(&sample_prediction, 4).map(|_| ());
        assert!(matches!(
            err,
            Err(SchedulerError::UnsupportedPrediction { .. })
        ));

        let euler = sd15(None, 2);
        let mut rng = TorchRng::new(0);
        assert!(euler.scale_model_input(&[0.0], 2).is_err());
        let err = euler.step(2, &[0.0], &[0.0], &mut rng);
        assert!(matches!(
            err,
            Err(SchedulerError::StepIndex { index: 2, steps: 2 })
        ));
    }

    #[test]
    fn the_last_step_still_draws_noise() {
        let euler = sd15(None, 1);
        let mut rng = TorchRng::new(9);
        euler
            .step(0, &[0.0; 16], &[1.0; 16], &mut rng)
            .expect("step");
        let mut fresh = TorchRng::new(9);
        fresh.randn(16);
        assert_eq!(rng.randn(16), fresh.randn(16));
    }
}
