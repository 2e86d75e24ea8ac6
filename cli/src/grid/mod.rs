//! `kiln grid`: a labelled contact sheet of a sweep or query along one or two axes, like
//! A1111's X/Y plot. The axes are any binding (`animal`, `alt1`, `lora.lcm.strength`) or a
//! render parameter (`seed`, `cfg`, `steps`, `sampler`, `model`, `prompt`, `size`). Values sort
//! numerically when they all are numbers. Each grid cell shows the first matching image (lowest
//! cell number); an empty grid cell is grey.

mod font;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use kiln_proto::v1 as pb;
use kiln_worker::engine::image::{RgbImage, decode_png, encode_png};
use kiln_worker::upload::{S3Options, Storage};

use crate::client::Conn;
use crate::query::{fetch_rows, open_storage};

/// Label pixels per font pixel.
const SCALE: usize = 2;
/// Gap around labels and between tiles, pixels.
const PAD: usize = 4;

/// The value of `key` for a cell, as text.
fn value(r: &pb::CellRecord, key: &str) -> String {
    let c = r.cell.clone().unwrap_or_default();
    match key {
        "seed" => c.seed.to_string(),
        "cfg" => format!("{}", c.cfg),
        "steps" => c.steps.to_string(),
        "sampler" => match pb::Sampler::try_from(c.sampler) {
            Ok(pb::Sampler::EulerA) => "euler_a".into(),
            _ => "lcm".into(),
        },
        "model" => c.model,
        "prompt" => c.prompt,
        "negative" | "negative_prompt" => c.negative_prompt,
        "width" => c.width.to_string(),
        "height" => c.height.to_string(),
        "size" => format!("{}x{}", c.width, c.height),
        binding => c
            .bindings
            .get(binding)
            .cloned()
            .unwrap_or_else(|| "-".into()),
    }
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

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize, shade: u8) -> Self {
        Self {
            w,
            h,
            px: vec![shade; w * h * 3],
        }
    }

    fn fill(&mut self, x0: usize, y0: usize, w: usize, h: usize, shade: u8) {
        for y in y0..(y0 + h).min(self.h) {
            for x in x0..(x0 + w).min(self.w) {
                let i = (y * self.w + x) * 3;
                self.px[i..i + 3].fill(shade);
            }
        }
    }

    fn blit(&mut self, x0: usize, y0: usize, img: &RgbImage) {
        let (iw, ih) = (img.width as usize, img.height as usize);
        for y in 0..ih.min(self.h.saturating_sub(y0)) {
            let src = &img.pixels[y * iw * 3..(y * iw + iw.min(self.w - x0)) * 3];
            let i = ((y0 + y) * self.w + x0) * 3;
            self.px[i..i + src.len()].copy_from_slice(src);
        }
    }

    fn text(&mut self, x0: usize, y0: usize, s: &str) {
        for (n, ch) in s.chars().enumerate() {
            let gx = x0 + n * (font::W + 1) * SCALE;
            for (row, bits) in font::glyph(ch).iter().enumerate() {
                for (col, b) in bits.chars().enumerate() {
                    if b == '#' {
                        self.fill(gx + col * SCALE, y0 + row * SCALE, SCALE, SCALE, 0);
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> usize {
    s.chars().count() * (font::W + 1) * SCALE
}

/// Builds the grid PNG from images already downloaded; `images[(x, y)]` is one tile.
fn compose(
    x_key: &str,
    y_key: Option<&str>,
    xs: &[String],
    ys: &[String],
    images: &HashMap<(usize, usize), RgbImage>,
) -> RgbImage {
    let tile_w = images
        .values()
        .map(|i| i.width as usize)
        .max()
        .unwrap_or(64);
    let tile_h = images
        .values()
        .map(|i| i.height as usize)
        .max()
        .unwrap_or(64);
    let line = font::H * SCALE + 2 * PAD;
    let corner = match y_key {
        Some(y) => format!("{y} / {x_key}"),
        None => x_key.to_string(),
    };
    let left = ys
        .iter()
        .map(|y| text_width(y))
        .chain([text_width(&corner)])
        .max()
        .unwrap_or(0)
        + 2 * PAD;
    let w = left + xs.len() * (tile_w + PAD) + PAD;
    let h = line + ys.len() * (tile_h + PAD) + PAD;
    let mut c = Canvas::new(w, h, 255);
    c.text(PAD, PAD, &corner);
    for (i, x) in xs.iter().enumerate() {
        c.text(left + i * (tile_w + PAD), PAD, x);
    }
    for (j, y) in ys.iter().enumerate() {
        let top = line + j * (tile_h + PAD);
        if y_key.is_some() {
            c.text(PAD, top + tile_h / 2, y);
        }
        for i in 0..xs.len() {
            let x0 = left + i * (tile_w + PAD);
            match images.get(&(i, j)) {
                Some(img) => c.blit(x0, top, img),
                None => c.fill(x0, top, tile_w, tile_h, 200),
            }
        }
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels: c.px,
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
    let xs = ordered(rows.iter().map(|r| value(r, x_key)).collect());
    let ys = match y_key {
        Some(k) => ordered(rows.iter().map(|r| value(r, k)).collect()),
        None => vec![String::new()],
    };
    let mut picked: HashMap<(usize, usize), &pb::CellRecord> = HashMap::new();
    for r in &rows {
        let i = xs.iter().position(|v| *v == value(r, x_key)).unwrap_or(0);
        let j = y_key.map_or(0, |k| {
            ys.iter().position(|v| *v == value(r, k)).unwrap_or(0)
        });
        picked.entry((i, j)).or_insert(r);
    }
    let mut stores: Vec<(String, Storage)> = Vec::new();
    let mut images = HashMap::new();
    for (pos, r) in picked {
        let Some(res) = &r.result else { continue };
        let storage = open_storage(&mut stores, &res.storage, s3).await?;
        let bytes = storage
            .get(&res.object_key)
            .await
            .with_context(|| format!("cell {}: {}", r.cell_id, res.object_key))?;
        let png = decode_png(&bytes).with_context(|| format!("cell {}: decoding", r.cell_id))?;
        images.insert(pos, png.image);
    }
    let sheet = compose(x_key, y_key, &xs, &ys, &images);
    let about = format!(
        "kiln grid of {filter}: x = {x_key}, y = {}",
        y_key.unwrap_or("-")
    );
    let png = encode_png(&sheet, &[("kiln-grid", &about)])?;
    std::fs::write(out, png).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}x{} grid ({} images) written to {}",
        xs.len(),
        ys.len(),
        images.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_sort_as_numbers() {
        let v = ordered(vec!["10".into(), "2".into(), "1.5".into(), "2".into()]);
        assert_eq!(v, vec!["1.5", "2", "10"]);
        let v = ordered(vec!["fox".into(), "cat".into()]);
        assert_eq!(v, vec!["cat", "fox"]);
    }

    #[test]
    fn compose_lays_out_tiles_and_labels() {
        let tile = RgbImage {
            width: 4,
            height: 4,
            pixels: vec![7; 48],
        };
        let images: HashMap<_, _> = [((0, 0), tile.clone()), ((1, 1), tile)].into();
        let xs = vec!["1".to_string(), "1.5".to_string()];
        let ys = vec!["cat".to_string(), "fox".to_string()];
        let g = compose("cfg", Some("animal"), &xs, &ys, &images);
        assert_eq!(g.pixels.len(), (g.width * g.height * 3) as usize);
        // Two tiles of value 7, two grey placeholders, black label ink somewhere.
        assert_eq!(g.pixels.iter().filter(|&&p| p == 7).count(), 2 * 48);
        assert!(g.pixels.contains(&200));
        assert!(g.pixels.contains(&0));
    }
}
