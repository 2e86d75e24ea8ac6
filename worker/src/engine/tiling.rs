//! Tiled VAE decoding: diffusers' `AutoencoderKL.tiled_decode` (`pipe.vae.enable_tiling()`,
//! A1111's and ComfyUI's "Tiled VAE"), which bounds the decoder's memory at large sizes.
//!
//! Owns the user's setting ([`VaeTiling`]: `auto`, `on`, `off`), when it tiles, the tile grid
//! diffusers derives from the VAE config ([`TileGrid`]) and the seam handling: overlapping
//! tiles whose shared edges are blended linearly (diffusers' `blend_v`, then `blend_h`, each
//! written back into the tile so later blends see it) and cropped to the stride
//! ([`TiledImage`]). It works on host f32 planes and knows nothing of candle or of how a tile is
//! decoded; `Model` decodes each tile (`post_quant_conv` included, as diffusers runs it per
//! tile).
//!
//! Tiling changes pixels: the decoder's mid-block attention and its group norms see one tile
//! rather than the whole latent, and seams are blended. The difference against the untiled
//! decode is measured by the `vae_tiled` parity test.

use std::fmt;
use std::str::FromStr;

use crate::engine::error::{EngineError, Result};

/// diffusers' `tile_overlap_factor`: a quarter of a tile overlaps its neighbour.
const OVERLAP: f64 = 0.25;

/// When the VAE decodes in tiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaeTiling {
    /// Tiles only images of more than four times the VAE's native area (`sample_size²`; 1024²
    /// for SD1.5), where an untiled decode's memory grows past a few GiB. Common sizes (512²,
    /// 768², 512×768, a 2× hires fix of 512²) decode whole and are unchanged by tiling. The
    /// rule depends on the image alone, never on free memory, so one request gives the same
    /// pixels on every worker set alike.
    #[default]
    Auto,
    /// Tiles whenever the latent is larger than one tile, as diffusers' `enable_tiling()`.
    On,
    /// Never tiles.
    Off,
}

impl VaeTiling {
    /// The setting's name, as `FromStr` reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }

    /// Whether a latent of `[h, w]` cells decodes in tiles of `grid`.
    pub fn tiles(self, grid: &TileGrid, [h, w]: [usize; 2]) -> bool {
        let larger_than_a_tile = h > grid.latent_tile || w > grid.latent_tile;
        match self {
            Self::Off => false,
            Self::On => larger_than_a_tile,
            Self::Auto => {
                let pixels = (h * grid.scale) * (w * grid.scale);
                larger_than_a_tile && pixels > 4 * grid.sample_tile * grid.sample_tile
            }
        }
    }
}

impl fmt::Display for VaeTiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VaeTiling {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("VAE tiling `{s}` is not auto, on or off")),
        }
    }
}

/// The tile geometry diffusers derives from a VAE config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileGrid {
    /// Pixels per latent cell (`2^(levels − 1)`).
    pub scale: usize,
    /// `tile_sample_min_size`: the config's `sample_size`, in pixels.
    pub sample_tile: usize,
    /// `tile_latent_min_size`: `sample_size / scale`, in latent cells.
    pub latent_tile: usize,
    /// Latent cells between tile starts: `int(latent_tile · (1 − overlap))`.
    pub stride: usize,
    /// Pixels blended across a seam: `int(sample_tile · overlap)`.
    pub blend: usize,
    /// Pixels kept of each tile: `sample_tile − blend` (diffusers' `row_limit`).
    pub row_limit: usize,
}

impl TileGrid {
    /// The grid of a VAE whose decoder upsamples `levels − 1` times, with `sample_size` pixels
    /// as its native size. Fails when the tiles would not put together an image of exactly
    /// `scale` pixels per latent cell.
    pub fn new(sample_size: usize, levels: usize) -> std::result::Result<Self, String> {
        let scale = 1usize << levels.saturating_sub(1);
        let latent_tile = sample_size / scale;
        let stride = (latent_tile as f64 * (1.0 - OVERLAP)) as usize;
        let blend = (sample_size as f64 * OVERLAP) as usize;
        let row_limit = sample_size - blend;
        if stride == 0 || row_limit != stride * scale {
            return Err(format!(
                "sample_size {sample_size} gives VAE tiles of {latent_tile} latent cells at a \
                 stride of {stride}, which do not tile an image (need sample_size a multiple \
                 of {} and at least {})",
                4 * scale,
                4 * scale
            ));
        }
        Ok(Self {
            scale,
            sample_tile: sample_size,
            latent_tile,
            stride,
            blend,
            row_limit,
        })
    }

