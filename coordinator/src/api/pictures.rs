//! The bounds of img2img pictures on the wire, shared by the sweep service (`PutImage`, the
//! `images` maps of submits, plans and extends) and the worker service (`GetImage`).

/// Most pictures one sweep file may name (`init_image`), and so entries in a request's
/// `images` map.
pub const MAX_SWEEP_IMAGES: usize = 256;

/// Bytes per message of a picture's stream (`PutImage` in, `GetImage` out).
pub const IMAGE_CHUNK_BYTES: usize = 1 << 20;
