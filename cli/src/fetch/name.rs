//! `kiln fetch --name PATTERN`: file names made from a cell's fields, as A1111's "images
//! filename pattern" (`[seed]-[prompt_words]`) and ComfyUI's `filename_prefix` do, in one
//! syntax: `{field}` or `{field:N}`, `/` (or `\`) between folders, `{{` and `}}` for braces.
//!
//! `{field:N}` fits a value to N: text (prompt, model, bindings …) keeps its first N characters
//! (graphemes: `é` with a combining accent is one), whole numbers are zero-padded to N digits,
//! so today's default names are the pattern `{sweep_id}-{number:6}-{seed}.png`.
//!
//! Every name this module makes is portable and stays inside the output folder:
//! - a value has runs of whitespace made one space, and `/ \ : * ? " < > |`, control
//!   characters and a value of only dots (`..`) replaced by `_` (`sanitize-filename`);
//! - the pattern's own text may not hold those characters, start with `/`, or have an empty,
//!   `.` or `..` folder: it is refused when parsed, before anything is fetched;
//! - each finished file or folder name is cut to 200 bytes, a folder loses trailing dots and
//!   spaces (Windows drops them), an empty name becomes `_`, and a name Windows reserves
//!   (`CON`, `NUL.png`, `com1` …) gets a leading `_`.
//!
//! Two cells given one name are `unique`'s business; this module only renders a cell's name.

use anyhow::bail;
use kiln_proto::v1 as pb;
use sanitize_filename::{Options, sanitize_with_options};
use unicode_segmentation::UnicodeSegmentation;

use crate::query::sampler_name;

/// Today's names, still the default: unique per cell.
pub const DEFAULT: &str = "{sweep_id}-{number:6}-{seed}.png";
/// The longest file or folder name made, in bytes, before `.png` and a `-N` suffix: under the
/// 255 bytes that ext4, NTFS and APFS allow.
const MAX_NAME_BYTES: usize = 200;
/// The largest N of `{field:N}`.
const MAX_WIDTH: usize = 200;
/// The file extension every name ends in (added when a pattern lacks it).
const EXT: &str = ".png";

/// The fields, as the help text and error messages list them.
pub const FIELDS: &str = "sweep, sweep_id, cell, number, seed, prompt, negative, model, cfg, \
                          steps, sampler, width, height, attempt, rating, b.NAME (a binding)";

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Sweep,
    SweepId,
    Cell,
    Number,
    Seed,
    Prompt,
    Negative,
    Model,
    Cfg,
    Steps,
    Sampler,
    Width,
    Height,
    Attempt,
    Rating,
    Binding(String),
}

