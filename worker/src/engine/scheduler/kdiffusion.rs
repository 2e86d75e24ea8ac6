//! k-diffusion's samplers, as AUTOMATIC1111's webui runs them (`k-diffusion` 0.1.1 on PyPI,
//! `k_diffusion/sampling.py` and `external.py`).
//!
//! Owns the discrete-model wrapper ([`KDenoiser`]: sigma = sqrt((1−ᾱ)/ᾱ) per training
//! timestep, `sigma_to_t`/`t_to_sigma` by interpolating log-sigma, the input/output scalings of
//! `DiscreteEpsDDPMDenoiser` and its v-prediction twin), the two sigma schedules
//! ([`Schedule::Normal`]: `get_sigmas`, [`Schedule::Karras`]: `get_sigmas_karras` between the
//! model's smallest and largest sigma, ρ = 7, as A1111 calls it) and the sampling loops of Euler,
//! Euler a, Heun, DPM++ 2M and DPM++ 2S a ([`KSampler`]). The loops run a whole batch of images
//! in lockstep, one model evaluation for all of them at a time, and draw each image's noise
//! from that image's own stream in k-diffusion's order. Arithmetic is float32, in the order of
//! the torch expressions it mirrors.

use kiln_proto::sampler::{Method, Schedule};

use super::dpmpp_sde::sample_dpmpp_sde;
use super::{
    ModelFn, PredictionType, ScheduleConfig, SchedulerError, StepFn, alphas_cumprod, linspace_f32,
};
use crate::engine::error::EngineError;
use crate::engine::rng::Randn;

/// A model trained on discrete timesteps, seen as a continuous denoiser of noise level σ.
#[derive(Clone, Debug)]
pub struct KDenoiser {
    /// σ of each training timestep, increasing.
    sigmas: Vec<f32>,
    /// `ln σ` of each training timestep.
    log_sigmas: Vec<f32>,
    prediction: PredictionType,
}

impl KDenoiser {
    /// The denoiser of a model trained with `config`'s noise schedule.
    pub fn new(config: &ScheduleConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        // `((1 - ac) / ac) ** 0.5`: torch evaluates `** 0.5` as a square root.
        let sigmas: Vec<f32> = alphas_cumprod(config)
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Ok(Self {
            sigmas,
            log_sigmas,
            prediction: config.prediction_type,
        })
    }

    /// The smallest σ the model was trained on (`sigma_min`).
    pub fn sigma_min(&self) -> f32 {
        self.sigmas[0]
    }

    /// The largest σ the model was trained on (`sigma_max`).
    pub fn sigma_max(&self) -> f32 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// `steps` noise levels from the noisiest down, then 0.
    pub fn schedule(&self, schedule: Schedule, steps: usize) -> Vec<f32> {
        let mut sigmas = match schedule {
            // `t_to_sigma(linspace(len - 1, 0, steps))`.
            Schedule::Normal => {
                let t_max = (self.sigmas.len() - 1) as f64;
                let ts = if steps == 1 {
                    vec![t_max as f32]
                } else {
                    linspace_f32(t_max, 0.0, steps)
                };
                ts.into_iter().map(|t| self.t_to_sigma(t)).collect()
            }
            Schedule::Karras => karras(steps, self.sigma_min(), self.sigma_max()),
        };
        sigmas.push(0.0);
        sigmas
    }

    /// The fractional training timestep of noise level `sigma` (`sigma_to_t`, unquantized).
    pub fn sigma_to_t(&self, sigma: f32) -> f32 {
        let log_sigma = sigma.ln();
        let n = self.log_sigmas.len();
        // `dists.ge(0).cumsum(0).argmax(0)`: the last index whose log-sigma is at most ours
        // (0 when none is), then kept below the top so `high` exists.
        let low = self
            .log_sigmas
            .iter()
            .rposition(|&l| log_sigma - l >= 0.0)
            .unwrap_or(0)
            .min(n - 2);
        let high = low + 1;
        let (lo, hi) = (self.log_sigmas[low], self.log_sigmas[high]);
        let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
        (1.0 - w) * low as f32 + w * high as f32
    }

