//! Diffusion schedulers: the timestep schedule and the update from one latent to the next.
//!
//! Owns the noise schedule shared by all samplers ([`ScheduleConfig`], parsed from a diffusers
//! `scheduler_config.json`, and [`alphas_cumprod`]), the [`Sampling`] seam the pipeline drives
//! (one per sampler name: a batch of latents in, the model called through a closure), the
//! one-evaluation-per-step [`Sampler`] seam of diffusers' schedulers (and its
//! [`MultistepSampler`] form for samplers that carry history from step to step), and one module
//! per family: [`lcm`] (diffusers' `LCMScheduler`), [`euler_ancestral`] (diffusers'
//! `EulerAncestralDiscreteScheduler`), [`ddim`] (`DDIMScheduler`), [`unipc`]
//! (`UniPCMultistepScheduler`), [`tcd`] (`TCDScheduler`) and [`kdiffusion`] (k-diffusion's
//! samplers as A1111 runs them). Samplers see latents as flat `f32` slices and never touch candle; the pipeline
//! supplies the model as a closure. Arithmetic follows diffusers' float32 tensor maths
//! operation by operation. Timesteps, ᾱ and LCM's `c_skip`/`c_out` come out bit-identical to
//! diffusers on x86; values that go through a square root (sigmas, the step coefficients) can
//! differ by one float32 ulp, because torch's x86 `sqrt` is not correctly rounded (about 0.5%
//! of `torch.sqrt` results differ from IEEE `sqrtf` on the reference machine, 0-dim tensors
//! included) while Rust's is.

pub mod ddim;
pub mod dpmpp_sde;
pub mod euler_ancestral;
pub mod kdiffusion;
pub mod lcm;
mod sampling;
pub mod tcd;
pub mod unipc;

use serde::Deserialize;

pub use ddim::DdimScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use kdiffusion::{Img2ImgSteps, KDenoiser, KSampler};
pub use lcm::LcmScheduler;
pub use sampling::Sampling;
pub use tcd::TcdScheduler;
pub use unipc::{UniPcScheduler, UniPcState};

use crate::engine::error::EngineError;

use crate::engine::rng::Randn;

/// Why a schedule could not be built or a step could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The scheduler config JSON did not parse.
    #[error("invalid scheduler config JSON: {0}")]
    ConfigJson(#[from] serde_json::Error),
    /// A config value is outside what the schedulers support.
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    /// The requested number of inference steps is not allowed for this sampler.
    #[error("{sampler} supports {min}..={max} steps, got {steps}")]
    StepCount {
        /// Sampler name.
        sampler: &'static str,
        /// Requested steps.
        steps: usize,
        /// Smallest allowed count.
        min: usize,
        /// Largest allowed count.
        max: usize,
    },
    /// `step` or `scale_model_input` was called with an index past the schedule.
    #[error("step index {index} is outside a schedule of {steps} steps")]
    StepIndex {
        /// Index given.
        index: usize,
        /// Steps in the schedule.
        steps: usize,
    },
    /// A multistep sampler's `step` was called out of order for its run state.
    #[error("step {index} was called where the run expects step {expected}")]
    StepOrder {
        /// Index given.
        index: usize,
        /// The index the run state expects next.
        expected: usize,
    },
    /// The model output and the sample have different lengths.
    #[error("model output has {model_output} values but the sample has {sample}")]
    LengthMismatch {
        /// Values in the model output.
        model_output: usize,
        /// Values in the sample.
        sample: usize,
    },
    /// The sampler does not implement this model parameterization.
    #[error("{sampler} does not support prediction_type {prediction:?}")]
    UnsupportedPrediction {
        /// Sampler name.
        sampler: &'static str,
        /// The configured parameterization.
        prediction: PredictionType,
    },
}

/// How betas are spaced over the training timesteps (`beta_schedule`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end))²`, SD1.5's schedule.
    #[default]
    ScaledLinear,
}

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε (SD1.5).
    #[default]
    Epsilon,
    /// The velocity `sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀` (SD2 768px).
    VPrediction,
    /// The clean sample x₀ itself.
    Sample,
}

/// How inference timesteps are picked from the training range (`timestep_spacing`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly from `num_train_timesteps - 1` down to 0, including both ends.
    Linspace,
    /// `i · (N / steps) + steps_offset`, so the last step lands near 0.
    Leading,
    /// Counted back from N, so the first step lands on `N - 1`.
    Trailing,
}

