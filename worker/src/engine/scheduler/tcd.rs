//! The Trajectory Consistency Distillation sampler, as diffusers' `TCDScheduler` (0.42,
//! `schedulers/scheduling_tcd.py`), for SD1.5 with TCD-LoRA.
//!
//! Owns TCD's strategic stochastic sampling: each step predicts x₀, moves it to an
//! intermediate timestep `s = floor((1 − γ)·t_prev)` along the predicted trajectory, then (for
//! `γ > 0`, on every step but the last) re-noises from `s` back up to `t_prev` with fresh noise.
//! γ (diffusers' `eta` argument of `step`) defaults to 0.3, the value TCD's authors and
//! diffusers' `step` use. The timestep schedule is LCM's (the same 50-step distillation
//! schedule), taken from [`LcmScheduler`]. Like diffusers, TCD ignores `clip_sample`; custom
//! timestep lists and img2img `strength` are not supported.

use super::{
    LcmScheduler, PredictionType, Sampler, ScheduleConfig, SchedulerError, StepOutput,
    alphas_cumprod, check_step,
};
use crate::engine::rng::Randn;

const NAME: &str = "TCD";
/// diffusers' default `eta` of `TCDScheduler.step`, TCD's γ.
pub const DEFAULT_GAMMA: f64 = 0.3;

/// diffusers' `TCDScheduler` with its standard (non-custom) timestep schedule.
#[derive(Clone, Debug)]
pub struct TcdScheduler {
    timesteps: Vec<usize>,
    /// `timesteps` as the UNet receives them.
    timesteps_f32: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
    gamma: f64,
}

impl TcdScheduler {
    /// The schedule for `steps` inference steps, `1..=original_inference_steps` (1..=50 for
    /// SD1.5), with `γ = 0.3`.
    pub fn new(config: &ScheduleConfig, steps: usize) -> Result<Self, SchedulerError> {
        // TCD's `set_timesteps` is LCM's; only the error should name TCD.
        let lcm = LcmScheduler::new(config, steps).map_err(|err| match err {
            SchedulerError::StepCount {
                steps, min, max, ..
            } => SchedulerError::StepCount {
                sampler: NAME,
                steps,
                min,
                max,
            },
            other => other,
        })?;
        let timesteps = lcm.discrete_timesteps().to_vec();
        Ok(Self {
            timesteps_f32: lcm.timesteps().to_vec(),
            timesteps,
            alphas_cumprod: alphas_cumprod(config),
            prediction_type: config.prediction_type,
            gamma: DEFAULT_GAMMA,
        })
    }

    /// The same schedule with stochasticity `gamma` in `[0, 1]` (0: deterministic; diffusers
    /// asserts the same range).
    pub fn with_gamma(mut self, gamma: f64) -> Result<Self, SchedulerError> {
        if !(0.0..=1.0).contains(&gamma) {
            return Err(SchedulerError::InvalidConfig(format!(
                "TCD gamma must be in [0, 1], got {gamma}"
            )));
        }
        self.gamma = gamma;
        Ok(self)
    }

    /// The stochasticity γ.
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// The discrete training timesteps of the schedule, first to last (4 steps: 999, 759, 499,
    /// 259).
    pub fn discrete_timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep after step `index` (0 after the last) and the intermediate timestep
    /// `s = floor((1 − γ)·t_prev)`, which torch evaluates in float32 (`1 − γ` in float64,
    /// rounded).
    pub fn prev_and_intermediate(&self, index: usize) -> (usize, usize) {
        let prev = self.timesteps.get(index + 1).copied().unwrap_or(0);
        // Both factors are non-negative and the product is at most `prev`, a valid index.
        let s = ((1.0 - self.gamma) as f32 * prev as f32).floor() as usize;
        (prev, s)
    }
}

