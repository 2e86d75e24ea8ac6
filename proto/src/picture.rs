//! Pictures that cross the network for img2img: which files are accepted (PNG, JPEG or WebP,
//! at most [`MAX_FILE_BYTES`] and [`MAX_SIDE`] pixels a side) and their decoding to 8-bit RGB
//! within those limits. Shared so that the CLI (before it uploads), the coordinator (when it
//! stores one) and the worker (when it renders from one) accept exactly the same files.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

/// The largest picture file accepted, bytes (32 MiB: a 4096² PNG of noise is about 48 MiB, a
/// photo's JPEG 2–8 MiB).
pub const MAX_FILE_BYTES: usize = 32 << 20;

/// The largest width or height accepted, pixels: kiln's largest render side.
pub const MAX_SIDE: u32 = 4096;

/// The most memory one decode may allocate (a 4096² RGBA picture takes 64 MiB).
const MAX_DECODE_ALLOC: u64 = 256 << 20;

/// A picture's container format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PictureFormat {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
    /// WebP (lossy or lossless).
    WebP,
}

impl PictureFormat {
    /// The lower-case name: `png`, `jpeg`, `webp`.
    pub fn as_str(self) -> &'static str {
        match self {
            PictureFormat::Png => "png",
            PictureFormat::Jpeg => "jpeg",
            PictureFormat::WebP => "webp",
        }
    }

    fn image_format(self) -> ImageFormat {
        match self {
            PictureFormat::Png => ImageFormat::Png,
            PictureFormat::Jpeg => ImageFormat::Jpeg,
            PictureFormat::WebP => ImageFormat::WebP,
        }
    }
}

/// What a picture's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PictureInfo {
    /// Its format.
    pub format: PictureFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Why a picture is refused. The messages name no path: callers add where it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PictureError {
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{bytes} bytes, more than the {} MiB a picture may have", MAX_FILE_BYTES >> 20)]
    FileTooLarge {
        /// The file's size.
        bytes: usize,
    },
    /// Not one of the accepted formats.
    #[error("not a PNG, JPEG or WebP picture")]
    Format,
    /// A side is 0 or past [`MAX_SIDE`].
    #[error("{width}x{height} pixels: each side must be 1..={MAX_SIDE}")]
    Size {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The header or the pixel data does not decode.
    #[error("an unreadable {format} picture ({reason})")]
    Unreadable {
        /// `png`, `jpeg` or `webp`.
        format: &'static str,
        /// The decoder's words.
        reason: String,
    },
}

/// Whether `s` names a picture as cells and requests do: a sha256 as 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads a picture's format and size from its header, without decoding the pixels.
pub fn probe(bytes: &[u8]) -> Result<PictureInfo, PictureError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(PictureError::FileTooLarge { bytes: bytes.len() });
    }
    let format = match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => PictureFormat::Png,
        Ok(ImageFormat::Jpeg) => PictureFormat::Jpeg,
        Ok(ImageFormat::WebP) => PictureFormat::WebP,
        _ => return Err(PictureError::Format),
    };
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format.image_format())
        .into_dimensions()
        .map_err(|e| unreadable(format, &e))?;
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(PictureError::Size { width, height });
    }
    Ok(PictureInfo {
        format,
        width,
        height,
    })
}

/// Decodes a whole picture to 8-bit RGB (row-major, 3 bytes a pixel), refusing what [`probe`]
/// refuses and pixel data that does not decode. A picture with alpha is flattened onto white,
/// as A1111's img2img does (`images.flatten` with its default background `#ffffff`, PIL's
/// `paste` rounding; A1111 flattens only RGBA pictures, and drops the alpha of a grey or
/// palette picture with transparency instead); 16-bit channels are rounded to 8.
pub fn decode_rgb8(bytes: &[u8]) -> Result<(PictureInfo, Vec<u8>), PictureError> {
    let info = probe(bytes)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), info.format.image_format());
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let picture = reader.decode().map_err(|e| unreadable(info.format, &e))?;
    if !picture.color().has_alpha() {
        return Ok((info, picture.into_rgb8().into_raw()));
    }
    let rgba = picture.into_rgba8().into_raw();
    let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.chunks_exact(4) {
        let a = u32::from(px[3]);
        for &c in &px[..3] {
            rgb.push(over_white(u32::from(c), a));
        }
    }
    Ok((info, rgb))
}