/// The noise schedule and sampler options of a diffusers `scheduler_config.json`.
///
/// Unknown keys (`_class_name`, `skip_prk_steps`, ...) are ignored and missing keys take
/// SD1.5's values (<https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/scheduler/scheduler_config.json>),
/// which is what `Scheduler.from_config(sd15_config)` does in diffusers.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ScheduleConfig {
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// Spacing of the betas.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start`/`beta_end`/`beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// Training timesteps (1000 for SD).
    pub num_train_timesteps: usize,
    /// Added to `leading` timesteps (SD1.5: 1).
    pub steps_offset: usize,
    /// Whether the step after the last uses ᾱ = 1 (DDIM-style); LCM keeps it for parity only.
    pub set_alpha_to_one: bool,
    /// What the UNet predicts.
    pub prediction_type: PredictionType,
    /// Timestep spacing; `None` lets each sampler use its diffusers default (Euler ancestral:
    /// `linspace`; LCM does not use it).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Clamp the predicted x₀ to `±clip_sample_range` (LCM only; off for SD1.5).
    pub clip_sample: bool,
    /// Bound for `clip_sample`.
    pub clip_sample_range: f64,
    /// LCM: length of the distillation schedule the inference steps are picked from.
    pub original_inference_steps: usize,
    /// LCM: timestep multiplier in the consistency boundary condition.
    pub timestep_scaling: f64,
    /// Dynamic thresholding of x₀; not implemented, so `true` is rejected.
    pub thresholding: bool,
    /// Zero-terminal-SNR beta rescaling; not implemented, so `true` is rejected.
    pub rescale_betas_zero_snr: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            num_train_timesteps: 1000,
            steps_offset: 1,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            clip_sample: false,
            clip_sample_range: 1.0,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }
}

