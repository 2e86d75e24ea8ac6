//! img2img start pictures: a PNG, JPEG or WebP file's bytes decoded under
//! [`kiln_proto::picture`]'s limits and resized to the render size as A1111's "Just resize"
//! does (Pillow's Lanczos, [`crate::engine::lanczos`]), for the agent's leased cells and for
//! `kiln render --init`. Decoding and resizing cost up to a few hundred milliseconds: callers
//! run this on a blocking thread.

use kiln_proto::picture::{self, PictureError};

use crate::engine::image::RgbImage;
use crate::engine::lanczos::resize_lanczos;

/// `bytes` decoded to RGB8 and resized to `width` × `height` (untouched when it already has
/// that size).
pub fn init_picture(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, PictureError> {
    let (info, pixels) = picture::decode_rgb8(bytes)?;
    let decoded = RgbImage {
        width: info.width,
        height: info.height,
        pixels,
    };
    if (info.width, info.height) == (width, height) {
        return Ok(decoded);
    }
    Ok(resize_lanczos(&decoded, width, height))
}
