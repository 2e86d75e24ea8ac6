//! The contact sheet's pixels: tiles on a white canvas, a header row of x values, a left
//! column of y values and the axis names in the corner (`cfg →` over `animal ↓`). Label size
//! follows the tile size (14 px text for 64 px tiles, up to 48 px for 1024 px ones, as A1111's
//! X/Y plot scales its font), and a label too long for its column ends in `…`. A tile with no
//! image is grey. Knows nothing of queries or storage.

use std::collections::HashMap;

use kiln_worker::engine::image::RgbImage;

use super::font::Face;

/// Grey of a tile with no matching image.
const EMPTY: u8 = 200;
/// Canvas background.
const PAPER: u8 = 255;

/// What the sheet says: the axis names and the values along each axis.
pub struct Labels<'a> {
    pub x_key: &'a str,
    pub y_key: Option<&'a str>,
    pub xs: &'a [String],
    pub ys: &'a [String],
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
        let cols = iw.min(self.w.saturating_sub(x0));
        for y in 0..ih.min(self.h.saturating_sub(y0)) {
            let src = &img.pixels[y * iw * 3..(y * iw + cols) * 3];
            let i = ((y0 + y) * self.w + x0) * 3;
            self.px[i..i + src.len()].copy_from_slice(src);
        }
    }

    /// Black text blended over what is there, cut to `max` pixels wide.
    fn text(&mut self, face: &Face, x0: usize, y0: usize, s: &str, max: usize) {
        let s = face.fit(s, max);
        let (w, h) = (self.w, self.h);
        let px = &mut self.px;
        face.draw(x0, y0, &s, |x, y, c| {
            if x < w && y < h {
                let i = (y * w + x) * 3;
                for p in &mut px[i..i + 3] {
                    *p = (f32::from(*p) * (1.0 - c)).round() as u8;
                }
            }
        });
    }
}

/// Label pixel size for tiles of `w`×`h`.
fn label_px(w: usize, h: usize) -> f32 {
    ((w + h) / 25).clamp(14, 48) as f32
}

/// Builds the sheet from images already decoded; `images[(x, y)]` is one tile.
pub fn compose(
    labels: &Labels,
    images: &HashMap<(usize, usize), RgbImage>,
) -> anyhow::Result<RgbImage> {
    let Labels {
        x_key,
        y_key,
        xs,
        ys,
    } = *labels;
    let size = |f: fn(&RgbImage) -> u32| images.values().map(|i| f(i) as usize).max();
    let tile_w = size(|i| i.width).unwrap_or(64);
    let tile_h = size(|i| i.height).unwrap_or(64);
    let face = Face::new(label_px(tile_w, tile_h))?;
    let line = face.line_height();
    let pad = (line / 4).max(4);

    let x_title = format!("{x_key} →");
    let y_title = y_key.map(|y| format!("{y} ↓"));
    let header_lines = if y_title.is_some() { 2 } else { 1 };
    let header = header_lines * line + 2 * pad;
    // The left column fits its longest label, but no wider than a tile or ten em.
    let widest = ys
        .iter()
        .filter(|_| y_key.is_some())
        .chain([&x_title])
        .chain(y_title.as_ref())
        .map(|s| face.width(s))
        .max()
        .unwrap_or(0);
    let text_max = widest.min(tile_w.max(10 * line));
    let left = text_max + 2 * pad;

    let w = left + xs.len() * (tile_w + pad) + pad;
    let h = header + ys.len() * (tile_h + pad) + pad;
    let mut c = Canvas::new(w, h, PAPER);
    c.text(&face, pad, pad, &x_title, text_max);
    if let Some(t) = &y_title {
        c.text(&face, pad, pad + line, t, text_max);
    }
    // Column labels sit centred on the line just above the tiles.
    for (i, x) in xs.iter().enumerate() {
        let x0 = left + i * (tile_w + pad);
        let label = face.fit(x, tile_w);
        let inset = tile_w.saturating_sub(face.width(&label)) / 2;
        c.text(&face, x0 + inset, header - pad - line, &label, tile_w);
    }
    for (j, y) in ys.iter().enumerate() {
        let top = header + j * (tile_h + pad);
        if y_key.is_some() {
            c.text(
                &face,
                pad,
                top + tile_h.saturating_sub(line) / 2,
                y,
                text_max,
            );
        }
        for i in 0..xs.len() {
            let x0 = left + i * (tile_w + pad);
            match images.get(&(i, j)) {
                Some(img) => c.blit(x0, top, img),
                None => c.fill(x0, top, tile_w, tile_h, EMPTY),
            }
        }
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels: c.px,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tile of one colour, which grey label ink never makes.
    const GREEN: [u8; 3] = [10, 200, 30];

    fn tile(side: u32) -> RgbImage {
        RgbImage {
            width: side,
            height: side,
            pixels: GREEN.repeat((side * side) as usize),
        }
    }

    /// Rows of the sheet that hold some dark (label) pixel left of `x_end`.
    fn inked_rows(g: &RgbImage, x_end: usize, rows: std::ops::Range<usize>) -> usize {
        let w = g.width as usize;
        rows.filter(|&y| (0..x_end).any(|x| g.pixels[(y * w + x) * 3] < 128))
            .count()
    }

    #[test]
    fn tiles_empty_tiles_and_labels_are_laid_out() {
        let images: HashMap<_, _> = [((0, 0), tile(4)), ((1, 1), tile(4))].into();
        let xs = vec!["1".to_string(), "1.5".to_string()];
        let ys = vec!["cat".to_string(), "fox".to_string()];
        let labels = Labels {
            x_key: "cfg",
            y_key: Some("animal"),
            xs: &xs,
            ys: &ys,
        };
        let g = compose(&labels, &images).unwrap();
        assert_eq!(g.pixels.len(), (g.width * g.height * 3) as usize);
        // Two green tiles, two grey placeholders, dark label ink.
        let px = |c: [u8; 3]| g.pixels.chunks(3).filter(|p| *p == c).count();
        assert_eq!(px(GREEN), 2 * 16);
        // (Anti-aliased ink may hold that grey too.)
        assert!(px([EMPTY; 3]) >= 2 * 16);
        assert!(g.pixels.chunks(3).any(|p| p[0] < 64 && p[0] == p[1]));
    }

    #[test]
    fn labels_grow_with_tiles_and_long_ones_stay_in_their_column() {
        let long = "a red fox in a snowy forest at dawn, highly detailed, 8k".to_string();
        for side in [64u32, 512] {
            let images: HashMap<_, _> = [((0, 0), tile(side)), ((1, 0), tile(side))].into();
            let xs = vec![long.clone(), "狐 fox".to_string()];
            let labels = Labels {
                x_key: "prompt",
                y_key: None,
                xs: &xs,
                ys: &[String::new()],
            };
            let g = compose(&labels, &images).unwrap();
            let px = label_px(side as usize, side as usize);
            let face = Face::new(px).unwrap();
            // Text height in the header matches the label size.
            let header = face.line_height() + 2 * (face.line_height() / 4).max(4);
            let rows = inked_rows(&g, g.width as usize, 0..header);
            assert!(rows as f32 >= px * 0.6, "{side}: {rows} inked rows");
            // Two tiles wide plus the left column: the long label did not widen anything.
            let left = face
                .width("prompt →")
                .min((side as usize).max(10 * face.line_height()));
            let pad = (face.line_height() / 4).max(4);
            assert_eq!(
                g.width as usize,
                left + 2 * pad + 2 * (side as usize + pad) + pad
            );
        }
    }
}
