//! A cell's hires fix as the coordinator stores it ([`HiresSpec`]): its settings, limits,
//! defaults, how it is written in `cells.spec`, and the final picture size A1111's arithmetic
//! gives (which the lease filter compares with a worker's `--max-pixels`).

use kiln_proto::hires::Upscaler;
use kiln_proto::sampler::SamplerName;
use serde::{Deserialize, Serialize};

/// The largest hires scale (A1111's slider stops at 4; the engine's limit too).
pub const MAX_HIRES_SCALE: f32 = 4.0;

/// The hires denoising strength when a sweep names none: A1111's default (its txt2img
/// "Denoising strength" slider starts at 0.7).
pub const DEFAULT_HIRES_DENOISE: f32 = 0.7;

/// The most steps a hires pass may take (what a first pass may take).
pub const MAX_HIRES_STEPS: u32 = 150;

/// The largest final width or height of a hires cell, in pixels.
pub const MAX_HIRES_SIZE: u32 = 4096;

/// An optional [`SamplerName`] (the hires pass's), stored like [`sampler_serde`].
mod opt_sampler_serde {
    use kiln_proto::sampler::SamplerName;
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes a reference
    pub(super) fn serialize<S: Serializer>(
        s: &Option<SamplerName>,
        ser: S,
    ) -> Result<S::Ok, S::Error> {
        match s {
            Some(s) => ser.serialize_some(&s.as_str()),
            None => ser.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SamplerName>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// [`Upscaler`] in `cells.spec` as its kiln name (`latent`); A1111's names read back too.
mod upscaler_serde {
    use kiln_proto::hires::Upscaler;
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `with` passes a reference
    pub(super) fn serialize<S: Serializer>(u: &Upscaler, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(u.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Upscaler, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A cell's hires fix (A1111's "Hires. fix"): render at the cell's size, upscale, denoise
/// again at the larger size. The final picture has `CellSpec::final_size`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HiresSpec {
    /// Scale of the first pass's size, 1..=4 (A1111's "Upscale by"); 0 when
    /// [`size`](Self::size) gives the size.
    #[serde(default, skip_serializing_if = "is_zero_f32")]
    pub scale: f32,
    /// (width, height) asked for (A1111's "Resize width/height to"); a different aspect ratio
    /// than the first pass's is filled and cropped, as A1111 does. `None` when scaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<(u32, u32)>,
    /// How the first pass's result is enlarged.
    #[serde(with = "upscaler_serde")]
    pub upscaler: Upscaler,
    /// Second-pass steps, 0..=150; 0: as many as the first pass.
    #[serde(default)]
    pub steps: u32,
    /// How much of the upscaled picture is noised and redrawn, (0, 1].
    pub denoise: f32,
    /// The second pass's sampler (a k-diffusion one); `None`: the first pass's.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_sampler_serde"
    )]
    pub sampler: Option<SamplerName>,
}

impl HiresSpec {
    /// A hires fix at `scale` with the defaults: the `latent` upscaler, the first pass's steps
    /// and sampler, denoising strength [`DEFAULT_HIRES_DENOISE`].
    pub fn scaled(scale: f32) -> Self {
        Self {
            scale,
            size: None,
            upscaler: Upscaler::default(),
            steps: 0,
            denoise: DEFAULT_HIRES_DENOISE,
            sampler: None,
        }
    }

    /// The final picture's (width, height) after a first pass of `width` × `height`: A1111's
    /// arithmetic as the worker's engine does it (`Hires::geometry(..).pixels()`): the target
    /// rounded down to whole latent cells (8 pixels), a resize to another aspect ratio filled
    /// then cropped.
    pub fn final_size(&self, width: u32, height: u32) -> (u32, u32) {
        const CELL: u32 = 8;
        let (w, h) = (u64::from(width.max(1)), u64::from(height.max(1)));
        let (to_x, to_y, cut_x, cut_y) = match self.size {
            None => {
                // `int(width * hr_scale)` in Python's doubles, of the decimal the user wrote.
                let scale: f64 = self.scale.to_string().parse().unwrap_or(0.0);
                let to_x = (w as f64 * scale) as u64;
                let to_y = (h as f64 * scale) as u64;
                (to_x, to_y, 0, 0)
            }
            Some((rx, ry)) => {
                let (rx, ry) = (u64::from(rx), u64::from(ry));
                // Fill the box keeping the first pass's aspect (w/h < rx/ry in integers).
                let (to_x, to_y) = if w * ry < rx * h {
                    (rx, rx * h / w)
                } else {
                    (ry * w / h, ry)
                };
                let cell = u64::from(CELL);
                (
                    to_x,
                    to_y,
                    to_x.saturating_sub(rx) / cell,
                    to_y.saturating_sub(ry) / cell,
                )
            }
        };
        let cell = u64::from(CELL);
        let side = |to: u64, cut: u64| {
            let cells = (to / cell).saturating_sub(cut);
            u32::try_from(cells * cell).unwrap_or(u32::MAX)
        };
        (side(to_x, cut_x), side(to_y, cut_y))
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_zero_f32(n: &f32) -> bool {
    *n == 0.0
}
