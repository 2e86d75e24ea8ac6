//! Planning: a sweep file (with its referenced files) → numbered [`CellSpec`]s, every seed
//! fixed. [`plan`] is a pure function of its inputs: the same source, limits and random seed
//! give the same cells in the same order.
//!
//! # Cell order
//! Axes in file order, the first one outermost (the slowest to change); then the prompt
//! (the lines of a `prompts` file, then each template's variants, see
//! [`template`](super::template)); then seeds, innermost. Consecutive cells therefore share
//! model, LoRA stack, size and prompt and differ in seed — easy to batch.
//!
//! # Bindings
//! Each cell records its choices as string key/values:
//! - each axis under its name, the value in canonical form: `cfg = "1.5"`, `steps = "8"`,
//!   `sampler = "euler_a"`, `size = "512x768"`, `width = "512"`, `model = "<as written>"`,
//!   `lora.<id>.strength = "0.5"`; the text axes record the 1-based position of the value:
//!   `prompt.index = "2"`, `negative_prompt.index = "1"`;
//! - a `prompts` file line as `prompts.line = "<line number in the file>"`;
//! - template choices as [`template`](super::template) describes (`alt1`, named lists,
//!   wildcard names, `animal.alt1`, `animal.2`, …).
//!
//! If a template key equals an axis key, the template's gets the next free `.N` suffix.
//! Seeds are not bindings: each cell's seed is a column of its own.
//!
//! # Identity
//! Identical renders (same `cell_key`, e.g. `{a|a}` or a repeated seed) are planned once; the
//! first wins and [`Plan::duplicates`] counts the rest. Extending a sweep — more seeds, more
//! axis values, more wildcard lines, more prompt lines, more options in a list — plans a
//! superset whose old cells have the same keys, so a resubmission adds only the missing cells.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::axis::Setter;
use super::cell::{CellSpec, PlannedCell};
use super::error::{Place, PlanError, PlanErrorKind};
use super::resolve::{self, Settings};
use super::seeds;
use super::source::SweepSource;
use super::spec;
use super::template::{Grammar, Template};
use super::wildcard::{WildcardValue, Wildcards};

/// Limits on what a sweep file may expand to. Every limit is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// Most cells in one sweep (default 1,000,000), counted before expansion.
    pub max_cells: u64,
    /// Most nesting levels of `{…}` alternatives (default 8).
    pub max_nesting: usize,
    /// Most levels of wildcards inside wildcard values (default 8).
    pub max_wildcard_depth: usize,
    /// Largest sweep file, bytes (default 1 MiB).
    pub max_sweep_bytes: usize,
    /// Largest referenced file (wildcards, prompts), bytes (default 16 MiB).
    pub max_file_bytes: usize,
}

impl Default for PlanLimits {
    fn default() -> Self {
        Self {
            max_cells: 1_000_000,
            max_nesting: 8,
            max_wildcard_depth: 8,
            max_sweep_bytes: 1 << 20,
            max_file_bytes: 16 << 20,
        }
    }
}

/// A planned sweep: its cells in order, numbered by position.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The sweep's name (`name`, or the sweep file's stem).
    pub name: String,
    /// The cells, checked, distinct and keyed; cell N is `cells[N]`.
    pub cells: Vec<PlannedCell>,
    /// The seeds every prompt is rendered with, in order (random seeds as drawn).
    pub seeds: Vec<u64>,
    /// Axis names, outermost first.
    pub axes: Vec<String>,
    /// Cells left out because an earlier cell has the same `cell_key`.
    pub duplicates: u64,
}

/// What planning says of a sweep besides its cells ([`plan_into`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSummary {
    /// The sweep's name (`name`, or the sweep file's stem).
    pub name: String,
    /// Distinct cells made.
    pub cell_count: u64,
    /// The seeds every prompt is rendered with, in order (random seeds as drawn).
    pub seeds: Vec<u64>,
    /// Axis names, outermost first.
    pub axes: Vec<String>,
    /// Cells left out because an earlier cell has the same `cell_key`.
    pub duplicates: u64,
}

/// A taker of planned cells, in order; an error stops the plan.
pub type CellSink<'a> = &'a mut dyn FnMut(PlannedCell) -> Result<(), PlanError>;

