//! One sampling pass over a batch of images: the model as a sampler sees it.
//!
//! Owns [`Pass`]: the UNet with its conditioning groups and classifier-free guidance wrapped as
//! the closure a [`Sampling`] calls (scaled inputs and a timestep in, each image's model output
//! out), the cancel check before every model evaluation, and the per-step progress reports.
//! A txt2img render is one pass; the hires fix adds a second at another size.

use candle_core::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::load::weights::HostTensor;
use crate::engine::model::{Model, to_host};
use crate::engine::noise::ImageNoise;
use crate::engine::pipeline::{Cancel, Progress};
use crate::engine::rng::Randn;
use crate::engine::scheduler::Sampling;
use crate::engine::text::conditioning::ContextGroup;

/// What stays the same across a batch's passes.
pub(crate) struct Pass<'a> {
    pub model: &'a Model,
    /// Images grouped by conditioning length, each group one UNet batch.
    pub groups: &'a [ContextGroup],
    pub cfg_scale: f32,
    /// Whether each evaluation runs `[uncond, cond]` and combines them.
    pub guided: bool,
    /// Asked before every model evaluation.
    pub cancel: &'a dyn Cancel,
}

/// Where a pass's steps fall in the whole render, for progress reports.
pub(crate) struct StepCount {
    /// Steps done before this pass.
    pub before: usize,
    /// Steps of the whole render.
    pub total: usize,
}

impl Pass<'_> {
    /// Runs `sampler` over `latents` (`[channels, h, w]` each, initial noise already in place),
    /// image `i` drawing from `noises[i]`.
    pub fn run(
        &self,
        sampler: &Sampling,
        latents: &mut [Vec<f32>],
        noises: &mut [ImageNoise],
        [channels, h, w]: [usize; 3],
        count: StepCount,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<()> {
        let n = latents.len();
        let numel = channels * h * w;
        let mut model_fn = |inputs: &[Vec<f32>], t: f32| -> Result<Vec<Vec<f32>>> {
            // Checked before every model evaluation, so a cancel never waits a whole step.
            if self.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let mut outputs = vec![Vec::new(); n];
            for group in self.groups {
                let mut input = Vec::with_capacity(group.images.len() * numel);
                for &i in &group.images {
                    input.extend_from_slice(&inputs[i]);
                }
                let input = self.model.to_device(&HostTensor {
                    shape: vec![group.images.len(), channels, h, w],
                    data: input,
                })?;
                let out = predict_noise(
                    self.model,
                    &input,
                    t,
                    &group.context,
                    self.cfg_scale,
                    self.guided,
                )?;
                for (j, &i) in group.images.iter().enumerate() {
                    outputs[i] = out[j * numel..(j + 1) * numel].to_vec();
                }
            }
            Ok(outputs)
        };
        let mut step_fn = |done: usize, t: f32, xs: &[Vec<f32>]| {
            for (i, l) in xs.iter().enumerate() {
                on_step(Progress {
                    image: i,
                    step: count.before + done,
                    steps: count.total,
                    timestep: t,
                    latents: l,
                });
            }
        };
        let mut streams: Vec<&mut dyn Randn> =
            noises.iter_mut().map(|n| n as &mut dyn Randn).collect();
        sampler.sample(latents, &mut streams, &mut model_fn, &mut step_fn)
    }
}

/// The model output the sampler steps with, for a batch of `b` latents (`[b, c, h, w]`),
/// row-major: one UNet pass (which an LCM-distilled UNet conditions on `g`), or when `guided`
/// one batch of `[uncond × b, cond × b]` combined as diffusers does, `u + g·(c − u)` in f32.
fn predict_noise(
    model: &Model,
    input: &Tensor,
    t: f32,
    context: &Tensor,
    g: f32,
    guided: bool,
) -> Result<Vec<f32>> {
    if !guided {
        return Ok(to_host(&model.unet_forward(input, t, context, g)?)?.data);
    }
    let b = input.dim(0)?;
    let batch = Tensor::cat(&[input, input], 0)?;
    let out = model.unet_forward(&batch, t, context, g)?;
    let uncond = to_host(&out.narrow(0, 0, b)?)?.data;
    let cond = to_host(&out.narrow(0, b, b)?)?.data;
    Ok(uncond
        .iter()
        .zip(&cond)
        .map(|(&u, &c)| u + g * (c - u))
        .collect())
}
