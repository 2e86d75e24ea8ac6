//! One render cell as stored: [`CellSpec`] (the resolved render parameters), its validation,
//! and the checked [`NewCell`] a sweep inserts. Its identity hashes (`cell_key`,
//! `affinity_key`) are `cell_key`'s.

use std::collections::BTreeMap;

use kiln_proto::picture::is_sha256_hex;
use kiln_proto::prompt::{LoraRef, ParsedPrompt};
use kiln_proto::sampler::{Method, SamplerName};
use serde::{Deserialize, Serialize};

pub use super::hires_spec::{
    DEFAULT_HIRES_DENOISE, HiresSpec, MAX_HIRES_SCALE, MAX_HIRES_SIZE, MAX_HIRES_STEPS,
};
use crate::{Error, Result};

/// Longest accepted prompt or negative prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
/// Most LoRAs in one stack.
pub const MAX_LORAS: usize = 16;
/// Most bindings on one cell.
pub const MAX_BINDINGS: usize = 64;
/// Longest model/LoRA reference or binding key/value, in bytes.
pub const MAX_REF_BYTES: usize = 1024;

/// The noise sources a cell may name: PyTorch's CPU generator, and its CUDA generator
/// computed on any device (A1111's "NV").
pub const RNG_SOURCES: [&str; 2] = ["cpu", "nv"];

/// A variation seed's highest strength (A1111's "Variation strength" 1: all variation seed).
pub const MAX_SUBSEED_STRENGTH: f32 = 1.0;

/// img2img's denoising strength when a sweep gives an init picture but no `strength`:
/// A1111's default.
pub const DEFAULT_INIT_STRENGTH: f32 = 0.75;

