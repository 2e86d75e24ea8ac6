//! The X/Y contact sheet shared by `kiln grid` and the web UI's X/Y view, like A1111's X/Y
//! plot: results laid out along one or two axes, each a binding (`animal`, `alt1`,
//! `lora.lcm.strength`) or a render parameter ([`PARAMS`]). This module owns choosing what goes
//! where — the values along each axis (numeric order when they all are numbers), which row each
//! tile shows, and refusing an axis no row has; [`sheet`] draws the labelled pixels (its text
//! through the private `font` module). No I/O: callers fetch the rows and images.
//!
//! The layout is generic over the row type: the CLI lays out `kiln_proto::v1::CellRecord`s, the
//! web UI [`CellSpec`]s ([`spec_value`]); each passes how to read an axis key from a row.
//! Several rows can fall on one tile (a grid of cfg × animal over three seeds): the tile shows
//! the first of them in the given order, and [`Layout`] counts the rest.

mod font;
pub mod sheet;

use image::codecs::png::PngEncoder;
pub use sheet::{Labels, RgbImage, compose};

use crate::sweep::CellSpec;

/// Render parameters usable as an axis, beside the bindings.
pub const PARAMS: [&str; 10] = [
    "seed", "cfg", "steps", "sampler", "model", "prompt", "negative", "width", "height", "size",
];

/// The label of a binding a row lacks.
pub const MISSING: &str = "-";

/// Distinct values, numeric order when all parse as numbers, else text order.
pub fn ordered(mut values: Vec<String>) -> Vec<String> {
    values.sort();
    values.dedup();
    if values.iter().all(|v| v.parse::<f64>().is_ok()) {
        values.sort_by(|a, b| {
            let (a, b) = (
                a.parse::<f64>().unwrap_or(0.0),
                b.parse::<f64>().unwrap_or(0.0),
            );
            a.total_cmp(&b)
        });
    }
    values
}

/// Where each row falls: `xs`/`ys` the ordered axis values (`ys == [""]` when there is no y
/// axis), `tiles[yi][xi]` the index into `rows` of the first row (in the given order) on that
/// tile, `hidden` how many rows fell on an already-filled tile, `counts[yi][xi]` how many rows
/// fell on each tile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Values along the x axis, in order.
    pub xs: Vec<String>,
    /// Values along the y axis, in order; `[""]` without a y axis.
    pub ys: Vec<String>,
    /// `tiles[yi][xi]`: index into the rows of the first row on the tile; `None`: empty (grey).
    pub tiles: Vec<Vec<Option<usize>>>,
    /// `counts[yi][xi]`: how many rows fell on the tile.
    pub counts: Vec<Vec<usize>>,
    /// Rows that fell on a tile an earlier row already filled (not shown).
    pub hidden: usize,
}

impl Layout {
    /// Tiles that show a row.
    pub fn shown(&self) -> usize {
        self.tiles.iter().flatten().filter(|t| t.is_some()).count()
    }

    /// Tiles no row fell on.
    pub fn empty(&self) -> usize {
        self.tiles.iter().flatten().filter(|t| t.is_none()).count()
    }
}

/// Lays `rows` out along `x` and `y` (`value(row, key)` reads an axis key; a row without the
/// key falls under [`MISSING`]). Each tile shows the first of its rows in the order given.
/// Does not check the axes: see [`check_axis`].
pub fn layout<T>(
    rows: &[T],
    x: &str,
    y: Option<&str>,
    value: impl Fn(&T, &str) -> Option<String>,
) -> Layout {
    let label = |r: &T, k: &str| value(r, k).unwrap_or_else(|| MISSING.into());
    let xs = ordered(rows.iter().map(|r| label(r, x)).collect());
    let ys = match y {
        Some(k) => ordered(rows.iter().map(|r| label(r, k)).collect()),
        None => vec![String::new()],
    };
    let index = |values: &[String], v: String| values.iter().position(|x| *x == v).unwrap_or(0);
    let mut tiles = vec![vec![None; xs.len()]; ys.len()];
    let mut counts = vec![vec![0; xs.len()]; ys.len()];
    let mut hidden = 0;
    for (n, r) in rows.iter().enumerate() {
        let xi = index(&xs, label(r, x));
        let yi = y.map_or(0, |k| index(&ys, label(r, k)));
        counts[yi][xi] += 1;
        match &mut tiles[yi][xi] {
            Some(_) => hidden += 1,
            tile => *tile = Some(n),
        }
    }
    Layout {
        xs,
        ys,
        tiles,
        counts,
        hidden,
    }
}

