//! The [`Sampling`] seam the pipeline drives: what a sampler name means for one model and
//! step count, run over a batch of latents with the model supplied as a closure.
//!
//! Owns the dispatch from [`SamplerName`] to each family's implementation and the loop that runs
//! the one-evaluation-per-step samplers of diffusers ([`Sampler`], [`MultistepSampler`]) over a
//! batch, one history per image. k-diffusion's samplers run their own loops
//! ([`KSampler::sample`]).

use kiln_proto::sampler::{Method, SamplerName};

use super::{
    DdimScheduler, EulerAncestralScheduler, KSampler, LcmScheduler, ModelFn, MultistepSampler,
    Sampler, ScheduleConfig, SchedulerError, StepFn, StepOutput, TcdScheduler, UniPcScheduler,
};
use crate::engine::error::EngineError;
use crate::engine::rng::Randn;

/// A sampler ready to run: what a [`SamplerName`] means for one model and step count.
#[derive(Debug)]
pub enum Sampling {
    /// diffusers' LCM.
    Lcm(LcmScheduler),
    /// diffusers' Euler ancestral.
    EulerADiffusers(EulerAncestralScheduler),
    /// diffusers' DDIM.
    Ddim(DdimScheduler),
    /// diffusers' UniPC (multistep: each [`sample`](Self::sample) call keeps a history per image).
    UniPc(UniPcScheduler),
    /// diffusers' TCD.
    Tcd(TcdScheduler),
    /// One of k-diffusion's.
    K(KSampler),
}

impl Sampling {
    /// `name` for `steps` steps of a model trained with `config`.
    pub fn new(
        config: &ScheduleConfig,
        name: SamplerName,
        steps: usize,
    ) -> Result<Self, SchedulerError> {
        Ok(match name.method {
            Method::Lcm => Sampling::Lcm(LcmScheduler::new(config, steps)?),
            Method::EulerADiffusers => {
                Sampling::EulerADiffusers(EulerAncestralScheduler::new(config, steps)?)
            }
            Method::Ddim => Sampling::Ddim(DdimScheduler::new(config, steps)?),
            Method::UniPc => Sampling::UniPc(UniPcScheduler::new(config, steps)?),
            Method::Tcd => Sampling::Tcd(TcdScheduler::new(config, steps)?),
            method => Sampling::K(KSampler::new(config, method, name.schedule, steps)?),
        })
    }

    /// Sets the sampler's stochasticity: DDIM's η (default 0) or TCD's γ (default 0.3). No
    /// other sampler takes one.
    pub fn with_eta(self, eta: f32) -> Result<Self, SchedulerError> {
        let eta = f64::from(eta);
        match self {
            Sampling::Ddim(s) => Ok(Sampling::Ddim(s.with_eta(eta)?)),
            Sampling::Tcd(s) => Ok(Sampling::Tcd(s.with_gamma(eta)?)),
            _ => Err(SchedulerError::InvalidConfig(
                "eta applies to the ddim and tcd samplers only".to_owned(),
            )),
        }
    }

    /// The standard deviation the initial unit noise is scaled to.
    pub fn init_noise_sigma(&self) -> f32 {
        match self {
            Sampling::Lcm(s) => s.init_noise_sigma(),
            Sampling::EulerADiffusers(s) => s.init_noise_sigma(),
            Sampling::Ddim(s) => s.init_noise_sigma(),
            Sampling::UniPc(s) => s.init_noise_sigma(),
            Sampling::Tcd(s) => s.init_noise_sigma(),
            Sampling::K(s) => s.init_noise_sigma(),
        }
    }

    /// The number of steps.
    pub fn steps(&self) -> usize {
        match self {
            Sampling::Lcm(s) => s.timesteps().len(),
            Sampling::EulerADiffusers(s) => s.timesteps().len(),
            Sampling::Ddim(s) => s.timesteps().len(),
            Sampling::UniPc(s) => s.timesteps().len(),
            Sampling::Tcd(s) => s.timesteps().len(),
            Sampling::K(s) => s.timesteps().len(),
        }
    }

    /// Samples every latent of `xs` in place (initial noise already scaled by
    /// [`init_noise_sigma`](Self::init_noise_sigma)), image `i` drawing its noise from
    /// `noise[i]`.
    pub fn sample(
        &self,
        xs: &mut [Vec<f32>],
        noise: &mut [&mut dyn Randn],
        model: &mut ModelFn<'_>,
        on_step: &mut StepFn<'_>,
    ) -> Result<(), EngineError> {
        match self {
            Sampling::Lcm(s) => stepwise(&Stateless(s), xs, noise, model, on_step),
            Sampling::EulerADiffusers(s) => stepwise(&Stateless(s), xs, noise, model, on_step),
            Sampling::Ddim(s) => stepwise(&Stateless(s), xs, noise, model, on_step),
            Sampling::UniPc(s) => stepwise(s, xs, noise, model, on_step),
            Sampling::Tcd(s) => stepwise(&Stateless(s), xs, noise, model, on_step),
            Sampling::K(s) => s.sample(xs, noise, model, on_step),
        }
    }
}

/// Runs a one-evaluation-per-step sampler over a batch, one history per image.
fn stepwise<S: MultistepSampler>(
    sampler: &S,
    xs: &mut [Vec<f32>],
    noise: &mut [&mut dyn Randn],
    model: &mut ModelFn<'_>,
    on_step: &mut StepFn<'_>,
) -> Result<(), EngineError> {
    let mut states: Vec<S::State> = xs.iter().map(|_| sampler.start()).collect();
    for (index, &t) in sampler.timesteps().iter().enumerate() {
        let inputs = xs
            .iter()
            .map(|x| sampler.scale_model_input(x, index))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = model(&inputs, t)?;
        for (((x, out), stream), state) in xs
            .iter_mut()
            .zip(&outputs)
            .zip(noise.iter_mut())
            .zip(&mut states)
        {
            *x = sampler
                .step(state, index, out, x, &mut **stream)?
                .prev_sample;
        }
        on_step(index + 1, t, xs);
    }
    Ok(())
}

/// A [`Sampler`] as a [`MultistepSampler`] with no history, so one loop runs both.
struct Stateless<'a>(&'a dyn Sampler);

impl MultistepSampler for Stateless<'_> {
    type State = ();

    fn timesteps(&self) -> &[f32] {
        self.0.timesteps()
    }

    fn init_noise_sigma(&self) -> f32 {
        self.0.init_noise_sigma()
    }

    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError> {
        self.0.scale_model_input(sample, index)
    }

    fn start(&self) {}

    fn step(
        &self,
        _state: &mut (),
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        rng: &mut dyn Randn,
    ) -> Result<StepOutput, SchedulerError> {
        self.0.step(index, model_output, sample, rng)
    }
}