/// [`SamplerName`] in `cells.spec` as its kiln name (`dpmpp_2m_karras`); any spelling
/// [`SamplerName`] parses reads back.
mod sampler_serde {
    use kiln_proto::sampler::SamplerName;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(s: &SamplerName, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&s.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SamplerName, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One LoRA of a stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// File name or path, resolved by the worker.
    pub name: String,
    /// Merge strength.
    pub strength: f32,
    /// The LoRA's content (hex): written in the sweep file, or pinned at submit when `name`
    /// is a model registry entry; empty: whatever file `name` finds on the worker.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

/// img2img: the picture a cell starts from and how much of it is redrawn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitSpec {
    /// The name the sweep file gave the picture (`photos/cat.png`): shown, never opened.
    pub name: String,
    /// sha256 of the picture file's bytes, 64 lowercase hex digits, as it was uploaded.
    pub sha256: String,
    /// A1111's "Denoising strength", (0, 1].
    pub strength: f32,
}

/// A fully resolved render, as stored in `cells.spec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellSpec {
    /// Model reference.
    pub model: String,
    /// LoRA stack, in order.
    #[serde(default)]
    pub loras: Vec<LoraSpec>,
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    #[serde(default)]
    pub negative_prompt: String,
    /// Noise seed, at most `i64::MAX`.
    pub seed: u64,
    /// Sampler steps.
    pub steps: u32,
    /// Guidance scale.
    pub cfg: f32,
    /// Sampler: method and schedule, stored as the kiln name (`dpmpp_2m_karras`).
    #[serde(with = "sampler_serde")]
    pub sampler: SamplerName,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Noise source: `"cpu"` (PyTorch's CPU generator) or `"nv"` (its CUDA generator, on any
    /// device); see [`RNG_SOURCES`].
    pub rng: String,
    /// Which alternative / wildcard / axis value produced the cell.
    #[serde(default)]
    pub bindings: BTreeMap<String, String>,
    /// Least device memory a worker must declare, MiB.
    #[serde(default)]
    pub min_memory_mib: u64,
    /// A VAE replacing the model's own (A1111's "SD VAE"); empty: the model's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vae: String,
    /// CLIP layers skipped from the end (A1111's "Clip skip"), 1..=4; 1 is the last layer.
    #[serde(default = "last_layer", skip_serializing_if = "is_last_layer")]
    pub clip_skip: u32,
    /// Variation seed (A1111's "Variation seed"), at most `i64::MAX`; 0 when unset.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub subseed: u64,
    /// How much of the variation seed's noise is blended in, 0..=1; 0: none.
    #[serde(default, skip_serializing_if = "is_zero_f32")]
    pub subseed_strength: f32,
    /// A1111's "Resize seed from": (width, height) the noise is drawn for; `None`: the cell's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_resize_from: Option<(u32, u32)>,
    /// A1111's hires fix; `None`: off (one pass at the cell's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresSpec>,
    /// The sampler's stochasticity where it has one: DDIM's η, TCD's γ, 0..=1; `None`: the
    /// sampler's default (DDIM 0, TCD 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f32>,
    /// img2img's start picture; `None`: text-to-image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSpec>,
    /// The content `model` was pinned to at submit (a model registry name or `sha256:HEX`),
    /// 64 lowercase hex digits; empty: `model` is a worker-local file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_sha256: String,
    /// The content `vae` was pinned to, as for [`Self::model_sha256`]; empty: unpinned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vae_sha256: String,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero_f32(n: &f32) -> bool {
    *n == 0.0
}

fn last_layer() -> u32 {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_last_layer(n: &u32) -> bool {
    *n == 1
}

impl CellSpec {
    /// Checks every field against the limits a worker can render; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check_ref("model", &self.model)?;
        for (field, sha) in [
            ("model_sha256", &self.model_sha256),
            ("vae_sha256", &self.vae_sha256),
        ] {
            if !sha.is_empty() && !is_sha256_hex(sha) {
                return Err(Error::invalid(format!(
                    "{field}: not 64 lowercase hex digits"
                )));
            }
        }
        if !self.vae_sha256.is_empty() && self.vae.is_empty() {
            return Err(Error::invalid("vae_sha256: needs vae"));
        }
        // `<lora:…>` tags in the prompt merge too: they count against the same limit.
        let in_prompt = self.prompt_loras().len();
        if self.loras.len() + in_prompt > MAX_LORAS {
            return Err(Error::invalid(format!(
                "loras: {} LoRAs ({in_prompt} of them <lora:…> tags in the prompt), at most \
                 {MAX_LORAS}",
                self.loras.len() + in_prompt
            )));
        }
        for (i, l) in self.loras.iter().enumerate() {
            check_ref(&format!("loras[{i}].name"), &l.name)?;
            if !l.strength.is_finite() || l.strength.abs() > 100.0 {
                return Err(Error::invalid(format!(
                    "loras[{i}].strength: {} is not a finite number in -100..=100",
                    l.strength
                )));
            }
            check_text(&format!("loras[{i}].sha256"), &l.sha256)?;
            if !l.sha256.is_empty()
                && (l.sha256.len() != 64 || !l.sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(Error::invalid(format!(
                    "loras[{i}].sha256: not 64 hex digits"
                )));
            }
        }
        for (field, text) in [
            ("prompt", &self.prompt),
            ("negative_prompt", &self.negative_prompt),
        ] {
            if text.len() > MAX_PROMPT_BYTES {
                return Err(Error::TooLarge(format!(
                    "{field}: {} bytes, at most {MAX_PROMPT_BYTES}",
                    text.len()
                )));
            }
            check_text(field, text)?;
        }
        if !self.vae.is_empty() {
            check_ref("vae", &self.vae)?;
        }
        if !(1..=4).contains(&self.clip_skip) {
            return Err(Error::invalid(format!(
                "clip_skip: {} is outside 1..=4",
                self.clip_skip
            )));
        }
        ParsedPrompt::parse(&self.prompt).map_err(|e| Error::invalid(format!("prompt: {e}")))?;
        ParsedPrompt::parse_negative(&self.negative_prompt)
            .map_err(|e| Error::invalid(format!("negative_prompt: {e}")))?;
        if self.min_memory_mib > MAX_MEMORY_MIB {
            return Err(Error::invalid(format!(
                "min_memory_mib: {} is past {MAX_MEMORY_MIB} (1 TiB)",
                self.min_memory_mib
            )));
        }
        if i64::try_from(self.seed).is_err() {
            return Err(Error::invalid(format!(
                "seed: {} is past 2^63-1",
                self.seed
            )));
        }
        if !(1..=150).contains(&self.steps) {
            return Err(Error::invalid(format!(
                "steps: {} is outside 1..=150",
                self.steps
            )));
        }
        if !self.cfg.is_finite() || !(0.0..=30.0).contains(&self.cfg) {
            return Err(Error::invalid(format!(
                "cfg: {} is outside 0..=30",
                self.cfg
            )));
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if !(64..=4096).contains(&v) || v % 8 != 0 {
                return Err(Error::invalid(format!(
                    "{field}: {v} must be a multiple of 8 in 64..=4096"
                )));
            }
        }
        if !RNG_SOURCES.contains(&self.rng.as_str()) {
            return Err(Error::invalid(format!(
                "rng: {:?} is not a known noise source (\"cpu\", \"nv\")",
                self.rng
            )));
        }
        if i64::try_from(self.subseed).is_err() {
            return Err(Error::invalid(format!(
                "subseed: {} is past 2^63-1",
                self.subseed
            )));
        }
        if !self.subseed_strength.is_finite()
            || !(0.0..=MAX_SUBSEED_STRENGTH).contains(&self.subseed_strength)
        {
            return Err(Error::invalid(format!(
                "subseed_strength: {} is outside 0..=1",
                self.subseed_strength
            )));
        }
        if let Some(eta) = self.eta {
            if !matches!(self.sampler.method, Method::Ddim | Method::Tcd) {
                return Err(Error::invalid(format!(
                    "eta: applies to the ddim and tcd samplers, not `{}`",
                    self.sampler
                )));
            }
            if !(eta.is_finite() && (0.0..=1.0).contains(&eta)) {
                return Err(Error::invalid(format!("eta: {eta} is outside 0..=1")));
            }
        }
        if let Some((w, h)) = self.seed_resize_from {
            for (field, v) in [("width", w), ("height", h)] {
                if !(64..=4096).contains(&v) || v % 8 != 0 {
                    return Err(Error::invalid(format!(
                        "seed_resize_from: {field} {v} must be a multiple of 8 in 64..=4096"
                    )));
                }
            }
        }
        if let Some(hires) = &self.hires {
            self.validate_hires(hires)?;
        }
        if let Some(init) = &self.init {
            check_ref("init_image", &init.name)?;
            if !is_sha256_hex(&init.sha256) {
                return Err(Error::invalid(
                    "init_image: its sha256 is not 64 lowercase hex digits",
                ));
            }
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return Err(Error::invalid(format!(
                    "strength: {} is outside (0, 1] (above 0, at most 1)",
                    init.strength
                )));
            }
            if !self.sampler.method.is_k_diffusion() {
                return Err(Error::invalid(format!(
                    "init_image: img2img runs a k-diffusion sampler (euler, euler_a, heun, \
                     dpmpp_2m, dpmpp_2s_a, dpmpp_sde, each also _karras), not `{}`",
                    self.sampler
                )));
            }
            if self.hires.is_some() {
                return Err(Error::invalid(
                    "init_image: img2img has no hires fix (as in A1111); drop the hires_* keys \
                     or the init picture",
                ));
            }
        }
        if self.bindings.len() > MAX_BINDINGS {
            return Err(Error::invalid(format!(
                "bindings: {} entries, at most {MAX_BINDINGS}",
                self.bindings.len()
            )));
        }
        for (k, v) in &self.bindings {
            if k.is_empty() {
                return Err(Error::invalid("bindings: empty key"));
            }
            check_len(&format!("bindings.{k}"), k)?;
            check_len(&format!("bindings.{k}"), v)?;
        }
        Ok(())
    }