impl Sampler for TcdScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    /// TCD starts from unit-variance noise.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// TCD feeds the latent to the UNet unchanged.
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError> {
        if index >= self.timesteps.len() {
            return Err(SchedulerError::StepIndex {
                index,
                steps: self.timesteps.len(),
            });
        }
        Ok(sample.to_vec())
    }

    /// One TCD step: x₀ and ε from the model output, `pred_noised = sqrt(ᾱ_s)·x₀ +
    /// sqrt(1−ᾱ_s)·ε`; for `γ > 0` before the last step,
    /// `sqrt(ᾱ_prev/ᾱ_s)·pred_noised + sqrt(1 − ᾱ_prev/ᾱ_s)·z` with fresh noise `z`, else
    /// `pred_noised` itself. `denoised` is the predicted x₀ (diffusers returns `pred_noised` as
    /// its second output; x₀ is the better preview).
    fn step(
        &self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        rng: &mut dyn Randn,
    ) -> Result<StepOutput, SchedulerError> {
        check_step(index, self.timesteps.len(), model_output, sample)?;
        let (prev, s) = self.prev_and_intermediate(index);
        let alpha = self.alphas_cumprod[self.timesteps[index]];
        let beta = 1.0 - alpha;
        let alpha_prev = self.alphas_cumprod[prev];
        let alpha_s = self.alphas_cumprod[s];
        let (sqrt_a, sqrt_b) = (alpha.sqrt(), beta.sqrt());
        let (sqrt_a_s, sqrt_b_s) = (alpha_s.sqrt(), (1.0 - alpha_s).sqrt());

        let (x0, eps): (Vec<f32>, Vec<f32>) = match self.prediction_type {
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
        let pred_noised: Vec<f32> = x0
            .iter()
            .zip(&eps)
            .map(|(&x0, &e)| sqrt_a_s * x0 + sqrt_b_s * e)
            .collect();

        if self.gamma <= 0.0 || index + 1 == self.timesteps.len() {
            return Ok(StepOutput {
                prev_sample: pred_noised,
                denoised: x0,
            });
        }
        let noise = rng.randn(sample.len());
        let ratio = alpha_prev / alpha_s;
        let (keep, fresh) = (ratio.sqrt(), (1.0 - ratio).sqrt());
        let prev_sample = pred_noised
            .iter()
            .zip(&noise)
            .map(|(&p, &z)| keep * p + fresh * z)
            .collect();
        Ok(StepOutput {
            prev_sample,
            denoised: x0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rng::TorchRng;

    fn sd15(steps: usize) -> TcdScheduler {
        TcdScheduler::new(&ScheduleConfig::default(), steps).expect("valid schedule")
    }

    #[test]
    fn timesteps_are_lcms_and_intermediates_follow_gamma() {
        let tcd = sd15(4);
        assert_eq!(tcd.discrete_timesteps(), [999, 759, 499, 259]);
        assert_eq!(tcd.gamma(), 0.3);
        // floor(0.7·759) = 531 (diffusers: 531, 349, 181, 0).
        let s: Vec<usize> = (0..4).map(|i| tcd.prev_and_intermediate(i).1).collect();
        assert_eq!(s, [531, 349, 181, 0]);
        let deterministic = sd15(4).with_gamma(0.0).expect("gamma");
        assert_eq!(deterministic.prev_and_intermediate(0), (759, 759));
    }

    #[test]
    fn bad_step_counts_and_gammas_are_rejected() {
        let err = TcdScheduler::new(&ScheduleConfig::default(), 51).map(|_| ());
        assert!(
            matches!(
                err,
                Err(SchedulerError::StepCount {
                    sampler: "TCD",
                    max: 50,
                    ..
                })
            ),
            "{err:?}"
        );
        for gamma in [-0.1, 1.5, f64::NAN] {
            assert!(sd15(4).with_gamma(gamma).is_err(), "{gamma}");
        }
        let mut rng = TorchRng::new(0);
        assert!(sd15(2).step(2, &[0.0], &[0.0], &mut rng).is_err());
        assert!(sd15(2).scale_model_input(&[0.0], 2).is_err());
    }

    #[test]
    fn noise_is_drawn_before_the_last_step_only() {
        let tcd = sd15(2);
        let mut rng = TorchRng::new(11);
        tcd.step(1, &[0.1; 16], &[1.0; 16], &mut rng).expect("last");
        assert_eq!(rng.randn(16), TorchRng::new(11).randn(16));
        let mut rng = TorchRng::new(11);
        tcd.step(0, &[0.1; 16], &[1.0; 16], &mut rng)
            .expect("first");
        let mut fresh = TorchRng::new(11);
        fresh.randn(16);
        assert_eq!(rng.randn(16), fresh.randn(16));
    }
}
