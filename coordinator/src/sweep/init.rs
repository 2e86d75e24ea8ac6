//! img2img in a sweep file (`init_image`, `strength`): whether it is on and the base cell's
//! picture and strength, every value checked with its place. A picture is named in cells by
//! the sha256 the client uploaded it under ([`SweepSource::images`](super::SweepSource)); the
//! coordinator checks at submit that it holds those bytes. The axes over the same keys are
//! [`axis`](super::axis)'s; the per-cell checks (no hires fix with img2img) are
//! [`CellSpec::validate`](super::cell::CellSpec::validate)'s.
use std::ops::Range;

use super::cell::{DEFAULT_INIT_STRENGTH, InitSpec, MAX_REF_BYTES};
use super::error::{PlanError, PlanErrorKind};
use super::resolver::Resolver;
use super::spec::SweepFile;

/// What `strength` needs when there is no init picture.
const NEEDS_IMAGE: &str = "needs init_image (img2img's start picture)";

impl Resolver<'_> {
    /// The base cell's img2img: `None` (text-to-image) unless `init_image` is set at the top
    /// level or as an axis; then the top-level `strength` or A1111's 0.75. An `init_image` axis
    /// sets the picture in every cell; until then the base holds an empty placeholder.
    pub(super) fn init(&self, f: &SweepFile) -> Result<Option<InitSpec>, PlanError> {
        let axes = f.axis_list();
        let axis = |name: &str| axes.iter().find(|a| a.name.get_ref() == name);
        let strength = match &f.strength {
            Some(s) => self.val(s.span(), "strength", init_strength(*s.get_ref()))?,
            None => DEFAULT_INIT_STRENGTH,
        };
        if let Some(name) = &f.init_image {
            self.check_text("init_image", name, MAX_REF_BYTES)?;
            return Ok(Some(InitSpec {
                name: name.get_ref().clone(),
                sha256: self.image(name.get_ref(), name.span())?,
                strength,
            }));
        }
        if axis("init_image").is_some() {
            return Ok(Some(InitSpec {
                name: String::new(),
                sha256: String::new(),
                strength,
            }));
        }
        if let Some(s) = &f.strength {
            return Err(self.invalid(s.span(), "strength", NEEDS_IMAGE));
        }
        if let Some(a) = axis("strength") {
            return Err(self.invalid(a.name.span(), "axes.strength", NEEDS_IMAGE));
        }
        Ok(None)
    }

    /// The sha256 the client uploaded picture `name` under.
    pub(super) fn image(&self, name: &str, span: Range<usize>) -> Result<String, PlanError> {
        self.src.images.get(name).cloned().ok_or_else(|| {
            PlanError::new(
                self.src.place_of(&span),
                PlanErrorKind::FileNotSent {
                    file: name.to_string(),
                },
            )
        })
    }
}

/// img2img's denoising strength, (0, 1].
pub(super) fn init_strength(v: f64) -> Result<f32, String> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(v as f32)
    } else {
        Err(format!("{v} is outside (0, 1] (above 0, at most 1)"))
    }
}

#[cfg(test)]
mod tests {
    use crate::sweep::{PlanLimits, SweepSource, plan, referenced_images};

    const CAT: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    const DOG: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";

    fn src(extra: &str) -> SweepSource {
        SweepSource::new(
            "s.toml",
            format!(
                "model = \"m\"\nprompt = \"a fox\"\nsampler = \"euler_a\"\nseeds = [1]\n{extra}"
            ),
        )
        .with_image("cat.png", CAT)
        .with_image("dog.jpg", DOG)
    }