    /// σ at a fractional training timestep (`t_to_sigma`).
    pub fn t_to_sigma(&self, t: f32) -> f32 {
        let (low, high) = (t.floor() as usize, t.ceil() as usize);
        let w = t - t.floor();
        let log_sigma = (1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[high];
        log_sigma.exp()
    }

    /// The UNet's input scale at `sigma`: `1 / sqrt(σ² + 1)`.
    pub fn c_in(sigma: f32) -> f32 {
        1.0 / (sigma * sigma + 1.0).sqrt()
    }

    /// The clean-image estimate from the model's raw output at `sigma` for the (unscaled)
    /// latent `x`.
    pub fn denoised(&self, x: &[f32], output: &[f32], sigma: f32) -> Vec<f32> {
        match self.prediction {
            PredictionType::VPrediction => {
                // `CompVisVDenoiser`: c_skip = 1/(σ²+1), c_out = −σ/sqrt(σ²+1).
                let var = sigma * sigma + 1.0;
                let c_skip = 1.0 / var;
                let c_out = -sigma / var.sqrt();
                output
                    .iter()
                    .zip(x)
                    .map(|(&v, &x)| v * c_out + x * c_skip)
                    .collect()
            }
            // `input + eps * c_out` with c_out = −σ. `KSampler::new` rejects `Sample`.
            _ => {
                let c_out = -sigma;
                output
                    .iter()
                    .zip(x)
                    .map(|(&eps, &x)| x + eps * c_out)
                    .collect()
            }
        }
    }
}

/// `get_sigmas_karras(n, sigma_min, sigma_max, rho=7)` without the trailing 0: the ρ-th roots
/// are taken in double (Python floats), the ramp is float32.
fn karras(steps: usize, sigma_min: f32, sigma_max: f32) -> Vec<f32> {
    const RHO: f64 = 7.0;
    let min_inv_rho = f64::from(sigma_min).powf(1.0 / RHO);
    let max_inv_rho = f64::from(sigma_max).powf(1.0 / RHO);
    let ramp = if steps == 1 {
        vec![0.0f32]
    } else {
        linspace_f32(0.0, 1.0, steps)
    };
    // A float32 tensor times a Python float: the scalar is rounded to float32 first.
    let span = (min_inv_rho - max_inv_rho) as f32;
    ramp.into_iter()
        .map(|r| (max_inv_rho as f32 + r * span).powf(RHO as f32))
        .collect()
}

/// `get_ancestral_step(σ_from, σ_to, eta=1)`: the level to step down to and the noise to add.
fn ancestral_step(from: f32, to: f32) -> (f32, f32) {
    let up = to.min((to * to * (from * from - to * to) / (from * from)).sqrt());
    let down = (to * to - up * up).sqrt();
    (down, up)
}

/// How an img2img run picks its steps (A1111's `setup_img2img_steps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Img2ImgSteps {
    /// img2img's default: of a `steps`-step schedule, the last `int(min(denoise, 0.999)·steps)
    /// + 1` are run.
    Scaled,
    /// The hires fix (and A1111's "img2img fix steps" option): exactly `steps` are run, the tail
    /// of a schedule of `int(steps / min(denoise, 0.999))`.
    Fixed,
}

/// One of k-diffusion's samplers over a fixed sigma schedule.
#[derive(Clone, Debug)]
pub struct KSampler {
    method: Method,
    denoiser: KDenoiser,
    /// Noise levels, one per step, then 0.
    sigmas: Vec<f32>,
    /// The UNet timestep of each step's first evaluation.
    timesteps: Vec<f32>,
    /// DPM++ SDE's Brownian interval: the smallest non-zero and the largest sigma of the whole
    /// schedule (of an img2img run too: A1111 builds it before cutting).
    tree_range: (f32, f32),
}

impl KSampler {
    /// `method` on `schedule` for `steps` steps of a model trained with `config`.
    pub fn new(
        config: &ScheduleConfig,
        method: Method,
        schedule: Schedule,
        steps: usize,
    ) -> Result<Self, SchedulerError> {
        let denoiser = Self::check(config, method, steps)?;
        let sigmas = denoiser.schedule(schedule, steps);
        let range = tree_range(&sigmas);
        Ok(Self::from_sigmas(method, denoiser, sigmas, range))
    }