    fn validate_hires(&self, h: &HiresSpec) -> Result<()> {
        match h.size {
            None => {
                if !h.scale.is_finite() || !(1.0..=MAX_HIRES_SCALE).contains(&h.scale) {
                    return Err(Error::invalid(format!(
                        "hires_scale: {} is outside 1..={MAX_HIRES_SCALE}",
                        h.scale
                    )));
                }
            }
            Some((w, h_px)) => {
                if h.scale != 0.0 {
                    return Err(Error::invalid(
                        "hires: give hires_scale or hires_size, not both",
                    ));
                }
                for (field, v, first) in [("width", w, self.width), ("height", h_px, self.height)] {
                    if !(64..=MAX_HIRES_SIZE).contains(&v) || v % 8 != 0 || v > first * 4 {
                        return Err(Error::invalid(format!(
                            "hires_size: {field} {v} must be a multiple of 8 in \
                             64..={MAX_HIRES_SIZE}, at most 4× the cell's {first}"
                        )));
                    }
                }
            }
        }
        let (fw, fh) = self.final_size();
        if fw < 64 || fh < 64 || fw > MAX_HIRES_SIZE || fh > MAX_HIRES_SIZE {
            return Err(Error::invalid(format!(
                "hires: the final size {fw}x{fh} is outside 64..={MAX_HIRES_SIZE} a side"
            )));
        }
        if !(h.denoise > 0.0 && h.denoise <= 1.0) {
            return Err(Error::invalid(format!(
                "hires_denoise: {} is outside (0, 1] (above 0, at most 1)",
                h.denoise
            )));
        }
        if h.steps > MAX_HIRES_STEPS {
            return Err(Error::invalid(format!(
                "hires_steps: {} is outside 0..={MAX_HIRES_STEPS} (0: the first pass's)",
                h.steps
            )));
        }
        match h.sampler {
            Some(s) if !s.method.is_k_diffusion() => Err(Error::invalid(format!(
                "hires_sampler: `{s}` is not a k-diffusion sampler; the hires pass runs only \
                 those (euler, euler_a, heun, dpmpp_2m, dpmpp_2s_a, each also _karras)"
            ))),
            None if !self.sampler.method.is_k_diffusion() => Err(Error::invalid(format!(
                "hires_sampler: needed, because the sampler `{}` is not a k-diffusion sampler \
                 and the hires pass runs only those (e.g. hires_sampler = \"euler_a\")",
                self.sampler
            ))),
            _ => Ok(()),
        }
    }