    fn err(extra: &str) -> String {
        plan(&src(extra), &PlanLimits::default(), 0)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn init_image_and_strength_as_settings_and_axes() {
        let p = plan(
            &src("init_image = \"cat.png\"\n"),
            &PlanLimits::default(),
            0,
        )
        .unwrap();
        let init = p.cells[0].init.as_ref().unwrap();
        assert_eq!((init.name.as_str(), init.sha256.as_str()), ("cat.png", CAT));
        assert_eq!(init.strength, 0.75, "A1111's default");
        assert_eq!(p.cells[0].render_level(), 2);

        let text = "strength = 0.3\n[axes]\ninit_image = [\"cat.png\", \"dog.jpg\"]\n\
                    size = [\"512x512\", \"768x512\"]\n";
        let p = plan(&src(text), &PlanLimits::default(), 0).unwrap();
        assert_eq!(p.cells.len(), 4);
        let got: Vec<(&str, &str, u32, f32)> = p
            .cells
            .iter()
            .map(|c| {
                let i = c.init.as_ref().unwrap();
                (
                    c.bindings["init_image"].as_str(),
                    i.sha256.as_str(),
                    c.width,
                    i.strength,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("cat.png", CAT, 512, 0.3),
                ("cat.png", CAT, 768, 0.3),
                ("dog.jpg", DOG, 512, 0.3),
                ("dog.jpg", DOG, 768, 0.3)
            ]
        );

        let p = plan(
            &src("init_image = \"dog.jpg\"\n[axes]\nstrength = [0.25, 1.0]\n"),
            &PlanLimits::default(),
            0,
        )
        .unwrap();
        let strengths: Vec<(f32, &str)> = p
            .cells
            .iter()
            .map(|c| {
                (
                    c.init.as_ref().unwrap().strength,
                    c.bindings["strength"].as_str(),
                )
            })
            .collect();
        assert_eq!(strengths, [(0.25, "0.25"), (1.0, "1.0")]);
        // The picture is part of a cell's identity by content, not by name.
        let a = plan(
            &src("init_image = \"cat.png\"\n"),
            &PlanLimits::default(),
            0,
        )
        .unwrap();
        let renamed = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"a fox\"\nsampler = \"euler_a\"\nseeds = [1]\n\
             init_image = \"kitty.png\"\n",
        )
        .with_image("kitty.png", CAT);
        let b = plan(&renamed, &PlanLimits::default(), 0).unwrap();
        let plain = plan(&src(""), &PlanLimits::default(), 0).unwrap();
        assert_eq!(a.cells[0].cell_key(), b.cells[0].cell_key());
        assert_ne!(a.cells[0].cell_key(), plain.cells[0].cell_key());
    }

    #[test]
    fn bad_img2img_settings_name_their_place() {
        for (extra, says) in [
            (
                "init_image = \"owl.png\"\n",
                "s.toml:5:14: `owl.png` was not sent with the sweep",
            ),
            (
                "init_image = \"cat.png\"\nstrength = 1.5\n",
                "s.toml:6:12: strength: 1.5 is outside (0, 1]",
            ),
            (
                "init_image = \"cat.png\"\nstrength = 0\n",
                "strength: 0 is outside (0, 1]",
            ),
            (
                "strength = 0.5\n",
                "s.toml:5:12: strength: needs init_image",
            ),
            (
                "[axes]\nstrength = [0.5]\n",
                "axes.strength: needs init_image",
            ),
            (
                "init_image = \"cat.png\"\n[axes]\ninit_image = [\"dog.jpg\"]\n",
                "`axes.init_image` conflicts with `init_image`",
            ),
            (
                "[axes]\ninit_image = [\"cat.png\", 3]\n",
                "axes.init_image[1]: expected a string, found an integer",
            ),
            (
                "init_image = \"cat.png\"\nhires_scale = 2\n",
                "img2img has no hires fix",
            ),
        ] {
            let e = err(extra);
            assert!(e.contains(says), "{extra}: {e}");
        }
        let lcm = SweepSource::new(
            "s.toml",
            "model = \"m\"\nprompt = \"a fox\"\nseeds = [1]\ninit_image = \"cat.png\"\n",
        )
        .with_image("cat.png", CAT);
        let e = plan(&lcm, &PlanLimits::default(), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("img2img runs a k-diffusion sampler"), "{e}");
    }

    #[test]
    fn referenced_images_lists_each_picture_once() {
        let text = "init_image = \"a.png\"\n[axes]\ninit_image = [\"b.png\", \"a.png\", 4]\n";
        assert_eq!(
            referenced_images("s.toml", text).unwrap(),
            ["a.png", "b.png"]
        );
        assert!(
            referenced_images("s.toml", "prompt = \"x\"\n")
                .unwrap()
                .is_empty()
        );
    }
}
