//! The sweep file's TOML schema ([`SweepFile`], serde with `deny_unknown_fields` and spans)
//! and its resolution into [`Settings`]: the base render, the axes in nesting order, the
//! prompt templates' texts and the wildcard values, every value range-checked with its place.
//!
//! ```toml
//! name = "foxes"                          # default: the file's stem
//! model = "dreamshaper_8.safetensors"
//! sampler = "lcm"                         # lcm (default) | euler_a
//! steps = 4                               # default 4
//! cfg = 1.0                               # default 1.0
//! size = "512x512"                        # or width = 512, height = 512 (default 512x512)
//! negative_prompt = "blurry"
//! prompt = "a {red|arctic} __animal__"    # or prompts = "prompts.txt", or axes.prompt
//! seeds = [1, 2]                          # or { from = 1000, count = 8 } or { random = 8 }
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
//! Axes: `cfg`, `steps`, `sampler`, `model`, `size`, `width`, `height`, `negative_prompt`,
//! `prompt` (a list of templates) and `lora.<id>.strength`. A parameter is set in one place:
//! at the top level *or* as an axis (`size` counts as both `width` and `height`).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::cell::{CellSpec, LoraSpec, MAX_REF_BYTES, Sampler};
use super::error::{Place, PlanError, PlanErrorKind};
use super::source::{Origin, SweepSource, list_lines};
use super::template::is_wildcard_name;

/// The sweep file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SweepFile {
    name: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    #[serde(default)]
    loras: Vec<Spanned<LoraEntry>>,
    sampler: Option<Spanned<String>>,
    steps: Option<Spanned<i64>>,
    cfg: Option<Spanned<f64>>,
    width: Option<Spanned<i64>>,
    height: Option<Spanned<i64>>,
    size: Option<Spanned<String>>,
    negative_prompt: Option<Spanned<String>>,
    prompt: Option<Spanned<String>>,
    prompts: Option<Spanned<String>>,
    seeds: Option<Spanned<SeedsSpec>>,
    #[serde(default)]
    wildcards: BTreeMap<Spanned<String>, Spanned<WildcardSource>>,
    #[serde(default)]
    axes: BTreeMap<Spanned<String>, Spanned<Vec<Spanned<toml::Value>>>>,
    min_memory_mib: Option<Spanned<u64>>,
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
}

/// One `[[loras]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraEntry {
    name: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    id: Option<Spanned<String>>,
    strength: Option<Spanned<f64>>,
    sha256: Option<Spanned<String>>,
}