    /// Where the tiles along a latent side of `len` cells start (`range(0, len, stride)`).
    pub fn starts(&self, len: usize) -> std::iter::StepBy<std::ops::Range<usize>> {
        (0..len).step_by(self.stride)
    }

    /// The latent cells `[start, end)` of the tile starting at `start` on a side of `len`.
    pub fn span(&self, start: usize, len: usize) -> (usize, usize) {
        (start, (start + self.latent_tile).min(len))
    }
}

/// One decoded tile: `channels` planes of `h × w` pixels, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tile {
    /// `[channels · h · w]` values.
    pub data: Vec<f32>,
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
}

impl Tile {
    fn at(&self, c: usize, y: usize, x: usize) -> usize {
        (c * self.h + y) * self.w + x
    }
}

/// diffusers' blend weights for row (or column) `i` of `extent`: the earlier tile's
/// `1 − i/extent` and this one's `i/extent`, computed in f64 and used as f32 scalars, as torch
/// multiplies an f32 tensor by a Python float.
fn weights(i: usize, extent: usize) -> (f32, f32) {
    let t = i as f64 / extent as f64;
    ((1.0 - t) as f32, t as f32)
}

/// diffusers' `blend_v`: the first rows of `b` fade in from the last rows of `a`, over
/// `min(a.h, b.h, extent)` rows, in place.
fn blend_v(a: &Tile, b: &mut Tile, extent: usize) {
    let e = a.h.min(b.h).min(extent);
    let w = a.w.min(b.w);
    for c in 0..b.channels {
        for y in 0..e {
            let (wa, wb) = weights(y, e);
            for x in 0..w {
                let from = a.data[a.at(c, a.h - e + y, x)];
                let i = b.at(c, y, x);
                b.data[i] = from * wa + b.data[i] * wb;
            }
        }
    }
}

/// diffusers' `blend_h`: the first columns of `b` fade in from the last columns of `a`, over
/// `min(a.w, b.w, extent)` columns, in place.
fn blend_h(a: &Tile, b: &mut Tile, extent: usize) {
    let e = a.w.min(b.w).min(extent);
    let h = a.h.min(b.h);
    for c in 0..b.channels {
        for y in 0..h {
            for x in 0..e {
                let (wa, wb) = weights(x, e);
                let from = a.data[a.at(c, y, a.w - e + x)];
                let i = b.at(c, y, x);
                b.data[i] = from * wa + b.data[i] * wb;
            }
        }
    }
}

/// A tiled decode being put together, one row of tiles at a time: each tile is blended with
/// the (already blended) tile above it and the one to its left, then its top-left
/// `row_limit × row_limit` pixels are copied into the image. Only the previous row of tiles is
/// kept, so memory is the image plus two rows of tiles.
#[derive(Debug)]
pub struct TiledImage {
    grid: TileGrid,
    channels: usize,
    height: usize,
    width: usize,
    /// `[channels, height, width]`, row-major.
    data: Vec<f32>,
    above: Vec<Tile>,
    row: Vec<Tile>,
    /// The image row where the current row of tiles goes.
    y: usize,
    /// The image column where the next tile goes.
    x: usize,
}

impl TiledImage {
    /// An empty image of `channels × [h, w]` latent cells' worth of pixels.
    pub fn new(grid: TileGrid, channels: usize, [h, w]: [usize; 2]) -> Self {
        let (height, width) = (h * grid.scale, w * grid.scale);
        Self {
            grid,
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
            above: Vec::new(),
            row: Vec::new(),
            y: 0,
            x: 0,
        }
    }

    /// Adds the next tile of the current row, left to right.
    pub fn push(&mut self, mut tile: Tile) -> Result<()> {
        let j = self.row.len();
        if tile.channels != self.channels {
            return Err(EngineError::InvalidRequest(format!(
                "a VAE tile has {} channels, the image {}",
                tile.channels, self.channels
            )));
        }
        if let Some(above) = self.above.get(j) {
            blend_v(above, &mut tile, self.grid.blend);
        }
        if let Some(left) = self.row.last() {
            blend_h(left, &mut tile, self.grid.blend);
        }
        let (kh, kw) = (
            tile.h.min(self.grid.row_limit),
            tile.w.min(self.grid.row_limit),
        );
        if self.y + kh > self.height || self.x + kw > self.width {
            return Err(EngineError::InvalidRequest(format!(
                "VAE tile {kh}x{kw} at ({}, {}) is outside the {}x{} image",
                self.y, self.x, self.height, self.width
            )));
        }
        for c in 0..self.channels {
            for y in 0..kh {
                let from = tile.at(c, y, 0);
                let to = (c * self.height + self.y + y) * self.width + self.x;
                self.data[to..to + kw].copy_from_slice(&tile.data[from..from + kw]);
            }
        }
        self.x += kw;
        self.row.push(tile);
        Ok(())
    }

