//! The render loop: a [`Pipeline`] (model + LoRA stack, loaded once) turns
//! [`RenderRequest`]s into images, as diffusers' `StableDiffusionPipeline` does.
//!
//! Owns request validation, classifier-free guidance (CFG ≤ 1: one UNet pass per step and no
//! unconditional branch; CFG > 1: one batch of `[uncond, cond]`), the seeded noise (initial
//! latents first, then whatever the sampler draws, from one [`TorchRng`] stream in diffusers'
//! order), progress reporting, cancellation, decoding and the image metadata. It does not
//! know where requests come from or where images go.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

use super::error::{EngineError, Result};
use super::image::{Infotext, RgbImage, encode_png, to_rgb8};
use super::lora::LoraSpec;
use super::model::{Device, Model, to_host};
use super::rng::TorchRng;
use super::scheduler::{EulerAncestralScheduler, LcmScheduler, Sampler};
use super::weights::HostTensor;

/// Pixels per latent cell: the VAE upsamples by 8.
const LATENT_SCALE: u32 = 8;

/// Which sampler steps the latents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplerKind {
    /// diffusers' `LCMScheduler`, for LCM-LoRA (4–8 steps, CFG 1–2).
    #[default]
    Lcm,
    /// diffusers' `EulerAncestralDiscreteScheduler` ("Euler a").
    EulerAncestral,
}

impl SamplerKind {
    /// The name A1111 uses in its metadata.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Lcm => "LCM",
            Self::EulerAncestral => "Euler a",
        }
    }

    /// The name kiln uses on the command line and in sweeps.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lcm => "lcm",
            Self::EulerAncestral => "euler_a",
        }
    }
}

impl FromStr for SamplerKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lcm" => Ok(Self::Lcm),
            "euler_a" => Ok(Self::EulerAncestral),
            other => Err(EngineError::InvalidRequest(format!(
                "unknown sampler {other:?} (expected lcm or euler_a)"
            ))),
        }
    }
}