    /// An img2img run that starts part-way down the schedule, as A1111's `setup_img2img_steps`
    /// and `sample_img2img` cut it (see [`Img2ImgSteps`]). `denoise` must be in (0, 1].
    pub fn img2img(
        config: &ScheduleConfig,
        method: Method,
        schedule: Schedule,
        steps: usize,
        denoise: f32,
        cut: Img2ImgSteps,
    ) -> Result<Self, SchedulerError> {
        if !(denoise > 0.0 && denoise <= 1.0) {
            return Err(SchedulerError::InvalidConfig(format!(
                "denoising strength {denoise} is not in (0, 1]"
            )));
        }
        // A1111 divides Python floats: the strength as the user wrote it (0.3, not the
        // float32 0.30000001, which would give 19 steps for 6 / 0.3 instead of 20).
        let strength: f64 = denoise.to_string().parse().unwrap_or(f64::from(denoise));
        let (total, t_enc) = match cut {
            Img2ImgSteps::Fixed => ((steps as f64 / strength.min(0.999)) as usize, steps - 1),
            Img2ImgSteps::Scaled => (steps, (strength.min(0.999) * steps as f64) as usize),
        };
        let denoiser = Self::check(config, method, total)?;
        let full = denoiser.schedule(schedule, total);
        // `sigma_sched = sigmas[steps - t_enc - 1:]`: t_enc + 1 steps are run.
        let sigmas = full[total - t_enc - 1..].to_vec();
        Ok(Self::from_sigmas(
            method,
            denoiser,
            sigmas,
            tree_range(&full),
        ))
    }

