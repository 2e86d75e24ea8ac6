//! The hires fix: render small, upscale, denoise again at the larger size, as A1111 defines it
//! (`modules/processing.py`, `StableDiffusionProcessingTxt2Img.init` and `sample_hr_pass`).
//!
//! Owns [`Hires`] (the settings of a request's second pass), how its target size is worked out
//! from a scale or a resize (A1111's arithmetic, including the crop when a resize changes the
//! aspect ratio), its validation, the second pass's sampler (k-diffusion's img2img cut of the
//! schedule) and its metadata. The pass itself runs in [`crate::engine::pipeline`].

use kiln_proto::hires::Upscaler;
use kiln_proto::sampler::SamplerName;

use crate::engine::error::{EngineError, Result};
use crate::engine::image::{HiresSize, HiresText};
use crate::engine::scheduler::{Img2ImgSteps, KSampler, Sampling, ScheduleConfig};

/// Latent cells per pixel edge.
const LATENT_SCALE: u32 = 8;

/// The largest hires scale (A1111's slider stops at 4).
pub const MAX_HIRES_SCALE: f32 = 4.0;

/// A request's hires fix.
#[derive(Clone, Debug, PartialEq)]
pub struct Hires {
    /// How large the second pass renders.
    pub size: HiresSize,
    /// How the first pass's result is enlarged.
    pub upscaler: Upscaler,
    /// Second-pass steps; 0 runs as many as the first pass.
    pub steps: usize,
    /// How much of the upscaled image is noised and redrawn, (0, 1].
    pub denoise: f32,
    /// The second pass's sampler; `None` keeps the first pass's.
    pub sampler: Option<SamplerName>,
}

/// Where the second pass renders, in latent cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiresGeometry {
    /// Size the latents are resized to (`[height, width]`).
    pub upscaled: [usize; 2],
    /// Latent rows cut from the top and bottom, and columns from the left and right, when a
    /// resize changed the aspect ratio (A1111's `truncate_y`/`truncate_x`, halves rounded as
    /// it rounds them).
    pub crop: [(usize, usize); 2],
}

impl HiresGeometry {
    /// The latent size the second pass samples at (`[height, width]`).
    pub fn latent(&self) -> [usize; 2] {
        let [h, w] = self.upscaled;
        let [(top, bottom), (left, right)] = self.crop;
        [h - top - bottom, w - left - right]
    }

    /// The final image's width and height in pixels.
    pub fn pixels(&self) -> (u32, u32) {
        let [h, w] = self.latent();
        (w as u32 * LATENT_SCALE, h as u32 * LATENT_SCALE)
    }
}

impl Hires {
    /// The second pass's geometry for a first pass of `width` × `height` pixels.
    pub fn geometry(&self, width: u32, height: u32) -> HiresGeometry {
        let (to_x, to_y, truncate_x, truncate_y) = match self.size {
            // `int(width * hr_scale)`: Python multiplies in double.
            HiresSize::Scale(scale) => {
                let scale = decimal(scale);
                let to_x = (f64::from(width) * scale) as u32;
                let to_y = (f64::from(height) * scale) as u32;
                (to_x, to_y, 0, 0)
            }
            HiresSize::Resize(rx, ry) => {
                if ry == 0 {
                    (rx, rx * height / width, 0, 0)
                } else if rx == 0 {
                    (ry * width / height, ry, 0, 0)
                } else {
                    // Fill the requested box keeping the first pass's aspect, then crop.
                    let src_ratio = f64::from(width) / f64::from(height);
                    let dst_ratio = f64::from(rx) / f64::from(ry);
                    let (to_x, to_y) = if src_ratio < dst_ratio {
                        (rx, rx * height / width)
                    } else {
                        (ry * width / height, ry)
                    };
                    (
                        to_x,
                        to_y,
                        (to_x - rx) / LATENT_SCALE,
                        (to_y - ry) / LATENT_SCALE,
                    )
                }
            }
        };
        let (tx, ty) = (truncate_x as usize, truncate_y as usize);
        HiresGeometry {
            upscaled: [
                (to_y / LATENT_SCALE) as usize,
                (to_x / LATENT_SCALE) as usize,
            ],
            crop: [(ty / 2, ty.div_ceil(2)), (tx / 2, tx.div_ceil(2))],
        }
    }

    /// The sampler of the second pass, given the first pass's.
    pub fn sampler_name(&self, first: SamplerName) -> SamplerName {
        self.sampler.unwrap_or(first)
    }

    /// The second pass's step count, given the first pass's.
    pub fn steps(&self, first: usize) -> usize {
        if self.steps == 0 { first } else { self.steps }
    }

    /// Checks the settings against a first pass of `width` × `height` pixels, `steps` steps
    /// with `sampler`, limited to `max_steps` steps per pass.
    pub fn check(
        &self,
        (width, height): (u32, u32),
        sampler: SamplerName,
        max_steps: usize,
    ) -> Result<()> {
        let invalid = |msg: String| Err(EngineError::InvalidRequest(msg));
        if !(self.denoise > 0.0 && self.denoise <= 1.0) {
            return invalid(format!(
                "hires denoising strength {} is not in (0, 1]",
                self.denoise
            ));
        }
        match self.size {
            HiresSize::Scale(scale) => {
                if !(1.0..=MAX_HIRES_SCALE).contains(&scale) {
                    return invalid(format!(
                        "hires scale {scale} is not in 1..={MAX_HIRES_SCALE}"
                    ));
                }
            }
            HiresSize::Resize(rx, ry) => {
                if (rx == 0 && ry == 0) || rx > width * 4 || ry > height * 4 {
                    return invalid(format!(
                        "hires resize {rx}x{ry} must name a width or a height of at most 4× \
                         {width}x{height}"
                    ));
                }
            }
        }
        let geometry = self.geometry(width, height);
        let [h, w] = geometry.latent();
        if h == 0 || w == 0 {
            return invalid("the hires size is empty".to_owned());
        }
        if self.steps > max_steps {
            return invalid(format!(
                "hires steps {} is more than {max_steps}",
                self.steps
            ));
        }
        let name = self.sampler_name(sampler);
        if !name.method.is_k_diffusion() {
            return invalid(format!(
                "the hires fix runs a k-diffusion sampler and `{name}` is not one: name a hires \
                 sampler such as euler_a or dpmpp_2m_karras"
            ));
        }
        Ok(())
    }