impl Field {
    fn from_name(s: &str) -> Option<Field> {
        Some(match s {
            "sweep" => Field::Sweep,
            "sweep_id" => Field::SweepId,
            "cell" | "cell_id" | "id" => Field::Cell,
            "number" => Field::Number,
            "seed" => Field::Seed,
            "prompt" => Field::Prompt,
            "negative" | "negative_prompt" => Field::Negative,
            "model" | "model_name" => Field::Model,
            "cfg" => Field::Cfg,
            "steps" => Field::Steps,
            "sampler" => Field::Sampler,
            "width" => Field::Width,
            "height" => Field::Height,
            "attempt" => Field::Attempt,
            "rating" => Field::Rating,
            _ => Field::Binding(s.strip_prefix("b.").filter(|k| !k.is_empty())?.to_string()),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Value { field: Field, width: Option<usize> },
}

/// A parsed pattern: its path components (folders, then the file name), each a run of pieces.
#[derive(Debug)]
pub struct Pattern {
    parts: Vec<Vec<Piece>>,
}

/// What a name is made from: a cell and the name of its sweep.
pub struct Source<'a> {
    pub record: &'a pb::CellRecord,
    pub sweep_name: &'a str,
}

/// Characters no file name may hold on some system (beside `/` and `\`, which separate folders
/// in a pattern).
fn forbidden(c: char) -> bool {
    c.is_control() || matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|')
}

fn parse_field(spec: &str) -> anyhow::Result<Piece> {
    let (name, width) = match spec.rsplit_once(':') {
        Some((name, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            let width = n
                .parse::<usize>()
                .ok()
                .filter(|w| (1..=MAX_WIDTH).contains(w));
            let Some(width) = width else {
                bail!("{{{spec}}}: N must be 1 to {MAX_WIDTH}");
            };
            (name, Some(width))
        }
        _ => (spec, None),
    };
    let Some(field) = Field::from_name(name.trim()) else {
        bail!("unknown field {{{spec}}}; the fields are {FIELDS}");
    };
    Ok(Piece::Value { field, width })
}

impl std::str::FromStr for Pattern {
    type Err = anyhow::Error;

    fn from_str(pattern: &str) -> anyhow::Result<Self> {
        let mut parts: Vec<Vec<Piece>> = vec![Vec::new()];
        let text = |parts: &mut Vec<Vec<Piece>>, c: char| {
            let part = parts
                .last_mut()
                .expect("parts starts non-empty and only grows");
            match part.last_mut() {
                Some(Piece::Text(t)) => t.push(c),
                _ => part.push(Piece::Text(c.to_string())),
            }
        };
        let mut rest = pattern;
        while let Some(c) = rest.chars().next() {
            if let Some(r) = rest.strip_prefix("{{").or(rest.strip_prefix("}}")) {
                text(&mut parts, c);
                rest = r;
                continue;
            }
            rest = &rest[c.len_utf8()..];
            match c {
                '{' => {
                    let Some(end) = rest.find('}') else {
                        bail!("a `{{` without its `}}` (write `{{{{` for a brace)");
                    };
                    let piece = parse_field(&rest[..end])?;
                    parts.last_mut().expect("never empty").push(piece);
                    rest = &rest[end + 1..];
                }
                '}' => bail!("a `}}` without its `{{` (write `}}}}` for a brace)"),
                '/' | '\\' => parts.push(Vec::new()),
                c if forbidden(c) => {
                    bail!("{c:?} cannot be in a file name on every system (Windows refuses it)")
                }
                c => text(&mut parts, c),
            }
        }
        check_parts(pattern, &parts)?;
        let Some(Piece::Text(last)) = parts.last_mut().and_then(|p| p.last_mut()) else {
            parts
                .last_mut()
                .expect("never empty")
                .push(Piece::Text(EXT.into()));
            return Ok(Pattern { parts });
        };
        if !last.to_ascii_lowercase().ends_with(EXT) {
            last.push_str(EXT);
        }
        Ok(Pattern { parts })
    }
}

/// Refuses patterns that would leave the output folder or whose own text is no portable name.
fn check_parts(pattern: &str, parts: &[Vec<Piece>]) -> anyhow::Result<()> {
    let portable = Options {
        windows: true,
        truncate: false,
        replacement: "_",
    };
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            if pattern.trim().is_empty() {
                bail!("the pattern is empty");
            }
            if i == 0 {
                bail!("names are relative to the output folder (-o): no leading `/`");
            }
            bail!("an empty folder or file name (`//`, or a `/` at the end)");
        }
        let [Piece::Text(t)] = part.as_slice() else {
            continue;
        };
        if t == "." || t == ".." {
            bail!("`{t}` is not allowed: every file stays inside the output folder (-o)");
        }
        if sanitize_with_options(t, portable.clone()) != *t {
            bail!(
                "{t:?} is no file or folder name on every system (Windows reserves CON, PRN, \
                 AUX, NUL, COM1-9, LPT1-9, and names ending in a dot or a space)"
            );
        }
    }
    for piece in parts.iter().flatten() {
        if let Piece::Text(t) = piece
            && let Some(field) = a1111_field(t)
        {
            bail!("A1111's [{field}] is written {{{field}}} here");
        }
    }
    Ok(())
}

/// `seed` when text holds `[seed]` (or another field in A1111's brackets), a likely slip.
fn a1111_field(text: &str) -> Option<&str> {
    let start = text.find('[')?;
    let inner = &text[start + 1..start + 1 + text[start + 1..].find(']')?];
    Field::from_name(inner)
        .filter(|f| !matches!(f, Field::Binding(_)))
        .map(|_| inner)
}

/// The first `n` graphemes of `s`.
fn first_graphemes(s: &str, n: usize) -> &str {
    match s.grapheme_indices(true).nth(n) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// The longest prefix of `s` of whole graphemes within `max` bytes.
fn within_bytes(s: &str, max: usize) -> &str {
    let end = s
        .grapheme_indices(true)
        .map(|(i, g)| i + g.len())
        .take_while(|&end| end <= max)
        .last()
        .unwrap_or(0);
    &s[..end]
}

/// A model reference (`tiny-sd15`, `models/dream.safetensors`, `C:\sd\x.ckpt`) as its file or
/// folder name without extension. Split by hand on both separators: the reference may come
/// from a coordinator on another system than this one, so `std::path` would read it wrongly.
fn model_name(model: &str) -> &str {
    let base = model
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(model);
    [".safetensors", ".ckpt", ".pt", ".bin"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(base)
}

/// One field's value for `src`, fitted to `width` and made safe to put in a name.
fn value(field: &Field, width: Option<usize>, src: &Source) -> String {
    let r = src.record;
    let c = r.cell.clone().unwrap_or_default();
    let number = |n: u64| match width {
        Some(w) => format!("{n:0w$}"),
        None => n.to_string(),
    };
    let text = match field {
        Field::SweepId => return number(r.sweep_id),
        Field::Cell => return number(r.cell_id),
        Field::Number => return number(r.number.into()),
        Field::Seed => return number(c.seed),
        Field::Steps => return number(c.steps.into()),
        Field::Width => return number(c.width.into()),
        Field::Height => return number(c.height.into()),
        Field::Attempt => return number(r.attempt.into()),
        Field::Rating => return number(r.rating.into()),
        Field::Sweep if src.sweep_name.is_empty() => r.sweep_id.to_string(),
        Field::Sweep => src.sweep_name.to_string(),
        Field::Prompt => c.prompt,
        Field::Negative => c.negative_prompt,
        Field::Model => model_name(&c.model).to_string(),
        Field::Cfg => format!("{}", c.cfg),
        Field::Sampler => sampler_name(&c),
        Field::Binding(k) => c.bindings.get(k).cloned().unwrap_or_default(),
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = match width {
        Some(n) => first_graphemes(&text, n).trim_end(),
        None => &text,
    };
    let chars_only = Options {
        windows: false,
        truncate: false,
        replacement: "_",
    };
    sanitize_with_options(text, chars_only)
}

/// Whether Windows reserves `name` (`CON`, `nul.png`, `com1.x.png`): the rules
/// `sanitize-filename` applies for Windows alone change it. Its trailing-dot rule cannot
/// fire here: callers pass names that end in neither a dot nor a space.
fn reserved_on_windows(name: &str) -> bool {
    let opts = |windows| Options {
        windows,
        truncate: false,
        replacement: "_",
    };
    sanitize_with_options(name, opts(true)) != sanitize_with_options(name, opts(false))
}

/// A rendered file or folder name made final (see the module header).
fn finish(name: &str, is_file: bool) -> String {
    let (stem, ext) = match is_file {
        // The parser made every file name end in `.png`, any case.
        true => name.split_at(name.len() - EXT.len()),
        false => (name, ""),
    };
    let mut stem = within_bytes(stem, MAX_NAME_BYTES);
    if !is_file {
        stem = stem.trim_end_matches(['.', ' ']);
    }
    let mut out = format!("{}{ext}", if stem.is_empty() { "_" } else { stem });
    if reserved_on_windows(&out) {
        out.insert(0, '_');
    }
    out
}

impl Pattern {
    /// The names of `src`'s folders and file, in order; each one portable and none `.`, `..`,
    /// empty or holding a separator.
    pub fn render(&self, src: &Source) -> Vec<String> {
        let last = self.parts.len() - 1;
        let mut out = Vec::with_capacity(self.parts.len());
        for (i, pieces) in self.parts.iter().enumerate() {
            let mut name = String::new();
            for p in pieces {
                match p {
                    Piece::Text(t) => name.push_str(t),
                    Piece::Value { field, width } => name.push_str(&value(field, *width, src)),
                }
            }
            out.push(finish(&name, i == last));
        }
        out
    }

    /// The bindings the pattern names (`{b.animal}` → `animal`).
    pub fn bindings(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().flatten().filter_map(|p| match p {
            Piece::Value {
                field: Field::Binding(k),
                ..
            } => Some(k.as_str()),
            _ => None,
        })
    }

    /// Whether it names the sweep (`{sweep}`), whose name the cell records lack.
    pub fn uses_sweep_name(&self) -> bool {
        self.parts.iter().flatten().any(|p| {
            matches!(
                p,
                Piece::Value {
                    field: Field::Sweep,
                    ..
                }
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn record(prompt: &str, bindings: &[(&str, &str)]) -> pb::CellRecord {
        pb::CellRecord {
            cell_id: 412,
            sweep_id: 3,
            number: 17,
            attempt: 2,
            cell: Some(pb::RenderCell {
                model: "models/dream-v2.safetensors".into(),
                prompt: prompt.into(),
                negative_prompt: "blurry".into(),
                seed: 42,
                steps: 4,
                cfg: 1.5,
                sampler: pb::Sampler::EulerA as i32,
                width: 512,
                height: 768,
                bindings: bindings
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn name(pattern: &str, r: &pb::CellRecord) -> String {
        let p: Pattern = pattern.parse().unwrap();
        p.render(&Source {
            record: r,
            sweep_name: "foxes",
        })
        .join("/")
    }

    fn refused(pattern: &str) -> String {
        match pattern.parse::<Pattern>() {
            Ok(p) => panic!("{pattern:?} parsed: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_default_is_todays_naming() {
        let r = record("a fox", &[]);
        assert_eq!(name(DEFAULT, &r), "3-000017-42.png");
    }

    #[test]
    fn every_field_renders() {
        let r = record(
            "a red fox",
            &[("animal", "fox"), ("lora.lcm.strength", "0.8")],
        );
        assert_eq!(
            name(
                "{sweep}/{sweep_id}-{cell}-{number}-{seed}-{prompt}-{negative}-{model}-{cfg}-\
                 {steps}-{sampler}-{width}x{height}-{attempt}-{b.animal}-{b.lora.lcm.strength}",
                &r
            ),
            "foxes/3-412-17-42-a red fox-blurry-dream-v2-1.5-4-euler_a-512x768-2-fox-0.8.png"
        );
        // A keeper's stars (0: not rated).
        let rated = pb::CellRecord {
            rating: 4,
            ..r.clone()
        };
        assert_eq!(name("{rating}/{seed}", &rated), "4/42.png");
        assert_eq!(name("{rating}-{seed}", &r), "0-42.png");
        // Aliases A1111 and the filter language use.
        assert_eq!(
            name("{model_name}-{negative_prompt}", &r),
            "dream-v2-blurry.png"
        );
        // `.png` is kept when given, in any case, and added when not.
        assert_eq!(name("{seed}.PNG", &r), "42.PNG");
        assert_eq!(name("{seed}.jpg", &r), "42.jpg.png");
        // Literal braces.
        assert_eq!(name("{{{seed}}}", &r), "{42}.png");
    }

    #[test]
    fn n_cuts_text_at_grapheme_boundaries_and_pads_numbers() {
        let r = record("  a   red\tfox\nin a forest  ", &[]);
        assert_eq!(name("{prompt:9}", &r), "a red fox.png");
        // A cut that ends in a space drops it.
        assert_eq!(name("{prompt:6}-{seed}", &r), "a red-42.png");
        assert_eq!(name("{number:6}-{seed:2}-{seed:1}", &r), "000017-42-42.png");
        // Combining accents and multi-byte characters are never split.
        let r = record("e\u{301}te\u{301} 狐狸 🦊", &[]);
        assert_eq!(name("{prompt:2}", &r), "e\u{301}t.png");
        assert_eq!(name("{prompt:6}", &r), "e\u{301}te\u{301} 狐狸.png");
        assert_eq!(name("{prompt:8}", &r), "e\u{301}te\u{301} 狐狸 🦊.png");
        // Long names stop at 200 bytes, on a character boundary, before `.png`.
        let r = record(&"狐".repeat(300), &[]);
        let long = name("{prompt}", &r);
        assert_eq!(long.len(), 198 + 4, "66 three-byte characters + .png");
        assert!(long.ends_with("狐.png"));
    }

    #[test]
    fn values_are_made_portable() {
        let r = record(
            "a/b\\c:d*e?f\"g<h>i|j\u{7}k",
            &[("a", ".."), ("b", "con"), ("c", "x. "), ("d", "")],
        );
        assert_eq!(name("{prompt}", &r), "a_b_c_d_e_f_g_h_i_j_k.png");
        // A value can never make a separator or a `..` folder.
        assert_eq!(name("{b.a}/{seed}", &r), "_/42.png");
        assert_eq!(name("{b.a}{b.d}/{seed}", &r), "_/42.png");
        assert_eq!(name("..{b.d}x/{seed}", &r), "..x/42.png");
        // Reserved names get a leading `_`, made by a value or by joining values.
        assert_eq!(name("{b.b}/{b.b}", &r), "_con/_con.png");
        assert_eq!(name("{b.b}.{seed}", &r), "_con.42.png");
        assert_eq!(name("co{b.d}n1", &r), "con1.png");
        // Folders lose trailing dots and spaces; empty names become `_`.
        assert_eq!(name("{b.c}/{b.c}", &r), "x/x..png");
        assert_eq!(name("{b.d}/{b.d}", &r), "_/_.png");
        assert_eq!(name("{b.missing}-{seed}", &r), "-42.png");
    }

    #[test]
    fn patterns_that_would_escape_or_are_not_portable_are_refused() {
        assert!(refused("/etc/{seed}").contains("relative to the output folder"));
        assert!(refused("\\{seed}").contains("relative"));
        assert!(refused("../{seed}").contains("`..` is not allowed"));
        assert!(refused("a/../../{seed}").contains("`..` is not allowed"));
        assert!(refused("./{seed}").contains("`.` is not allowed"));
        assert!(refused("a//{seed}").contains("empty folder"));
        assert!(refused("{seed}/").contains("empty folder or file"));
        assert!(refused("").contains("empty"));
        assert!(refused("C:/{seed}").contains("':' cannot be in a file name"));
        assert!(refused("{seed}?").contains("'?'"));
        assert!(refused("nul/{seed}").contains("Windows reserves"));
        assert!(refused("a./{seed}").contains("ending in a dot"));
        assert!(refused("{colour}").contains("unknown field {colour}; the fields are sweep,"));
        assert!(refused("{b.}").contains("unknown field"));
        assert!(refused("{seed").contains("without its `}`"));
        assert!(refused("seed}").contains("without its `{`"));
        assert!(refused("{prompt:0}").contains("N must be 1 to 200"));
        assert!(refused("{prompt:999}").contains("N must be 1 to 200"));
        assert!(refused("[seed]-[prompt]").contains("A1111's [seed] is written {seed} here"));
        // Dots inside a name are fine; so are other brackets.
        assert!("..a/[x]{seed}".parse::<Pattern>().is_ok());
    }

    #[test]
    fn model_names_lose_folders_and_extensions_from_any_system() {
        assert_eq!(model_name("tiny-sd15"), "tiny-sd15");
        assert_eq!(model_name("models/dream.safetensors"), "dream");
        assert_eq!(model_name("C:\\sd\\models\\x.ckpt"), "x");
        assert_eq!(model_name("/srv/diffusers/sd15/"), "sd15");
    }

    #[test]
    fn bindings_and_sweep_use_are_reported() {
        let p: Pattern = "{sweep}/{b.animal}-{b.alt1}".parse().unwrap();
        assert_eq!(p.bindings().collect::<Vec<_>>(), ["animal", "alt1"]);
        assert!(p.uses_sweep_name());
        assert!(!DEFAULT.parse::<Pattern>().unwrap().uses_sweep_name());
    }
}