    /// The denoiser, once `method`, the model's parameterization and `steps` are known good.
    fn check(
        config: &ScheduleConfig,
        method: Method,
        steps: usize,
    ) -> Result<KDenoiser, SchedulerError> {
        let name = method.a1111_name();
        if !method.is_k_diffusion() {
            return Err(SchedulerError::InvalidConfig(format!(
                "{name} is not a k-diffusion sampler"
            )));
        }
        if config.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::UnsupportedPrediction {
                sampler: name,
                prediction: config.prediction_type,
            });
        }
        let train = config.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(SchedulerError::StepCount {
                sampler: name,
                steps,
                min: 1,
                max: train,
            });
        }
        KDenoiser::new(config)
    }

    fn from_sigmas(
        method: Method,
        denoiser: KDenoiser,
        sigmas: Vec<f32>,
        tree_range: (f32, f32),
    ) -> Self {
        let steps = sigmas.len() - 1;
        let timesteps = sigmas[..steps]
            .iter()
            .map(|&s| denoiser.sigma_to_t(s))
            .collect();
        Self {
            method,
            denoiser,
            sigmas,
            timesteps,
            tree_range,
        }
    }

    /// The noise levels: one per step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The UNet timestep of each step's first evaluation.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The standard deviation of the initial noise: the first sigma.
    pub fn init_noise_sigma(&self) -> f32 {
        self.sigmas[0]
    }

    /// Denoised estimates of every image of `xs` at noise level `sigma`, from one model call.
    fn denoise(
        &self,
        model: &mut ModelFn<'_>,
        xs: &[Vec<f32>],
        sigma: f32,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let c_in = KDenoiser::c_in(sigma);
        let inputs: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| x.iter().map(|&v| v * c_in).collect())
            .collect();
        let outputs = model(&inputs, self.denoiser.sigma_to_t(sigma))?;
        Ok(xs
            .iter()
            .zip(&outputs)
            .map(|(x, out)| self.denoiser.denoised(x, out, sigma))
            .collect())
    }

    /// Samples every image of `xs` (initial noise already scaled by
    /// [`init_noise_sigma`](Self::init_noise_sigma)) in place, drawing image `i`'s noise from
    /// `noise[i]` and reporting each finished step to `on_step`.
    pub fn sample(
        &self,
        xs: &mut [Vec<f32>],
        noise: &mut [&mut dyn Randn],
        model: &mut ModelFn<'_>,
        on_step: &mut StepFn<'_>,
    ) -> Result<(), EngineError> {
        let steps = self.sigmas.len() - 1;
        if self.method == Method::DpmppSde {
            return self.sample_sde(xs, noise, model, on_step);
        }
        let mut old_denoised: Option<Vec<Vec<f32>>> = None;
        for i in 0..steps {
            let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
            let denoised = self.denoise(model, xs, sigma)?;
            match self.method {
                Method::Euler => euler(xs, &denoised, sigma, next),
                Method::Heun => {
                    if next == 0.0 {
                        euler(xs, &denoised, sigma, next);
                    } else {
                        let dt = next - sigma;
                        let d: Vec<Vec<f32>> = xs
                            .iter()
                            .zip(&denoised)
                            .map(|(x, dn)| to_d(x, dn, sigma))
                            .collect();
                        let x2: Vec<Vec<f32>> = xs
                            .iter()
                            .zip(&d)
                            .map(|(x, d)| x.iter().zip(d).map(|(&x, &d)| x + d * dt).collect())
                            .collect();
                        let denoised2 = self.denoise(model, &x2, next)?;
                        for ((x, d), (x2, dn2)) in
                            xs.iter_mut().zip(&d).zip(x2.iter().zip(&denoised2))
                        {
                            let d2 = to_d(x2, dn2, next);
                            for ((x, &d), &d2) in x.iter_mut().zip(d).zip(&d2) {
                                *x += (d + d2) / 2.0 * dt;
                            }
                        }
                    }
                }
                Method::EulerA => {
                    let (down, up) = ancestral_step(sigma, next);
                    euler(xs, &denoised, sigma, down);
                    add_noise(xs, noise, next, up);
                }
                Method::Dpmpp2m => {
                    let t = -sigma.ln();
                    let t_next = -next.ln();
                    let h = t_next - t;
                    let ratio = (-t_next).exp() / (-t).exp();
                    let coef = (-h).exp_m1();
                    match (&old_denoised, next == 0.0) {
                        (Some(old), false) => {
                            let h_last = t - (-self.sigmas[i - 1].ln());
                            let r = h_last / h;
                            let (a, b) = (1.0 + 1.0 / (2.0 * r), 1.0 / (2.0 * r));
                            for ((x, dn), old) in xs.iter_mut().zip(&denoised).zip(old) {
                                for ((x, &dn), &old) in x.iter_mut().zip(dn).zip(old) {
                                    let dd = a * dn - b * old;
                                    *x = ratio * *x - coef * dd;
                                }
                            }
                        }
                        _ => {
                            for (x, dn) in xs.iter_mut().zip(&denoised) {
                                for (x, &dn) in x.iter_mut().zip(dn) {
                                    *x = ratio * *x - coef * dn;
                                }
                            }
                        }
                    }
                }
                Method::Dpmpp2sA => {
                    let (down, up) = ancestral_step(sigma, next);
                    if down == 0.0 {
                        euler(xs, &denoised, sigma, down);
                    } else {
                        let t = -sigma.ln();
                        let t_next = -down.ln();
                        let h = t_next - t;
                        let s = t + 0.5 * h;
                        let sigma_s = (-s).exp();
                        let sigma_t = (-t).exp();
                        let ratio_s = sigma_s / sigma_t;
                        let coef_s = (-h * 0.5).exp_m1();
                        let x2: Vec<Vec<f32>> = xs
                            .iter()
                            .zip(&denoised)
                            .map(|(x, dn)| {
                                x.iter()
                                    .zip(dn)
                                    .map(|(&x, &dn)| ratio_s * x - coef_s * dn)
                                    .collect()
                            })
                            .collect();
                        let denoised2 = self.denoise(model, &x2, sigma_s)?;
                        let ratio = (-t_next).exp() / sigma_t;
                        let coef = (-h).exp_m1();
                        for (x, dn2) in xs.iter_mut().zip(&denoised2) {
                            for (x, &dn2) in x.iter_mut().zip(dn2) {
                                *x = ratio * *x - coef * dn2;
                            }
                        }
                    }
                    add_noise(xs, noise, next, up);
                }
                Method::DpmppSde => unreachable!("handled by sample_sde"),
                Method::Lcm
                | Method::EulerADiffusers
                | Method::Ddim
                | Method::UniPc
                | Method::Tcd => {
                    unreachable!("KSampler::new accepts only k-diffusion methods")
                }
            }
            if self.method == Method::Dpmpp2m {
                old_denoised = Some(denoised);
            }
            on_step(i + 1, self.timesteps[i], xs);
        }
        Ok(())
    }
}

