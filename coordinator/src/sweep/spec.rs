//! The sweep file's TOML schema ([`SweepFile`]): serde with `deny_unknown_fields` and spans,
//! so that TOML errors, unknown keys and wrong types come back with their `line:col`. What the
//! values mean is [`resolve`](super::resolve)'s business.
//!
//! ```toml
//! name = "foxes"                          # default: the file's stem
//! model = "dreamshaper_8.safetensors"
//! sampler = "lcm"                         # lcm (default), euler, euler_a, heun, dpmpp_2m,
//!                                         # dpmpp_2s_a, dpmpp_sde (each also `_karras`:
//!                                         # dpmpp_2m_karras), ddim, unipc, tcd,
//!                                         # euler_a_diffusers; or A1111's "DPM++ 2M Karras"
//! eta = 0.3                               # ddim's η (default 0) or tcd's γ (default 0.3)
//! steps = 4                               # default 4
//! cfg = 1.0                               # default 1.0
//! size = "512x512"                        # or width = 512, height = 512 (default 512x512)
//! negative_prompt = "blurry"
//! vae = "vae-ft-mse-840000-ema-pruned"     # default: the model's own VAE
//! clip_skip = 2                           # 1 (default, the last layer) ..= 4
//! prompt = "a {red|arctic} __animal__"    # or prompts = "prompts.txt", or axes.prompt
//! seeds = [1, 2]                          # or { from = 1000, count = 8 } or { random = 8 }
//! subseed = 77                            # A1111's variation seed, 0..=2^63-1 (default 0)
//! subseed_strength = 0.3                  # 0 (default: off) ..= 1
//! seed_resize_from = "512x768"            # draw the noise for this size (default: the cell's)
//! rng = "cpu"                             # cpu (default) | nv (A1111's "NV": CUDA's generator)
//! hires_scale = 2.0                       # hires fix on: 1..=4 × the size (or hires_size = "WxH")
//! hires_upscaler = "latent"               # latent (default), latent_nearest,
//!                                         # latent_nearest_exact, lanczos; or A1111's names
//! hires_steps = 0                         # 0 (default: the first pass's) ..= 150
//! hires_denoise = 0.7                     # (0, 1]; default 0.7 (A1111's)
//! hires_sampler = "euler_a"               # a k-diffusion sampler (default: the first pass's;
//!                                         # needed when that is lcm or euler_a_diffusers)
//! init_image = "photos/cat.png"           # img2img from this PNG, JPEG or WebP (sent along,
//!                                         # resized to the cell's size as A1111 does)
//! strength = 0.75                         # img2img's denoising strength, (0, 1] (default 0.75)
//!
//! [[loras]]
//! name = "lcm-lora-sdv1-5.safetensors"    # or path = "…"
//! id = "lcm"                              # for axes; default: the file stem
//! strength = 1.0                          # default 1.0
//!
//! [wildcards]
//! animal = "wildcards/animal.txt"         # a file: one value per line, `#` comments
//! light = ["dawn", "dusk"]                # or inline
//!
//! [axes]                                  # a grid; the first axis is the outermost loop
//! cfg = [1.0, 1.5]
//! "lora.lcm.strength" = [0.5, 1.0]
//! ```
//!
//! Axes: `cfg`, `steps`, `sampler`, `model`, `vae`, `clip_skip`, `size`, `width`, `height`,
//! `negative_prompt`, `prompt` (a list of templates), `eta`, `subseed`, `subseed_strength`,
//! `seed_resize_from`, `rng`, `hires_scale`, `hires_size`, `hires_upscaler`, `hires_steps`,
//! `hires_denoise`, `hires_sampler`, `init_image`, `strength` and `lora.<id>.strength`. A parameter is set in one place:
//! at the top level *or* as an axis (`size` counts as both `width` and `height`; `hires_scale`
//! and `hires_size` are one parameter). The hires fix is on when `hires_scale` or `hires_size`
//! is set; the other `hires_*` keys need one of them.
//! `min_memory_mib` (default 0) asks for workers with at least that much device memory.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::error::{Place, PlanError, PlanErrorKind};
use super::source::SweepSource;