/// `name (N values)` when a key varies over `rows`, else just `name`.
fn described<T>(rows: &[T], key: &str, value: &impl Fn(&T, &str) -> Option<String>) -> String {
    let n = ordered(rows.iter().filter_map(|r| value(r, key)).collect()).len();
    if n > 1 {
        format!("{key} ({n} values)")
    } else {
        key.to_string()
    }
}

/// Refuses an axis that is neither a render parameter nor a binding of some row (`bindings`
/// lists a row's binding keys), listing the axes the rows do have (those that vary say how many
/// values they take).
pub fn check_axis<T>(
    rows: &[T],
    key: &str,
    value: impl Fn(&T, &str) -> Option<String>,
    bindings: impl Fn(&T) -> Vec<String>,
) -> Result<(), String> {
    if PARAMS.contains(&key) || key == "negative_prompt" {
        return Ok(());
    }
    let mut keys: Vec<String> = rows.iter().flat_map(bindings).collect();
    if keys.iter().any(|k| k == key) {
        return Ok(());
    }
    keys.sort();
    keys.dedup();
    let list = |keys: Vec<String>| {
        if keys.is_empty() {
            "none".to_string()
        } else {
            keys.join(", ")
        }
    };
    Err(format!(
        "unknown axis {key:?}: none of the {} matched cells has it\n  bindings: {}\n  parameters: {}",
        rows.len(),
        list(keys.iter().map(|k| described(rows, k, &value)).collect()),
        list(PARAMS.iter().map(|k| described(rows, k, &value)).collect()),
    ))
}

/// The value of an axis key for a cell: `seed`, `cfg`, `steps`, `sampler` (its name), `model`,
/// `prompt`, `negative` (or `negative_prompt`), `width`, `height`, `size` (`WxH`), else the
/// binding of that name (`None` when the cell lacks it).
pub fn spec_value(spec: &CellSpec, key: &str) -> Option<String> {
    Some(match key {
        "seed" => spec.seed.to_string(),
        "cfg" => format!("{}", spec.cfg),
        "steps" => spec.steps.to_string(),
        "sampler" => spec.sampler.as_str(),
        "model" => spec.model.clone(),
        "prompt" => spec.prompt.clone(),
        "negative" | "negative_prompt" => spec.negative_prompt.clone(),
        "width" => spec.width.to_string(),
        "height" => spec.height.to_string(),
        "size" => format!("{}x{}", spec.width, spec.height),
        binding => return spec.bindings.get(binding).cloned(),
    })
}

