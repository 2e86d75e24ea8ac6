//! Reading img2img start pictures from the user's disk: `kiln render --init` (decoded and
//! resized here) and the `init_image` files of a sweep (checked here, then uploaded by
//! `kiln submit`). Both accept exactly what the coordinator and the workers accept
//! ([`kiln_proto::picture`]: PNG, JPEG or WebP, at most 32 MiB and 4096 pixels a side).

use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::Context;
use kiln_proto::picture::{self, MAX_FILE_BYTES};
use kiln_worker::engine::image::RgbImage;
use sha2::{Digest, Sha256};

/// Reads `path` and returns it as RGB8 at `width` × `height` (resized as A1111's "Just resize":
/// Pillow's Lanczos).
pub fn read(path: &Path, width: u32, height: u32) -> anyhow::Result<RgbImage> {
    let shown = format!("--init {}", path.display());
    let bytes = read_bytes(path, &shown)?;
    kiln_worker::picture::init_picture(&bytes, width, height)
        .map_err(|e| anyhow::anyhow!("{shown}: {e}"))
}

/// Reads a picture file whole (refusing one past [`MAX_FILE_BYTES`] before reading it).
/// `shown` names it in errors.
pub fn read_bytes(path: &Path, shown: &str) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| shown.to_string())?;
    let len = file.metadata().with_context(|| shown.to_string())?.len();
    anyhow::ensure!(
        len <= MAX_FILE_BYTES as u64,
        "{shown}: {len} bytes, more than the {} MiB a picture may have",
        MAX_FILE_BYTES >> 20
    );
    let mut bytes = Vec::with_capacity(len as usize);
    BufReader::new(file)
        .take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| shown.to_string())?;
    Ok(bytes)
}

/// Checks a sweep's picture as the coordinator will (decoding it whole) and returns the
/// sha256 (hex) it is uploaded and named under.
pub fn check(path: &Path, shown: &str) -> anyhow::Result<String> {
    let bytes = read_bytes(path, shown)?;
    picture::decode_rgb8(&bytes).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}