/// The sweep file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SweepFile {
    pub(super) name: Option<Spanned<String>>,
    pub(super) model: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) loras: Vec<Spanned<LoraEntry>>,
    pub(super) sampler: Option<Spanned<String>>,
    pub(super) steps: Option<Spanned<i64>>,
    pub(super) cfg: Option<Spanned<f64>>,
    pub(super) width: Option<Spanned<i64>>,
    pub(super) height: Option<Spanned<i64>>,
    pub(super) size: Option<Spanned<String>>,
    pub(super) negative_prompt: Option<Spanned<String>>,
    pub(super) prompt: Option<Spanned<String>>,
    pub(super) prompts: Option<Spanned<String>>,
    pub(super) seeds: Option<Spanned<SeedsSpec>>,
    #[serde(default)]
    pub(super) wildcards: BTreeMap<Spanned<String>, Spanned<WildcardSource>>,
    #[serde(default)]
    pub(super) axes: BTreeMap<Spanned<String>, Spanned<AxisEntry>>,
    pub(super) min_memory_mib: Option<Spanned<u64>>,
    pub(super) vae: Option<Spanned<String>>,
    pub(super) clip_skip: Option<Spanned<i64>>,
    pub(super) subseed: Option<Spanned<i64>>,
    pub(super) subseed_strength: Option<Spanned<f64>>,
    pub(super) seed_resize_from: Option<Spanned<String>>,
    pub(super) rng: Option<Spanned<String>>,
    pub(super) hires_scale: Option<Spanned<f64>>,
    pub(super) hires_size: Option<Spanned<String>>,
    pub(super) hires_upscaler: Option<Spanned<String>>,
    pub(super) hires_steps: Option<Spanned<i64>>,
    pub(super) hires_denoise: Option<Spanned<f64>>,
    pub(super) hires_sampler: Option<Spanned<String>>,
    pub(super) eta: Option<Spanned<f64>>,
    pub(super) init_image: Option<Spanned<String>>,
    pub(super) strength: Option<Spanned<f64>>,
}

impl SweepFile {
    /// The files this sweep file references, as written: wildcard files (by wildcard name),
    /// then the prompts file.
    pub(crate) fn referenced_files(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let files = self.wildcards.values().filter_map(|s| match s.get_ref() {
            WildcardSource::File(f) => Some(f),
            WildcardSource::Inline(_) => None,
        });
        for f in files.chain(self.prompts.as_ref().map(Spanned::get_ref)) {
            if !out.contains(f) {
                out.push(f.clone());
            }
        }
        out
    }

    /// The pictures this sweep file references (`init_image`, at the top level and as axis
    /// values), as written, each once.
    pub(crate) fn referenced_images(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let top = self.init_image.iter().map(|s| s.get_ref().as_str());
        let axis = self
            .axis_list()
            .into_iter()
            .filter(|a| a.name.get_ref() == "init_image")
            .flat_map(|a| a.values.get_ref().iter())
            .filter_map(|v| v.get_ref().as_str());
        for name in top.chain(axis) {
            if !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
        out
    }
}

/// One `[[loras]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoraEntry {
    pub(super) name: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) id: Option<Spanned<String>>,
    pub(super) strength: Option<Spanned<f64>>,
    pub(super) sha256: Option<Spanned<String>>,
}

/// `seeds = [..]`, `{ from, count }` or `{ random }`.
#[derive(Debug)]
pub(crate) enum SeedsSpec {
    /// Explicit seeds.
    List(Vec<Spanned<i64>>),
    /// `from`, `from + 1`, … (`count` seeds).
    Range {
        /// First seed.
        from: Spanned<i64>,
        /// How many.
        count: Spanned<i64>,
    },
    /// `count` seeds drawn at planning.
    Random {
        /// How many.
        count: Spanned<i64>,
    },
}

