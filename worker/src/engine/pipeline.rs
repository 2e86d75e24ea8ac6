//! The render loop: a [`Pipeline`] (model + LoRA stack, loaded once) turns
//! [`RenderRequest`]s into images, as diffusers' `StableDiffusionPipeline` does.
//!
//! Owns request validation, the order of a render (first pass; for the hires fix the latent
//! upscale and the second pass; decoding), each image's seeded noise (initial latents first,
//! then whatever the sampler draws, from the image's [`ImageNoise`] stream; the hires pass
//! starts a fresh stream for the same seeds, as A1111 does), batching requests that share
//! everything but prompt and seed into one UNet batch (each with its own noise stream, so each
//! image is its single render), the prompt-embedding cache and putting each request's
//! conditioning together (A1111 prompt syntax, textual-inversion embeddings from the database
//! its caller sets, clip skip, the negative prompt padded to the prompt's chunk count), phase
//! timings, cancellation, decoding (whole or in tiles, as each request's `vae_tiling` says) and
//! the image metadata. Classifier-free guidance and the
//! model closure samplers call live in the `pass` module. It does not know where requests
//! come from or where images go.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use kiln_proto::prompt::PromptPart;

use crate::engine::device::Device;
use crate::engine::error::{EngineError, Result};
use crate::engine::hires::crop_latents;
use crate::engine::image::{
    Infotext, RgbImage, encode_png, to_rgb8, to_rgb8_truncating, to_vae_input,
};
use crate::engine::lanczos::resize_lanczos;
use crate::engine::load::lora::LoraSpec;
use crate::engine::load::weights::HostTensor;
use crate::engine::model::{Model, UsedInversion};
use crate::engine::noise::ImageNoise;
use crate::engine::pass::{Pass, StepCount};
use crate::engine::scheduler::{Img2ImgSteps, KSampler, Sampling};
use crate::engine::text::conditioning::{self, ContextGroup, Encoded};
use crate::engine::text::embeddings::{self, EmbeddingCache, EmbeddingStats};
use crate::engine::text::inversion::InversionDb;
use crate::engine::tiling::VaeTiling;

pub use crate::engine::request::{InitImage, MAX_CLIP_SKIP, MAX_HIRES_STEPS, RenderRequest};
use crate::engine::upscale::resize_latents;
use kiln_proto::hires::Upscaler;
use kiln_proto::sampler::Method;

/// Pixels per latent cell: the VAE upsamples by 8.
const LATENT_SCALE: u32 = 8;

