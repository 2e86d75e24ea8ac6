//! `kiln grid`: a labelled contact sheet of a sweep or query along one or two axes, like
//! A1111's X/Y plot. The axes are any binding (`animal`, `alt1`, `lora.lcm.strength`) or a
//! render parameter (`seed`, `cfg`, `steps`, `sampler`, `model`, `prompt`, `negative`, `width`,
//! `height`, `size`); an axis no matched cell has is refused with the axes they do have. Values
//! sort numerically when they all are numbers.
//!
//! Several matches can fall on one tile (a grid of cfg × animal over three seeds): the tile
//! shows the first of them in query order (lowest cell number), and the command says how many
//! matches were not shown. A tile no match falls on is grey. `sheet` draws the pixels, `font`
//! the labels; this module owns choosing what goes where and talking to the coordinator.

mod font;
mod sheet;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use kiln_proto::v1 as pb;
use kiln_worker::engine::image::{decode_png, encode_png};
use kiln_worker::upload::{S3Options, Storage};

use crate::client::Conn;
use crate::query::{fetch_rows, open_storage, sampler_name};

/// Render parameters usable as an axis, beside the bindings.
const PARAMS: [&str; 10] = [
    "seed", "cfg", "steps", "sampler", "model", "prompt", "negative", "width", "height", "size",
];

/// The value of `key` for a cell, as text; `None` when it is a binding the cell lacks.
fn value(r: &pb::CellRecord, key: &str) -> Option<String> {
    let c = r.cell.clone().unwrap_or_default();
    Some(match key {
        "seed" => c.seed.to_string(),
        "cfg" => format!("{}", c.cfg),
        "steps" => c.steps.to_string(),
        "sampler" => sampler_name(c.sampler).into(),
        "model" => c.model,
        "prompt" => c.prompt,
        "negative" | "negative_prompt" => c.negative_prompt,
        "width" => c.width.to_string(),
        "height" => c.height.to_string(),
        "size" => format!("{}x{}", c.width, c.height),
        binding => return c.bindings.get(binding).cloned(),
    })
}

