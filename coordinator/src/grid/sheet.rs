//! The contact sheet's pixels: tiles on a white canvas, a header row of x values, a left
//! column of y values and the axis names in the corner (`cfg →` over `animal ↓`). Label size
//! follows the tile size (14 px text for 64 px tiles, up to 48 px for 1024 px ones, as A1111's
//! X/Y plot scales its font), and a label too long for its column ends in `…`. A tile with no
//! image is grey. Knows nothing of queries or storage: it gets decoded images and gives back
//! pixels ([`compose`]) or PNG bytes ([`sheet_png`]).

/// The image type of tiles and sheets: 8-bit RGB (the `image` crate's).
pub use image::RgbImage;

use super::font::Face;

/// Grey of a tile with no matching image.
const EMPTY: u8 = 200;
/// Canvas background.
const PAPER: u8 = 255;

/// What the sheet says: the axis names and the values along each axis.
pub struct Labels<'a> {
    /// Name of the x axis.
    pub x_key: &'a str,
    /// Name of the y axis; `None` for a single row of tiles.
    pub y_key: Option<&'a str>,
    /// Values along the x axis (one column each).
    pub xs: &'a [String],
    /// Values along the y axis (one row each; `[""]` without a y axis).
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
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let pixels = img.as_raw();
        let cols = iw.min(self.w.saturating_sub(x0));
        for y in 0..ih.min(self.h.saturating_sub(y0)) {
            let src = &pixels[y * iw * 3..(y * iw + cols) * 3];
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

/// Builds the sheet from images already decoded, one per tile in rows of `xs.len()`:
/// `images[yi * xs.len() + xi]` is the tile at (`xi`, `yi`); `None` (or a missing entry) is a
/// grey tile. Tiles are as large as the largest image (64 px when there is none).
pub fn compose(labels: &Labels, images: &[Option<RgbImage>]) -> RgbImage {
    let Labels {
        x_key,
        y_key,
        xs,
        ys,
    } = *labels;
    let tile = |i: usize, j: usize| images.get(j * xs.len() + i).and_then(Option::as_ref);
    let size = |f: fn(&RgbImage) -> u32| images.iter().flatten().map(|i| f(i) as usize).max();
    let tile_w = size(RgbImage::width).unwrap_or(64);
    let tile_h = size(RgbImage::height).unwrap_or(64);
    let face = Face::new(label_px(tile_w, tile_h));
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
            match tile(i, j) {
                Some(img) => c.blit(x0, top, img),
                None => c.fill(x0, top, tile_w, tile_h, EMPTY),
            }
        }
    }
    // The canvas holds exactly w · h · 3 bytes, which is all `from_raw` checks.
    RgbImage::from_raw(w as u32, h as u32, c.px).expect("the canvas is w × h RGB")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tile of one colour, which grey label ink never makes.
    const GREEN: [u8; 3] = [10, 200, 30];

    fn tile(side: u32) -> RgbImage {
        RgbImage::from_raw(side, side, GREEN.repeat((side * side) as usize)).unwrap()
    }

    /// Rows of the sheet that hold some dark (label) pixel left of `x_end`.
    fn inked_rows(g: &RgbImage, x_end: usize, rows: std::ops::Range<usize>) -> usize {
        let w = g.width() as usize;
        rows.filter(|&y| (0..x_end).any(|x| g.as_raw()[(y * w + x) * 3] < 128))
            .count()
    }

    #[test]
    fn tiles_empty_tiles_and_labels_are_laid_out() {
        let images = [Some(tile(4)), None, None, Some(tile(4))];
        let xs = vec!["1".to_string(), "1.5".to_string()];
        let ys = vec!["cat".to_string(), "fox".to_string()];
        let labels = Labels {
            x_key: "cfg",
            y_key: Some("animal"),
            xs: &xs,
            ys: &ys,
        };
        let g = compose(&labels, &images);
        assert_eq!(g.as_raw().len(), (g.width() * g.height() * 3) as usize);
        // Two green tiles, two grey placeholders, dark label ink.
        let px = |c: [u8; 3]| g.as_raw().chunks(3).filter(|p| *p == c).count();
        assert_eq!(px(GREEN), 2 * 16);
        // (Anti-aliased ink may hold that grey too.)
        assert!(px([EMPTY; 3]) >= 2 * 16);
        assert!(g.as_raw().chunks(3).any(|p| p[0] < 64 && p[0] == p[1]));
    }

    #[test]
    fn labels_grow_with_tiles_and_long_ones_stay_in_their_column() {
        let long = "a red fox in a snowy forest at dawn, highly detailed, 8k".to_string();
        for side in [64u32, 512] {
            let images = [Some(tile(side)), Some(tile(side))];
            let xs = vec![long.clone(), "狐 fox".to_string()];
            let labels = Labels {
                x_key: "prompt",
                y_key: None,
                xs: &xs,
                ys: &[String::new()],
            };
            let g = compose(&labels, &images);
            let px = label_px(side as usize, side as usize);
            let face = Face::new(px);
            // Text height in the header matches the label size.
            let header = face.line_height() + 2 * (face.line_height() / 4).max(4);
            let rows = inked_rows(&g, g.width() as usize, 0..header);
            assert!(rows as f32 >= px * 0.6, "{side}: {rows} inked rows");
            // Two tiles wide plus the left column: the long label did not widen anything.
            let left = face
                .width("prompt →")
                .min((side as usize).max(10 * face.line_height()));
            let pad = (face.line_height() / 4).max(4);
            assert_eq!(
                g.width() as usize,
                left + 2 * pad + 2 * (side as usize + pad) + pad
            );
        }
    }

    #[test]
    fn a_layout_becomes_a_png_of_the_composed_sheet() {
        let rows = [("1", "fox"), ("2", "fox"), ("1", "cat")];
        let value =
            |r: &(&str, &str), k: &str| Some(if k == "cfg" { r.0 } else { r.1 }.to_string());
        let layout = super::super::layout(&rows, "cfg", Some("animal"), value);
        // cat: [cell 2, grey]; fox: [cell 0, cell 1].
        let images = vec![Some(tile(8)), None, Some(tile(8)), Some(tile(8))];
        let labels = Labels {
            x_key: "cfg",
            y_key: Some("animal"),
            xs: &layout.xs,
            ys: &layout.ys,
        };
        let composed = compose(&labels, &images);
        let png = super::super::sheet_png(&layout, "cfg", Some("animal"), images).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let back = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!(back, composed);
    }
}