impl KSampler {
    /// DPM++ SDE: each image's noise comes from its Brownian tree over the schedule's range.
    fn sample_sde(
        &self,
        xs: &mut [Vec<f32>],
        noise: &mut [&mut dyn Randn],
        model: &mut ModelFn<'_>,
        on_step: &mut StepFn<'_>,
    ) -> Result<(), EngineError> {
        let (lo, hi) = self.tree_range;
        let mut trees = Vec::with_capacity(xs.len());
        for (x, stream) in xs.iter().zip(noise.iter()) {
            let tree = stream.brownian_tree(x.len(), lo, hi).ok_or_else(|| {
                EngineError::InvalidRequest("DPM++ SDE needs each image's seed".to_owned())
            })?;
            trees.push(tree);
        }
        let mut denoise = |xs: &[Vec<f32>], sigma: f32| self.denoise(model, xs, sigma);
        let timesteps = &self.timesteps;
        sample_dpmpp_sde(
            &self.sigmas,
            xs,
            &mut trees,
            &mut denoise,
            &mut |done, xs| on_step(done, timesteps[done - 1], xs),
        )
    }
}

/// The smallest non-zero and the largest of `sigmas` (A1111's `create_noise_sampler`).
fn tree_range(sigmas: &[f32]) -> (f32, f32) {
    let lo = sigmas
        .iter()
        .copied()
        .filter(|&s| s > 0.0)
        .fold(f32::INFINITY, f32::min);
    let hi = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (lo, hi)
}

/// `to_d`: the ODE derivative `(x − denoised) / σ`.
fn to_d(x: &[f32], denoised: &[f32], sigma: f32) -> Vec<f32> {
    x.iter()
        .zip(denoised)
        .map(|(&x, &dn)| (x - dn) / sigma)
        .collect()
}

/// An Euler move of every image from `sigma` to `to`: `x + d·(to − σ)`.
fn euler(xs: &mut [Vec<f32>], denoised: &[Vec<f32>], sigma: f32, to: f32) {
    let dt = to - sigma;
    for (x, dn) in xs.iter_mut().zip(denoised) {
        for (x, &dn) in x.iter_mut().zip(dn) {
            let d = (*x - dn) / sigma;
            *x += d * dt;
        }
    }
}

