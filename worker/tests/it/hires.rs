//! The hires fix against A1111's definition composed from k-diffusion, torch's `interpolate`
//! and diffusers' UNet (`tools/reference/gen_hires.py`): the cut img2img schedule, every
//! first-pass and second-pass latent, the upscaled latents and every pixel of the final image,
//! for the bilinear and nearest latent upscalers, with and without a separate hires sampler.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use kiln_worker::engine::image::decode_png;
use kiln_worker::engine::scheduler::{Img2ImgSteps, KSampler, ScheduleConfig};
use kiln_worker::engine::upscale::resize_latents;
use kiln_worker::engine::{
    Device, Hires, HiresSize, HostTensor, Pipeline, Progress, RenderRequest, SamplerName, Upscaler,
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
    prompt: String,
    negative_prompt: String,
    seed: u64,
    cfg: f32,
    width: u32,
    height: u32,
    method: String,
    schedule: String,
    steps: usize,
    hr_scale: f32,
    hr_width: u32,
    hr_height: u32,
    upscaler: String,
    hr_method: String,
    hr_schedule: String,
    hr_steps: usize,
    hr_steps_effective: usize,
    denoise: f32,
    sigma_sched: Vec<f32>,
    png: String,
}

fn name(method: &str, schedule: &str) -> SamplerName {
    let spelled = if schedule == "karras" {
        format!("{method}_karras")
    } else {
        method.to_owned()
    };
    spelled.parse().expect("fixture sampler")
}

impl Case {
    fn request(&self) -> RenderRequest {
        let first = name(&self.method, &self.schedule);
        let second = name(&self.hr_method, &self.hr_schedule);
        RenderRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            steps: self.steps,
            cfg_scale: self.cfg,
            sampler: first,
            width: self.width,
            height: self.height,
            hires: Some(Hires {
                size: HiresSize::Scale(self.hr_scale),
                upscaler: self.upscaler.parse::<Upscaler>().expect("upscaler"),
                steps: self.hr_steps,
                denoise: self.denoise,
                sampler: (second != first).then_some(second),
            }),
            ..RenderRequest::default()
        }
    }
}

#[test]
fn the_img2img_cut_of_the_schedule_matches_a1111() {
    let fixture: Fixture = load("hires.json");
    for (case_name, case) in &fixture.cases {
        let hr = name(&case.hr_method, &case.hr_schedule);
        let sampler = KSampler::img2img(
            &ScheduleConfig::default(),
            hr.method,
            hr.schedule,
            case.hr_steps_effective,
            case.denoise,
            Img2ImgSteps::Fixed,
        )
        .expect("img2img sampler");
        let got = sampler.sigmas();
        assert_eq!(got.len(), case.sigma_sched.len(), "{case_name}");
        let err = relative_error(got, &case.sigma_sched);
        assert!(
            err <= 2e-6,
            "{case_name}: {got:?} vs {:?}",
            case.sigma_sched
        );
    }
}

#[test]
fn hires_renders_match_a1111_latent_by_latent_and_pixel_for_pixel() {
    let fixture: Fixture = load("hires.json");
    let tensors = read_safetensors(&path("hires.safetensors")).expect("tensors");
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("pipeline loads");
    assert_eq!(fixture.cases.len(), 4);
    let never = AtomicBool::new(false);
    for (case_name, case) in &fixture.cases {
        let first_steps = case.steps;
        let mut seen = 0;
        let mut worst = 0f64;
        let mut on_step = |p: Progress<'_>| {
            let key = if p.step <= first_steps {
                format!("case/{case_name}/first/step{}/latents", p.step - 1)
            } else {
                format!(
                    "case/{case_name}/hires/step{}/latents",
                    p.step - first_steps - 1
                )
            };
            let want: &HostTensor = &tensors[&key];
            let err = relative_error(p.latents, &want.data);
            worst = worst.max(err);
            assert!(err <= 1e-4, "{case_name} {key}: relative error {err:e}");
            assert_eq!(p.steps, first_steps + case.hr_steps_effective);
            seen = p.step;
        };
        let out = pipeline
            .render(&case.request(), &mut on_step, &never)
            .expect("render");
        assert_eq!(seen, first_steps + case.hr_steps_effective, "{case_name}");
        assert_eq!(
            (out.image.width, out.image.height),
            (case.hr_width, case.hr_height)
        );
        let want = decode_png(&std::fs::read(path(&case.png)).expect("png")).expect("png");
        let max = out
            .image
            .pixels
            .iter()
            .zip(&want.image.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        eprintln!("{case_name}: worst latent error {worst:.3e}, max pixel diff {max}/255");
        assert!(max <= 1, "{case_name}: a pixel is {max}/255 off");
        let params = &out.parameters;
        assert!(
            params.contains(&format!("Size: {}x{}", case.width, case.height)),
            "{params}"
        );
        assert!(
            params.contains(&format!("Denoising strength: {}", case.denoise)),
            "{params}"
        );
        assert!(
            params.contains(&format!("Hires upscale: {}", case.hr_scale)),
            "{params}"
        );
    }
}

#[test]
fn the_upscale_matches_torch_interpolate() {
    let fixture: Fixture = load("hires.json");
    let tensors = read_safetensors(&path("hires.safetensors")).expect("tensors");
    for (case_name, case) in &fixture.cases {
        let last = &tensors[&format!("case/{case_name}/first/step{}/latents", case.steps - 1)];
        let want = &tensors[&format!("case/{case_name}/upscaled")];
        let Upscaler::Latent(mode) = case.upscaler.parse::<Upscaler>().expect("upscaler") else {
            continue;
        };
        let (h, w) = ((case.height / 8) as usize, (case.width / 8) as usize);
        let (uh, uw) = ((case.hr_height / 8) as usize, (case.hr_width / 8) as usize);
        let got = resize_latents(&last.data, [4, h, w], [uh, uw], mode);
        let err = relative_error(&got, &want.data);
        assert!(err <= 1e-6, "{case_name}: {err:e}");
    }
}
