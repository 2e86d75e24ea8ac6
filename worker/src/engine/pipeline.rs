//! The render loop: a [`Pipeline`] (model + LoRA stack, loaded once) turns
//! [`RenderRequest`]s into images, as diffusers' `StableDiffusionPipeline` does.
//!
//! Owns request validation, classifier-free guidance (CFG ≤ 1: one UNet pass per step and no
//! unconditional branch; CFG > 1: one batch of `[uncond, cond]`), the seeded noise (initial
//! latents first, then whatever the sampler draws, from one [`TorchRng`] stream in diffusers'
//! order), batching requests that share everything but prompt and seed into one UNet batch
//! (each with its own noise stream, so each image is its single render), the prompt-embedding
//! cache and putting each request's conditioning together (A1111 prompt syntax, textual-inversion
//! embeddings from the database its caller sets, clip skip, the negative prompt padded to the
//! prompt's chunk count), phase timings, progress reporting, cancellation, decoding and the image
//! metadata. It does not know where requests come from or where images go.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use kiln_proto::prompt::{ParsedPrompt, PromptPart};

use crate::engine::device::Device;
use crate::engine::error::{EngineError, Result};
use crate::engine::image::{Infotext, RgbImage, encode_png, to_rgb8};
use crate::engine::load::lora::LoraSpec;
use crate::engine::load::weights::HostTensor;
use crate::engine::model::{Model, UsedInversion, to_host};
use crate::engine::rng::TorchRng;
use crate::engine::scheduler::{EulerAncestralScheduler, LcmScheduler, Sampler};
use crate::engine::text::conditioning::{self, ContextGroup, Encoded};
use crate::engine::text::embeddings::{self, EmbeddingCache, EmbeddingStats};
use crate::engine::text::inversion::InversionDb;

/// Pixels per latent cell: the VAE upsamples by 8.
const LATENT_SCALE: u32 = 8;

/// The largest [`RenderRequest::clip_skip`] (A1111's slider goes to 12; 1–4 is what SD1.5 work
/// uses).
pub const MAX_CLIP_SKIP: usize = 4;

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
    /// A1111's "Clip skip": which text-encoder layer, counted from the end, conditions the UNet
    /// (its output then goes through CLIP's final layer norm). 1, the usual value, is the last
    /// layer; at most [`MAX_CLIP_SKIP`].
    pub clip_skip: usize,
}

impl RenderRequest {
    /// The checks that need no model: size, CFG scale, clip skip and prompt syntax. (Step
    /// counts depend on the model's schedule; [`Pipeline::validate`] checks everything.)
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
        if !(1..=MAX_CLIP_SKIP).contains(&self.clip_skip) {
            return invalid(format!(
                "clip skip {} is not in 1..={MAX_CLIP_SKIP}",
                self.clip_skip
            ));
        }
        self.parse_prompts().map(|_| ())
    }

    /// The prompt and the negative prompt, parsed as A1111 parses them (extra networks are cut
    /// from the prompt only).
    pub fn parse_prompts(&self) -> Result<(ParsedPrompt, ParsedPrompt)> {
        let prompt = ParsedPrompt::parse(&self.prompt).map_err(|error| EngineError::Prompt {
            which: "prompt",
            error,
        })?;
        let negative = ParsedPrompt::parse_negative(&self.negative_prompt).map_err(|error| {
            EngineError::Prompt {
                which: "negative prompt",
                error,
            }
        })?;
        Ok((prompt, negative))
    }

    /// Whether `other` can share a UNet batch with this request: same steps, CFG scale,
    /// sampler and size (prompts, clip skip and seeds may differ).
    pub fn batchable_with(&self, other: &RenderRequest) -> bool {
        self.steps == other.steps
            && self.cfg_scale.to_bits() == other.cfg_scale.to_bits()
            && self.sampler == other.sampler
            && self.width == other.width
            && self.height == other.height
    }
}

/// Asked before each step and before decoding whether to give up.
pub trait Cancel {
    /// True once the render should stop with [`EngineError::Cancelled`].
    fn is_cancelled(&self) -> bool;
}

impl Cancel for AtomicBool {
    fn is_cancelled(&self) -> bool {
        self.load(Ordering::Relaxed)
    }
}