/// `x + noise · σ_up` from each image's own stream, only while the next sigma is not 0 (so the
/// last step draws nothing).
fn add_noise(xs: &mut [Vec<f32>], noise: &mut [&mut dyn Randn], next: f32, up: f32) {
    if next <= 0.0 {
        return;
    }
    for (x, stream) in xs.iter_mut().zip(noise.iter_mut()) {
        let z = stream.randn(x.len());
        for (x, &z) in x.iter_mut().zip(&z) {
            *x += z * up;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> KDenoiser {
        KDenoiser::new(&ScheduleConfig::default()).expect("SD1.5 schedule")
    }

    #[test]
    fn sd15_sigma_range_is_the_well_known_one() {
        // A1111 and ComfyUI print these for every SD1.5 model.
        let d = sd15();
        assert!((d.sigma_min() - 0.0292).abs() < 1e-4, "{}", d.sigma_min());
        assert!((d.sigma_max() - 14.6146).abs() < 1e-3, "{}", d.sigma_max());
    }

    #[test]
    fn sigma_to_t_inverts_t_to_sigma() {
        let d = sd15();
        for t in [0.0f32, 0.5, 1.0, 250.25, 614.5, 998.75, 999.0] {
            let back = d.sigma_to_t(d.t_to_sigma(t));
            assert!((back - t).abs() < 2e-3, "{t} -> {back}");
        }
        // Beyond the trained range the weight clamps to the ends.
        assert_eq!(d.sigma_to_t(100.0), 999.0);
        assert_eq!(d.sigma_to_t(1e-4), 0.0);
    }

    #[test]
    fn schedules_start_at_the_top_and_end_at_zero() {
        let d = sd15();
        for schedule in [Schedule::Normal, Schedule::Karras] {
            for steps in [1, 2, 6, 30] {
                let s = d.schedule(schedule, steps);
                assert_eq!(s.len(), steps + 1);
                assert_eq!(*s.last().expect("trailing zero"), 0.0);
                assert!((s[0] - d.sigma_max()).abs() < 1e-3, "{schedule:?} {s:?}");
                assert!(s.windows(2).all(|w| w[0] > w[1]), "{schedule:?} {s:?}");
            }
        }
        let karras = d.schedule(Schedule::Karras, 6);
        assert!((karras[5] - d.sigma_min()).abs() < 1e-5, "{karras:?}");
    }

    #[test]
    fn img2img_runs_the_tail_of_a_longer_schedule_as_a1111_counts_it() {
        let config = ScheduleConfig::default();
        // 6 / 0.3 is 20.000000000000004 in Python: 20 steps, of which the last 6 run.
        let cut = KSampler::img2img(
            &config,
            Method::EulerA,
            Schedule::Karras,
            6,
            0.3,
            Img2ImgSteps::Fixed,
        )
        .expect("cut");
        let full = KSampler::new(&config, Method::EulerA, Schedule::Karras, 20).expect("full");
        assert_eq!(cut.sigmas(), &full.sigmas()[14..]);
        // Strength 1 is capped at 0.999: int(4 / 0.999) = 4, the whole schedule.
        let whole = KSampler::img2img(
            &config,
            Method::Euler,
            Schedule::Normal,
            4,
            1.0,
            Img2ImgSteps::Fixed,
        )
        .expect("1");
        let plain = KSampler::new(&config, Method::Euler, Schedule::Normal, 4).expect("plain");
        assert_eq!(whole.sigmas(), plain.sigmas());
        // img2img's own cut: int(0.5 · 6) = 3, so the last 4 of 6 steps run.
        let scaled = KSampler::img2img(
            &config,
            Method::Euler,
            Schedule::Normal,
            6,
            0.5,
            Img2ImgSteps::Scaled,
        )
        .expect("scaled");
        let six = KSampler::new(&config, Method::Euler, Schedule::Normal, 6).expect("six");
        assert_eq!(scaled.sigmas(), &six.sigmas()[2..]);
    }

    #[test]
    fn the_ancestral_split_keeps_the_variance() {
        for (from, to) in [(14.6f32, 7.0f32), (1.0, 0.5), (0.3, 0.0)] {
            let (down, up) = ancestral_step(from, to);
            assert!((down * down + up * up - to * to).abs() < 1e-4);
            assert!(up <= to);
        }
        assert_eq!(ancestral_step(0.3, 0.0), (0.0, 0.0));
    }

    #[test]
    fn only_k_diffusion_methods_and_known_predictions_build() {
        let config = ScheduleConfig::default();
        assert!(KSampler::new(&config, Method::Lcm, Schedule::Normal, 4).is_err());
        assert!(KSampler::new(&config, Method::Euler, Schedule::Normal, 0).is_err());
        let sample = ScheduleConfig {
            prediction_type: PredictionType::Sample,
            ..ScheduleConfig::default()
        };
        assert!(KSampler::new(&sample, Method::Heun, Schedule::Karras, 4).is_err());
        let ok = KSampler::new(&config, Method::Dpmpp2sA, Schedule::Karras, 6).expect("builds");
        assert!(
            KSampler::img2img(
                &config,
                Method::Euler,
                Schedule::Normal,
                4,
                0.0,
                Img2ImgSteps::Fixed
            )
            .is_err()
        );
        assert!(
            KSampler::img2img(
                &config,
                Method::Euler,
                Schedule::Normal,
                4,
                1.5,
                Img2ImgSteps::Scaled
            )
            .is_err()
        );
        assert_eq!(ok.timesteps().len(), 6);
        assert!((ok.timesteps()[0] - 999.0).abs() < 1e-3);
    }
}