/// Distinct values in numeric order when all parse as numbers, else text order.
fn ordered(mut values: Vec<String>) -> Vec<String> {
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

/// `name (N values)` when a key varies over `rows`, else just `name`.
fn described(rows: &[pb::CellRecord], key: &str) -> String {
    let n = ordered(rows.iter().filter_map(|r| value(r, key)).collect()).len();
    if n > 1 {
        format!("{key} ({n} values)")
    } else {
        key.to_string()
    }
}

/// Refuses an axis that is neither a render parameter nor a binding of some matched cell,
/// listing the axes the matched cells have (those that vary say how many values they take).
fn check_axis(rows: &[pb::CellRecord], key: &str) -> anyhow::Result<()> {
    let is_param = PARAMS.contains(&key) || key == "negative_prompt";
    let bound = |k: &str| {
        rows.iter()
            .any(|r| r.cell.as_ref().is_some_and(|c| c.bindings.contains_key(k)))
    };
    if is_param || bound(key) {
        return Ok(());
    }
    let mut bindings: Vec<&String> = rows
        .iter()
        .filter_map(|r| r.cell.as_ref())
        .flat_map(|c| c.bindings.keys())
        .collect();
    bindings.sort();
    bindings.dedup();
    let list = |keys: Vec<String>| {
        if keys.is_empty() {
            "none".to_string()
        } else {
            keys.join(", ")
        }
    };
    anyhow::bail!(
        "unknown axis {key:?}: none of the {} matched cells has it\n  bindings: {}\n  parameters: {}",
        rows.len(),
        list(bindings.iter().map(|k| described(rows, k)).collect()),
        list(PARAMS.iter().map(|k| described(rows, k)).collect()),
    )
}

/// What goes where: the values along each axis and, per tile, the index of the row it shows.
#[derive(Debug)]
struct Layout {
    xs: Vec<String>,
    ys: Vec<String>,
    /// `(x, y)` → index into the rows: the first row (query order) that falls on the tile.
    tiles: BTreeMap<(usize, usize), usize>,
    /// Rows considered.
    matches: usize,
}

/// Lays `rows` (in query order) out along `x_key` and `y_key`; the label of a binding a
/// cell lacks is `-`.
fn lay_out(rows: &[pb::CellRecord], x_key: &str, y_key: Option<&str>) -> anyhow::Result<Layout> {
    check_axis(rows, x_key)?;
    if let Some(y) = y_key {
        check_axis(rows, y)?;
    }
    let label = |r: &pb::CellRecord, k: &str| value(r, k).unwrap_or_else(|| "-".into());
    let xs = ordered(rows.iter().map(|r| label(r, x_key)).collect());
    let ys = match y_key {
        Some(k) => ordered(rows.iter().map(|r| label(r, k)).collect()),
        None => vec![String::new()],
    };
    let index = |values: &[String], v: String| values.iter().position(|x| *x == v).unwrap_or(0);
    let mut tiles = BTreeMap::new();
    for (n, r) in rows.iter().enumerate() {
        let i = index(&xs, label(r, x_key));
        let j = y_key.map_or(0, |k| index(&ys, label(r, k)));
        tiles.entry((i, j)).or_insert(n);
    }
    Ok(Layout {
        xs,
        ys,
        tiles,
        matches: rows.len(),
    })
}

impl Layout {
    /// The one-line account of the sheet: its size, how many images it shows out of how many
    /// matches, and why the rest are not shown.
    fn summary(&self) -> String {
        let (cols, rows) = (self.xs.len(), self.ys.len());
        let shown = self.tiles.len();
        let mut s = format!(
            "{cols}x{rows} grid ({shown} images) from {} matches",
            self.matches
        );
        let hidden = self.matches - shown;
        if hidden > 0 {
            s += &format!(
                ": {hidden} not shown (several per tile, each tile shows the first by cell \
                 number; narrow the filter or add --x/--y)"
            );
        }
        let empty = cols * rows - shown;
        if empty > 0 {
            let plural = if empty == 1 { "" } else { "s" };
            s += &format!("; {empty} empty (grey) tile{plural}");
        }
        s
    }
}

/// `kiln grid`.
pub async fn grid(
    conn: &Conn,
    filter: &str,
    x_key: &str,
    y_key: Option<&str>,
    limit: u32,
    out: &Path,
    s3: &S3Options,
) -> anyhow::Result<()> {
    let filter = if filter.trim().is_empty() {
        "state = \"completed\"".to_string()
    } else {
        format!("({filter}) and state = \"completed\"")
    };
    let rows = fetch_rows(conn, &filter, Some("number"), limit).await?;
    anyhow::ensure!(!rows.is_empty(), "no completed cells match {filter}");
    let layout = lay_out(&rows, x_key, y_key)?;
    let mut stores: Vec<(String, Storage)> = Vec::new();
    let mut images = HashMap::new();
    for (&pos, &n) in &layout.tiles {
        let r = &rows[n];
        let Some(res) = &r.result else { continue };
        let storage = open_storage(&mut stores, &res.storage, s3).await?;
        let bytes = storage
            .get(&res.object_key)
            .await
            .with_context(|| format!("cell {}: {}", r.cell_id, res.object_key))?;
        let png = decode_png(&bytes).with_context(|| format!("cell {}: decoding", r.cell_id))?;
        images.insert(pos, png.image);
    }
    let labels = sheet::Labels {
        x_key,
        y_key,
        xs: &layout.xs,
        ys: &layout.ys,
    };
    let sheet = sheet::compose(&labels, &images)?;
    let about = format!(
        "kiln grid of {filter}: x = {x_key}, y = {}",
        y_key.unwrap_or("-")
    );
    let png = encode_png(&sheet, &[("kiln-grid", &about)])?;
    std::fs::write(out, png).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", layout.summary());
    if rows.len() as u32 >= limit {
        println!("(stopped at --limit {limit}: more cells may match)");
    }
    println!("written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(number: u32, seed: u64, cfg: f32, animal: Option<&str>) -> pb::CellRecord {
        let mut bindings = HashMap::new();
        if let Some(a) = animal {
            bindings.insert("animal".to_string(), a.to_string());
        }
        pb::CellRecord {
            cell_id: u64::from(number) + 100,
            number,
            cell: Some(pb::RenderCell {
                seed,
                cfg,
                prompt: "a fox".into(),
                bindings,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn numbers_sort_as_numbers() {
        let v = ordered(vec!["10".into(), "2".into(), "1.5".into(), "2".into()]);
        assert_eq!(v, vec!["1.5", "2", "10"]);
        let v = ordered(vec!["fox".into(), "cat".into()]);
        assert_eq!(v, vec!["cat", "fox"]);
    }

    #[test]
    fn every_match_is_counted_and_each_tile_shows_the_first() {
        // 3 cfg × 2 animals × 8 seeds = 48 matches on 6 tiles.
        let mut rows = Vec::new();
        for seed in 1..=8 {
            for (k, cfg) in [1.0, 1.5, 2.0].into_iter().enumerate() {
                for (a, animal) in ["fox", "cat"].into_iter().enumerate() {
                    let number = (seed as u32 - 1) * 6 + k as u32 * 2 + a as u32;
                    rows.push(row(number, seed, cfg, Some(animal)));
                }
            }
        }
        let l = lay_out(&rows, "cfg", Some("animal")).unwrap();
        assert_eq!(
            (l.xs.len(), l.ys.len(), l.tiles.len(), l.matches),
            (3, 2, 6, 48)
        );
        assert!(
            l.tiles
                .values()
                .all(|&n| rows[n].cell.as_ref().unwrap().seed == 1)
        );
        assert_eq!(
            l.summary(),
            "3x2 grid (6 images) from 48 matches: 42 not shown (several per tile, each tile \
             shows the first by cell number; narrow the filter or add --x/--y)"
        );
        // One seed: one match per tile, nothing hidden; one fewer: a grey tile.
        let l = lay_out(&rows[..6], "cfg", Some("animal")).unwrap();
        assert_eq!(l.summary(), "3x2 grid (6 images) from 6 matches");
        let l = lay_out(&rows[..5], "cfg", Some("animal")).unwrap();
        assert_eq!(
            l.summary(),
            "3x2 grid (5 images) from 5 matches; 1 empty (grey) tile"
        );
    }

    #[test]
    fn an_unknown_axis_is_refused_with_the_axes_there_are() {
        let rows = vec![
            row(0, 1, 1.0, Some("fox")),
            row(1, 2, 1.5, Some("cat")),
            row(2, 3, 1.5, None),
        ];
        let e = lay_out(&rows, "colour", None).unwrap_err().to_string();
        assert!(
            e.starts_with("unknown axis \"colour\": none of the 3 matched cells has it"),
            "{e}"
        );
        assert!(e.contains("bindings: animal (2 values)"), "{e}");
        assert!(
            e.contains("parameters: seed (3 values), cfg (2 values), steps, sampler,"),
            "{e}"
        );
        let e = lay_out(&rows, "cfg", Some("colour")).unwrap_err();
        assert!(e.to_string().contains("\"colour\""));
        // A binding some cells lack is an axis; those cells fall under `-`.
        let l = lay_out(&rows, "animal", None).unwrap();
        assert_eq!(l.xs, vec!["-", "cat", "fox"]);
        let e = lay_out(&rows[2..], "animal", None).unwrap_err().to_string();
        assert!(e.contains("bindings: none"), "{e}");
    }
}