/// Reported after every sampling step, once per image of the batch.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// Which request of the batch (0 for a single render).
    pub image: usize,
    /// Steps done so far (1 after the first).
    pub step: usize,
    /// Total steps.
    pub steps: usize,
    /// The timestep just sampled.
    pub timestep: f32,
    /// This image's latents after this step (`[1, c, h/8, w/8]`, row-major).
    pub latents: &'a [f32],
}

/// Wall-clock milliseconds of each phase of one render. For an image rendered in a batch of
/// `batch`, each phase is the batch's time divided by `batch` (the image's share), so summing
/// over images gives the device time spent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// Prompt encoding (0 when every prompt was cached).
    pub text_encode_ms: f64,
    /// All sampling steps: UNet passes and sampler updates.
    pub unet_ms: f64,
    /// VAE decoding and conversion to 8-bit RGB.
    pub vae_ms: f64,
    /// Images rendered together (1 for a single render).
    pub batch: usize,
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
    /// UNet evaluations per step for this image: 1 without guidance, 2 with.
    pub unet_batch: usize,
    /// Where the time went.
    pub times: PhaseTimes,
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

/// A loaded model + LoRA stack that renders many requests, keeping its prompts' embeddings.
#[derive(Debug)]
pub struct Pipeline {
    model: Model,
    embeddings: Mutex<EmbeddingCache<Encoded>>,
    /// The textual-inversion embeddings prompts may name (none until the caller sets some).
    inversions: Mutex<Arc<InversionDb>>,
}

/// A request's conditioning, ready for the UNet.
struct Conditioned {
    cond: Tensor,
    /// The negative prompt's, under classifier-free guidance.
    uncond: Option<Tensor>,
    /// Whether one of them was padded to the other's length (A1111's `Pad conds`).
    padded: bool,
    /// The embeddings used by the prompt, then those only the negative prompt used.
    inversions: Vec<UsedInversion>,
}

impl Pipeline {
    /// Loads `folder` with `loras` merged in, on `device`.
    pub fn load(folder: &Path, loras: &[LoraSpec], device: Device) -> Result<Self> {
        Ok(Self::new(Model::load(folder, loras, device)?))
    }

    /// Wraps an already loaded model, with the default prompt-embedding cache.
    pub fn new(model: Model) -> Self {
        Self::with_embedding_cache(model, embeddings::DEFAULT_CAPACITY)
    }

    /// Wraps a model, keeping at most `prompts` prompt embeddings (0: encode every time).
    pub fn with_embedding_cache(model: Model, prompts: usize) -> Self {
        Self {
            model,
            embeddings: Mutex::new(EmbeddingCache::new(prompts)),
            inversions: Mutex::new(Arc::new(InversionDb::empty())),
        }
    }

    /// Sets the textual-inversion embeddings later renders find in prompts (the caller loads
    /// the database, off async threads, and may swap in a newer one at any time; prompt
    /// embeddings cached under another database are not reused).
    pub fn set_inversions(&self, inversions: Arc<InversionDb>) {
        *self.inversions.lock().unwrap_or_else(|e| e.into_inner()) = inversions;
    }

