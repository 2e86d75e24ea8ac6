//! The sweep's hires fix (`hires_*` keys): whether it is on, and the base cell's settings, every
//! value checked with its place. The axes over the same keys are [`axis`](super::axis)'s; the
//! per-cell checks that need the whole cell (a k-diffusion sampler for the hires pass, the final
//! size) are [`CellSpec::validate`](super::cell::CellSpec::validate)'s.

use toml::Spanned;

use super::cell::HiresSpec;
use super::error::PlanError;
use super::resolver::Resolver;
use super::spec::SweepFile;
use super::values::{hires_denoise, hires_sampler, hires_scale, hires_steps, size, upscaler};

/// What a `hires_*` key needs when the hires fix is off.
const NEEDS_SIZE: &str =
    "needs hires_scale or hires_size (the hires fix is on only when one of them is set)";

impl Resolver<'_> {
    /// The base cell's hires fix: `None` (off) unless `hires_scale` or `hires_size` is set at
    /// the top level or as an axis; then A1111's defaults (the `latent` upscaler, the first
    /// pass's steps and sampler, denoising strength 0.7) under the top-level keys. An axis of
    /// the scale or size sets it in every cell; until then the base holds a placeholder scale.
    pub(super) fn hires(&self, f: &SweepFile) -> Result<Option<HiresSpec>, PlanError> {
        let axes = f.axis_list();
        let on_axis = axes
            .iter()
            .any(|a| matches!(a.name.get_ref().as_str(), "hires_scale" | "hires_size"));
        if let (Some(_), Some(s)) = (&f.hires_scale, &f.hires_size) {
            return Err(self.conflict(s.span(), "hires_size", "hires_scale"));
        }
        let mut h = if let Some(s) = &f.hires_scale {
            HiresSpec::scaled(self.val(s.span(), "hires_scale", hires_scale(*s.get_ref()))?)
        } else if let Some(s) = &f.hires_size {
            HiresSpec {
                scale: 0.0,
                size: Some(self.val(s.span(), "hires_size", size(s.get_ref()))?),
                ..HiresSpec::scaled(0.0)
            }
        } else if on_axis {
            HiresSpec::scaled(1.0)
        } else {
            let off = [
                (
                    "hires_upscaler",
                    f.hires_upscaler.as_ref().map(Spanned::span),
                ),
                ("hires_steps", f.hires_steps.as_ref().map(Spanned::span)),
                ("hires_denoise", f.hires_denoise.as_ref().map(Spanned::span)),
                ("hires_sampler", f.hires_sampler.as_ref().map(Spanned::span)),
            ];
            if let Some((key, Some(span))) = off.into_iter().find(|(_, s)| s.is_some()) {
                return Err(self.invalid(span, key, NEEDS_SIZE));
            }
            if let Some(a) = axes.iter().find(|a| a.name.get_ref().starts_with("hires_")) {
                let key = format!("axes.{}", a.name.get_ref());
                return Err(self.invalid(a.name.span(), &key, NEEDS_SIZE));
            }
            return Ok(None);
        };
        if let Some(u) = &f.hires_upscaler {
            h.upscaler = self.val(u.span(), "hires_upscaler", upscaler(u.get_ref()))?;
        }
        if let Some(s) = &f.hires_steps {
            h.steps = self.val(s.span(), "hires_steps", hires_steps(*s.get_ref()))?;
        }
        if let Some(d) = &f.hires_denoise {
            h.denoise = self.val(d.span(), "hires_denoise", hires_denoise(*d.get_ref()))?;
        }
        if let Some(s) = &f.hires_sampler {
            h.sampler = Some(self.val(s.span(), "hires_sampler", hires_sampler(s.get_ref()))?);
        }
        Ok(Some(h))
    }
}