    /// The final picture's (width, height): the hires pass's when there is one
    /// ([`HiresSpec::final_size`]), else the cell's.
    pub fn final_size(&self) -> (u32, u32) {
        match &self.hires {
            Some(h) => h.final_size(self.width, self.height),
            None => (self.width, self.height),
        }
    }

    /// Width × height of the final picture (the hires pass's when there is one): what a
    /// worker's `--max-pixels` is compared with, since the largest pass sets the memory a
    /// render needs.
    pub fn pixels(&self) -> u64 {
        let (w, h) = self.final_size();
        u64::from(w) * u64::from(h)
    }

    /// The hires denoising strength rounded to 4 decimals, as stored for queries (like
    /// [`Self::cfg_decimal`]); `None` without a hires fix.
    pub fn hires_denoise_decimal(&self) -> Option<f64> {
        self.hires.map(|h| decimal4(h.denoise))
    }

    /// The hires scale rounded to 4 decimals, as stored for queries; `None` without a hires
    /// fix or when a size was given.
    pub fn hires_scale_decimal(&self) -> Option<f64> {
        self.hires
            .filter(|h| h.size.is_none())
            .map(|h| decimal4(h.scale))
    }

    /// The guidance scale rounded to 4 decimals, as stored for queries (so `cfg = 1.2` finds a
    /// cell whose f32 CFG is 1.2000000476837158).
    pub fn cfg_decimal(&self) -> f64 {
        decimal4(self.cfg)
    }

    /// The lowest worker render level ([`kiln_proto::sampler::RENDER_LEVEL`]) that renders
    /// this cell: its sampler's, 1 for NV noise, a variation seed, a resized seed or a hires
    /// fix, and 2 for img2img.
    pub fn render_level(&self) -> u32 {
        let noise = u32::from(
            self.rng == "nv"
                || self.subseed_strength > 0.0
                || self.seed_resize_from.is_some()
                || self.hires.is_some(),
        );
        let init = if self.init.is_some() { 2 } else { 0 };
        self.sampler.render_level().max(noise).max(init)
    }

    /// The LoRAs the prompt names (`<lora:name:weight>`), which a worker merges after
    /// [`Self::loras`]; none for a prompt that does not parse (`validate` refuses it).
    pub fn prompt_loras(&self) -> Vec<LoraRef> {
        ParsedPrompt::parse(&self.prompt)
            .map(|p| p.loras())
            .unwrap_or_default()
    }
}

/// `v` rounded to 4 decimals, so that `= 0.3` finds the f32 0.30000001192092896.
fn decimal4(v: f32) -> f64 {
    (f64::from(v) * 1e4).round() / 1e4
}

/// Refuses text a database cannot store the same way on both backends: Postgres `text` and
/// `jsonb` reject NUL, SQLite keeps it. Named by field, so the client knows what to fix.
pub fn check_text(name: &str, v: &str) -> Result<()> {
    if v.contains('\0') {
        return Err(Error::invalid(format!("{name}: contains a NUL character")));
    }
    Ok(())
}

