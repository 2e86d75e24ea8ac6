//! `kiln render --init`: the img2img start picture read from a PNG, JPEG or WebP file, checked
//! against size limits before and after the header is read, converted to RGB8 and resized to
//! the render size (A1111's "Just resize").

use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::Context;
use image::imageops::FilterType;
use image::{ImageFormat, ImageReader, Limits};
use kiln_worker::engine::image::RgbImage;

/// The largest init file read (64 MiB): far past any picture SD1.5 renders from.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The largest init picture's width or height, in pixels.
pub const MAX_SIDE: u32 = 8192;

/// Reads `path` and returns it as RGB8 at `width` × `height` (Lanczos3 when it differs).
pub fn read(path: &Path, width: u32, height: u32) -> anyhow::Result<RgbImage> {
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("--init {shown}"))?;
    let len = file
        .metadata()
        .with_context(|| format!("--init {shown}"))?
        .len();
    anyhow::ensure!(
        len <= MAX_FILE_BYTES,
        "--init {shown}: {len} bytes, more than the {} MiB an init picture may have",
        MAX_FILE_BYTES >> 20
    );
    let mut bytes = Vec::with_capacity(len as usize);
    BufReader::new(file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("--init {shown}"))?;
    let format = image::guess_format(&bytes)
        .ok()
        .filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP))
        .ok_or_else(|| anyhow::anyhow!("--init {shown}: not a PNG, JPEG or WebP picture"))?;
    let (w, h) = ImageReader::with_format(std::io::Cursor::new(&bytes), format)
        .into_dimensions()
        .with_context(|| format!("--init {shown}: an unreadable {format:?} picture"))?;
    anyhow::ensure!(
        w <= MAX_SIDE && h <= MAX_SIDE,
        "--init {shown}: {w}x{h} is larger than {MAX_SIDE} pixels a side"
    );
    let mut reader = ImageReader::with_format(std::io::Cursor::new(&bytes), format);
    reader.limits(limits_for(MAX_SIDE));
    let picture = reader
        .decode()
        .with_context(|| format!("--init {shown}: an unreadable {format:?} picture"))?
        .into_rgb8();
    let picture = if picture.dimensions() == (width, height) {
        picture
    } else {
        image::imageops::resize(&picture, width, height, FilterType::Lanczos3)
    };
    Ok(RgbImage {
        width,
        height,
        pixels: picture.into_raw(),
    })
}

fn limits_for(side: u32) -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits
}
