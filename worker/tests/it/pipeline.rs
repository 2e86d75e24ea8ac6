//! End-to-end renders of `tiny-sd15` against diffusers' `StableDiffusionPipeline`: every
//! per-step latent and every pixel of the final PNG, for LCM at CFG 1 and 1.5 (two seeds, one
//! above 2^32) and Euler a at CFG 7.5; plus cancellation, bad sizes and ignored negatives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use kiln_worker::engine::image::decode_png;
use kiln_worker::engine::{
    Device, EngineError, HostTensor, LoraSpec, Pipeline, RenderOutput, RenderRequest, SamplerName,
    read_safetensors,
};
use serde::Deserialize;

use crate::fixture::{load, path, relative_error};

#[derive(Deserialize)]
struct Expected {
    runs: BTreeMap<String, Run>,
}

#[derive(Deserialize)]
struct Run {
    scheduler: String,
    prompt: String,
    steps: usize,
    guidance_scale: f32,
    seed: u64,
    png: String,
    lora: Option<RunLora>,
}

#[derive(Deserialize)]
struct RunLora {
    file: String,
    strength: f32,
}

fn pipeline(lora: Option<&RunLora>) -> Pipeline {
    let loras: Vec<LoraSpec> = lora
        .iter()
        .map(|l| LoraSpec {
            path: path(&l.file),
            strength: l.strength,
            text_encoder_strength: None,
        })
        .collect();
    Pipeline::load(&path("tiny-sd15"), &loras, Device::Cpu).expect("pipeline loads")
}

fn request(run: &Run) -> RenderRequest {
    RenderRequest {
        prompt: run.prompt.clone(),
        negative_prompt: String::new(),
        seed: run.seed,
        steps: run.steps,
        cfg_scale: run.guidance_scale,
        sampler: match run.scheduler.as_str() {
            "LCMScheduler" => SamplerName::LCM,
            _ => SamplerName::EULER_A_DIFFUSERS,
        },
        width: 64,
        height: 64,
        clip_skip: 1,
        ..RenderRequest::default()
    }
}

/// Renders `run`, checking each step's latents against the fixture.
fn render_checked(
    name: &str,
    pipeline: &Pipeline,
    run: &Run,
    tensors: &BTreeMap<String, HostTensor>,
) -> RenderOutput {
    let never = AtomicBool::new(false);
    let mut worst = 0f64;
    let mut on_step = |p: kiln_worker::engine::Progress<'_>| {
        let want = &tensors[&format!("run/{name}/step{}/latents", p.step - 1)];
        let err = relative_error(p.latents, &want.data);
        worst = worst.max(err);
        assert!(
            err <= 1e-4,
            "{name} step {}: relative error {err:e}",
            p.step
        );
    };
    let out = pipeline
        .render(&request(run), &mut on_step, &never)
        .expect("render");
    eprintln!("{name}: worst per-step latent relative error {worst:.3e}");
    out
}