impl ScheduleConfig {
    /// Parses and validates a diffusers `scheduler_config.json`.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values no sampler can work with.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let invalid = |msg: String| Err(SchedulerError::InvalidConfig(msg));
        let train = self.num_train_timesteps;
        if train < 2 {
            return invalid(format!(
                "num_train_timesteps must be at least 2, got {train}"
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != train {
                return invalid(format!(
                    "trained_betas has {} values for {train} training timesteps",
                    betas.len()
                ));
            }
            if betas.iter().any(|b| !(*b > 0.0 && *b < 1.0)) {
                return invalid("trained_betas must lie in (0, 1)".to_owned());
            }
        } else if !(self.beta_start > 0.0
            && self.beta_end < 1.0
            && self.beta_start <= self.beta_end)
        {
            return invalid(format!(
                "need 0 < beta_start <= beta_end < 1, got {} and {}",
                self.beta_start, self.beta_end
            ));
        }
        if self.original_inference_steps == 0 || self.original_inference_steps > train {
            return invalid(format!(
                "original_inference_steps must be in 1..={train}, got {}",
                self.original_inference_steps
            ));
        }
        if !self.timestep_scaling.is_finite() || !self.clip_sample_range.is_finite() {
            return invalid("timestep_scaling and clip_sample_range must be finite".to_owned());
        }
        if self.thresholding || self.rescale_betas_zero_snr {
            return invalid("thresholding and rescale_betas_zero_snr are not supported".to_owned());
        }
        Ok(())
    }
}

/// ᾱ_t = Π(1 − β) for every training timestep, in float32 as diffusers computes it.
///
/// Bit-exact with torch 2.15 on CPU: `torch.linspace` evaluates `fma(step, i, start)` for the
/// first half and `fma(-step, n-1-i, end)` for the second, `** 2` is a float32 square, and
/// `torch.cumprod` multiplies in double and rounds each prefix to float32.
pub fn alphas_cumprod(config: &ScheduleConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    let betas: Vec<f32> = match (&config.trained_betas, config.beta_schedule) {
        // `torch.tensor(trained_betas, dtype=float32)` rounds each value.
        (Some(betas), _) => betas.iter().map(|&b| b as f32).collect(),
        (None, BetaSchedule::Linear) => linspace_f32(config.beta_start, config.beta_end, n),
        (None, BetaSchedule::ScaledLinear) => {
            linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
    };
    let mut product = 1.0f64;
    betas
        .iter()
        .map(|&beta| {
            product *= f64::from(1.0 - beta);
            product as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` on CPU (`n >= 2`).
pub(super) fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    // Step counts are at most a few thousand, far below f32's exact-integer range.
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// What one sampler step produces.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// The latent to feed the next step (after the last step: the final latent).
    pub prev_sample: Vec<f32>,
    /// The sampler's estimate of the clean latent at this step (LCM's `denoised`, Euler's
    /// `pred_original_sample`), useful for previews.
    pub denoised: Vec<f32>,
}

/// A sampler over a fixed schedule, stepped by index `0..timesteps().len()`.
///
/// The caller's loop is: `latents = rng.randn(n) · init_noise_sigma()`; for each index `i`,
/// run the UNet on `scale_model_input(latents, i)` at `timesteps()[i]`, then
/// `latents = step(i, eps, latents, rng).prev_sample`. Samplers hold no per-run state, so one
/// instance can serve many renders with the same step count.
pub trait Sampler {
    /// The timestep to give the UNet at each step, first to last.
    fn timesteps(&self) -> &[f32];

    /// The standard deviation of the initial latent noise.
    fn init_noise_sigma(&self) -> f32;

    /// The UNet input for step `index` (some samplers rescale the latent).
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError>;

    /// Advances `sample` by step `index` given the model's output for it, drawing any noise the
    /// step needs from `rng`.
    fn step(
        &self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        rng: &mut dyn Randn,
    ) -> Result<StepOutput, SchedulerError>;
}

/// A [`Sampler`] whose step also reads what earlier steps of the run left behind (UniPC: the
/// last x₀ predictions and sample). The sampler still holds no per-run state; each image's
/// history is a [`State`](Self::State) from [`start`](Self::start), passed to every `step` in
/// index order `0, 1, ...`.
pub trait MultistepSampler {
    /// One image's history.
    type State;

    /// The timestep to give the UNet at each step, first to last.
    fn timesteps(&self) -> &[f32];

    /// The standard deviation of the initial latent noise.
    fn init_noise_sigma(&self) -> f32;

    /// The UNet input for step `index`.
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError>;

    /// A fresh history for one image.
    fn start(&self) -> Self::State;

    /// Advances `sample` by step `index` given the model's output for it, reading and updating
    /// the image's `state` and drawing any noise the step needs from `rng`.
    fn step(
        &self,
        state: &mut Self::State,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        rng: &mut dyn Randn,
    ) -> Result<StepOutput, SchedulerError>;
}

/// The model as a sampler sees it: the UNet inputs of a batch of images (already scaled for
/// the model) and one timestep in, the raw model output of each image out (guidance applied).
pub type ModelFn<'a> = dyn FnMut(&[Vec<f32>], f32) -> Result<Vec<Vec<f32>>, EngineError> + 'a;

/// Called after each finished step with the steps done, that step's (first) timestep and every
/// image's latents.
pub type StepFn<'a> = dyn FnMut(usize, f32, &[Vec<f32>]) + 'a;

/// Checks `index` against a schedule of `steps` and the two buffers against each other.
fn check_step(
    index: usize,
    steps: usize,
    model_output: &[f32],
    sample: &[f32],
) -> Result<(), SchedulerError> {
    if index >= steps {
        return Err(SchedulerError::StepIndex { index, steps });
    }
    if model_output.len() != sample.len() {
        return Err(SchedulerError::LengthMismatch {
            model_output: model_output.len(),
            sample: sample.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sd15_config_file_parses_with_unknown_keys_ignored() {
        let json = r#"{
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "trained_betas": null, "clip_sample": false
        }"#;
        let config = ScheduleConfig::from_json(json).expect("SD1.5 config parses");
        assert_eq!(config, ScheduleConfig::default());
    }

    #[test]
    fn an_empty_config_takes_sd15_defaults() {
        let config = ScheduleConfig::from_json("{}").expect("empty config parses");
        assert_eq!(config, ScheduleConfig::default());
    }

    #[test]
    fn spacing_and_prediction_names_follow_diffusers() {
        let json = r#"{"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                       "beta_schedule": "linear"}"#;
        let config = ScheduleConfig::from_json(json).expect("parses");
        assert_eq!(config.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(config.prediction_type, PredictionType::VPrediction);
        assert_eq!(config.beta_schedule, BetaSchedule::Linear);
    }

    #[test]
    fn unsupported_beta_schedules_are_rejected() {
        let err = ScheduleConfig::from_json(r#"{"beta_schedule": "squaredcos_cap_v2"}"#);
        assert!(matches!(err, Err(SchedulerError::ConfigJson(_))), "{err:?}");
    }

    #[test]
    fn nonsense_values_are_rejected() {
        for json in [
            r#"{"num_train_timesteps": 1}"#,
            r#"{"beta_start": 0.5, "beta_end": 0.1}"#,
            r#"{"beta_start": -0.1}"#,
            r#"{"original_inference_steps": 0}"#,
            r#"{"original_inference_steps": 2000}"#,
            r#"{"trained_betas": [0.1, 0.2]}"#,
            r#"{"thresholding": true}"#,
            r#"{"rescale_betas_zero_snr": true}"#,
        ] {
            let err = ScheduleConfig::from_json(json);
            assert!(
                matches!(err, Err(SchedulerError::InvalidConfig(_))),
                "{json}: {err:?}"
            );
        }
    }

    #[test]
    fn sd15_alphas_cumprod_match_the_tech_notes() {
        // float64 values from tech-notes §2.4; float32 maths agrees to ~1e-6 relative.
        let alphas = alphas_cumprod(&ScheduleConfig::default());
        for (t, want) in [
            (999, 0.004660),
            (759, 0.052213),
            (499, 0.277670),
            (0, 0.999150),
        ] {
            let got = f64::from(alphas[t]);
            assert!((got - want).abs() / want < 1e-4, "t={t}: {got} vs {want}");
        }
    }
}