/// One image to render.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderRequest {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from; only used when `cfg_scale > 1`.
    pub negative_prompt: String,
    /// Seed of the torch-compatible CPU generator (only its low 32 bits matter, as in torch).
    pub seed: u64,
    /// Sampling steps.
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` disables guidance.
    pub cfg_scale: f32,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Image width in pixels, a multiple of 8.
    pub width: u32,
    /// Image height in pixels, a multiple of 8.
    pub height: u32,
}

impl RenderRequest {
    /// The checks that need no model: size and CFG scale. (Step counts depend on the
    /// model's schedule; [`Pipeline::validate`] checks everything.)
    pub fn check(&self) -> Result<()> {
        let invalid = |msg: String| Err(EngineError::InvalidRequest(msg));
        for (what, value) in [("width", self.width), ("height", self.height)] {
            if value == 0 || !value.is_multiple_of(LATENT_SCALE) {
                return invalid(format!(
                    "{what} {value} is not a positive multiple of {LATENT_SCALE}"
                ));
            }
        }
        if !self.cfg_scale.is_finite() {
            return invalid(format!("CFG scale {} is not finite", self.cfg_scale));
        }
        Ok(())
    }
}

/// Reported after every sampling step.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// Steps done so far (1 after the first).
    pub step: usize,
    /// Total steps.
    pub steps: usize,
    /// The timestep just sampled.
    pub timestep: f32,
    /// The latents after this step (`[1, c, h/8, w/8]`, row-major).
    pub latents: &'a [f32],
}

/// A rendered image and what was done to make it.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderOutput {
    /// The image.
    pub image: RgbImage,
    /// A1111-style generation parameters (the PNG `parameters` chunk).
    pub parameters: String,
    /// Things the caller should know, e.g. that the negative prompt was ignored.
    pub notes: Vec<String>,
    /// UNet evaluations per step: 1 without guidance, 2 with.
    pub unet_batch: usize,
}

impl RenderOutput {
    /// The image as PNG, with `parameters` (and `kiln-notes` when there are notes) as text
    /// chunks.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let notes = self.notes.join("\n");
        let mut text = vec![("parameters", self.parameters.as_str())];
        if !notes.is_empty() {
            text.push(("kiln-notes", notes.as_str()));
        }
        encode_png(&self.image, &text)
    }
}

/// A loaded model + LoRA stack that renders many requests.
#[derive(Debug)]
pub struct Pipeline {
    model: Model,
}

impl Pipeline {
    /// Loads `folder` with `loras` merged in, on `device`.
    pub fn load(folder: &Path, loras: &[LoraSpec], device: Device) -> Result<Self> {
        Ok(Self {
            model: Model::load(folder, loras, device)?,
        })
    }

    /// Wraps an already loaded model.
    pub fn new(model: Model) -> Self {
        Self { model }
    }

    /// The model, for its name, hashes and component access.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Checks a request without rendering it.
    pub fn validate(&self, request: &RenderRequest) -> Result<()> {
        request.check()?;
        self.sampler(request).map(|_| ())
    }

    fn sampler(&self, request: &RenderRequest) -> Result<Box<dyn Sampler>> {
        let schedule = self.model.schedule();
        Ok(match request.sampler {
            SamplerKind::Lcm => Box::new(LcmScheduler::new(schedule, request.steps)?),
            SamplerKind::EulerAncestral => {
                Box::new(EulerAncestralScheduler::new(schedule, request.steps)?)
            }
        })
    }

    /// Renders `request`, calling `on_step` after every step and giving up with
    /// [`EngineError::Cancelled`] once `cancel` is set (checked before each step and before
    /// decoding).
    pub fn render(
        &self,
        request: &RenderRequest,
        on_step: &mut dyn FnMut(Progress<'_>),
        cancel: &AtomicBool,
    ) -> Result<RenderOutput> {
        self.validate(request)?;
        let sampler = self.sampler(request)?;
        let model = &self.model;
        let guided = request.cfg_scale > 1.0;
        let mut notes = Vec::new();
        let context = if guided {
            model.text_embeddings(&[&request.negative_prompt, &request.prompt])?
        } else {
            if !request.negative_prompt.is_empty() {
                notes.push(format!(
                    "negative prompt ignored: CFG scale {} <= 1 runs no unconditional pass",
                    request.cfg_scale
                ));
            }
            model.text_embeddings(&[&request.prompt])?
        };

        let latent_shape = vec![
            1,
            model.latent_channels(),
            (request.height / LATENT_SCALE) as usize,
            (request.width / LATENT_SCALE) as usize,
        ];
        let numel = latent_shape.iter().product();
        let mut rng = TorchRng::new(request.seed);
        let sigma = sampler.init_noise_sigma();
        let mut latents: Vec<f32> = rng.randn(numel).into_iter().map(|z| z * sigma).collect();

        let timesteps = sampler.timesteps().to_vec();
        for (index, &t) in timesteps.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            let input = sampler.scale_model_input(&latents, index)?;
            let input = model.to_device(&HostTensor {
                shape: latent_shape.clone(),
                data: input,
            })?;
            let eps = predict_noise(
                model,
                &input,
                t,
                &context,
                guided.then_some(request.cfg_scale),
            )?;
            latents = sampler.step(index, &eps, &latents, &mut rng)?.prev_sample;
            on_step(Progress {
                step: index + 1,
                steps: timesteps.len(),
                timestep: t,
                latents: &latents,
            });
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }

        let final_latents = model.to_device(&HostTensor {
            shape: latent_shape.clone(),
            data: latents,
        })?;
        let decoded = to_host(&model.decode_latents(&final_latents)?)?;
        let image = to_rgb8(&decoded.data, request.width, request.height)?;
        let parameters = Infotext {
            prompt: &request.prompt,
            negative_prompt: &request.negative_prompt,
            steps: request.steps,
            sampler: request.sampler.a1111_name(),
            cfg_scale: request.cfg_scale,
            seed: request.seed,
            width: request.width,
            height: request.height,
            model_hash: model.hash(),
            model_name: model.name(),
            loras: model.loras(),
        }
        .render();
        Ok(RenderOutput {
            image,
            parameters,
            notes,
            unet_batch: if guided { 2 } else { 1 },
        })
    }
}

/// The noise the sampler steps with: one UNet pass, or with `guidance = Some(g)` one batch of
/// `[uncond, cond]` combined as diffusers does, `u + g·(c − u)` in f32.
fn predict_noise(
    model: &Model,
    input: &Tensor,
    t: f32,
    context: &Tensor,
    guidance: Option<f32>,
) -> Result<Vec<f32>> {
    let Some(g) = guidance else {
        return Ok(to_host(&model.unet_forward(input, t, context)?)?.data);
    };
    let batch = Tensor::cat(&[input, input], 0)?;
    let out = model.unet_forward(&batch, t, context)?;
    let uncond = to_host(&out.narrow(0, 0, 1)?)?.data;
    let cond = to_host(&out.narrow(0, 1, 1)?)?.data;
    Ok(uncond
        .iter()
        .zip(&cond)
        .map(|(&u, &c)| u + g * (c - u))
        .collect())
}