/// The largest `min_memory_mib` (1 TiB): more than any device, and far inside the database's
/// signed 64-bit integers.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

fn check_ref(name: &str, v: &str) -> Result<()> {
    if v.trim().is_empty() {
        return Err(Error::invalid(format!("{name}: must not be empty")));
    }
    check_len(name, v)
}

fn check_len(name: &str, v: &str) -> Result<()> {
    check_text(name, v)?;
    if v.len() > MAX_REF_BYTES {
        return Err(Error::TooLarge(format!(
            "{name}: {} bytes, at most {MAX_REF_BYTES}",
            v.len()
        )));
    }
    Ok(())
}

/// A validated cell ready to insert, with its derived columns.
#[derive(Clone, Debug)]
pub struct NewCell {
    /// Position within the sweep.
    pub number: u32,
    /// Identity hash.
    pub cell_key: String,
    /// Pipeline-reuse hash.
    pub affinity_key: String,
    /// The render itself.
    pub spec: CellSpec,
    /// `spec` as stored JSON.
    pub spec_json: String,
    /// `spec.bindings` as stored JSON.
    pub bindings_json: String,
}

/// A cell the planner made: checked ([`CellSpec::validate`]), distinct from the sweep's other
/// cells, with its identity hash, so a submit of a plan neither checks nor hashes it again.
/// Reads as its [`CellSpec`].
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedCell {
    /// The render.
    pub spec: CellSpec,
    /// `spec.cell_key()`.
    pub cell_key: String,
}

impl std::ops::Deref for PlannedCell {
    type Target = CellSpec;
    fn deref(&self) -> &CellSpec {
        &self.spec
    }
}

impl NewCell {
    /// Validates `spec` and derives its keys and JSON.
    pub fn new(number: u32, spec: CellSpec) -> Result<Self> {
        spec.validate().map_err(|e| prefix_cell(number, e))?;
        let cell_key = spec.cell_key();
        Self::checked(number, spec, cell_key)
    }

    /// A cell the planner checked and keyed already ([`PlannedCell`]): only its affinity key
    /// and JSON are derived.
    pub fn planned(number: u32, cell: PlannedCell) -> Result<Self> {
        Self::checked(number, cell.spec, cell.cell_key)
    }

    fn checked(number: u32, spec: CellSpec, cell_key: String) -> Result<Self> {
        let spec_json = serde_json::to_string(&spec)
            .map_err(|e| Error::invalid(format!("cell {number}: {e}")))?;
        let bindings_json = serde_json::to_string(&spec.bindings)
            .map_err(|e| Error::invalid(format!("cell {number}: {e}")))?;
        Ok(Self {
            number,
            cell_key,
            affinity_key: spec.affinity_key(),
            spec,
            spec_json,
            bindings_json,
        })
    }
}