/// Plans a sweep. `random_seed` feeds `seeds = { random = N }` only; the caller picks it
/// once per sweep and keeps it (e.g. with the stored sweep) so that re-planning or extending
/// the sweep draws the same seeds. Holds every cell: for previews and tests; a submit streams
/// them ([`plan_into`]).
pub fn plan(src: &SweepSource, limits: &PlanLimits, random_seed: u64) -> Result<Plan, PlanError> {
    let mut cells = Vec::new();
    let s = plan_into(src, limits, random_seed, &mut |c| {
        cells.push(c);
        Ok(())
    })?;
    Ok(Plan {
        name: s.name,
        cells,
        seeds: s.seeds,
        axes: s.axes,
        duplicates: s.duplicates,
    })
}

/// Plans a sweep as [`plan`] does, handing each distinct, checked cell to `sink` as it is
/// made, so a sweep is never held whole: what is kept is the sink's business, and a 32-byte
/// digest per cell to drop repeats.
pub fn plan_into(
    src: &SweepSource,
    limits: &PlanLimits,
    random_seed: u64,
    sink: CellSink<'_>,
) -> Result<PlanSummary, PlanError> {
    let settings = settings(src, limits)?;
    let wildcards = parse_wildcards(&settings, src, limits)?;
    let grammar = Grammar {
        wildcards: &wildcards.0,
        max_nesting: limits.max_nesting,
    };
    let wildcards = wildcards.1;
    let templates = settings
        .prompts
        .iter()
        .map(|p| Template::parse(p.text.clone(), &p.origin, src, &grammar))
        .collect::<Result<Vec<_>, _>>()?;
    let seeds = seeds::resolve(&settings.seeds, src, random_seed, limits.max_cells)?;
    check_count(&settings, &templates, &wildcards, seeds.len(), src, limits)?;
    let mut cells = Cells {
        sink,
        models: &src.models,
        count: 0,
        seen: HashSet::new(),
        duplicates: 0,
    };
    Expansion {
        settings: &settings,
        templates: &templates,
        wildcards: &wildcards,
        seeds: &seeds,
    }
    .run(&mut cells)?;
    Ok(PlanSummary {
        name: settings.name,
        cell_count: cells.count,
        seeds,
        axes: settings.axes.iter().map(|a| a.name.clone()).collect(),
        duplicates: cells.duplicates,
    })
}

/// The files a sweep file references (wildcard files, then the prompts file), as written;
/// the client sends each one along with the sweep.
pub fn referenced_files(path: &str, text: &str) -> Result<Vec<String>, PlanError> {
    let src = SweepSource::new(path, text);
    let file = spec::parse_file(&src)?;
    Ok(file.referenced_files())
}

/// The references a sweep file may pin to the model registry (`model`, `vae`, `[[loras]]`
/// names, `model`/`vae` axis values), as written; the coordinator looks each one up at submit.
pub fn referenced_models(path: &str, text: &str) -> Result<Vec<String>, PlanError> {
    let src = SweepSource::new(path, text);
    let file = spec::parse_file(&src)?;
    Ok(file.referenced_models())
}

/// The pictures a sweep file references (`init_image`, top level and axis values), as
/// written; the client uploads each one and sends its sha256 along with the sweep.
pub fn referenced_images(path: &str, text: &str) -> Result<Vec<String>, PlanError> {
    let src = SweepSource::new(path, text);
    let file = spec::parse_file(&src)?;
    Ok(file.referenced_images())
}

fn settings(src: &SweepSource, limits: &PlanLimits) -> Result<Settings, PlanError> {
    if src.text.len() > limits.max_sweep_bytes {
        return Err(PlanError::new(
            Place::File {
                file: src.path.clone(),
            },
            PlanErrorKind::FileTooLarge {
                bytes: src.text.len(),
                limit: limits.max_sweep_bytes,
            },
        ));
    }
    let file = spec::parse_file(src)?;
    resolve::resolve(file, src, limits.max_file_bytes)
}

