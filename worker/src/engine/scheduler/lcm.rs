//! The Latent Consistency Model sampler, as diffusers' `LCMScheduler` (0.42,
//! `schedulers/scheduling_lcm.py`), for SD1.5 with LCM-LoRA.
//!
//! Owns the LCM timestep schedule (a subset of the 50-step distillation schedule), the
//! consistency boundary condition (`c_skip`, `c_out`) and the multistep update that re-noises
//! the denoised estimate between steps. It does not handle img2img `strength` or custom
//! timestep lists.

use super::{
    PredictionType, Sampler, ScheduleConfig, SchedulerError, StepOutput, alphas_cumprod, check_step,
};
use crate::engine::rng::Randn;

/// `sigma_data` of the consistency-model parameterization (diffusers hard-codes 0.5).
const SIGMA_DATA: f32 = 0.5;
const NAME: &str = "LCM";

/// diffusers' `LCMScheduler` with its standard (non-custom) timestep schedule.
#[derive(Clone, Debug)]
pub struct LcmScheduler {
    timesteps: Vec<usize>,
    /// `timesteps` as the UNet receives them.
    timesteps_f32: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f32>,
    timestep_scaling: f32,
}

impl LcmScheduler {
    /// The schedule for `steps` inference steps; `steps` must be in
    /// `1..=original_inference_steps` (1..=50 for SD1.5).
    pub fn new(config: &ScheduleConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        let timesteps = lcm_timesteps(config, steps)?;
        Ok(Self {
            // Timesteps are below num_train_timesteps, exact in f32.
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            alphas_cumprod: alphas_cumprod(config),
            prediction_type: config.prediction_type,
            clip: config
                .clip_sample
                .then_some(config.clip_sample_range as f32),
            timestep_scaling: config.timestep_scaling as f32,
        })
    }

    /// The discrete training timesteps of the schedule, first to last (4 steps: 999, 759, 499,
    /// 259).
    pub fn discrete_timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// `(c_skip, c_out)` of the boundary condition at `timestep`, in float32 as diffusers
    /// computes it from a timestep tensor: `s = t · timestep_scaling`,
    /// `c_skip = σ_d² / (s² + σ_d²)`, `c_out = s / sqrt(s² + σ_d²)`.
    pub fn boundary_scalings(&self, timestep: usize) -> (f32, f32) {
        // Training timesteps are far below 2^24, so the conversion is exact.
        let scaled = timestep as f32 * self.timestep_scaling;
        let denominator = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        (
            SIGMA_DATA * SIGMA_DATA / denominator,
            scaled / denominator.sqrt(),
        )
    }

    /// x₀ predicted from the model output at ᾱ_t (`sqrt_a = sqrt(ᾱ_t)`, `sqrt_b = sqrt(1−ᾱ_t)`).
    fn predict_original(&self, eps: f32, sample: f32, sqrt_a: f32, sqrt_b: f32) -> f32 {
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => (sample - sqrt_b * eps) / sqrt_a,
            PredictionType::Sample => eps,
            PredictionType::VPrediction => sqrt_a * sample - sqrt_b * eps,
        };
        match self.clip {
            Some(range) => x0.clamp(-range, range),
            None => x0,
        }
    }
}

impl Sampler for LcmScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    /// LCM starts from unit-variance noise.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// LCM feeds the latent to the UNet unchanged.
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError> {
        if index >= self.timesteps.len() {
            return Err(SchedulerError::StepIndex {
                index,
                steps: self.timesteps.len(),
            });
        }
        Ok(sample.to_vec())
    }

    /// One LCM step: `denoised = c_out·x₀ + c_skip·sample`; before the last step the result is
    /// re-noised to the next timestep with fresh noise, `sqrt(ᾱ_prev)·denoised +
    /// sqrt(1−ᾱ_prev)·z`. The last step returns `denoised` and draws nothing from `rng`.
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
        let (sqrt_a, sqrt_b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (c_skip, c_out) = self.boundary_scalings(timestep);

        let denoised: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&eps, &x)| c_out * self.predict_original(eps, x, sqrt_a, sqrt_b) + c_skip * x)
            .collect();

        let Some(&next) = self.timesteps.get(index + 1) else {
            return Ok(StepOutput {
                prev_sample: denoised.clone(),
                denoised,
            });
        };
        // Standard LCM timesteps are never negative, so diffusers' `final_alpha_cumprod`
        // branch cannot be reached here.
        let alpha_prev = self.alphas_cumprod[next];
        let (sqrt_a_prev, sqrt_b_prev) = (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt());
        let noise = rng.randn(sample.len());
        let prev_sample = denoised
            .iter()
            .zip(&noise)
            .map(|(&d, &z)| sqrt_a_prev * d + sqrt_b_prev * z)
            .collect();
        Ok(StepOutput {
            prev_sample,
            denoised,
        })
    }
}

