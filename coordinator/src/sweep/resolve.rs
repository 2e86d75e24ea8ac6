//! Resolution of a parsed sweep file into [`Settings`]: the base render, the axes in nesting
//! order (see [`axis`](super::axis)), the prompt templates' texts and the wildcard values,
//! every value checked with its place, and the referenced files looked up (never read from
//! disk: the client sent them).

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;

use kiln_proto::sampler::SamplerName;

use super::axis::Axis;
use super::cell::{CellSpec, LoraSpec, MAX_REF_BYTES};
use super::error::{Place, PlanError, PlanErrorKind};
use super::resolver::{PromptText, Resolver, quote_key};
use super::source::{Origin, SweepSource, list_lines};
use super::spec::{LoraEntry, SeedsSpec, SweepFile, WildcardSource};
use super::template::is_wildcard_name;
use super::values::{
    cfg, clip_skip, dimension, eta, rng, sampler, size, steps, strength, subseed, subseed_strength,
};

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
            sampler: SamplerName::LCM,
            width: DEFAULT_SIZE,
            height: DEFAULT_SIZE,
            rng: "cpu".into(),
            bindings: BTreeMap::new(),
            min_memory_mib: f.min_memory_mib.as_ref().map_or(0, |m| *m.get_ref()),
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
        };
        base.hires = self.hires(&f)?;
        base.init = self.init(&f)?;
        if let Some(m) = &f.model {
            self.check_text("model", m, MAX_REF_BYTES)?;
            base.model.clone_from(m.get_ref());
        }
        if let Some(v) = &f.vae {
            self.check_text("vae", v, MAX_REF_BYTES)?;
            base.vae.clone_from(v.get_ref());
        }
        if let Some(c) = &f.clip_skip {
            base.clip_skip = self.val(c.span(), "clip_skip", clip_skip(*c.get_ref()))?;
        }
        if let Some(s) = &f.sampler {
            base.sampler = self.val(s.span(), "sampler", sampler(s.get_ref()))?;
        }
        if let Some(s) = &f.subseed {
            base.subseed = self.val(s.span(), "subseed", subseed(*s.get_ref()))?;
        }
        if let Some(s) = &f.subseed_strength {
            base.subseed_strength =
                self.val(s.span(), "subseed_strength", subseed_strength(*s.get_ref()))?;
        }
        if let Some(s) = &f.eta {
            base.eta = Some(self.val(s.span(), "eta", eta(*s.get_ref()))?);
        }
        if let Some(s) = &f.seed_resize_from {
            base.seed_resize_from =
                Some(self.val(s.span(), "seed_resize_from", size(s.get_ref()))?);
        }
        if let Some(r) = &f.rng {
            rng(r.get_ref())
                .map(|r| r.clone_into(&mut base.rng))
                .map_err(|m| self.invalid(r.span(), "rng", &m))?;
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

    pub(super) fn check_text(
        &self,
        key: &str,
        v: &Spanned<String>,
        max: usize,
    ) -> Result<(), PlanError> {
        if v.get_ref().trim().is_empty() || v.get_ref().len() > max {
            return Err(self.invalid(v.span(), key, &format!("must be 1..={max} bytes")));
        }
        Ok(())
    }

    pub(super) fn val<T>(
        &self,
        span: Range<usize>,
        key: &str,
        r: Result<T, String>,
    ) -> Result<T, PlanError> {
        r.map_err(|m| self.invalid(span, key, &m))
    }

    pub(super) fn invalid(&self, span: Range<usize>, key: &str, message: &str) -> PlanError {
        PlanError::new(
            self.src.place_of(&span),
            PlanErrorKind::Invalid {
                key: key.to_string(),
                message: message.to_string(),
            },
        )
    }

    pub(super) fn conflict(&self, span: Range<usize>, key: &str, other: &str) -> PlanError {
        PlanError::new(
            self.src.place_of(&span),
            PlanErrorKind::Conflict {
                key: key.to_string(),
                other: other.to_string(),
                hint: "set it in one place (an axis replaces the top-level value)".into(),
            },
        )
    }

    pub(super) fn missing(&self, key: &str, what: &str) -> PlanError {
        PlanError::new(
            Place::Key {
                file: self.src.path.clone(),
                key: key.to_string(),
            },
            PlanErrorKind::Missing(what.to_string()),
        )
    }

    pub(super) fn line_of(&self, span: Range<usize>) -> u32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::spec::parse_file;

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
            ("euler_a".parse::<SamplerName>().unwrap(), 20, 7.0)
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
            "s.toml:4:1: unknown field `colour`, expected one of `name`, `model`, `loras`, `sampler`, `steps`, `cfg`, `width`, `height`, `size`, `negative_prompt`, `prompt`, `prompts`, `seeds`, `wildcards`, `axes`, `min_memory_mib`, `vae`, `clip_skip`, `subseed`, `subseed_strength`, `seed_resize_from`, `rng`, `hires_scale`, `hires_size`, `hires_upscaler`, `hires_steps`, `hires_denoise`, `hires_sampler`, `eta`, `init_image`, `strength`"
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
            err(&format!("{BASE}[axes]\ndenoise = [1]\n"))
                .starts_with("s.toml:5:1: unknown axis `denoise`")
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
    fn samplers_and_variation_seeds() {
        let s = settings(&format!(
            "{BASE}sampler = \"DPM++ 2S a Karras\"\nsubseed = 77\nsubseed_strength = 0.25\nseed_resize_from = \"512x768\"\nrng = \"nv\"\n"
        ))
        .unwrap();
        assert_eq!(s.base.sampler.as_str(), "dpmpp_2s_a_karras");
        assert_eq!(
            (
                s.base.subseed,
                s.base.subseed_strength,
                s.base.seed_resize_from
            ),
            (77, 0.25, Some((512, 768)))
        );
        assert_eq!(s.base.rng, "nv");
        let e = err(&format!("{BASE}sampler = \"plms\"\n"));
        assert!(
            e.starts_with("s.toml:4:11: sampler: unknown sampler `plms` (samplers: lcm, "),
            "{e}"
        );
        assert!(e.contains("dpmpp_2m_karras"), "{e}");
        assert_eq!(
            err(&format!("{BASE}subseed_strength = 1.5\n")),
            "s.toml:4:20: subseed_strength: 1.5 is outside 0..=1"
        );
        assert_eq!(
            err(&format!("{BASE}[axes]\nsubseed_strength = [0.5, -0.1]\n")),
            "s.toml:5:26: axes.subseed_strength[1]: -0.1 is outside 0..=1"
        );
        assert_eq!(
            err(&format!("{BASE}seed_resize_from = \"500x512\"\n")),
            "s.toml:4:20: seed_resize_from: 500 must be a multiple of 8 in 64..=4096"
        );
        assert!(
            err(&format!("{BASE}seed_resize_from = \"big\"\n"))
                .starts_with("s.toml:4:20: seed_resize_from: `big` is not WIDTHxHEIGHT")
        );
        assert_eq!(
            err(&format!("{BASE}rng = \"gpu\"\n")),
            "s.toml:4:7: rng: unknown noise source `gpu` (rng: cpu, nv)"
        );
        assert_eq!(
            err(&format!("{BASE}subseed = -1\n")),
            "s.toml:4:11: subseed: -1 is outside 0..=2^63-1"
        );
        assert!(
            err(&format!("{BASE}rng = \"cpu\"\n[axes]\nrng = [\"nv\"]\n"))
                .contains("`axes.rng` conflicts with `rng`")
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