    /// The textual-inversion embeddings renders use now.
    pub fn inversions(&self) -> Arc<InversionDb> {
        self.inversions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model, for its name, hashes and component access.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Prompt-embedding cache hits and misses so far.
    pub fn embedding_stats(&self) -> EmbeddingStats {
        self.embeddings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats
    }

    /// Checks a request without rendering it.
    pub fn validate(&self, request: &RenderRequest) -> Result<()> {
        request.check()?;
        let layers = self.model.clip_layers();
        if request.clip_skip > layers {
            return Err(EngineError::InvalidRequest(format!(
                "clip skip {} is more than the text encoder's {layers} layers",
                request.clip_skip
            )));
        }
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

    /// The conditioning (`[1, 77·k, hidden]`, f32) of one parsed prompt with the embeddings
    /// it used, cached by its parts, clip skip and embedding database.
    fn embedding(
        &self,
        parts: &[PromptPart],
        clip_skip: usize,
        db: &InversionDb,
    ) -> Result<Encoded> {
        let key = conditioning::cache_key(parts, clip_skip, db);
        self.embeddings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_encode(&key, || self.model.text_embeddings(parts, clip_skip, db))
    }

    /// `request`'s conditioning and, when `guided`, its negative prompt's, padded to the same
    /// number of chunks with the empty prompt's as A1111's `pad_cond_uncond` does. Embeddings
    /// of a negative prompt that is not used are not used either.
    fn conditioning_pair(&self, request: &RenderRequest, guided: bool) -> Result<Conditioned> {
        let db = self.inversions();
        let (prompt, negative) = request.parse_prompts()?;
        let cond = self.embedding(&prompt.parts, request.clip_skip, &db)?;
        if !guided {
            return Ok(Conditioned {
                inversions: conditioning::used_inversions(&[&cond]),
                cond: cond.z,
                uncond: None,
                padded: false,
            });
        }
        let uncond = self.embedding(&negative.parts, request.clip_skip, &db)?;
        let inversions = conditioning::used_inversions(&[&cond, &uncond]);
        let empty = || {
            let nothing = PromptPart::Text {
                text: String::new(),
                weight: 1.0,
            };
            Ok(self.embedding(&[nothing], request.clip_skip, &db)?.z)
        };
        let (cond, uncond, padded) = conditioning::pad_cond_uncond(cond.z, uncond.z, empty)?;
        Ok(Conditioned {
            cond,
            uncond: Some(uncond),
            padded,
            inversions,
        })
    }

    /// The conditioning the UNet sees for `request` (`[1, 77·k, hidden]` each): the prompt's
    /// and, under classifier-free guidance, the negative prompt's, padded alike.
    #[cfg(feature = "testing")]
    pub fn conditioning(
        &self,
        request: &RenderRequest,
    ) -> Result<(HostTensor, Option<HostTensor>)> {
        let guided = request.cfg_scale > 1.0 && !self.model.embeds_guidance();
        let c = self.conditioning_pair(request, guided)?;
        Ok((
            to_host(&c.cond)?,
            c.uncond.map(|u| to_host(&u)).transpose()?,
        ))
    }

    /// Renders `request`, calling `on_step` after every step and giving up with
    /// [`EngineError::Cancelled`] once `cancel` is set (checked before each step and before
    /// decoding).
    pub fn render(
        &self,
        request: &RenderRequest,
        on_step: &mut dyn FnMut(Progress<'_>),
        cancel: &dyn Cancel,
    ) -> Result<RenderOutput> {
        let mut out = self.render_batch(std::slice::from_ref(request), on_step, cancel)?;
        Ok(out.pop().expect("one request gives one image"))
    }

    /// Renders `requests` as one UNet batch per step (one per conditioning length, when their
    /// prompts have different chunk counts). They must share steps, CFG scale, sampler and size
    /// ([`RenderRequest::batchable_with`]); each keeps its own prompt and its own seed's noise
    /// stream, so each image is what [`Pipeline::render`] gives for it alone (up to the last
    /// bits of float summation order in batched kernels). `on_step` is called
    /// per image per step; `cancel` is checked before each step and before decoding.
    pub fn render_batch(
        &self,
        requests: &[RenderRequest],
        on_step: &mut dyn FnMut(Progress<'_>),
        cancel: &dyn Cancel,
    ) -> Result<Vec<RenderOutput>> {
        let Some(first) = requests.first() else {
            return Ok(Vec::new());
        };
        for request in requests {
            self.validate(request)?;
            if !first.batchable_with(request) {
                return Err(EngineError::InvalidRequest(
                    "a batch must share steps, CFG scale, sampler and size".into(),
                ));
            }
        }
        let n = requests.len();
        let sampler = self.sampler(first)?;
        let model = &self.model;
        // An LCM-distilled UNet takes the scale as an embedding: one pass, no CFG batch.
        let guided = first.cfg_scale > 1.0 && !model.embeds_guidance();

        let started = Instant::now();
        let mut pairs = Vec::with_capacity(n);
        let mut extras = Vec::with_capacity(n);
        for request in requests {
            let c = self.conditioning_pair(request, guided)?;
            pairs.push((c.cond, c.uncond));
            extras.push((c.padded, c.inversions));
        }
        // Prompts of different chunk counts cannot share a UNet batch; each length gets its own
        // pass, so every image is still its single render.
        let groups: Vec<ContextGroup> = conditioning::group_by_length(&pairs)?;
        let text_encode_ms = ms(started);

        let started = Instant::now();
        let (h, w) = (
            (first.height / LATENT_SCALE) as usize,
            (first.width / LATENT_SCALE) as usize,
        );
        let channels = model.latent_channels();
        let numel = channels * h * w;
        let sigma = sampler.init_noise_sigma();
        let mut rngs: Vec<TorchRng> = requests.iter().map(|r| TorchRng::new(r.seed)).collect();
        let mut latents: Vec<Vec<f32>> = rngs
            .iter_mut()
            .map(|rng| rng.randn(numel).into_iter().map(|z| z * sigma).collect())
            .collect();
        let timesteps = sampler.timesteps().to_vec();
        for (index, &t) in timesteps.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let mut eps = vec![0f32; n * numel];
            for group in &groups {
                let mut input = Vec::with_capacity(group.images.len() * numel);
                for &i in &group.images {
                    input.extend(sampler.scale_model_input(&latents[i], index)?);
                }
                let input = model.to_device(&HostTensor {
                    shape: vec![group.images.len(), channels, h, w],
                    data: input,
                })?;
                let out = predict_noise(model, &input, t, &group.context, first.cfg_scale, guided)?;
                for (j, &i) in group.images.iter().enumerate() {
                    eps[i * numel..(i + 1) * numel]
                        .copy_from_slice(&out[j * numel..(j + 1) * numel]);
                }
            }
            for (i, (l, rng)) in latents.iter_mut().zip(&mut rngs).enumerate() {
                let eps_i = &eps[i * numel..(i + 1) * numel];
                *l = sampler.step(index, eps_i, l, rng)?.prev_sample;
                on_step(Progress {
                    image: i,
                    step: index + 1,
                    steps: timesteps.len(),
                    timestep: t,
                    latents: l,
                });
            }
        }
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let unet_ms = ms(started);

        // Decoded one at a time: the VAE at full resolution is the largest activation, and a
        // batch of them is what runs a gaming GPU out of memory.
        let started = Instant::now();
        let mut images = Vec::with_capacity(n);
        for (request, l) in requests.iter().zip(latents) {
            let final_latents = model.to_device(&HostTensor {
                shape: vec![1, channels, h, w],
                data: l,
            })?;
            let decoded = to_host(&model.decode_latents(&final_latents)?)?;
            images.push(to_rgb8(&decoded.data, request.width, request.height)?);
        }
        let vae_ms = ms(started);

        let share = |total: f64| total / n as f64;
        let times = PhaseTimes {
            text_encode_ms: share(text_encode_ms),
            unet_ms: share(unet_ms),
            vae_ms: share(vae_ms),
            batch: n,
        };
        Ok(requests
            .iter()
            .zip(images)
            .zip(extras)
            .map(|((request, image), (padded, inversions))| {
                self.output(request, image, guided, (padded, &inversions), times)
            })
            .collect())
    }

    /// The image with its metadata; `padded` says the prompt's and negative prompt's
    /// conditionings were padded to the same length (A1111's `Pad conds`), `inversions` are the
    /// embeddings they used.
    fn output(
        &self,
        request: &RenderRequest,
        image: RgbImage,
        guided: bool,
        (padded, inversions): (bool, &[UsedInversion]),
        times: PhaseTimes,
    ) -> RenderOutput {
        let model = &self.model;
        let mut notes = Vec::new();
        if !guided && !request.negative_prompt.is_empty() {
            notes.push(format!(
                "negative prompt ignored: CFG scale {} <= 1 runs no unconditional pass",
                request.cfg_scale
            ));
        }
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
            vae: model.vae_file(),
            inversions,
            clip_skip: request.clip_skip,
            pad_conds: padded,
        }
        .render();
        RenderOutput {
            image,
            parameters,
            notes,
            unet_batch: if guided { 2 } else { 1 },
            times,
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// The noise the sampler steps with, for a batch of `b` latents (`[b, c, h, w]`), row-major:
/// one UNet pass (which an LCM-distilled UNet conditions on `g`), or when `guided` one batch of
/// `[uncond × b, cond × b]` combined as diffusers does, `u + g·(c − u)` in f32.
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
