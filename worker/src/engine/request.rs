//! What one image is asked to be: [`RenderRequest`] (prompt, seed, sampler, size, noise,
//! hires fix, img2img picture, VAE tiling) and the checks that need no model, so a caller can refuse a
//! bad request before loading anything. [`crate::engine::pipeline::Pipeline::validate`] adds
//! the checks that need the model.

use kiln_proto::prompt::ParsedPrompt;
use kiln_proto::sampler::SamplerName;

use crate::engine::error::{EngineError, Result};
use crate::engine::hires::Hires;
use crate::engine::image::RgbImage;
use crate::engine::noise::{NoiseSpec, RngKind};
use crate::engine::tiling::VaeTiling;

/// Pixels per latent cell: the VAE upsamples by 8.
const LATENT_SCALE: u32 = 8;

/// The most steps a hires pass may take (what a sweep allows a first pass).
pub const MAX_HIRES_STEPS: usize = 150;

/// The largest [`RenderRequest::clip_skip`] (A1111's slider goes to 12; 1–4 is what SD1.5 work
/// uses).
pub const MAX_CLIP_SKIP: usize = 4;

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
    /// The sampler: method and schedule.
    pub sampler: SamplerName,
    /// Image width in pixels, a multiple of 8.
    pub width: u32,
    /// Image height in pixels, a multiple of 8.
    pub height: u32,
    /// A1111's "Clip skip": which text-encoder layer, counted from the end, conditions the UNet
    /// (its output then goes through CLIP's final layer norm). 1, the usual value, is the last
    /// layer; at most [`MAX_CLIP_SKIP`].
    pub clip_skip: usize,
    /// The noise generator.
    pub rng: RngKind,
    /// A1111's "Variation seed": a second seed whose noise is blended in by
    /// [`subseed_strength`](Self::subseed_strength).
    pub subseed: u64,
    /// How much of the variation seed's noise the initial noise holds, `0..=1`: 0 is the plain
    /// seed's image, 1 the variation seed's.
    pub subseed_strength: f32,
    /// A1111's "Resize seed from width/height" in pixels: the noise is drawn at this size and
    /// placed centred in the image's, so a seed keeps its composition across sizes.
    pub seed_resize_from: Option<(u32, u32)>,
    /// A1111's hires fix: a second pass at a larger size.
    pub hires: Option<Hires>,
    /// img2img: start from this picture instead of pure noise.
    pub init_image: Option<InitImage>,
    /// The sampler's stochasticity where it has one: DDIM's η (default 0), TCD's γ (default
    /// 0.3); `None` keeps the default.
    pub eta: Option<f32>,
    /// When the VAE decodes in tiles (diffusers' `enable_tiling()`); a worker setting, not part
    /// of the sweep: [`VaeTiling::Auto`] by default.
    pub vae_tiling: VaeTiling,
}

/// The picture an img2img render starts from.
#[derive(Clone, Debug, PartialEq)]
pub struct InitImage {
    /// The picture, at the render's size.
    pub image: RgbImage,
    /// A1111's "Denoising strength", (0, 1]: how much of it is noised and redrawn (the last
    /// `int(strength · steps) + 1` steps of the schedule run).
    pub strength: f32,
}

impl Default for RenderRequest {
    /// An LCM render of the empty prompt: 4 steps, CFG 1, 512×512, seed 0.
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            steps: 4,
            cfg_scale: 1.0,
            sampler: SamplerName::default(),
            width: 512,
            height: 512,
            clip_skip: 1,
            rng: RngKind::default(),
            subseed: 0,
            subseed_strength: 0.0,
            seed_resize_from: None,
            hires: None,
            init_image: None,
            eta: None,
            vae_tiling: VaeTiling::Auto,
        }
    }
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
        if !(0.0..=1.0).contains(&self.subseed_strength) {
            return invalid(format!(
                "variation strength {} is not in 0..=1",
                self.subseed_strength
            ));
        }
        if let Some((w, h)) = self.seed_resize_from {
            for (what, value) in [("width", w), ("height", h)] {
                if value == 0 || !value.is_multiple_of(LATENT_SCALE) {
                    return invalid(format!(
                        "resize-seed-from {what} {value} is not a positive multiple of {LATENT_SCALE}"
                    ));
                }
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
        if let Some(hires) = &self.hires {
            hires.check((self.width, self.height), self.sampler, MAX_HIRES_STEPS)?;
        }
        if let Some(init) = &self.init_image {
            if self.hires.is_some() {
                return invalid("an img2img render has no hires fix".to_owned());
            }
            if (init.image.width, init.image.height) != (self.width, self.height) {
                return invalid(format!(
                    "the init image is {}x{} but the render is {}x{}",
                    init.image.width, init.image.height, self.width, self.height
                ));
            }
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return invalid(format!(
                    "denoising strength {} is not in (0, 1]",
                    init.strength
                ));
            }
            if !self.sampler.method.is_k_diffusion() {
                return invalid(format!(
                    "img2img runs a k-diffusion sampler and `{}` is not one (euler_a, \
                     dpmpp_2m_karras, ...)",
                    self.sampler
                ));
            }
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

    /// What decides this image's noise. The resize-from size goes from `(width, height)`
    /// pixels to `(height, width)` latent cells, floor-divided by 8 as A1111's `ImageRNG` does.
    pub fn noise_spec(&self) -> NoiseSpec {
        NoiseSpec {
            seed: self.seed,
            rng: self.rng,
            subseed: self.subseed,
            subseed_strength: self.subseed_strength,
            resize_from: self
                .seed_resize_from
                .map(|(w, h)| ((h / LATENT_SCALE) as usize, (w / LATENT_SCALE) as usize)),
        }
    }

    /// Whether `other` can share a UNet batch with this request: same steps, CFG scale,
    /// sampler and size (prompts, clip skip and seeds may differ).
    pub fn batchable_with(&self, other: &RenderRequest) -> bool {
        self.steps == other.steps
            && self.cfg_scale.to_bits() == other.cfg_scale.to_bits()
            && self.sampler == other.sampler
            && self.rng == other.rng
            && self.eta.map(f32::to_bits) == other.eta.map(f32::to_bits)
            && self.hires == other.hires
            && self.init_image.as_ref().map(|i| i.strength.to_bits())
                == other.init_image.as_ref().map(|i| i.strength.to_bits())
            && self.width == other.width
            && self.height == other.height
    }
}
