//! Hires-fix upscaler names, shared by the coordinator (sweep files, queries) and the worker.
//!
//! A1111's hires fix renders small, upscales, then denoises again at the larger size. The
//! upscaler decides how the small result is enlarged; the latent ones resize the latents
//! directly (no VAE round trip), as A1111's "Latent" family does with `torch`'s `interpolate`;
//! "Lanczos" decodes the small picture, resizes it as Pillow does and encodes it again.

use std::fmt;
use std::str::FromStr;

/// How latents are resized (`torch.nn.functional.interpolate` modes, no antialiasing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LatentMode {
    /// `bilinear`, `align_corners=False`: A1111 "Latent".
    Bilinear,
    /// `nearest`: A1111 "Latent (nearest)".
    Nearest,
    /// `nearest-exact`: A1111 "Latent (nearest-exact)".
    NearestExact,
}

/// The hires fix's upscaler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Upscaler {
    /// Resize the latents.
    Latent(LatentMode),
    /// Decode, resize the picture with Pillow's Lanczos filter (A1111 "Lanczos"), encode again.
    Lanczos,
}

impl Default for Upscaler {
    fn default() -> Self {
        Upscaler::Latent(LatentMode::Bilinear)
    }
}

/// An upscaler name nobody knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown hires upscaler `{0}` (upscalers: latent, latent_nearest, latent_nearest_exact, lanczos)"
)]
pub struct UnknownUpscaler(pub String);

impl Upscaler {
    /// Every upscaler.
    pub const ALL: [Upscaler; 4] = [
        Upscaler::Latent(LatentMode::Bilinear),
        Upscaler::Latent(LatentMode::Nearest),
        Upscaler::Latent(LatentMode::NearestExact),
        Upscaler::Lanczos,
    ];

    /// kiln's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Upscaler::Latent(LatentMode::Bilinear) => "latent",
            Upscaler::Latent(LatentMode::Nearest) => "latent_nearest",
            Upscaler::Latent(LatentMode::NearestExact) => "latent_nearest_exact",
            Upscaler::Lanczos => "lanczos",
        }
    }

    /// The `Hires upscaler:` value A1111 writes.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Upscaler::Latent(LatentMode::Bilinear) => "Latent",
            Upscaler::Latent(LatentMode::Nearest) => "Latent (nearest)",
            Upscaler::Latent(LatentMode::NearestExact) => "Latent (nearest-exact)",
            Upscaler::Lanczos => "Lanczos",
        }
    }
}

impl fmt::Display for Upscaler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Upscaler {
    type Err = UnknownUpscaler;

    /// kiln's names and A1111's, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Upscaler::ALL
            .into_iter()
            .find(|u| {
                wanted.eq_ignore_ascii_case(u.as_str())
                    || wanted.eq_ignore_ascii_case(u.a1111_name())
            })
            .ok_or_else(|| UnknownUpscaler(wanted.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_both_spellings() {
        for u in Upscaler::ALL {
            assert_eq!(u.as_str().parse(), Ok(u));
            assert_eq!(u.a1111_name().parse(), Ok(u));
            assert_eq!(u.a1111_name().to_uppercase().parse(), Ok(u));
        }
        let err = "ESRGAN_4x".parse::<Upscaler>().unwrap_err().to_string();
        assert!(
            err.contains("`ESRGAN_4x`") && err.contains("latent_nearest"),
            "{err}"
        );
    }
}
