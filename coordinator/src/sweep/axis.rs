//! Axes: a grid over render parameters (`[axes]`), each value type- and range-checked with
//! its place (the checks themselves, shared with top-level keys, are `values`').

use toml::Spanned;

use kiln_proto::hires::Upscaler;
use kiln_proto::sampler::SamplerName;

use super::cell::{CellSpec, MAX_REF_BYTES};
use super::error::{PlanError, PlanErrorKind};
use super::init::init_strength;
use super::resolver::{PromptText, Resolver, quote_key};
use super::spec::SweepFile;
use super::values::{
    cfg, clip_skip, dimension, eta, hires_denoise, hires_sampler, hires_scale, hires_steps,
    integer, number, rng, sampler, size, steps, strength, string, subseed, subseed_strength,
    upscaler,
};

/// One parameter an axis sets.
#[derive(Clone, Debug)]
pub(crate) enum Setter {
    Cfg(f32),
    Steps(u32),
    Sampler(SamplerName),
    Model(String),
    Vae(String),
    ClipSkip(u32),
    Width(u32),
    Height(u32),
    Size(u32, u32),
    NegativePrompt(String),
    /// Index into [`Settings::prompts`].
    Prompt(usize),
    /// (index into the LoRA stack, strength)
    LoraStrength(usize, f32),
    Subseed(u64),
    SubseedStrength(f32),
    Eta(f32),
    /// (width, height)
    SeedResizeFrom(u32, u32),
    /// One of [`RNG_SOURCES`].
    Rng(&'static str),
    HiresScale(f32),
    /// (width, height)
    HiresSize(u32, u32),
    HiresUpscaler(Upscaler),
    HiresSteps(u32),
    HiresDenoise(f32),
    HiresSampler(SamplerName),
    /// img2img's picture: (name as written, sha256 it was uploaded under).
    InitImage(String, String),
    /// img2img's denoising strength.
    InitStrength(f32),
}

impl Setter {
    /// Applies the value to a cell.
    pub(crate) fn apply(&self, cell: &mut CellSpec) {
        match self {
            Setter::Cfg(v) => cell.cfg = *v,
            Setter::Steps(v) => cell.steps = *v,
            Setter::Sampler(v) => cell.sampler = *v,
            Setter::Model(v) => cell.model.clone_from(v),
            Setter::Vae(v) => cell.vae.clone_from(v),
            Setter::ClipSkip(v) => cell.clip_skip = *v,
            Setter::Width(v) => cell.width = *v,
            Setter::Height(v) => cell.height = *v,
            Setter::Size(w, h) => (cell.width, cell.height) = (*w, *h),
            Setter::NegativePrompt(v) => cell.negative_prompt.clone_from(v),
            Setter::Prompt(_) => {}
            Setter::LoraStrength(i, s) => {
                if let Some(l) = cell.loras.get_mut(*i) {
                    l.strength = *s;
                }
            }
            Setter::Subseed(v) => cell.subseed = *v,
            Setter::SubseedStrength(v) => cell.subseed_strength = *v,
            Setter::Eta(v) => cell.eta = Some(*v),
            Setter::SeedResizeFrom(w, h) => cell.seed_resize_from = Some((*w, *h)),
            Setter::Rng(v) => (*v).clone_into(&mut cell.rng),
            // The resolver turns the hires fix on in the base cell whenever a hires key is
            // allowed, so every cell an axis sets has one.
            Setter::HiresScale(v) => {
                if let Some(h) = cell.hires.as_mut() {
                    (h.scale, h.size) = (*v, None);
                }
            }
            Setter::HiresSize(w, hp) => {
                if let Some(h) = cell.hires.as_mut() {
                    (h.scale, h.size) = (0.0, Some((*w, *hp)));
                }
            }
            Setter::HiresUpscaler(v) => {
                if let Some(h) = cell.hires.as_mut() {
                    h.upscaler = *v;
                }
            }
            Setter::HiresSteps(v) => {
                if let Some(h) = cell.hires.as_mut() {
                    h.steps = *v;
                }
            }
            Setter::HiresDenoise(v) => {
                if let Some(h) = cell.hires.as_mut() {
                    h.denoise = *v;
                }
            }
            Setter::HiresSampler(v) => {
                if let Some(h) = cell.hires.as_mut() {
                    h.sampler = Some(*v);
                }
            }
            // As for the hires fix, the base cell has img2img on whenever these are allowed.
            Setter::InitImage(name, sha256) => {
                if let Some(i) = cell.init.as_mut() {
                    (i.name, i.sha256) = (name.clone(), sha256.clone());
                }
            }
            Setter::InitStrength(v) => {
                if let Some(i) = cell.init.as_mut() {
                    i.strength = *v;
                }
            }
        }
    }
}

/// One axis value: what it sets and the binding value it records.
#[derive(Clone, Debug)]
pub(crate) struct AxisValue {
    pub binding: String,
    pub set: Setter,
}

/// One axis of the grid.
#[derive(Clone, Debug)]
pub(crate) struct Axis {
    /// The axis name as written (`cfg`, `lora.lcm.strength`).
    pub name: String,
    /// The binding key its values are recorded under.
    pub binding_key: String,
    pub values: Vec<AxisValue>,
}

/// The axis names besides `lora.<id>.strength`.
const AXES: &[&str] = &[
    "cfg",
    "steps",
    "sampler",
    "model",
    "vae",
    "clip_skip",
    "size",
    "width",
    "height",
    "negative_prompt",
    "prompt",
    "subseed",
    "subseed_strength",
    "eta",
    "seed_resize_from",
    "rng",
    "hires_scale",
    "hires_size",
    "hires_upscaler",
    "hires_steps",
    "hires_denoise",
    "hires_sampler",
    "init_image",
    "strength",
];

impl Resolver<'_> {
    pub(super) fn axes(
        &self,
        f: &SweepFile,
        lora_ids: &[String],
        prompts: &mut Vec<PromptText>,
    ) -> Result<Vec<Axis>, PlanError> {
        let entries = f.axis_list();
        let names: Vec<&str> = entries.iter().map(|a| a.name.get_ref().as_str()).collect();
        let mut axes = Vec::new();
        for decl in &entries {
            let (key, values) = (&decl.name, &decl.values);
            let name = key.get_ref().as_str();
            let path = format!("axes.{}", quote_key(name));
            let top_level: &[(&str, bool)] = match name {
                "cfg" => &[("cfg", f.cfg.is_some())],
                "steps" => &[("steps", f.steps.is_some())],
                "sampler" => &[("sampler", f.sampler.is_some())],
                "model" => &[("model", f.model.is_some())],
                "vae" => &[("vae", f.vae.is_some())],
                "clip_skip" => &[("clip_skip", f.clip_skip.is_some())],
                "negative_prompt" => &[("negative_prompt", f.negative_prompt.is_some())],
                "subseed" => &[("subseed", f.subseed.is_some())],
                "subseed_strength" => &[("subseed_strength", f.subseed_strength.is_some())],
                "eta" => &[("eta", f.eta.is_some())],
                "seed_resize_from" => &[("seed_resize_from", f.seed_resize_from.is_some())],
                "rng" => &[("rng", f.rng.is_some())],
                "hires_scale" | "hires_size" => &[
                    ("hires_scale", f.hires_scale.is_some()),
                    ("hires_size", f.hires_size.is_some()),
                ],
                "hires_upscaler" => &[("hires_upscaler", f.hires_upscaler.is_some())],
                "hires_steps" => &[("hires_steps", f.hires_steps.is_some())],
                "hires_denoise" => &[("hires_denoise", f.hires_denoise.is_some())],
                "hires_sampler" => &[("hires_sampler", f.hires_sampler.is_some())],
                "init_image" => &[("init_image", f.init_image.is_some())],
                "strength" => &[("strength", f.strength.is_some())],
                "prompt" => &[
                    ("prompt", f.prompt.is_some()),
                    ("prompts", f.prompts.is_some()),
                ],
                "width" => &[("width", f.width.is_some()), ("size", f.size.is_some())],
                "height" => &[("height", f.height.is_some()), ("size", f.size.is_some())],
                "size" => &[
                    ("size", f.size.is_some()),
                    ("width", f.width.is_some()),
                    ("height", f.height.is_some()),
                ],
                _ => &[],
            };
            if let Some((other, _)) = top_level.iter().find(|(_, set)| *set) {
                return Err(self.conflict(key.span(), &path, other));
            }
            if let Some(other) = names.iter().find(|n| {
                (name == "size" && matches!(**n, "width" | "height"))
                    || (name == "hires_size" && **n == "hires_scale")
            }) {
                return Err(self.conflict(key.span(), &path, &format!("axes.{other}")));
            }
            let lora = self.lora_axis(key, &path, f, lora_ids)?;
            if values.get_ref().is_empty() {
                return Err(PlanError::new(
                    self.src.place_of(&values.span()),
                    PlanErrorKind::EmptyList(path),
                ));
            }
            let mut out = Vec::new();
            for (i, v) in values.get_ref().iter().enumerate() {
                let vpath = format!("{path}[{i}]");
                let span = v.span();
                let value = v.get_ref();
                let set = match (name, lora) {
                    (_, Some(idx)) => Setter::LoraStrength(
                        idx,
                        self.val(span.clone(), &vpath, number(value).and_then(strength))?,
                    ),
                    ("cfg", _) => {
                        Setter::Cfg(self.val(span.clone(), &vpath, number(value).and_then(cfg))?)
                    }
                    ("steps", _) => Setter::Steps(self.val(
                        span.clone(),
                        &vpath,
                        integer(value).and_then(steps),
                    )?),
                    ("sampler", _) => Setter::Sampler(self.val(
                        span.clone(),
                        &vpath,
                        string(value).and_then(sampler),
                    )?),
                    ("width", _) => Setter::Width(self.val(
                        span.clone(),
                        &vpath,
                        integer(value).and_then(dimension),
                    )?),
                    ("height", _) => Setter::Height(self.val(
                        span.clone(),
                        &vpath,
                        integer(value).and_then(dimension),
                    )?),
                    ("size", _) => {
                        let (w, h) =
                            self.val(span.clone(), &vpath, string(value).and_then(size))?;
                        Setter::Size(w, h)
                    }
                    ("model" | "vae", _) => {
                        let m = self.val(span.clone(), &vpath, string(value))?;
                        if m.trim().is_empty() || m.len() > MAX_REF_BYTES {
                            return Err(self.invalid(span, &vpath, "must be 1..=1024 bytes"));
                        }
                        if name == "vae" {
                            Setter::Vae(m.to_string())
                        } else {
                            Setter::Model(m.to_string())
                        }
                    }
                    ("subseed", _) => Setter::Subseed(self.val(
                        span.clone(),
                        &vpath,
                        integer(value).and_then(subseed),
                    )?),
                    ("subseed_strength", _) => Setter::SubseedStrength(self.val(
                        span.clone(),
                        &vpath,
                        number(value).and_then(subseed_strength),
                    )?),
                    ("eta", _) => {
                        Setter::Eta(self.val(span.clone(), &vpath, number(value).and_then(eta))?)
                    }
                    ("seed_resize_from", _) => {
                        let (w, h) =
                            self.val(span.clone(), &vpath, string(value).and_then(size))?;
                        Setter::SeedResizeFrom(w, h)
                    }
                    ("rng", _) => {
                        Setter::Rng(self.val(span.clone(), &vpath, string(value).and_then(rng))?)
                    }
                    ("hires_scale", _) => Setter::HiresScale(self.val(
                        span.clone(),
                        &vpath,
                        number(value).and_then(hires_scale),
                    )?),
                    ("hires_size", _) => {
                        let (w, h) =
                            self.val(span.clone(), &vpath, string(value).and_then(size))?;
                        Setter::HiresSize(w, h)
                    }
                    ("hires_upscaler", _) => Setter::HiresUpscaler(self.val(
                        span.clone(),
                        &vpath,
                        string(value).and_then(upscaler),
                    )?),
                    ("hires_steps", _) => Setter::HiresSteps(self.val(
                        span.clone(),
                        &vpath,
                        integer(value).and_then(hires_steps),
                    )?),
                    ("hires_denoise", _) => Setter::HiresDenoise(self.val(
                        span.clone(),
                        &vpath,
                        number(value).and_then(hires_denoise),
                    )?),
                    ("hires_sampler", _) => Setter::HiresSampler(self.val(
                        span.clone(),
                        &vpath,
                        string(value).and_then(hires_sampler),
                    )?),
                    ("init_image", _) => {
                        let n = self.val(span.clone(), &vpath, string(value))?;
                        if n.trim().is_empty() || n.len() > MAX_REF_BYTES {
                            return Err(self.invalid(span, &vpath, "must be 1..=1024 bytes"));
                        }
                        Setter::InitImage(n.to_string(), self.image(n, span)?)
                    }
                    ("strength", _) => Setter::InitStrength(self.val(
                        span.clone(),
                        &vpath,
                        number(value).and_then(init_strength),
                    )?),
                    ("clip_skip", _) => Setter::ClipSkip(self.val(
                        span.clone(),
                        &vpath,
                        integer(value).and_then(clip_skip),
                    )?),
                    ("negative_prompt", _) => Setter::NegativePrompt(
                        self.val(span.clone(), &vpath, string(value))?.to_string(),
                    ),
                    ("prompt", _) => {
                        let text = self.val(span.clone(), &vpath, string(value))?.to_string();
                        prompts.push(PromptText {
                            origin: self.src.string_origin(&span, &text),
                            text,
                            binding: None,
                        });
                        Setter::Prompt(prompts.len() - 1)
                    }
                    _ => unreachable!("lora_axis rejects unknown axis names"),
                };
                out.push(AxisValue {
                    binding: match &set {
                        Setter::Cfg(v)
                        | Setter::LoraStrength(_, v)
                        | Setter::SubseedStrength(v)
                        | Setter::Eta(v)
                        | Setter::HiresScale(v)
                        | Setter::HiresDenoise(v)
                        | Setter::InitStrength(v) => format!("{v:?}"),
                        Setter::InitImage(name, _) => name.clone(),
                        Setter::HiresSize(w, h) => format!("{w}x{h}"),
                        Setter::HiresUpscaler(u) => u.as_str().to_string(),
                        Setter::HiresSteps(v) => v.to_string(),
                        Setter::HiresSampler(s) => s.as_str().to_string(),
                        Setter::Subseed(v) => v.to_string(),
                        Setter::SeedResizeFrom(w, h) => format!("{w}x{h}"),
                        Setter::Rng(v) => (*v).to_string(),
                        Setter::Steps(v)
                        | Setter::Width(v)
                        | Setter::Height(v)
                        | Setter::ClipSkip(v) => v.to_string(),
                        Setter::Sampler(s) => s.as_str().to_string(),
                        Setter::Size(w, h) => format!("{w}x{h}"),
                        Setter::Model(m) | Setter::Vae(m) => m.clone(),
                        Setter::NegativePrompt(_) | Setter::Prompt(_) => (i + 1).to_string(),
                    },
                    set,
                });
            }
            let binding_key = match name {
                "prompt" | "negative_prompt" => format!("{name}.index"),
                _ => name.to_string(),
            };
            axes.push(Axis {
                name: name.to_string(),
                binding_key,
                values: out,
            });
        }
        Ok(axes)
    }