impl<'de> Deserialize<'de> for SeedsSpec {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SeedsSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of seeds, { from = N, count = N } or { random = N }")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SeedsSpec, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element()? {
                    out.push(s);
                }
                Ok(SeedsSpec::List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SeedsSpec, A::Error> {
                const KEYS: &[&str] = &["from", "count", "random"];
                let (mut from, mut count, mut random) = (None, None, None);
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "from" => &mut from,
                        "count" => &mut count,
                        "random" => &mut random,
                        other => return Err(de::Error::unknown_field(other, KEYS)),
                    };
                    *slot = Some(map.next_value::<Spanned<i64>>()?);
                }
                match (from, count, random) {
                    (None, None, Some(count)) => Ok(SeedsSpec::Random { count }),
                    (Some(from), Some(count), None) => Ok(SeedsSpec::Range { from, count }),
                    _ => Err(de::Error::custom(
                        "seeds: give either { from = N, count = N } or { random = N }",
                    )),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A `[wildcards]` entry: a file name or an inline list.
#[derive(Debug)]
pub(super) enum WildcardSource {
    /// A file name, as written.
    File(String),
    /// Values written in the sweep file.
    Inline(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for WildcardSource {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WildcardSource;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a file name or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WildcardSource, E> {
                Ok(WildcardSource::File(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element()? {
                    out.push(s);
                }
                Ok(WildcardSource::Inline(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// An `[axes]` entry: a list of values, or — for a dotted key written without quotes, such as
/// `lora.lcm.strength = [..]`, which TOML reads as nested tables — a table of entries.
#[derive(Debug)]
pub(super) enum AxisEntry {
    /// The axis values.
    List(Vec<Spanned<toml::Value>>),
    /// The next key segments.
    Nested(BTreeMap<Spanned<String>, Spanned<AxisEntry>>),
}

impl<'de> Deserialize<'de> for AxisEntry {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AxisEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of axis values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AxisEntry, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(AxisEntry::List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AxisEntry, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry()? {
                    out.insert(k, v);
                }
                Ok(AxisEntry::Nested(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl SweepFile {
    /// The axes with dotted names (`lora.lcm.strength`), in file order, each with the span
    /// of its (first) key and its values (with their span).
    pub(super) fn axis_list(&self) -> Vec<AxisDecl<'_>> {
        fn walk<'a>(
            prefix: Option<&Spanned<String>>,
            map: &'a BTreeMap<Spanned<String>, Spanned<AxisEntry>>,
            out: &mut Vec<AxisDecl<'a>>,
        ) {
            for (k, v) in map {
                let name = match prefix {
                    Some(p) => Spanned::new(p.span(), format!("{}.{}", p.get_ref(), k.get_ref())),
                    None => k.clone(),
                };
                match v.get_ref() {
                    AxisEntry::Nested(inner) => walk(Some(&name), inner, out),
                    AxisEntry::List(list) => {
                        out.push(AxisDecl {
                            name,
                            values: Spanned::new(v.span(), list.as_slice()),
                        });
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(None, &self.axes, &mut out);
        out.sort_by_key(|a| a.name.span().start);
        out
    }
}

/// One axis as declared: its dotted name (spanned at its first key) and its values.
pub(super) struct AxisDecl<'a> {
    /// `cfg`, `lora.lcm.strength`, …
    pub(super) name: Spanned<String>,
    /// The list, spanned.
    pub(super) values: Spanned<&'a [Spanned<toml::Value>]>,
}

/// Parses the sweep file; TOML syntax, unknown keys and wrong types come back placed.
pub(crate) fn parse_file(src: &SweepSource) -> Result<SweepFile, PlanError> {
    toml::from_str(&src.text).map_err(|e| {
        let place = match e.span() {
            Some(span) => src.place_of(&span),
            None => Place::File {
                file: src.path.clone(),
            },
        };
        PlanError::new(place, PlanErrorKind::Toml(e.message().trim().to_string()))
    })
}