/// One channel `c` of alpha `a` composited onto opaque white: `(c·a + 255·(255−a)) / 255`
/// rounded as PIL's `DIV255` rounds.
fn over_white(c: u32, a: u32) -> u8 {
    let t = c * a + 255 * (255 - a) + 128;
    ((t + (t >> 8)) >> 8) as u8
}

fn unreadable(format: PictureFormat, e: &image::ImageError) -> PictureError {
    PictureError::Unreadable {
        format: format.as_str(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
        let picture = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Cursor::new(Vec::new());
        picture.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn png_jpeg_and_webp_decode_to_rgb8_at_their_size() {
        for (format, name) in [
            (ImageFormat::Png, "png"),
            (ImageFormat::Jpeg, "jpeg"),
            (ImageFormat::WebP, "webp"),
        ] {
            let bytes = encode(24, 16, format);
            let (info, pixels) = decode_rgb8(&bytes).unwrap();
            assert_eq!(
                (info.format.as_str(), info.width, info.height),
                (name, 24, 16)
            );
            assert_eq!(pixels.len(), 24 * 16 * 3);
        }
        // PNG and lossless WebP are exact.
        let (_, pixels) = decode_rgb8(&encode(5, 3, ImageFormat::Png)).unwrap();
        assert_eq!(&pixels[3..6], &[7, 0, 3]);
    }

    #[test]
    fn alpha_is_flattened_onto_white() {
        let picture = image::RgbaImage::from_raw(
            4,
            1,
            vec![
                10, 20, 30, 255, // opaque: unchanged
                10, 20, 30, 0, // transparent: white
                0, 100, 200, 128, // half: between
                255, 0, 0, 1,
            ],
        )
        .unwrap();
        let mut out = Cursor::new(Vec::new());
        picture.write_to(&mut out, ImageFormat::Png).unwrap();
        let (_, rgb) = decode_rgb8(&out.into_inner()).unwrap();
        // (c·a + 255·(255−a)) / 255, rounded half up: 0→127, 100→177, 200→227.
        assert_eq!(
            rgb,
            vec![10, 20, 30, 255, 255, 255, 127, 177, 227, 255, 254, 254]
        );
        for (c, a) in [(0, 0), (255, 255), (7, 200), (254, 3)] {
            let exact = (f64::from(c * a + 255 * (255 - a)) / 255.0).round() as u8;
            assert_eq!(over_white(c, a), exact, "{c} {a}");
        }
    }

    #[test]
    fn other_formats_truncated_and_oversized_pictures_are_refused() {
        assert_eq!(probe(b"hello, not a picture"), Err(PictureError::Format));
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert_eq!(probe(gif), Err(PictureError::Format));
        let png = encode(32, 32, ImageFormat::Png);
        let e = decode_rgb8(&png[..png.len() / 2]).unwrap_err();
        assert!(
            matches!(e, PictureError::Unreadable { format: "png", .. }),
            "{e:?}"
        );
        let wide = encode(MAX_SIDE + 8, 1, ImageFormat::Png);
        assert_eq!(
            probe(&wide),
            Err(PictureError::Size {
                width: MAX_SIDE + 8,
                height: 1
            })
        );
        let big = vec![0u8; MAX_FILE_BYTES + 1];
        assert_eq!(
            probe(&big),
            Err(PictureError::FileTooLarge {
                bytes: MAX_FILE_BYTES + 1
            })
        );
        assert!(
            PictureError::Size {
                width: 5000,
                height: 10
            }
            .to_string()
            .contains("5000x10 pixels: each side must be 1..=4096")
        );
    }
}