/// `seeds = [..]`, `{ from, count }` or `{ random }`.
#[derive(Debug)]
pub(crate) enum SeedsSpec {
    /// Explicit seeds.
    List(Vec<Spanned<i64>>),
    /// `from`, `from + 1`, … (`count` seeds).
    Range {
        from: Spanned<i64>,
        count: Spanned<i64>,
    },
    /// `count` seeds drawn at planning.
    Random { count: Spanned<i64> },
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
enum WildcardSource {
    File(String),
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

/// One parameter an axis sets.
#[derive(Clone, Debug)]
pub(crate) enum Setter {
    Cfg(f32),
    Steps(u32),
    Sampler(Sampler),
    Model(String),
    Width(u32),
    Height(u32),
    Size(u32, u32),
    NegativePrompt(String),
    /// Index into [`Settings::prompts`].
    Prompt(usize),
    /// (index into the LoRA stack, strength)
    LoraStrength(usize, f32),
}

impl Setter {
    /// Applies the value to a cell.
    pub(crate) fn apply(&self, cell: &mut CellSpec) {
        match self {
            Setter::Cfg(v) => cell.cfg = *v,
            Setter::Steps(v) => cell.steps = *v,
            Setter::Sampler(v) => cell.sampler = *v,
            Setter::Model(v) => cell.model.clone_from(v),
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

/// A prompt template's text before parsing.
#[derive(Clone, Debug)]
pub(crate) struct PromptText {
    pub text: String,
    pub origin: Origin,
    /// The binding recording which prompt this is (`prompts.line`), if any.
    pub binding: Option<(String, String)>,
}

/// A declared wildcard's values before parsing.
#[derive(Clone, Debug)]
pub(crate) struct WildcardText {
    pub name: String,
    pub values: Vec<(String, Origin)>,
}

/// The sweep file resolved: everything but template parsing and expansion.
#[derive(Debug)]
pub(crate) struct Settings {
    pub name: String,
    /// Every cell starts from this (prompt and seed unset).
    pub base: CellSpec,
    /// Axes, outermost first (file order).
    pub axes: Vec<Axis>,
    /// The prompt templates: one `prompt`, the lines of `prompts`, or `axes.prompt`'s values
    /// (then chosen by the axis).
    pub prompts: Vec<PromptText>,
    /// Whether `axes.prompt` picks the template.
    pub prompt_axis: bool,
    pub seeds: Spanned<SeedsSpec>,
    pub wildcards: Vec<WildcardText>,
}

/// Default steps, CFG and size: LCM's usual 4 steps at CFG 1, SD1.5's 512×512.
pub const DEFAULT_STEPS: u32 = 4;
/// Default guidance scale.
pub const DEFAULT_CFG: f32 = 1.0;
/// Default width and height.
pub const DEFAULT_SIZE: u32 = 512;

/// The axis names besides `lora.<id>.strength`.
const AXES: &[&str] = &[
    "cfg",
    "steps",
    "sampler",
    "model",
    "size",
    "width",
    "height",
    "negative_prompt",
    "prompt",
];

/// Resolves a parsed sweep file. `max_file_bytes` bounds each referenced file.
pub(crate) fn resolve(
    file: SweepFile,
    src: &SweepSource,
    max_file_bytes: usize,
) -> Result<Settings, PlanError> {
    let r = Resolver {
        src,
        max_file_bytes,
    };
    r.resolve(file)
}

struct Resolver<'a> {
    src: &'a SweepSource,
    max_file_bytes: usize,
}

impl Resolver<'_> {
    fn resolve(&self, f: SweepFile) -> Result<Settings, PlanError> {
        let name = match &f.name {
            Some(n) => {
                self.check_text("name", n, 200)?;
                n.get_ref().clone()
            }
            None => file_stem(&self.src.path).to_string(),
        };
        let (loras, lora_ids) = self.loras(&f.loras)?;
        let mut base = CellSpec {
            model: String::new(),
            loras,
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            steps: DEFAULT_STEPS,
            cfg: DEFAULT_CFG,
            sampler: Sampler::Lcm,
            width: DEFAULT_SIZE,
            height: DEFAULT_SIZE,
            rng: "cpu".into(),
            bindings: BTreeMap::new(),
            min_memory_mib: f.min_memory_mib.as_ref().map_or(0, |m| *m.get_ref()),
        };
        if let Some(m) = &f.model {
            self.check_text("model", m, MAX_REF_BYTES)?;
            base.model.clone_from(m.get_ref());
        }
        if let Some(s) = &f.sampler {
            base.sampler = self.val(s.span(), "sampler", sampler(s.get_ref()))?;
        }
        if let Some(s) = &f.steps {
            base.steps = self.val(s.span(), "steps", steps(*s.get_ref()))?;
        }
        if let Some(c) = &f.cfg {
            base.cfg = self.val(c.span(), "cfg", cfg(*c.get_ref()))?;
        }
        if let Some(s) = &f.size {
            for (other, set) in [("width", f.width.is_some()), ("height", f.height.is_some())] {
                if set {
                    return Err(self.conflict(s.span(), "size", other));
                }
            }
            (base.width, base.height) = self.val(s.span(), "size", size(s.get_ref()))?;
        }
        if let Some(w) = &f.width {
            base.width = self.val(w.span(), "width", dimension(*w.get_ref()))?;
        }
        if let Some(h) = &f.height {
            base.height = self.val(h.span(), "height", dimension(*h.get_ref()))?;
        }
        if let Some(n) = &f.negative_prompt {
            base.negative_prompt.clone_from(n.get_ref());
        }

        let mut prompts = Vec::new();
        let axes = self.axes(&f, &lora_ids, &mut prompts)?;
        let prompt_axis = axes.iter().any(|a| a.name == "prompt");
        if let (Some(p), Some(q)) = (&f.prompt, &f.prompts) {
            return Err(self.conflict(
                q.span(),
                "prompts",
                &format!("prompt (line {})", { self.line_of(p.span()) }),
            ));
        }
        if let Some(p) = &f.prompt {
            prompts.push(PromptText {
                text: p.get_ref().clone(),
                origin: self.src.string_origin(&p.span(), p.get_ref()),
                binding: None,
            });
        } else if let Some(p) = &f.prompts {
            let text = self.file(p.get_ref(), p.span())?;
            for l in list_lines(p.get_ref(), text) {
                prompts.push(PromptText {
                    text: l.text,
                    origin: l.origin,
                    binding: Some(("prompts.line".into(), l.line.to_string())),
                });
            }
            if prompts.is_empty() {
                return Err(PlanError::new(
                    Place::File {
                        file: p.get_ref().clone(),
                    },
                    PlanErrorKind::EmptyList("prompts".into()),
                ));
            }
        } else if !prompt_axis {
            return Err(self.missing(
                "prompt",
                "prompt (a template), prompts (a file) or axes.prompt",
            ));
        }
        if base.model.is_empty() && !axes.iter().any(|a| a.name == "model") {
            return Err(self.missing("model", "model (a file name or path, or axes.model)"));
        }
        let Some(seeds) = f.seeds else {
            return Err(self.missing(
                "seeds",
                "seeds (a list, { from = N, count = N } or { random = N })",
            ));
        };
        let wildcards = self.wildcards(&f.wildcards)?;
        Ok(Settings {
            name,
            base,
            axes,
            prompts,
            prompt_axis,
            seeds,
            wildcards,
        })
    }

    fn loras(
        &self,
        entries: &[Spanned<LoraEntry>],
    ) -> Result<(Vec<LoraSpec>, Vec<String>), PlanError> {
        let mut loras = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let key = format!("loras[{i}]");
            let l = e.get_ref();
            let name = match (&l.name, &l.path) {
                (Some(n), None) | (None, Some(n)) => n,
                (Some(_), Some(p)) => {
                    return Err(self.conflict(p.span(), &format!("{key}.path"), "name"));
                }
                (None, None) => {
                    return Err(PlanError::new(
                        self.src.place_of(&e.span()),
                        PlanErrorKind::Missing(format!("{key}.name (or {key}.path)")),
                    ));
                }
            };
            self.check_text(&format!("{key}.name"), name, MAX_REF_BYTES)?;
            let id = match &l.id {
                Some(id) => {
                    if !is_wildcard_name(id.get_ref()) {
                        return Err(self.invalid(
                            id.span(),
                            &format!("{key}.id"),
                            "use letters, digits, `_`, `-`, `.` or `/`",
                        ));
                    }
                    id.get_ref().clone()
                }
                None => file_stem(name.get_ref()).to_string(),
            };
            if ids.contains(&id) {
                let at = l.id.as_ref().map_or(name.span(), Spanned::span);
                return Err(self.invalid(
                    at,
                    &format!("{key}.id"),
                    &format!("two LoRAs have the id `{id}`; set `id` to tell them apart"),
                ));
            }
            let strength = match &l.strength {
                Some(s) => {
                    self.val(s.span(), &format!("{key}.strength"), strength(*s.get_ref()))?
                }
                None => 1.0,
            };
            let sha256 = match &l.sha256 {
                Some(h) => {
                    let v = h.get_ref().to_ascii_lowercase();
                    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(self.invalid(
                            h.span(),
                            &format!("{key}.sha256"),
                            "not 64 hex digits",
                        ));
                    }
                    v
                }
                None => String::new(),
            };
            ids.push(id);
            loras.push(LoraSpec {
                name: name.get_ref().clone(),
                strength,
                sha256,
            });
        }
        Ok((loras, ids))
    }

