//! An LCM-distilled UNet (`time_cond_proj_dim`, as LCM Dreamshaper v7) against diffusers'
//! `LatentConsistencyModelPipeline`: the guidance scale reaches the UNet as an embedding, one
//! pass per step, at CFG 1.5 and 8 (fixtures from `tools/reference/gen_lcm_distilled.py`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use kiln_worker::engine::image::decode_png;
use kiln_worker::engine::{Device, Pipeline, RenderRequest, SamplerName, read_safetensors};
use serde::Deserialize;

use crate::fixture::{load, path, relative_error};

#[derive(Deserialize)]
struct Reference {
    prompt: String,
    seed: u64,
    steps: usize,
    width: u32,
    height: u32,
    runs: BTreeMap<String, Run>,
}

#[derive(Deserialize)]
struct Run {
    guidance_scale: f32,
    png: String,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn an_lcm_distilled_unet_matches_diffusers_lcm_pipeline_at_cfg_1_5_and_8() {
    let r: Reference = load("lcm_distilled.json");
    let expected = read_safetensors(&path("lcm_distilled_expected.safetensors")).unwrap();
    // tiny-sd15 with its UNet replaced by the distilled one.
    let dir = tempfile::tempdir().unwrap();
    for part in ["text_encoder", "vae", "scheduler"] {
        copy_dir(&path("tiny-sd15").join(part), &dir.path().join(part));
    }
    copy_dir(&path("tiny-lcm-unet"), &dir.path().join("unet"));
    let pipeline = Pipeline::load(dir.path(), &[], Device::Cpu).expect("loads");
    assert!(pipeline.model().embeds_guidance());
    for (name, run) in &r.runs {
        let request = RenderRequest {
            prompt: r.prompt.clone(),
            negative_prompt: String::new(),
            seed: r.seed,
            steps: r.steps,
            cfg_scale: run.guidance_scale,
            sampler: SamplerName::LCM,
            width: r.width,
            height: r.height,
            clip_skip: 1,
            ..RenderRequest::default()
        };
        let mut last = Vec::new();
        let out = pipeline
            .render(
                &request,
                &mut |p| {
                    if p.step == p.steps {
                        last = p.latents.to_vec();
                    }
                },
                &AtomicBool::new(false),
            )
            .expect("render");
        let want = &expected[&format!("{name}/final_latents")];
        let err = relative_error(&last, &want.data);
        let png = decode_png(&std::fs::read(path(&run.png)).unwrap()).unwrap();
        let max = out
            .image
            .pixels
            .iter()
            .zip(&png.image.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("{name}: final latents relative error {err:.3e}, max pixel diff {max}/255");
        assert!(err <= 1e-4, "{name}: relative error {err:e}");
        assert!(max <= 1, "{name}: max pixel diff {max}");
        assert_eq!(out.unet_batch, 1, "{name}: one UNet pass per step");
    }
}
