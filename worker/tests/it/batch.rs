//! What the worker's speed features must not change: a UNet batch renders each image as its
//! single render would, a cached prompt embedding is the fresh one, and a LoRA stack re-merged
//! from a cached base is the model a cold load gives.

use std::sync::atomic::AtomicBool;

use kiln_worker::engine::{
    BaseModel, Device, HostTensor, LoraSpec, Model, Pipeline, RenderOutput, RenderRequest,
    SamplerName,
};

use crate::fixture::path;

fn lora(strength: f32) -> Vec<LoraSpec> {
    vec![LoraSpec {
        path: path("lora_kohya.safetensors"),
        strength,
        text_encoder_strength: None,
    }]
}

fn request(prompt: &str, seed: u64, cfg: f32, sampler: SamplerName) -> RenderRequest {
    RenderRequest {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        seed,
        steps: 4,
        cfg_scale: cfg,
        sampler,
        width: 64,
        height: 48,
        clip_skip: 1,
        ..RenderRequest::default()
    }
}

/// Max per-channel difference and how many values differ.
fn pixel_diff(a: &RenderOutput, b: &RenderOutput) -> (u8, usize) {
    assert_eq!(a.image.pixels.len(), b.image.pixels.len());
    let diffs: Vec<u8> = a
        .image
        .pixels
        .iter()
        .zip(&b.image.pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .collect();
    (
        diffs.iter().copied().max().unwrap_or(0),
        diffs.iter().filter(|&&d| d > 0).count(),
    )
}

#[test]
fn a_batch_of_four_renders_each_image_as_its_single_render() {
    let pipeline =
        Pipeline::load(&path("tiny-sd15"), &lora(1.0), Device::Cpu).expect("pipeline loads");
    let never = AtomicBool::new(false);
    let prompts = ["a red fox", "a red fox", "an arctic fox", "a fennec fox"];
    for (cfg, sampler) in [
        (1.0, SamplerName::LCM),
        (1.5, SamplerName::LCM),
        (7.5, SamplerName::EULER_A_DIFFUSERS),
    ] {
        let requests: Vec<RenderRequest> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| request(p, 40 + i as u64 * 1000, cfg, sampler))
            .collect();
        let mut steps_seen = [0usize; 4];
        let batch = pipeline
            .render_batch(&requests, &mut |p| steps_seen[p.image] += 1, &never)
            .expect("batch renders");
        assert_eq!(steps_seen, [4; 4], "progress per image per step");
        assert_eq!(batch.len(), 4);
        for (i, (req, got)) in requests.iter().zip(&batch).enumerate() {
            let single = pipeline.render(req, &mut |_| {}, &never).expect("single");
            let (max, count) = pixel_diff(got, &single);
            eprintln!("cfg {cfg} {sampler:?} image {i}: max diff {max}/255, {count} values differ");
            assert!(
                max <= 1,
                "image {i} differs from its single render by {max}/255"
            );
            assert_eq!(got.parameters, single.parameters, "metadata of image {i}");
            assert_eq!(got.times.batch, 4);
        }
        // Different seeds and prompts really give different images.
        assert!(pixel_diff(&batch[0], &batch[1]).0 > 10);
        assert!(pixel_diff(&batch[1], &batch[2]).0 > 10);
    }
}

#[test]
fn a_batch_of_unlike_requests_is_refused() {
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("loads");
    let a = request("a", 1, 1.0, SamplerName::LCM);
    let mut b = a.clone();
    b.steps = 6;
    let err = pipeline
        .render_batch(&[a, b], &mut |_| {}, &AtomicBool::new(false))
        .expect_err("must refuse");
    assert!(err.to_string().contains("share steps"), "{err}");
}

#[test]
fn a_seed_sweep_encodes_its_prompt_once_and_renders_the_same_images() {
    let never = AtomicBool::new(false);
    let model = || Model::load(&path("tiny-sd15"), &lora(1.0), Device::Cpu).expect("loads");
    let cached = Pipeline::new(model());
    let uncached = Pipeline::with_embedding_cache(model(), 0);
    for seed in 0..4 {
        let req = request("a lighthouse at dusk", seed, 1.5, SamplerName::LCM);
        let a = cached.render(&req, &mut |_| {}, &never).expect("cached");
        let b = uncached
            .render(&req, &mut |_| {}, &never)
            .expect("uncached");
        assert_eq!(
            a.image, b.image,
            "seed {seed}: a cached embedding changed the image"
        );
    }
    // Prompt and negative prompt encoded once each, then found 3 more times each.
    let stats = cached.embedding_stats();
    assert_eq!((stats.misses, stats.hits), (2, 6), "{stats:?}");
    assert_eq!(uncached.embedding_stats().misses, 8);
}

fn unet_out(model: &Model) -> Vec<f32> {
    let latents = HostTensor {
        shape: vec![1, 4, 8, 8],
        data: (0..256)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect(),
    };
    let context = model.encode_prompt("a castle").expect("encode");
    model
        .predict_noise(&latents, 500.0, &context)
        .expect("unet")
        .data
}

#[test]
fn re_merging_from_a_cached_base_equals_a_cold_load_and_leaves_the_base_alone() {
    let base = BaseModel::read(&path("tiny-sd15")).expect("base");
    let bare = unet_out(&base.build(&[], Device::Cpu).expect("bare"));
    for strength in [1.0, 0.5, 0.0, 0.5] {
        let warm = base.build(&lora(strength), Device::Cpu).expect("warm");
        let cold = Model::load(&path("tiny-sd15"), &lora(strength), Device::Cpu).expect("cold");
        assert_eq!(unet_out(&warm), unet_out(&cold), "strength {strength}");
        assert_eq!(warm.loras(), cold.loras());
        assert_eq!(warm.hash(), cold.hash());
        if strength != 0.0 {
            assert_ne!(
                unet_out(&warm),
                bare,
                "the LoRA at {strength} changed nothing"
            );
            assert!(warm.resident_bytes() > 0, "merged tensors are counted");
        }
    }
    // Building never wrote into the base.
    assert_eq!(
        unet_out(&base.build(&[], Device::Cpu).expect("bare again")),
        bare
    );
}
