//! `kiln grid`: a labelled contact sheet of a sweep or query along one or two axes, like
//! A1111's X/Y plot. The axes are any binding (`animal`, `alt1`, `lora.lcm.strength`) or a
//! render parameter (`seed`, `cfg`, `steps`, `sampler`, `model`, `prompt`, `negative`, `width`,
//! `height`, `size`); an axis no matched cell has is refused with the axes they do have. Values
//! sort numerically when they all are numbers.
//!
//! Several matches can fall on one tile (a grid of cfg × animal over three seeds): the tile
//! shows the first of them in query order (lowest cell number), and the command says how many
//! matches were not shown. A tile no match falls on is grey. Choosing what goes where and
//! drawing the sheet are [`kiln_coordinator::grid`]'s (the web UI's X/Y view draws the same
//! sheet); this module reads a cell's axis values, talks to the coordinator and storage, and
//! writes the file.

use std::path::Path;

use anyhow::Context;
use kiln_coordinator::grid::{self, Labels, Layout, RgbImage};
use kiln_proto::v1 as pb;
use kiln_worker::engine::image::{self as worker_image, decode_png, encode_png};
use kiln_worker::upload::{S3Options, Storage};

use crate::client::Conn;
use crate::query::{fetch_rows, open_storage, sampler_name};

/// The value of `key` for a cell, as text; `None` when it is a binding the cell lacks.
fn value(r: &pb::CellRecord, key: &str) -> Option<String> {
    let c = r.cell.clone().unwrap_or_default();
    Some(match key {
        "seed" => c.seed.to_string(),
        "cfg" => format!("{}", c.cfg),
        "steps" => c.steps.to_string(),
        "sampler" => sampler_name(&c),
        "model" => c.model,
        "prompt" => c.prompt,
        "negative" | "negative_prompt" => c.negative_prompt,
        "width" => c.width.to_string(),
        "height" => c.height.to_string(),
        "size" => format!("{}x{}", c.width, c.height),
        binding => return c.bindings.get(binding).cloned(),
    })
}

/// A cell's binding keys.
fn bindings(r: &pb::CellRecord) -> Vec<String> {
    r.cell
        .as_ref()
        .map(|c| c.bindings.keys().cloned().collect())
        .unwrap_or_default()
}

/// Lays `rows` (in query order) out along `x_key` and `y_key`, refusing an axis no row has;
/// the label of a binding a cell lacks is `-`.
fn lay_out(rows: &[pb::CellRecord], x_key: &str, y_key: Option<&str>) -> anyhow::Result<Layout> {
    for key in std::iter::once(x_key).chain(y_key) {
        grid::check_axis(rows, key, value, bindings).map_err(anyhow::Error::msg)?;
    }
    Ok(grid::layout(rows, x_key, y_key, value))
}

/// The one-line account of the sheet: its size, how many images it shows out of how many
/// matches, and why the rest are not shown.
fn summary(layout: &Layout, matches: usize) -> String {
    let (cols, rows) = (layout.xs.len(), layout.ys.len());
    let shown = layout.shown();
    let mut s = format!("{cols}x{rows} grid ({shown} images) from {matches} matches");
    if layout.hidden > 0 {
        s += &format!(
            ": {} not shown (several per tile, each tile shows the first by cell \
             number; narrow the filter or add --x/--y)",
            layout.hidden
        );
    }
    let empty = layout.empty();
    if empty > 0 {
        let plural = if empty == 1 { "" } else { "s" };
        s += &format!("; {empty} empty (grey) tile{plural}");
    }
    s
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
    let mut images = Vec::new();
    for &tile in layout.tiles.iter().flatten() {
        let r = tile.map(|n| &rows[n]);
        let Some((r, res)) = r.and_then(|r| Some((r, r.result.as_ref()?))) else {
            images.push(None);
            continue;
        };
        let storage = open_storage(&mut stores, &res.storage, s3).await?;
        let bytes = storage
            .get(&res.object_key)
            .await
            .with_context(|| format!("cell {}: {}", r.cell_id, res.object_key))?;
        let img = decode_png(&bytes)
            .with_context(|| format!("cell {}: decoding", r.cell_id))?
            .image;
        // Never `None`: decode_png gives width · height · 3 bytes, all that `from_raw` checks.
        images.push(RgbImage::from_raw(img.width, img.height, img.pixels));
    }
    let labels = Labels {
        x_key,
        y_key,
        xs: &layout.xs,
        ys: &layout.ys,
    };
    let sheet = grid::compose(&labels, &images);
    let sheet = worker_image::RgbImage {
        width: sheet.width(),
        height: sheet.height(),
        pixels: sheet.into_raw(),
    };
    let about = format!(
        "kiln grid of {filter}: x = {x_key}, y = {}",
        y_key.unwrap_or("-")
    );
    let png = encode_png(&sheet, &[("kiln-grid", &about)])?;
    std::fs::write(out, png).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", summary(&layout, rows.len()));
    if rows.len() as u32 >= limit {
        println!("(stopped at --limit {limit}: more cells may match)");
    }
    println!("written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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
        assert_eq!((l.xs.len(), l.ys.len(), l.shown(), l.hidden), (3, 2, 6, 42));
        assert!(
            l.tiles
                .iter()
                .flatten()
                .all(|&n| rows[n.unwrap()].cell.as_ref().unwrap().seed == 1)
        );
        assert_eq!(
            summary(&l, rows.len()),
            "3x2 grid (6 images) from 48 matches: 42 not shown (several per tile, each tile \
             shows the first by cell number; narrow the filter or add --x/--y)"
        );
        // One seed: one match per tile, nothing hidden; one fewer: a grey tile.
        let l = lay_out(&rows[..6], "cfg", Some("animal")).unwrap();
        assert_eq!(summary(&l, 6), "3x2 grid (6 images) from 6 matches");
        let l = lay_out(&rows[..5], "cfg", Some("animal")).unwrap();
        assert_eq!(
            summary(&l, 5),
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