/// Asked before each model evaluation and before decoding whether to give up.
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
    /// This image's latents after this step (`[1, c, h/8, w/8]`, row-major; during a hires
    /// pass at the hires size).
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
        self.sampler(request)?;
        if let Some(hires) = &request.hires {
            hires.sampling(self.model.schedule(), request.sampler, request.steps)?;
        }
        Ok(())
    }

    fn sampler(&self, request: &RenderRequest) -> Result<Sampling> {
        let schedule = self.model.schedule();
        Ok(match &request.init_image {
            Some(init) => Sampling::K(KSampler::img2img(
                schedule,
                request.sampler.method,
                request.sampler.schedule,
                request.steps,
                init.strength,
                Img2ImgSteps::Scaled,
            )?),
            None => {
                let sampling = Sampling::new(schedule, request.sampler, request.steps)?;
                match request.eta {
                    Some(eta) => sampling.with_eta(eta)?,
                    None => sampling,
                }
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
        use crate::engine::model::to_host;
        Ok((
            to_host(&c.cond)?,
            c.uncond.map(|u| to_host(&u)).transpose()?,
        ))
    }

    /// Renders `request`, calling `on_step` after every step and giving up with
    /// [`EngineError::Cancelled`] once `cancel` is set (checked before each model evaluation
    /// and before decoding).
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
    /// bits of float summation order in batched kernels). `on_step` is called per image per
    /// step (the hires pass's steps continue the count); `cancel` is checked before each model
    /// evaluation and before decoding.
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
        let (mut h, mut w) = (
            (first.height / LATENT_SCALE) as usize,
            (first.width / LATENT_SCALE) as usize,
        );
        let channels = model.latent_channels();
        let pass = Pass {
            model,
            groups: &groups,
            cfg_scale: first.cfg_scale,
            guided,
            cancel,
        };
        let hires = match &first.hires {
            Some(hires) => Some((
                hires,
                hires.sampling(model.schedule(), first.sampler, first.steps)?,
            )),
            None => None,
        };
        let total = sampler.steps() + hires.as_ref().map_or(0, |(_, s)| s.steps());
        let mut noises: Vec<ImageNoise> = requests
            .iter()
            .map(|r| ImageNoise::new(&r.noise_spec()))
            .collect();
        let sigma = sampler.init_noise_sigma();
        let mut latents = Vec::with_capacity(n);
        for (request, noise) in requests.iter().zip(&mut noises) {
            let z = noise.first([channels, h, w]);
            // img2img: A1111's `xi = init_latent + noise · sigma_sched[0]`.
            let start = match &request.init_image {
                Some(init) => {
                    let encoded = model.encode_image(&to_vae_input(&init.image)?)?;
                    let init = encoded.latents().data;
                    init.iter().zip(&z).map(|(&x, &z)| x + z * sigma).collect()
                }
                None => z.into_iter().map(|z| z * sigma).collect(),
            };
            latents.push(start);
        }
        let count = StepCount { before: 0, total };
        pass.run(
            &sampler,
            &mut latents,
            &mut noises,
            [channels, h, w],
            count,
            on_step,
        )?;
        if let Some((hires, second)) = &hires {
            // A1111's `sample_hr_pass`: resize the latents, crop to the asked aspect, then an
            // img2img pass from fresh noise of the same seeds at the new size.
            let geometry = hires.geometry(first.width, first.height);
            let [uh, uw] = geometry.upscaled;
            let small = [channels, h, w];
            [h, w] = geometry.latent();
            let mut noises: Vec<ImageNoise> = requests
                .iter()
                .map(|r| ImageNoise::new(&r.noise_spec()))
                .collect();
            let sigma = second.init_noise_sigma();
            for ((l, noise), request) in latents.iter_mut().zip(&mut noises).zip(requests) {
                let up = match hires.upscaler {
                    Upscaler::Latent(mode) => resize_latents(l, small, [uh, uw], mode),
                    Upscaler::Lanczos => {
                        self.lanczos_upscale(l, small, [uh, uw], request.vae_tiling)?
                    }
                };
                let up = crop_latents(&up, [channels, uh, uw], geometry.crop);
                let z = noise.first([channels, h, w]);
                *l = up.iter().zip(&z).map(|(&x, &z)| x + z * sigma).collect();
            }
            let count = StepCount {
                before: sampler.steps(),
                total,
            };
            pass.run(
                second,
                &mut latents,
                &mut noises,
                [channels, h, w],
                count,
                on_step,
            )?;
        }
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let unet_ms = ms(started);

        // Decoded one at a time: the VAE at full resolution is the largest activation, and a
        // batch of them is what runs a gaming GPU out of memory.
        let started = Instant::now();
        let (width, height) = (w as u32 * LATENT_SCALE, h as u32 * LATENT_SCALE);
        let mut images = Vec::with_capacity(n);
        let mut tiled = Vec::with_capacity(n);
        for (l, request) in latents.into_iter().zip(requests) {
            let final_latents = model.to_device(&HostTensor {
                shape: vec![1, channels, h, w],
                data: l,
            })?;
            let (decoded, was_tiled) = model.decode_to_host(&final_latents, request.vae_tiling)?;
            images.push(to_rgb8(&decoded.data, width, height)?);
            tiled.push(was_tiled);
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
            .zip(tiled)
            .map(|(((request, image), (padded, inversions)), tiled)| {
                let mut out = self.output(request, image, guided, (padded, &inversions), times);
                if tiled {
                    let g = model.vae_tile_grid();
                    out.notes.push(format!(
                        "VAE decoded in tiles of {0}x{0} px overlapping by {1} px (VAE tiling \
                         {2}); seams are blended, so pixels differ slightly from a whole decode",
                        g.sample_tile, g.blend, request.vae_tiling
                    ));
                }
                out
            })
            .collect())
    }

    /// A1111's "Lanczos" hires upscaler for one image's latents (`[c, h, w]`): decode, to 8-bit
    /// as A1111 does (truncating), resize with Pillow's Lanczos to `[uh, uw]` latent cells'
    /// worth of pixels, encode (the posterior mean) again. A1111 resizes to `int(W · scale)`
    /// exactly (in up to three Pillow calls) and encodes that; kiln's encoder takes multiples of
    /// 8, so when `int(W · scale)` is not one kiln resizes once, straight to the multiple of 8
    /// below it. Scales that land on multiples of 8 (1.25, 1.5, 2 of 512) are A1111's exactly.
    fn lanczos_upscale(
        &self,
        latents: &[f32],
        [channels, h, w]: [usize; 3],
        [uh, uw]: [usize; 2],
        tiling: VaeTiling,
    ) -> Result<Vec<f32>> {
        let model = &self.model;
        let small = model.to_device(&HostTensor {
            shape: vec![1, channels, h, w],
            data: latents.to_vec(),
        })?;
        let (decoded, _) = model.decode_to_host(&small, tiling)?;
        let scale = LATENT_SCALE as usize;
        let picture = to_rgb8_truncating(&decoded.data, (w * scale) as u32, (h * scale) as u32)?;
        let large = resize_lanczos(&picture, (uw * scale) as u32, (uh * scale) as u32);
        Ok(model.encode_image(&to_vae_input(&large)?)?.latents().data)
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
            sampler: &request.sampler.a1111_name(),
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
            rng: request.rng.a1111_name(),
            eta: request.eta.map(|eta| match request.sampler.method {
                Method::Ddim => ("Eta DDIM", eta),
                _ => ("Eta", eta),
            }),
            variation: (request.subseed_strength > 0.0)
                .then_some((request.subseed, request.subseed_strength)),
            seed_resize_from: request.seed_resize_from,
            denoise: (request.hires.as_ref().map(|h| h.denoise))
                .or(request.init_image.as_ref().map(|i| i.strength)),
            hires: request.hires.as_ref().map(|h| h.text(request.sampler)),
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