/// `set_timesteps(steps)`: every `k`-th training timestep (`k = N / original_steps`, giving
/// 19, 39, ..., 999), reversed, then `steps` of them at indices `floor(i · len / steps)`.
fn lcm_timesteps(config: &ScheduleConfig, steps: usize) -> Result<Vec<usize>, SchedulerError> {
    let original = config.original_inference_steps;
    if steps == 0 || steps > original {
        return Err(SchedulerError::StepCount {
            sampler: NAME,
            steps,
            min: 1,
            max: original,
        });
    }
    let k = config.num_train_timesteps / original;
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
    // `np.linspace(0, len, steps, endpoint=False)` then `np.floor`, in float64.
    let stride = origin.len() as f64 / steps as f64;
    let timesteps = (0..steps)
        .map(|i| {
            // floor of a value in [0, len) is a valid index; truncation is the intent.
            let at = (i as f64 * stride).floor() as usize;
            origin[at.min(origin.len() - 1)]
        })
        .collect();
    Ok(timesteps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rng::TorchRng;

    fn sd15(steps: usize) -> Result<LcmScheduler, SchedulerError> {
        LcmScheduler::new(&ScheduleConfig::default(), steps)
    }

    #[test]
    fn four_steps_use_the_documented_timesteps() {
        let lcm = sd15(4).expect("4 steps");
        assert_eq!(lcm.discrete_timesteps(), [999, 759, 499, 259]);
        assert_eq!(lcm.timesteps(), [999.0, 759.0, 499.0, 259.0]);
        let eight = sd15(8).expect("8 steps");
        assert_eq!(
            eight.discrete_timesteps(),
            [999, 879, 759, 639, 499, 379, 259, 139]
        );
    }

    #[test]
    fn step_counts_outside_1_to_50_are_rejected() {
        for steps in [0, 51, 1000] {
            let err = sd15(steps).map(|_| ()).expect_err("out of range");
            assert!(
                matches!(err, SchedulerError::StepCount { steps: s, min: 1, max: 50, .. } if s == steps),
                "{err}"
            );
        }
        assert!(sd15(1).is_ok() && sd15(50).is_ok());
    }

    #[test]
    fn step_rejects_bad_indices_and_lengths() {
        let lcm = sd15(2).expect("2 steps");
        let mut rng = TorchRng::new(0);
        let err = lcm.step(2, &[0.0; 4], &[0.0; 4], &mut rng);
        assert!(matches!(
            err,
            Err(SchedulerError::StepIndex { index: 2, steps: 2 })
        ));
        let err = lcm.step(0, &[0.0; 3], &[0.0; 4], &mut rng);
        assert!(matches!(err, Err(SchedulerError::LengthMismatch { .. })));
        assert!(lcm.scale_model_input(&[0.0], 2).is_err());
    }

    #[test]
    fn the_last_step_returns_denoised_and_draws_no_noise() {
        let lcm = sd15(1).expect("1 step");
        let mut rng = TorchRng::new(5);
        let out = lcm.step(0, &[0.1; 16], &[1.0; 16], &mut rng).expect("step");
        assert_eq!(out.prev_sample, out.denoised);
        assert_eq!(rng.randn(16), TorchRng::new(5).randn(16));
    }

    #[test]
    fn boundary_scalings_vanish_away_from_zero() {
        let lcm = sd15(4).expect("4 steps");
        let (c_skip, c_out) = lcm.boundary_scalings(999);
        assert!(c_skip < 1e-8 && (c_out - 1.0).abs() < 1e-6);
        assert_eq!(lcm.boundary_scalings(0), (1.0, 0.0));
    }
}