/// The sheet of `layout` as PNG bytes: [`compose`] with the layout's values as labels and
/// `images` one per tile, row by row (`images[yi * layout.xs.len() + xi]` for
/// `layout.tiles[yi][xi]`; `None` is a grey tile).
pub fn sheet_png(
    layout: &Layout,
    x_key: &str,
    y_key: Option<&str>,
    images: Vec<Option<RgbImage>>,
) -> Result<Vec<u8>, image::ImageError> {
    let labels = Labels {
        x_key,
        y_key,
        xs: &layout.xs,
        ys: &layout.ys,
    };
    let sheet = compose(&labels, &images);
    drop(images);
    let mut out = Vec::new();
    sheet.write_with_encoder(PngEncoder::new(&mut out))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec(seed: u64, cfg: f32, animal: Option<&str>) -> CellSpec {
        let mut bindings = BTreeMap::new();
        if let Some(a) = animal {
            bindings.insert("animal".to_string(), a.to_string());
        }
        CellSpec {
            model: "sd15".into(),
            loras: Vec::new(),
            prompt: "a fox".into(),
            negative_prompt: String::new(),
            seed,
            steps: 4,
            cfg,
            sampler: "Euler a".parse().unwrap(),
            width: 512,
            height: 768,
            rng: "cpu".into(),
            bindings,
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

    fn keys(s: &CellSpec) -> Vec<String> {
        s.bindings.keys().cloned().collect()
    }

    #[test]
    fn numbers_sort_as_numbers() {
        let v = ordered(vec!["10".into(), "2".into(), "1.5".into(), "2".into()]);
        assert_eq!(v, vec!["1.5", "2", "10"]);
        let v = ordered(vec!["fox".into(), "cat".into()]);
        assert_eq!(v, vec!["cat", "fox"]);
    }

    #[test]
    fn a_spec_answers_every_parameter_and_its_bindings() {
        let s = spec(7, 1.5, Some("fox"));
        let v = |k: &str| spec_value(&s, k);
        assert_eq!(v("seed").as_deref(), Some("7"));
        assert_eq!(v("cfg").as_deref(), Some("1.5"));
        assert_eq!(v("sampler").as_deref(), Some("euler_a"));
        assert_eq!(v("size").as_deref(), Some("512x768"));
        assert_eq!(v("negative"), v("negative_prompt"));
        assert_eq!(v("animal").as_deref(), Some("fox"));
        assert_eq!(v("colour"), None);
        for p in PARAMS {
            assert!(v(p).is_some(), "{p}");
        }
    }

    #[test]
    fn every_row_is_counted_and_each_tile_shows_the_first() {
        // 3 cfg × 2 animals × 8 seeds = 48 rows on 6 tiles.
        let mut rows = Vec::new();
        for seed in 1..=8 {
            for cfg in [1.0, 1.5, 2.0] {
                for animal in ["fox", "cat"] {
                    rows.push(spec(seed, cfg, Some(animal)));
                }
            }
        }
        let l = layout(&rows, "cfg", Some("animal"), spec_value);
        assert_eq!(
            (l.xs.clone(), l.ys.clone()),
            (
                vec!["1".to_string(), "1.5".into(), "2".into()],
                vec!["cat".to_string(), "fox".into()]
            )
        );
        assert_eq!((l.shown(), l.empty(), l.hidden), (6, 0, 42));
        assert!(l.counts.iter().flatten().all(|&n| n == 8));
        for (yi, row) in l.tiles.iter().enumerate() {
            for (xi, tile) in row.iter().enumerate() {
                let s = &rows[tile.unwrap()];
                assert_eq!(s.seed, 1);
                assert_eq!(spec_value(s, "cfg").unwrap(), l.xs[xi]);
                assert_eq!(spec_value(s, "animal").unwrap(), l.ys[yi]);
            }
        }
        // One fewer (cat at cfg 2): a grey tile; no y axis: one row of tiles labelled "".
        let l = layout(&rows[..5], "cfg", Some("animal"), spec_value);
        assert_eq!((l.shown(), l.empty(), l.hidden), (5, 1, 0));
        assert_eq!(l.tiles[0][2], None);
        assert_eq!(l.counts[0][2], 0);
        let l = layout(&rows, "seed", None, spec_value);
        assert_eq!(
            (l.xs.len(), l.ys.clone(), l.hidden),
            (8, vec![String::new()], 40)
        );
        assert_eq!(l.tiles[0][1], Some(6));
    }

    #[test]
    fn an_unknown_axis_is_refused_with_the_axes_there_are() {
        let rows = vec![
            spec(1, 1.0, Some("fox")),
            spec(2, 1.5, Some("cat")),
            spec(3, 1.5, None),
        ];
        let check = |rows: &[CellSpec], k: &str| check_axis(rows, k, spec_value, keys);
        let e = check(&rows, "colour").unwrap_err();
        assert!(
            e.starts_with("unknown axis \"colour\": none of the 3 matched cells has it"),
            "{e}"
        );
        assert!(e.contains("bindings: animal (2 values)"), "{e}");
        assert!(
            e.contains("parameters: seed (3 values), cfg (2 values), steps, sampler,"),
            "{e}"
        );
        assert!(check(&rows, "cfg").is_ok() && check(&rows, "negative_prompt").is_ok());
        // A binding some rows lack is an axis; those rows fall under `-`.
        assert!(check(&rows, "animal").is_ok());
        let l = layout(&rows, "animal", None, spec_value);
        assert_eq!(l.xs, vec![MISSING, "cat", "fox"]);
        let e = check(&rows[2..], "animal").unwrap_err();
        assert!(e.contains("bindings: none"), "{e}");
    }
}