    fn axes(
        &self,
        f: &SweepFile,
        lora_ids: &[String],
        prompts: &mut Vec<PromptText>,
    ) -> Result<Vec<Axis>, PlanError> {
        let mut entries: Vec<_> = f.axes.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let names: Vec<&str> = entries.iter().map(|(k, _)| k.get_ref().as_str()).collect();
        let mut axes = Vec::new();
        for (key, values) in entries {
            let name = key.get_ref().as_str();
            let path = format!("axes.{}", quote_key(name));
            let top_level: &[(&str, bool)] = match name {
                "cfg" => &[("cfg", f.cfg.is_some())],
                "steps" => &[("steps", f.steps.is_some())],
                "sampler" => &[("sampler", f.sampler.is_some())],
                "model" => &[("model", f.model.is_some())],
                "negative_prompt" => &[("negative_prompt", f.negative_prompt.is_some())],
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
            if let Some(other) = names
                .iter()
                .find(|n| name == "size" && matches!(**n, "width" | "height"))
            {
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
                    ("model", _) => {
                        let m = self.val(span.clone(), &vpath, string(value))?;
                        if m.trim().is_empty() || m.len() > MAX_REF_BYTES {
                            return Err(self.invalid(span, &vpath, "must be 1..=1024 bytes"));
                        }
                        Setter::Model(m.to_string())
                    }
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
                        Setter::Cfg(v) | Setter::LoraStrength(_, v) => format!("{v:?}"),
                        Setter::Steps(v) | Setter::Width(v) | Setter::Height(v) => v.to_string(),
                        Setter::Sampler(s) => s.as_str().to_string(),
                        Setter::Size(w, h) => format!("{w}x{h}"),
                        Setter::Model(m) => m.clone(),
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

    fn wildcards(
        &self,
        decls: &BTreeMap<Spanned<String>, Spanned<WildcardSource>>,
    ) -> Result<Vec<WildcardText>, PlanError> {
        let mut out = Vec::new();
        for (name, source) in decls {
            let key = format!("wildcards.{}", quote_key(name.get_ref()));
            if !is_wildcard_name(name.get_ref()) {
                return Err(self.invalid(
                    name.span(),
                    &key,
                    "a wildcard name uses letters, digits, `_`, `-`, `.` or `/` and does not start with `_`",
                ));
            }
            let values = match source.get_ref() {
                WildcardSource::File(file) => {
                    let text = self.file(file, source.span())?;
                    let lines = list_lines(file, text);
                    if lines.is_empty() {
                        return Err(PlanError::new(
                            Place::File { file: file.clone() },
                            PlanErrorKind::EmptyList(format!("wildcard `{}`", name.get_ref())),
                        ));
                    }
                    lines.into_iter().map(|l| (l.text, l.origin)).collect()
                }
                WildcardSource::Inline(values) => {
                    if values.is_empty() {
                        return Err(PlanError::new(
                            self.src.place_of(&source.span()),
                            PlanErrorKind::EmptyList(key),
                        ));
                    }
                    values
                        .iter()
                        .map(|v| {
                            let origin = self.src.string_origin(&v.span(), v.get_ref());
                            (v.get_ref().clone(), origin)
                        })
                        .collect()
                }
            };
            out.push(WildcardText {
                name: name.get_ref().clone(),
                values,
            });
        }
        Ok(out)
    }

    /// A referenced file's text, checked against the size limit.
    fn file(&self, name: &str, span: Range<usize>) -> Result<&str, PlanError> {
        let Some(text) = self.src.files.get(name) else {
            return Err(PlanError::new(
                self.src.place_of(&span),
                PlanErrorKind::FileNotSent {
                    file: name.to_string(),
                },
            ));
        };
        if text.len() > self.max_file_bytes {
            return Err(PlanError::new(
                Place::File {
                    file: name.to_string(),
                },
                PlanErrorKind::FileTooLarge {
                    bytes: text.len(),
                    limit: self.max_file_bytes,
                },
            ));
        }
        Ok(text)
    }

    fn check_text(&self, key: &str, v: &Spanned<String>, max: usize) -> Result<(), PlanError> {
        if v.get_ref().trim().is_empty() || v.get_ref().len() > max {
            return Err(self.invalid(v.span(), key, &format!("must be 1..={max} bytes")));
        }
        Ok(())
    }

    fn val<T>(&self, span: Range<usize>, key: &str, r: Result<T, String>) -> Result<T, PlanError> {
        r.map_err(|m| self.invalid(span, key, &m))
    }

    fn invalid(&self, span: Range<usize>, key: &str, message: &str) -> PlanError {
        PlanError::new(
            self.src.place_of(&span),
            PlanErrorKind::Invalid {
                key: key.to_string(),
                message: message.to_string(),
            },
        )
    }

    fn conflict(&self, span: Range<usize>, key: &str, other: &str) -> PlanError {
        PlanError::new(
            self.src.place_of(&span),
            PlanErrorKind::Conflict {
                key: key.to_string(),
                other: other.to_string(),
                hint: "set it in one place (an axis replaces the top-level value)".into(),
            },
        )
    }

    fn missing(&self, key: &str, what: &str) -> PlanError {
        PlanError::new(
            Place::Key {
                file: self.src.path.clone(),
                key: key.to_string(),
            },
            PlanErrorKind::Missing(what.to_string()),
        )
    }

    fn line_of(&self, span: Range<usize>) -> u32 {
        super::source::line_col(&self.src.text, span.start).0
    }
}

/// `lcm-lora-sdv1-5.safetensors` → `lcm-lora-sdv1-5`; `dir/foxes.toml` → `foxes`.
fn file_stem(path: &str) -> &str {
    let base = path.rsplit(['/', '\\']).next().unwrap_or(path);
    match base.rfind('.') {
        Some(i) if i > 0 => &base[..i],
        _ => base,
    }
}

/// A key as it would be written in a TOML path: bare if it can be, quoted otherwise.
fn quote_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

fn kind_of(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn number(v: &toml::Value) -> Result<f64, String> {
    match v {
        toml::Value::Float(f) => Ok(*f),
        toml::Value::Integer(i) => Ok(*i as f64),
        other => Err(format!("expected a number, found {}", kind_of(other))),
    }
}

fn integer(v: &toml::Value) -> Result<i64, String> {
    match v {
        toml::Value::Integer(i) => Ok(*i),
        other => Err(format!("expected an integer, found {}", kind_of(other))),
    }
}

fn string(v: &toml::Value) -> Result<&str, String> {
    match v {
        toml::Value::String(s) => Ok(s),
        other => Err(format!("expected a string, found {}", kind_of(other))),
    }
}

fn sampler(s: &str) -> Result<Sampler, String> {
    match s {
        "lcm" => Ok(Sampler::Lcm),
        "euler_a" => Ok(Sampler::EulerA),
        other => Err(format!(
            "unknown sampler `{other}` (samplers: lcm, euler_a)"
        )),
    }
}

fn steps(v: i64) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(s) if (1..=150).contains(&s) => Ok(s),
        _ => Err(format!("{v} is outside 1..=150")),
    }
}

fn cfg(v: f64) -> Result<f32, String> {
    if v.is_finite() && (0.0..=30.0).contains(&v) {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside 0..=30"))
    }
}

fn strength(v: f64) -> Result<f32, String> {
    if v.is_finite() && v.abs() <= 100.0 {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside -100..=100"))
    }
}

fn dimension(v: i64) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(d) if (64..=4096).contains(&d) && d % 8 == 0 => Ok(d),
        _ => Err(format!("{v} must be a multiple of 8 in 64..=4096")),
    }
}

/// `"512x768"` → (512, 768).
fn size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not WIDTHxHEIGHT, e.g. \"512x768\"");
    let (w, h) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let w: i64 = w.trim().parse().map_err(|_| bad())?;
    let h: i64 = h.trim().parse().map_err(|_| bad())?;
    Ok((dimension(w)?, dimension(h)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<Settings, PlanError> {
        let src = SweepSource::new("s.toml", text)
            .with_file("w.txt", "a\n# c\nb\n")
            .with_file("p.txt", "one\n\ntwo\n");
        resolve(parse_file(&src)?, &src, 1 << 20)
    }

    fn err(text: &str) -> String {
        settings(text).unwrap_err().to_string()
    }

    const BASE: &str = "model = \"m\"\nprompt = \"p\"\nseeds = [1]\n";

    #[test]
    fn defaults_and_top_level_values() {
        let s = settings(BASE).unwrap();
        assert_eq!(s.name, "s");
        assert_eq!((s.base.steps, s.base.cfg, s.base.width), (4, 1.0, 512));
        let s = settings(&format!(
            "{BASE}size = \"512x768\"\nsampler = \"euler_a\"\nsteps = 20\ncfg = 7\n"
        ))
        .unwrap();
        assert_eq!((s.base.width, s.base.height), (512, 768));
        assert_eq!(
            (s.base.sampler, s.base.steps, s.base.cfg),
            (Sampler::EulerA, 20, 7.0)
        );
    }

    #[test]
    fn axes_keep_file_order_and_bindings() {
        let s = settings(&format!(
            "{BASE}[[loras]]\npath = \"x/lcm.safetensors\"\n[axes]\nsteps = [4, 8]\ncfg = [1, 1.5]\n\"lora.lcm.strength\" = [0.5]\nsize = [\"512x768\"]\n"
        ))
        .unwrap();
        let names: Vec<_> = s.axes.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["steps", "cfg", "lora.lcm.strength", "size"]);
        let b: Vec<_> = s.axes[1]
            .values
            .iter()
            .map(|v| v.binding.as_str())
            .collect();
        assert_eq!(b, ["1.0", "1.5"]);
        assert_eq!(s.axes[2].values[0].binding, "0.5");
        assert_eq!(s.axes[3].values[0].binding, "512x768");
    }

    #[test]
    fn prompts_file_lines_are_bound() {
        let s = settings("model = \"m\"\nprompts = \"p.txt\"\nseeds = [1]\n").unwrap();
        let p: Vec<_> = s
            .prompts
            .iter()
            .map(|p| (p.text.as_str(), p.binding.clone()))
            .collect();
        assert_eq!(p[1].0, "two");
        assert_eq!(p[1].1, Some(("prompts.line".into(), "3".into())));
    }

    #[test]
    fn errors_name_their_place() {
        assert_eq!(
            err(&format!("{BASE}colour = 1\n")),
            "s.toml:4:1: unknown field `colour`, expected one of `name`, `model`, `loras`, `sampler`, `steps`, `cfg`, `width`, `height`, `size`, `negative_prompt`, `prompt`, `prompts`, `seeds`, `wildcards`, `axes`, `min_memory_mib`"
        );
        assert_eq!(
            err(&format!("{BASE}steps = \"4\"\n")),
            "s.toml:4:9: invalid type: string \"4\", expected i64"
        );
        assert_eq!(
            err(&format!("{BASE}steps = 0\n")),
            "s.toml:4:9: steps: 0 is outside 1..=150"
        );
        assert_eq!(
            err(&format!("{BASE}[axes]\ncfg = [1.0, \"x\"]\n")),
            "s.toml:5:13: axes.cfg[1]: expected a number, found a string"
        );
        assert_eq!(
            err(&format!("{BASE}cfg = 2\n[axes]\ncfg = [1.0]\n")),
            "s.toml:6:1: `axes.cfg` conflicts with `cfg`: set it in one place (an axis replaces the top-level value)"
        );
        assert!(
            err(&format!("{BASE}[axes]\nseed = [1]\n"))
                .starts_with("s.toml:5:1: axes.seed: seeds are not an axis")
        );
        assert!(
            err(&format!("{BASE}[axes]\nclip_skip = [1]\n"))
                .starts_with("s.toml:5:1: unknown axis `clip_skip`")
        );
        assert!(
            err(&format!("{BASE}[axes]\n\"lora.x.strength\" = [1]\n"))
                .contains("no LoRA has the id `x` (ids: none)")
        );
        assert_eq!(
            err(&format!("{BASE}[axes]\ncfg = []\n")),
            "s.toml:5:7: axes.cfg: the list is empty"
        );
        assert_eq!(
            err("prompt = \"p\"\nseeds = [1]\n"),
            "s.toml: model: missing: model (a file name or path, or axes.model)"
        );
        assert!(err("model = \"m\"\nprompt = \"p\"\n").starts_with("s.toml: seeds: missing"));
        assert_eq!(
            err(&format!("{BASE}[wildcards]\nanimal = \"animals.txt\"\n")),
            "s.toml:5:10: `animals.txt` was not sent with the sweep (the client must send every referenced file)"
        );
        assert_eq!(
            err(&format!("{BASE}[wildcards]\n_x = [\"a\"]\n"))
                .split(':')
                .take(3)
                .collect::<Vec<_>>(),
            ["s.toml", "5", "1"]
        );
        assert!(
            err(&format!("{BASE}size = \"512\"\n"))
                .starts_with("s.toml:4:8: size: `512` is not WIDTHxHEIGHT")
        );
        assert!(
            err(&format!("{BASE}size = \"512x512\"\nwidth = 512\n"))
                .contains("`size` conflicts with `width`")
        );
        assert!(
            err("model = \"m\"\nprompt = \"p\"\nseeds = { from = 1 }\n")
                .starts_with("s.toml:3:9: seeds: give either")
        );
        assert!(
            err("model = \"m\"\nprompt = \"p\"\nseeds = { random = 1, x = 2 }\n")
                .contains("unknown field `x`")
        );
        assert!(
            err(&format!("{BASE}[[loras]]\nstrength = 1\n"))
                .contains("missing: loras[0].name (or loras[0].path)")
        );
    }

    #[test]
    fn file_too_large() {
        let src = SweepSource::new("s.toml", format!("{BASE}[wildcards]\nw = \"w.txt\"\n"))
            .with_file("w.txt", "x".repeat(100));
        let e = resolve(parse_file(&src).unwrap(), &src, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "w.txt: 100 bytes, more than the limit of 10 bytes"
        );
        assert!(e.is_limit());
    }

    #[test]
    fn stems() {
        assert_eq!(
            file_stem("a/b/lcm-lora-sdv1-5.safetensors"),
            "lcm-lora-sdv1-5"
        );
        assert_eq!(file_stem(r"c:\x\foxes.toml"), "foxes");
        assert_eq!(file_stem(".hidden"), ".hidden");
    }
}
