//! img2img against A1111's definition composed from diffusers' VAE, k-diffusion and diffusers'
//! UNet (`tools/reference/gen_img2img.py`): the cut schedule, the encoded and noised start,
//! every latent the sampler passes through and every pixel of the image; plus the clear errors
//! for an init image of the wrong size, a bad strength and a sampler img2img cannot run.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use kiln_worker::engine::image::decode_png;
use kiln_worker::engine::{
    Device, EngineError, HostTensor, InitImage, Pipeline, Progress, RenderRequest, SamplerName,
    read_safetensors,
};
use serde::Deserialize;

use crate::fixture::{load, path, relative_error};

#[derive(Deserialize)]
struct Fixture {
    cases: BTreeMap<String, Case>,
}

#[derive(Deserialize)]
struct Case {
    init: String,
    width: u32,
    height: u32,
    method: String,
    schedule: String,
    steps: usize,
    strength: f32,
    cfg: f32,
    seed: u64,
    prompt: String,
    negative_prompt: String,
    t_enc: usize,
    png: String,
}

fn init(file: &str, strength: f32) -> InitImage {
    let png = decode_png(&std::fs::read(path(file)).expect("init png")).expect("decodes");
    InitImage {
        image: png.image,
        strength,
    }
}

impl Case {
    fn request(&self) -> RenderRequest {
        let name = if self.schedule == "karras" {
            format!("{}_karras", self.method)
        } else {
            self.method.clone()
        };
        RenderRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            steps: self.steps,
            cfg_scale: self.cfg,
            sampler: name.parse::<SamplerName>().expect("sampler"),
            width: self.width,
            height: self.height,
            init_image: Some(init(&self.init, self.strength)),
            ..RenderRequest::default()
        }
    }
}

#[test]
fn img2img_renders_match_a1111_latent_by_latent_and_pixel_for_pixel() {
    let fixture: Fixture = load("img2img.json");
    let tensors = read_safetensors(&path("img2img.safetensors")).expect("tensors");
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("pipeline loads");
    assert_eq!(fixture.cases.len(), 3);
    let never = AtomicBool::new(false);
    for (name, case) in &fixture.cases {
        let mut seen = 0;
        let mut worst = 0f64;
        let mut on_step = |p: Progress<'_>| {
            let want: &HostTensor = &tensors[&format!("case/{name}/step{}/latents", p.step - 1)];
            let err = relative_error(p.latents, &want.data);
            worst = worst.max(err);
            // The VAE encoder adds its own float32 rounding (~3e-6) to the start.
            assert!(
                err <= 1e-4,
                "{name} step {}: relative error {err:e}",
                p.step
            );
            assert_eq!(p.steps, case.t_enc + 1);
            seen = p.step;
        };
        let out = pipeline
            .render(&case.request(), &mut on_step, &never)
            .expect("render");
        assert_eq!(seen, case.t_enc + 1, "{name}: t_enc + 1 steps run");
        let want = decode_png(&std::fs::read(path(&case.png)).expect("png")).expect("png");
        assert_eq!(
            (out.image.width, out.image.height),
            (case.width, case.height)
        );
        let max = out
            .image
            .pixels
            .iter()
            .zip(&want.image.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        eprintln!("{name}: worst latent error {worst:.3e}, max pixel diff {max}/255");
        assert!(max <= 1, "{name}: a pixel is {max}/255 off");
        assert!(
            out.parameters
                .contains(&format!("Denoising strength: {}", case.strength)),
            "{}",
            out.parameters
        );
    }
}

#[test]
fn bad_img2img_requests_are_clear_errors() {
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("pipeline loads");
    let base = RenderRequest {
        prompt: "a fox".into(),
        steps: 4,
        sampler: "euler_a".parse().expect("sampler"),
        width: 64,
        height: 64,
        init_image: Some(init("vae_encoder_a.png", 0.5)),
        ..RenderRequest::default()
    };
    assert!(pipeline.validate(&base).is_ok());
    let cases = [
        (
            RenderRequest {
                width: 96,
                ..base.clone()
            },
            "the init image is 64x64 but the render is 96x64",
        ),
        (
            RenderRequest {
                init_image: Some(init("vae_encoder_a.png", 1.5)),
                ..base.clone()
            },
            "denoising strength 1.5 is not in (0, 1]",
        ),
        (
            RenderRequest {
                sampler: SamplerName::LCM,
                ..base.clone()
            },
            "`lcm` is not one",
        ),
    ];
    for (request, needle) in cases {
        match pipeline.validate(&request) {
            Err(EngineError::InvalidRequest(msg)) => assert!(msg.contains(needle), "{msg}"),
            other => panic!("{needle}: {other:?}"),
        }
    }
}