fn parse_wildcards(
    settings: &Settings,
    src: &SweepSource,
    limits: &PlanLimits,
) -> Result<(BTreeSet<String>, Wildcards), PlanError> {
    let names: BTreeSet<String> = settings.wildcards.iter().map(|w| w.name.clone()).collect();
    let grammar = Grammar {
        wildcards: &names,
        max_nesting: limits.max_nesting,
    };
    let mut wildcards = Wildcards::default();
    for w in &settings.wildcards {
        let values = w
            .values
            .iter()
            .map(|(text, origin)| {
                Ok(WildcardValue {
                    template: Template::parse(text.clone(), origin, src, &grammar)?,
                    origin: origin.clone(),
                })
            })
            .collect::<Result<Vec<_>, PlanError>>()?;
        wildcards.insert(w.name.clone(), values);
    }
    wildcards.check(src, limits.max_wildcard_depth)?;
    Ok((names, wildcards))
}

/// Rejects a sweep over the cell limit before anything is expanded.
fn check_count(
    settings: &Settings,
    templates: &[Template],
    wildcards: &Wildcards,
    seeds: usize,
    src: &SweepSource,
    limits: &PlanLimits,
) -> Result<(), PlanError> {
    let mut count = templates
        .iter()
        .fold(0u128, |s, t| s.saturating_add(t.count(wildcards.counts())));
    for axis in settings.axes.iter().filter(|a| a.name != "prompt") {
        count = count.saturating_mul(axis.values.len() as u128);
    }
    count = count.saturating_mul(seeds as u128);
    if count > u128::from(limits.max_cells) {
        return Err(PlanError::new(
            Place::File {
                file: src.path.clone(),
            },
            PlanErrorKind::TooManyCells {
                count: if count == u128::MAX {
                    "more than 2^128".into()
                } else {
                    count.to_string()
                },
                limit: limits.max_cells,
            },
        ));
    }
    Ok(())
}

/// The nested loops that produce the cells.
struct Expansion<'a> {
    settings: &'a Settings,
    /// The prompt templates, expanded afresh for each combination of axis values (one variant
    /// at a time, never all of them held).
    templates: &'a [Template],
    wildcards: &'a Wildcards,
    seeds: &'a [u64],
}