/// Max per-channel difference between our image and the fixture PNG, and how many differ.
fn compare_png(name: &str, out: &RenderOutput, file: &str) -> (u8, usize) {
    let want = decode_png(&std::fs::read(path(file)).expect("fixture png")).expect("png");
    assert_eq!(
        (want.image.width, want.image.height),
        (out.image.width, out.image.height)
    );
    let diffs: Vec<u8> = out
        .image
        .pixels
        .iter()
        .zip(&want.image.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let count = diffs.iter().filter(|&&d| d > 0).count();
    eprintln!(
        "{name}: max pixel diff {max}/255, {count} of {} values differ",
        diffs.len()
    );
    (max, count)
}

#[test]
fn lcm_and_euler_a_renders_match_diffusers_pixel_for_pixel() {
    let expected: Expected = load("expected.json");
    let tensors = read_safetensors(&path("expected.safetensors")).expect("tensors");
    let with_lora = pipeline(
        expected.runs["lcm_cfg1_seed42"]
            .lora
            .as_ref()
            .map(|l| RunLora {
                file: l.file.clone(),
                strength: l.strength,
            })
            .as_ref(),
    );
    let without_lora = pipeline(None);
    for (name, run) in &expected.runs {
        let pipeline = if run.lora.is_some() {
            &with_lora
        } else {
            &without_lora
        };
        let out = render_checked(name, pipeline, run, &tensors);
        assert_eq!(out.unet_batch, if run.guidance_scale > 1.0 { 2 } else { 1 });
        let (max, _) = compare_png(name, &out, &run.png);
        assert!(max <= 1, "{name}: a pixel is {max}/255 off");
    }
}

#[test]
fn the_png_carries_a1111_parameters() {
    let expected: Expected = load("expected.json");
    let run = &expected.runs["lcm_cfg1_seed42"];
    let pipeline = pipeline(run.lora.as_ref());
    let out = pipeline
        .render(&request(run), &mut |_| {}, &AtomicBool::new(false))
        .expect("render");
    let hash = &pipeline.model().hash()[..10];
    let lora_hash = &pipeline.model().loras()[0].hash[..12];
    assert_eq!(
        out.parameters,
        format!(
            "a photograph of an astronaut riding a horse <lora:lora_kohya:1>\n\
             Steps: 4, Sampler: LCM, CFG scale: 1, Seed: 42, Size: 64x64, \
             Model hash: {hash}, Model: tiny-sd15, \
             Lora hashes: \"lora_kohya: {lora_hash}\", RNG: CPU"
        )
    );
    let png = decode_png(&out.to_png().expect("png")).expect("decode");
    assert_eq!(png.image, out.image);
    assert_eq!(
        png.text,
        vec![("parameters".to_owned(), out.parameters.clone())]
    );
}

#[test]
fn at_cfg_1_the_negative_prompt_is_ignored_and_reported() {
    let expected: Expected = load("expected.json");
    let run = &expected.runs["lcm_cfg1_seed42"];
    let pipeline = pipeline(run.lora.as_ref());
    let never = AtomicBool::new(false);
    let plain = pipeline
        .render(&request(run), &mut |_| {}, &never)
        .expect("render");
    let mut with_negative = request(run);
    with_negative.negative_prompt = "blurry".to_owned();
    let out = pipeline
        .render(&with_negative, &mut |_| {}, &never)
        .expect("render");
    assert_eq!(out.image, plain.image);
    assert_eq!(out.unet_batch, 1);
    assert_eq!(out.notes.len(), 1, "{:?}", out.notes);
    assert!(out.notes[0].contains("negative prompt ignored"));
    assert!(out.parameters.contains("\nNegative prompt: blurry\n"));
}

#[test]
fn a_set_cancel_flag_stops_the_render() {
    let expected: Expected = load("expected.json");
    let run = &expected.runs["lcm_cfg1_seed42"];
    let pipeline = pipeline(None);
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let err = pipeline
        .render(
            &request(run),
            &mut |p| {
                steps = p.step;
                cancel.store(true, Ordering::Relaxed);
            },
            &cancel,
        )
        .expect_err("cancelled");
    assert!(matches!(err, EngineError::Cancelled), "{err}");
    assert_eq!(steps, 1);
}

#[test]
fn sizes_that_are_not_multiples_of_8_are_rejected() {
    let expected: Expected = load("expected.json");
    let pipeline = pipeline(None);
    let mut req = request(&expected.runs["lcm_cfg1_seed42"]);
    req.width = 100;
    let err = pipeline
        .render(&req, &mut |_| {}, &AtomicBool::new(false))
        .expect_err("width 100");
    assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("width 100"), "{err}");
    req.width = 64;
    req.steps = 0;
    assert!(pipeline.validate(&req).is_err());
}

#[test]
fn odd_latent_sizes_render() {
    // 72×40 px gives 9×5 latents, which the UNet halves to 5×3, 3×2, 2×1: the up path must
    // resize to each skip connection's size, as diffusers does.
    let expected: Expected = load("expected.json");
    let pipeline = pipeline(None);
    let mut req = request(&expected.runs["lcm_cfg1_seed42"]);
    req.width = 72;
    req.height = 40;
    let out = pipeline
        .render(&req, &mut |_| {}, &AtomicBool::new(false))
        .expect("render");
    assert_eq!((out.image.width, out.image.height), (72, 40));
}