    /// Ends the current row of tiles; the next [`Self::push`] starts a row below it.
    pub fn end_row(&mut self) {
        let kh = self.row.first().map_or(0, |t| t.h.min(self.grid.row_limit));
        self.y += kh;
        self.x = 0;
        self.above = std::mem::take(&mut self.row);
    }

    /// The image, `[channels, height, width]` row-major, once every row has ended.
    pub fn finish(self) -> Result<Vec<f32>> {
        if self.y != self.height || !self.row.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "the VAE tiles covered {} of {} rows",
                self.y, self.height
            )));
        }
        Ok(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> TileGrid {
        TileGrid::new(512, 4).expect("SD1.5 grid")
    }

    #[test]
    fn the_grid_is_diffusers_for_sd15_and_the_tiny_vae() {
        let g = sd15();
        assert_eq!(
            (g.scale, g.latent_tile, g.stride, g.blend, g.row_limit),
            (8, 64, 48, 128, 384)
        );
        let t = TileGrid::new(64, 4).expect("tiny grid");
        assert_eq!(
            (t.scale, t.latent_tile, t.stride, t.blend, t.row_limit),
            (8, 8, 6, 16, 48)
        );
        assert_eq!(g.starts(128).collect::<Vec<_>>(), [0, 48, 96]);
        assert_eq!(g.span(96, 128), (96, 128));
        assert!(TileGrid::new(500, 4).is_err());
    }

    #[test]
    fn auto_tiles_past_four_times_the_native_area_and_on_past_one_tile() {
        let g = sd15();
        let lat = |px: usize| px / 8;
        for (h, w, auto, on) in [
            (512, 512, false, false),
            (512, 768, false, true),
            (768, 768, false, true),
            (1024, 1024, false, true),
            (1024, 1032, true, true),
            (1536, 1536, true, true),
        ] {
            let hw = [lat(h), lat(w)];
            assert_eq!(VaeTiling::Auto.tiles(&g, hw), auto, "auto {h}x{w}");
            assert_eq!(VaeTiling::On.tiles(&g, hw), on, "on {h}x{w}");
            assert!(!VaeTiling::Off.tiles(&g, hw), "off {h}x{w}");
        }
    }

    #[test]
    fn the_setting_reads_its_three_names_only() {
        for t in [VaeTiling::Auto, VaeTiling::On, VaeTiling::Off] {
            assert_eq!(t.as_str().parse::<VaeTiling>(), Ok(t));
        }
        assert!("tiled".parse::<VaeTiling>().is_err());
    }

    /// A constant image tiled is the same constant image: blending two equal values with
    /// weights summing to one changes nothing, and the crops cover every pixel once.
    #[test]
    fn constant_tiles_put_together_a_constant_image() {
        let g = TileGrid::new(64, 4).expect("grid");
        let (h, w) = (20, 15);
        let mut image = TiledImage::new(g, 3, [h, w]);
        for i in g.starts(h) {
            for j in g.starts(w) {
                let ((y0, y1), (x0, x1)) = (g.span(i, h), g.span(j, w));
                let (th, tw) = ((y1 - y0) * 8, (x1 - x0) * 8);
                image
                    .push(Tile {
                        data: vec![0.5; 3 * th * tw],
                        channels: 3,
                        h: th,
                        w: tw,
                    })
                    .expect("push");
            }
            image.end_row();
        }
        let data = image.finish().expect("finish");
        assert_eq!(data.len(), 3 * 160 * 120);
        assert!(data.iter().all(|&v| v == 0.5));
    }

    #[test]
    fn a_seam_fades_linearly_from_the_upper_tile_to_the_lower() {
        let a = Tile {
            data: vec![1.0; 8],
            channels: 1,
            h: 8,
            w: 1,
        };
        let mut b = Tile {
            data: vec![0.0; 8],
            channels: 1,
            h: 8,
            w: 1,
        };
        blend_v(&a, &mut b, 4);
        assert_eq!(b.data, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]);
    }
}