impl Expansion<'_> {
    fn run(&self, out: &mut Cells<'_>) -> Result<(), PlanError> {
        let axes = &self.settings.axes;
        let mut index = vec![0usize; axes.len()];
        loop {
            self.combination(&index, out)?;
            // Odometer: the last axis turns fastest.
            let mut i = axes.len();
            loop {
                if i == 0 {
                    return Ok(());
                }
                i -= 1;
                index[i] += 1;
                if index[i] < axes[i].values.len() {
                    break;
                }
                index[i] = 0;
            }
        }
    }

    /// The cells of one combination of axis values.
    fn combination(&self, index: &[usize], out: &mut Cells<'_>) -> Result<(), PlanError> {
        let mut base = self.settings.base.clone();
        let mut prompt = None;
        for (axis, &i) in self.settings.axes.iter().zip(index) {
            let value = &axis.values[i];
            value.set.apply(&mut base);
            if let Setter::Prompt(p) = value.set {
                prompt = Some(p);
            }
            base.bindings
                .insert(axis.binding_key.clone(), value.binding.clone());
        }
        let prompts: Vec<usize> = match prompt {
            Some(p) => vec![p],
            None if !self.settings.prompt_axis => (0..self.templates.len()).collect(),
            None => Vec::new(),
        };
        for p in prompts {
            let mut with_prompt = base.clone();
            if let Some((k, v)) = &self.settings.prompts[p].binding {
                bind(&mut with_prompt.bindings, k, v);
            }
            self.templates[p].each_variant(self.wildcards, &mut |variant| {
                let mut cell = with_prompt.clone();
                cell.prompt.clone_from(&variant.text);
                for (k, v) in &variant.bindings {
                    bind(&mut cell.bindings, k, v);
                }
                // `<lora:name:w>` in the prompt: queryable as `lora.<name>` (the UNet strength).
                for lora in cell.prompt_loras() {
                    bind(
                        &mut cell.bindings,
                        &format!("lora.{}", lora.name),
                        &lora.unet.to_string(),
                    );
                }
                for &seed in self.seeds {
                    let mut c = cell.clone();
                    c.seed = seed;
                    out.push(c)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// The planned cells on their way to the sink, identical renders dropped as they come.
struct Cells<'a> {
    sink: CellSink<'a>,
    /// Registry references and the hashes they are pinned to.
    models: &'a BTreeMap<String, String>,
    count: u64,
    /// Identity digests of the cells so far.
    seen: HashSet<[u8; 32]>,
    duplicates: u64,
}

impl Cells<'_> {
    fn push(&mut self, mut cell: CellSpec) -> Result<(), PlanError> {
        super::pins::pin(&mut cell, self.models);
        let digest = cell.cell_digest();
        if !self.seen.insert(digest) {
            self.duplicates += 1;
            return Ok(());
        }
        cell.validate().map_err(|e| {
            PlanError::new(
                Place::Cell { number: self.count },
                PlanErrorKind::InvalidCell(e.to_string()),
            )
        })?;
        self.count += 1;
        (self.sink)(PlannedCell {
            spec: cell,
            cell_key: hex::encode(digest),
        })
    }
}

/// Inserts a binding; a key already taken gets the next free `.N` suffix.
fn bind(bindings: &mut BTreeMap<String, String>, key: &str, value: &str) {
    let mut k = key.to_string();
    let mut n = 1;
    while bindings.contains_key(&k) {
        n += 1;
        k = format!("{key}.{n}");
    }
    bindings.insert(k, value.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::sampler::SamplerName;

    fn run(src: &SweepSource) -> Result<Plan, PlanError> {
        plan(src, &PlanLimits::default(), 7)
    }

    fn b(cell: &CellSpec) -> Vec<(&str, &str)> {
        cell.bindings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn counts_order_and_bindings() {
        let src = SweepSource::new(
            "s.toml",
            r#"
model = "m"
prompt = "a {red|grey} __animal__"
seeds = [1, 2]
[[loras]]
name = "lcm.safetensors"
[wildcards]
animal = ["fox", "owl", "cat"]
[axes]
cfg = [1, 2]
"lora.lcm.strength" = [0.5, 1.0]
"#,
        );
        let p = run(&src).unwrap();
        assert_eq!(p.cells.len(), 2 * 2 * 2 * 3 * 2);
        assert_eq!(p.axes, ["cfg", "lora.lcm.strength"]);
        let c = &p.cells[0];
        assert_eq!((c.prompt.as_str(), c.seed, c.cfg), ("a red fox", 1, 1.0));
        assert_eq!(c.loras[0].strength, 0.5);
        assert_eq!(
            b(c),
            [
                ("alt1", "red"),
                ("animal", "fox"),
                ("cfg", "1.0"),
                ("lora.lcm.strength", "0.5")
            ]
        );
        assert_eq!(p.cells[1].seed, 2);
        assert_eq!(p.cells[2].prompt, "a red owl");
        let last = p.cells.last().unwrap();
        assert_eq!((last.prompt.as_str(), last.cfg), ("a grey cat", 2.0));
        assert_eq!(last.loras[0].strength, 1.0);
        assert_eq!(p, run(&src).unwrap());
    }

    #[test]
    fn prompt_axis_and_prompts_file() {
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nseeds = [1]\n[axes]\nsteps = [4, 8]\nprompt = [\"x {1|2}\", \"y\"]\nsampler = [\"lcm\", \"euler_a\"]\n",
        );
        let p = run(&src).unwrap();
        assert_eq!(p.cells.len(), 2 * 3 * 2);
        let got: Vec<_> = p.cells[..6]
            .iter()
            .map(|c| (c.prompt.as_str(), c.sampler.to_string()))
            .collect();
        let got: Vec<(&str, &str)> = got.iter().map(|(p, s)| (*p, s.as_str())).collect();
        assert_eq!(
            got,
            [
                ("x 1", "lcm"),
                ("x 2", "lcm"),
                ("x 1", "euler_a"),
                ("x 2", "euler_a"),
                ("y", "lcm"),
                ("y", "euler_a")
            ]
        );
        assert_eq!(p.cells[4].bindings["prompt.index"], "2");

        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompts = \"p.txt\"\nseeds = { from = 10, count = 3 }\n",
        )
        .with_file("p.txt", "# prompts\nfox\n\nowl {a|b}\n");
        let p = run(&src).unwrap();
        assert_eq!(p.cells.len(), 9);
        assert_eq!(p.seeds, [10, 11, 12]);
        assert_eq!(p.cells[3].prompt, "owl a");
        assert_eq!(b(&p.cells[3]), [("alt1", "a"), ("prompts.line", "4")]);
    }

    #[test]
    fn duplicates_are_planned_once() {
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"{a|a|b}\"\nseeds = [1, 1]\n",
        );
        let p = run(&src).unwrap();
        assert_eq!(p.cells.len(), 2);
        assert_eq!(p.duplicates, 4);
    }

    #[test]
    fn random_seeds_depend_only_on_the_rng_seed() {
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"p\"\nseeds = { random = 5 }\n",
        );
        let a = plan(&src, &PlanLimits::default(), 1).unwrap();
        assert_eq!(a.seeds.len(), 5);
        assert_eq!(a, plan(&src, &PlanLimits::default(), 1).unwrap());
        assert_ne!(
            a.seeds,
            plan(&src, &PlanLimits::default(), 2).unwrap().seeds
        );
    }

    #[test]
    fn cell_limit_is_checked_before_expansion() {
        let limits = PlanLimits {
            max_cells: 100,
            ..PlanLimits::default()
        };
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"{a|b}{a|b}{a|b}{a|b}{a|b}{a|b}\"\nseeds = [1]\n",
        );
        assert_eq!(plan(&src, &limits, 0).unwrap().cells.len(), 64);
        let src = SweepSource::new(
            "s.toml",
            format!(
                "model = \"m\"\nprompt = \"{}\"\nseeds = {{ from = 0, count = 100 }}\n",
                "{a|b}".repeat(200)
            ),
        );
        let e = plan(&src, &limits, 0).unwrap_err();
        assert!(e.is_limit());
        assert!(
            e.to_string()
                .starts_with("s.toml: the sweep expands to more than 2^128 cells"),
            "{e}"
        );
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"p\"\nseeds = { random = 101 }\n",
        );
        assert_eq!(
            plan(&src, &limits, 0).unwrap_err().to_string(),
            "s.toml:3:20: the sweep expands to 101 cells, more than the limit of 100"
        );
    }

    #[test]
    fn template_errors_point_into_the_toml() {
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nseeds = [1]\nprompt = \"a {b|c\"\n",
        );
        assert_eq!(
            run(&src).unwrap_err().to_string(),
            "s.toml:3:13: `{` is never closed"
        );
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nseeds = [1]\nprompt = \"a __x__\"\n[wildcards]\nx = \"x.txt\"\n",
        )
        .with_file("x.txt", "# c\nok\n  bad }\n");
        assert_eq!(
            run(&src).unwrap_err().to_string(),
            "x.txt:3:7: `}` without a matching `{` (write `\\}` for a literal brace)"
        );
    }

    #[test]
    fn prompt_loras_are_bindings_and_part_of_the_pipeline() {
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nseeds = [1]\nprompt = \"a (fox:1.2) <lora:{detail:0.7|detail:0.5:0.25}>\"\n",
        );
        let p = run(&src).unwrap();
        assert_eq!(p.cells.len(), 2);
        assert_eq!(
            b(&p.cells[0]),
            [("alt1", "detail:0.7"), ("lora.detail", "0.7")]
        );
        assert_eq!(
            b(&p.cells[1]),
            [("alt1", "detail:0.5:0.25"), ("lora.detail", "0.25")]
        );
        // Another prompt LoRA strength is another pipeline; the prompt text is kept whole.
        assert_ne!(p.cells[0].affinity_key(), p.cells[1].affinity_key());
        assert!(p.cells[0].prompt.ends_with("<lora:detail:0.7>"));
        let mut plain = p.cells[0].spec.clone();
        plain.prompt = "a (fox:1.2)".into();
        let mut other = plain.clone();
        other.prompt = "a fox".into();
        assert_eq!(plain.affinity_key(), other.affinity_key());
    }

    #[test]
    fn vae_and_clip_skip_as_settings_and_axes() {
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nseeds = [1]\nprompt = \"a fox\"\nvae = \"mse\"\n[axes]\nclip_skip = [1, 2]\n",
        );
        let p = run(&src).unwrap();
        let got: Vec<_> = p
            .cells
            .iter()
            .map(|c| (c.vae.as_str(), c.clip_skip, b(c)))
            .collect();
        assert_eq!(
            got,
            [
                ("mse", 1, vec![("clip_skip", "1")]),
                ("mse", 2, vec![("clip_skip", "2")])
            ]
        );
        // Another VAE is another pipeline; clip skip is not.
        let mut other = p.cells[0].spec.clone();
        other.vae = "other".into();
        assert_ne!(other.affinity_key(), p.cells[0].affinity_key());
        assert_eq!(p.cells[0].affinity_key(), p.cells[1].affinity_key());
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nseeds = [1]\nprompt = \"a\"\n[axes]\nvae = [\"a\", \"b\"]\nclip_skip = [5]\n",
        );
        let e = run(&src).unwrap_err().to_string();
        assert!(
            e.contains("s.toml:6:") && e.contains("outside 1..=4"),
            "{e}"
        );
    }

    #[test]
    fn a_prompt_a1111_cannot_read_is_refused_with_its_column() {
        let many = "<lora:x:1> ".repeat(17);
        for (prompt, says) in [
            ("a (fox", "`(` at column 3 is never closed"),
            ("a fox)", "`)` at column 6 closes nothing"),
            ("a <lora:x:abc>", "lora"),
            (
                many.as_str(),
                "17 LoRAs (17 of them <lora:…> tags in the prompt), at most 16",
            ),
        ] {
            let src = SweepSource::new(
                "s.toml",
                format!("model = \"m\"\nseeds = [1]\nprompt = \"{prompt}\"\n"),
            );
            let e = run(&src).unwrap_err().to_string();
            assert!(e.contains(says), "{prompt}: {e}");
        }
    }

    /// A sampler axis in A1111's and ComfyUI's spellings plans kiln's names, records them in
    /// the bindings, and the new noise settings work as axes.
    #[test]
    fn a1111_samplers_and_variation_seeds_as_axes() {
        let src = SweepSource::new(
            "s.toml",
            r#"
model = "m"
prompt = "p"
seeds = [1]
subseed = 9
[axes]
sampler = ["DPM++ 2S a Karras", "Euler a", "dpmpp_2m_karras", "euler_a_diffusers"]
subseed_strength = [0, 0.5]
seed_resize_from = ["512x768"]
rng = ["cpu", "nv"]
"#,
        );
        let p = run(&src).unwrap();
        assert_eq!(p.cells.len(), 4 * 2 * 2);
        let samplers: Vec<_> = p.cells.iter().step_by(4).map(|c| c.sampler).collect();
        let names: Vec<_> = samplers.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "dpmpp_2s_a_karras",
                "euler_a",
                "dpmpp_2m_karras",
                "euler_a_diffusers"
            ]
        );
        assert_eq!(samplers[3], SamplerName::EULER_A_DIFFUSERS);
        let c = &p.cells[3];
        assert_eq!(
            b(c),
            [
                ("rng", "nv"),
                ("sampler", "dpmpp_2s_a_karras"),
                ("seed_resize_from", "512x768"),
                ("subseed_strength", "0.5"),
            ]
        );
        assert_eq!(
            (
                c.subseed,
                c.subseed_strength,
                c.seed_resize_from,
                c.rng.as_str()
            ),
            (9, 0.5, Some((512, 768)), "nv")
        );
        assert_eq!(p.cells[0].render_level(), 1);

        let bad = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"p\"\nseeds = [1]\n[axes]\nsampler = [\"lcm\", \"PLMS\"]\n",
        );
        let e = run(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("s.toml:5:19: axes.sampler[1]: unknown sampler `PLMS` (samplers: lcm, "),
            "{e}"
        );
        assert!(e.contains("dpmpp_2s_a_karras"), "{e}");
    }

    /// A sweep that sets none of the new settings plans the cells (and keys) it did before.
    #[test]
    fn plain_sweeps_keep_their_cells() {
        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"p\"\nseeds = [1]\nsampler = \"euler_a_diffusers\"\n",
        );
        let p = run(&src).unwrap();
        let c = &p.cells[0];
        assert_eq!(
            (
                c.subseed,
                c.subseed_strength,
                c.seed_resize_from,
                c.rng.as_str()
            ),
            (0, 0.0, None, "cpu")
        );
        assert_eq!(c.render_level(), 0);
        let mut explicit = c.spec.clone();
        explicit.subseed = 0;
        explicit.subseed_strength = 0.0;
        explicit.seed_resize_from = None;
        assert_eq!(explicit.cell_key(), c.cell_key);
    }

    /// The hires fix as top-level keys and as axes: on when a scale or size is set, A1111's
    /// defaults, bindings recorded, and the errors a user can make.
    #[test]
    fn hires_keys_and_axes() {
        let src = SweepSource::new(
            "s.toml",
            r#"
model = "m"
prompt = "p"
seeds = [1]
size = "64x64"
sampler = "DPM++ 2S a Karras"
hires_scale = 1.5
hires_upscaler = "Latent (nearest)"
[axes]
hires_denoise = [0.3, 0.5]
hires_steps = [0, 2]
"#,
        );
        let p = run(&src).unwrap();
        assert_eq!(p.cells.len(), 4);
        let c = &p.cells[1];
        let h = c.hires.unwrap();
        assert_eq!(
            (h.scale, h.upscaler.as_str(), h.steps, h.denoise),
            (1.5, "latent_nearest", 2, 0.3)
        );
        assert_eq!(b(c), [("hires_denoise", "0.3"), ("hires_steps", "2")]);
        assert_eq!((c.final_size(), c.render_level()), ((96, 96), 1));

        let src = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"p\"\nseeds = [1]\nsampler = \"euler\"\n[axes]\nhires_size = [\"768x768\", \"1024x512\"]\nhires_sampler = [\"Euler a\"]\n",
        );
        let p = run(&src).unwrap();
        let h = p.cells[0].hires.unwrap();
        assert_eq!(
            (h.size, h.denoise, h.upscaler.as_str()),
            (Some((768, 768)), 0.7, "latent")
        );
        assert_eq!(p.cells[1].final_size(), (1024, 512));
        assert_eq!(
            b(&p.cells[1]),
            [("hires_sampler", "euler_a"), ("hires_size", "1024x512")]
        );

        let err = |body: &str| {
            let src = SweepSource::new(
                "s.toml",
                format!("model = \"m\"\nprompt = \"p\"\nseeds = [1]\n{body}"),
            );
            run(&src).unwrap_err().to_string()
        };
        assert_eq!(
            err("hires_denoise = 0.5\n"),
            "s.toml:4:17: hires_denoise: needs hires_scale or hires_size (the hires fix is on only when one of them is set)"
        );
        assert!(
            err("[axes]\nhires_steps = [1]\n")
                .starts_with("s.toml:5:1: axes.hires_steps: needs hires_scale")
        );
        assert!(err("hires_scale = 5\n").contains("hires_scale: 5 is outside 1..=4"));
        assert!(
            err("hires_scale = 2\nhires_denoise = 0\n")
                .contains("hires_denoise: 0 is outside (0, 1]")
        );
        assert!(
            err("hires_scale = 2\nhires_upscaler = \"ESRGAN\"\n")
                .contains("unknown hires upscaler `ESRGAN`")
        );
        assert!(
            err("hires_scale = 2\nhires_size = \"768x768\"\n")
                .contains("conflicts with `hires_scale`")
        );
        assert!(
            err("hires_scale = 2\n[axes]\nhires_size = [\"768x768\"]\n")
                .contains("conflicts with `hires_scale`")
        );
        assert!(
            err("hires_scale = 2\nhires_sampler = \"lcm\"\n")
                .contains("hires_sampler: `lcm` is not a k-diffusion sampler")
        );
        // LCM's first pass needs a hires sampler: the cell says so at submit time.
        let e = err("hires_scale = 2\n");
        assert!(
            e.starts_with("cell 0: ") && e.contains("hires_sampler: needed"),
            "{e}"
        );
    }

    #[test]
    fn invalid_cells_are_numbered() {
        let src = SweepSource::new(
            "s.toml",
            format!(
                "model = \"m\"\nseeds = [1]\nprompt = \"{{a|{}}}\"\n",
                "x".repeat(20_000)
            ),
        );
        let e = run(&src).unwrap_err();
        assert_eq!(e.place, Place::Cell { number: 1 });
    }

    #[test]
    fn referenced_files_lists_wildcard_and_prompt_files() {
        let files = referenced_files(
            "s.toml",
            "prompts = \"p.txt\"\n[wildcards]\na = \"w/a.txt\"\nb = [\"x\"]\n",
        )
        .unwrap();
        assert_eq!(files, ["w/a.txt", "p.txt"]);
    }
}