fn prefix_cell(number: u32, e: Error) -> Error {
    match e {
        Error::Invalid(m) => Error::Invalid(format!("cell {number}: {m}")),
        Error::TooLarge(m) => Error::TooLarge(format!("cell {number}: {m}")),
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec(seed: u64) -> CellSpec {
        CellSpec {
            model: "dreamshaper_8.safetensors".into(),
            loras: vec![LoraSpec {
                name: "lcm-lora-sdv1-5".into(),
                strength: 1.0,
                sha256: String::new(),
            }],
            prompt: "a fox in a forest".into(),
            negative_prompt: String::new(),
            seed,
            steps: 4,
            cfg: 1.0,
            sampler: SamplerName::LCM,
            width: 512,
            height: 512,
            rng: "cpu".into(),
            bindings: BTreeMap::new(),
            min_memory_mib: 0,
            vae: String::new(),
            clip_skip: 1,
            subseed: 0,
            subseed_strength: 0.0,
            seed_resize_from: None,
            hires: None,
            eta: None,
            init: None,
            model_sha256: String::new(),
            vae_sha256: String::new(),
        }
    }

    #[test]
    fn old_specs_read_back_and_new_fields_stay_out_of_plain_ones() {
        let json = serde_json::to_string(&spec(1)).unwrap();
        assert!(json.contains(r#""sampler":"lcm""#), "{json}");
        for absent in ["subseed", "seed_resize_from"] {
            assert!(!json.contains(absent), "{json}");
        }
        let back: CellSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec(1));
        let mut s = spec(1);
        s.sampler = "DPM++ 2S a Karras".parse().unwrap();
        s.seed_resize_from = Some((640, 512));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""sampler":"dpmpp_2s_a_karras""#), "{json}");
        assert_eq!(serde_json::from_str::<CellSpec>(&json).unwrap(), s);
    }

    #[test]
    fn render_levels() {
        assert_eq!(spec(1).render_level(), 0);
        let mut s = spec(1);
        s.sampler = SamplerName::EULER_A_DIFFUSERS;
        assert_eq!(s.render_level(), 0);
        s.sampler = "heun".parse().unwrap();
        assert_eq!(s.render_level(), 1);
        let mut s = spec(1);
        s.rng = "nv".into();
        assert_eq!(s.render_level(), 1);
        let mut s = spec(1);
        s.subseed = 9;
        assert_eq!(
            s.render_level(),
            0,
            "a subseed at strength 0 changes nothing"
        );
        s.subseed_strength = 0.25;
        assert_eq!(s.render_level(), 1);
        let mut s = spec(1);
        s.seed_resize_from = Some((512, 512));
        assert_eq!(s.render_level(), 1);
    }

    #[test]
    fn new_fields_are_checked() {
        let mut s = spec(1);
        s.subseed_strength = 1.5;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("subseed_strength: 1.5"), "{e}");
        let mut s = spec(1);
        s.seed_resize_from = Some((100, 512));
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("seed_resize_from: width 100"), "{e}");
        let mut s = spec(1);
        s.rng = "gpu".into();
        assert!(s.validate().unwrap_err().to_string().contains("rng"));
        let mut s = spec(1);
        s.subseed = u64::MAX;
        assert!(s.validate().unwrap_err().to_string().contains("subseed"));
    }

    #[test]
    fn eta_belongs_to_ddim_and_tcd_and_keys_only_when_set() {
        let plain = spec(1);
        let mut ddim = spec(1);
        ddim.sampler = "ddim".parse().unwrap();
        let ddim_key = ddim.cell_key();
        ddim.eta = Some(0.5);
        assert!(ddim.validate().is_ok());
        assert_ne!(
            ddim.cell_key(),
            ddim_key,
            "a set eta is part of the identity"
        );
        ddim.eta = Some(1.5);
        let e = ddim.validate().unwrap_err().to_string();
        assert!(e.contains("eta: 1.5 is outside 0..=1"), "{e}");
        let mut euler = plain.clone();
        euler.eta = Some(0.5);
        let e = euler.validate().unwrap_err().to_string();
        assert!(
            e.contains("eta: applies to the ddim and tcd samplers"),
            "{e}"
        );
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("eta"), "{json}");
    }

    fn hires_spec(scale: f32) -> CellSpec {
        let mut s = spec(1);
        s.sampler = "DPM++ 2S a Karras".parse().unwrap();
        s.hires = Some(HiresSpec::scaled(scale));
        s
    }

    #[test]
    fn a_hires_cell_counts_its_final_size_and_needs_level_1() {
        let s = hires_spec(1.5);
        s.validate().unwrap();
        assert_eq!(s.final_size(), (768, 768));
        assert_eq!(
            s.pixels(),
            768 * 768,
            "the lease filter sees the hires size"
        );
        assert_eq!(s.render_level(), 1);
        // A1111's arithmetic, as the engine's `Hires::geometry`: int(512 × 1.3) = 665 → 664.
        assert_eq!(hires_spec(1.3).final_size(), (664, 664));
        assert_eq!(HiresSpec::scaled(1.5).final_size(64, 64), (96, 96));
        // A resize to another aspect ratio fills the box, then crops to it.
        let mut r = spec(1);
        (r.width, r.height) = (512, 768);
        let h = HiresSpec {
            size: Some((1024, 1024)),
            ..HiresSpec::scaled(0.0)
        };
        assert_eq!(h.final_size(512, 768), (1024, 1024));
        let h = HiresSpec {
            size: Some((1000, 1500)),
            ..HiresSpec::scaled(0.0)
        };
        assert_eq!(h.final_size(512, 768), (1000, 1496));
        assert_eq!(
            (s.hires_denoise_decimal(), s.hires_scale_decimal()),
            (Some(0.7), Some(1.5))
        );
        let mut d = s.clone();
        d.hires.as_mut().unwrap().denoise = 0.3;
        assert_eq!(d.hires_denoise_decimal(), Some(0.3));
        assert_eq!(spec(1).hires_denoise_decimal(), None);
    }

    #[test]
    fn hires_settings_change_the_key_and_round_trip() {
        let plain = spec(7);
        let mut on = plain.clone();
        on.hires = Some(HiresSpec::scaled(1.5));
        assert_ne!(on.cell_key(), plain.cell_key());
        assert_eq!(
            on.affinity_key(),
            plain.affinity_key(),
            "same first-pass pipeline"
        );
        let variants: [fn(&mut HiresSpec); 5] = [
            |h| h.denoise = 0.5,
            |h| h.steps = 3,
            |h| h.upscaler = "lanczos".parse().unwrap(),
            |h| h.sampler = Some("euler".parse().unwrap()),
            |h| (h.scale, h.size) = (0.0, Some((768, 768))),
        ];
        for change in variants {
            let mut other = on.clone();
            change(other.hires.as_mut().unwrap());
            assert_ne!(other.cell_key(), on.cell_key(), "{:?}", other.hires);
            let json = serde_json::to_string(&other).unwrap();
            assert_eq!(serde_json::from_str::<CellSpec>(&json).unwrap(), other);
        }
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("hires"), "{json}");
        let json = serde_json::to_string(&on).unwrap();
        assert!(
            json.contains(r#""hires":{"scale":1.5,"upscaler":"latent","steps":0,"denoise":0.7}"#),
            "{json}"
        );
    }

    #[test]
    fn hires_settings_are_checked() {
        let check = |change: fn(&mut CellSpec)| {
            let mut s = hires_spec(2.0);
            change(&mut s);
            s.validate().unwrap_err().to_string()
        };
        let e = check(|s| s.hires.as_mut().unwrap().scale = 4.5);
        assert!(e.contains("hires_scale: 4.5 is outside 1..=4"), "{e}");
        let e = check(|s| s.hires.as_mut().unwrap().denoise = 0.0);
        assert!(e.contains("hires_denoise: 0 is outside (0, 1]"), "{e}");
        let e = check(|s| s.hires.as_mut().unwrap().steps = 151);
        assert!(e.contains("hires_steps: 151"), "{e}");
        let e = check(|s| s.sampler = SamplerName::LCM);
        assert!(
            e.contains("hires_sampler: needed") && e.contains("`lcm`"),
            "{e}"
        );
        let e = check(|s| s.hires.as_mut().unwrap().sampler = Some(SamplerName::LCM));
        assert!(e.contains("not a k-diffusion sampler"), "{e}");
        let e = check(|s| (s.width, s.height) = (4096, 4096));
        assert!(e.contains("final size 8192x8192"), "{e}");
        let e = check(|s| {
            let h = s.hires.as_mut().unwrap();
            (h.scale, h.size) = (0.0, Some((4096, 512)));
        });
        assert!(e.contains("hires_size: width 4096"), "{e}");
        // The first pass may be LCM when the hires pass names a k-diffusion sampler.
        let mut s = hires_spec(2.0);
        s.sampler = SamplerName::LCM;
        s.hires.as_mut().unwrap().sampler = Some("euler_a".parse().unwrap());
        s.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec(1);
        s.width = 100;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("width: 100"), "{e}");
        let mut s = spec(u64::MAX);
        s.steps = 4;
        assert!(s.validate().unwrap_err().to_string().contains("seed"));
        let mut s = spec(1);
        s.cfg = f32::NAN;
        assert!(s.validate().unwrap_err().to_string().contains("cfg"));
        let mut s = spec(1);
        s.model = " ".into();
        assert!(s.validate().unwrap_err().to_string().contains("model"));
        let mut s = spec(1);
        s.prompt = "x".repeat(MAX_PROMPT_BYTES + 1);
        assert!(matches!(s.validate(), Err(Error::TooLarge(_))));
    }

    #[test]
    fn cfg_is_stored_as_its_decimal() {
        let mut s = spec(1);
        s.cfg = 1.2;
        assert_eq!(s.cfg_decimal(), 1.2);
    }
}