    /// For a `lora.<id>.strength` axis: the LoRA's index. Rejects unknown axis names.
    fn lora_axis(
        &self,
        key: &Spanned<String>,
        path: &str,
        f: &SweepFile,
        lora_ids: &[String],
    ) -> Result<Option<usize>, PlanError> {
        let name = key.get_ref().as_str();
        if AXES.contains(&name) {
            return Ok(None);
        }
        if matches!(name, "seed" | "seeds") {
            return Err(self.invalid(
                key.span(),
                path,
                "seeds are not an axis: use `seeds` (a list, { from, count } or { random })",
            ));
        }
        let Some(id) = name
            .strip_prefix("lora.")
            .and_then(|r| r.strip_suffix(".strength"))
        else {
            let mut known: Vec<String> = AXES.iter().map(|s| s.to_string()).collect();
            known.extend(lora_ids.iter().map(|id| format!("lora.{id}.strength")));
            return Err(PlanError::new(
                self.src.place_of(&key.span()),
                PlanErrorKind::UnknownAxis {
                    name: name.to_string(),
                    known: known.join(", "),
                },
            ));
        };
        let Some(idx) = lora_ids.iter().position(|i| i == id) else {
            let known = if lora_ids.is_empty() {
                "none".to_string()
            } else {
                lora_ids.join(", ")
            };
            return Err(self.invalid(
                key.span(),
                path,
                &format!("no LoRA has the id `{id}` (ids: {known})"),
            ));
        };
        if let Some(s) = &f.loras[idx].get_ref().strength {
            return Err(self.conflict(
                key.span(),
                path,
                &format!("loras[{idx}].strength (line {})", self.line_of(s.span())),
            ));
        }
        Ok(Some(idx))
    }
}