    /// The second pass's sampler for a model trained with `config` after a first pass of
    /// `steps` steps with `first`.
    pub fn sampling(
        &self,
        config: &ScheduleConfig,
        first: SamplerName,
        steps: usize,
    ) -> Result<Sampling> {
        let name = self.sampler_name(first);
        Ok(Sampling::K(KSampler::img2img(
            config,
            name.method,
            name.schedule,
            self.steps(steps),
            self.denoise,
            Img2ImgSteps::Fixed,
        )?))
    }

    /// The metadata A1111 writes for it, after a first pass with `first`.
    pub fn text(&self, first: SamplerName) -> HiresText {
        HiresText {
            size: self.size,
            steps: self.steps,
            upscaler: self.upscaler.a1111_name(),
            sampler: self.sampler.filter(|s| *s != first).map(|s| s.a1111_name()),
        }
    }
}

/// A float32 setting as the decimal the user wrote (what Python would hold): `1.3`, not
/// `1.2999999523`.
fn decimal(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

/// Crops `[channels, h, w]` latents by `crop` (`[(top, bottom), (left, right)]`).
pub fn crop_latents(
    x: &[f32],
    [channels, h, w]: [usize; 3],
    crop: [(usize, usize); 2],
) -> Vec<f32> {
    let [(top, bottom), (left, right)] = crop;
    if top + bottom + left + right == 0 {
        return x.to_vec();
    }
    let mut out = Vec::with_capacity(channels * (h - top - bottom) * (w - left - right));
    for plane in x.chunks_exact(h * w) {
        for row in plane.chunks_exact(w).take(h - bottom).skip(top) {
            out.extend_from_slice(&row[left..w - right]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::hires::LatentMode;

    fn hires(size: HiresSize) -> Hires {
        Hires {
            size,
            upscaler: Upscaler::Latent(LatentMode::Bilinear),
            steps: 0,
            denoise: 0.5,
            sampler: None,
        }
    }

    #[test]
    fn a_scale_multiplies_as_python_does() {
        // int(512 * 1.3) = 665 → 83 latent cells (664 pixels).
        let g = hires(HiresSize::Scale(1.3)).geometry(512, 512);
        assert_eq!(g.upscaled, [83, 83]);
        assert_eq!(g.pixels(), (664, 664));
        assert_eq!(
            hires(HiresSize::Scale(2.0)).geometry(512, 768).pixels(),
            (1024, 1536)
        );
    }

    #[test]
    fn a_resize_to_another_aspect_fills_then_crops() {
        // 512×512 to 1024×768: upscale to 1024×1024, cut 256 rows (32 latent rows: 16 + 16).
        let g = hires(HiresSize::Resize(1024, 768)).geometry(512, 512);
        assert_eq!(g.upscaled, [128, 128]);
        assert_eq!(g.crop, [(16, 16), (0, 0)]);
        assert_eq!(g.pixels(), (1024, 768));
        // One side only keeps the aspect.
        assert_eq!(
            hires(HiresSize::Resize(0, 1024))
                .geometry(512, 768)
                .pixels(),
            (680, 1024)
        );
    }

    #[test]
    fn crops_take_the_middle() {
        let x: Vec<f32> = (0..2 * 4 * 3).map(|v| v as f32).collect();
        let out = crop_latents(&x, [2, 4, 3], [(1, 1), (0, 1)]);
        assert_eq!(out, [3.0, 4.0, 6.0, 7.0, 15.0, 16.0, 18.0, 19.0]);
    }

    #[test]
    fn bad_settings_are_refused_with_the_value() {
        let euler = "euler_a".parse().expect("name");
        let ok = hires(HiresSize::Scale(1.5));
        assert!(ok.check((512, 512), euler, 150).is_ok());
        for (bad, needle) in [
            (
                Hires {
                    denoise: 0.0,
                    ..ok.clone()
                },
                "denoising strength 0",
            ),
            (
                Hires {
                    denoise: 1.5,
                    ..ok.clone()
                },
                "1.5",
            ),
            (hires(HiresSize::Scale(5.0)), "hires scale 5"),
            (hires(HiresSize::Resize(0, 0)), "resize 0x0"),
            (
                Hires {
                    steps: 151,
                    ..ok.clone()
                },
                "hires steps 151",
            ),
        ] {
            let err = bad.check((512, 512), euler, 150).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = ok
            .check((512, 512), SamplerName::LCM, 150)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`lcm` is not one"), "{err}");
        let with_sampler = Hires {
            sampler: Some(euler),
            ..ok
        };
        assert!(
            with_sampler
                .check((512, 512), SamplerName::LCM, 150)
                .is_ok()
        );
    }
}
