//! The worker's speed-ups (issue 5), not a test: what the prompt-embedding cache gains on a
//! seed sweep, what a UNet batch of 4 gains over 4 single renders, and how long a LoRA
//! strength change takes on a cached base against a cold load. One process, one run, CPU f32.
//!
//! ```sh
//! cargo bench -p kiln-worker --bench speedups --profile dev                 # tiny-sd15, 64×64
//! cargo bench -p kiln-worker --bench speedups --profile dev -- DIR SIZE [LORA]
//! ```
//!
//! With no arguments it uses the test fixtures (tiny-sd15 and its kohya LoRA). `KILN_BENCH_IMAGES`
//! sets the images per measurement (default 16), `KILN_BENCH_ROUNDS` the alternating rounds
//! (default 3), `KILN_BENCH_ONLY=switch|cache|batch` runs one part, `KILN_BENCH_CFGS=1,1.5`
//! the CFG scales (default both). Each rate is images/s over the whole sweep,
//! after one warm-up render; the two sides of each comparison run alternately, 3 times each,
//! and the medians are compared (so load that drifts during the run hits both). The switch
//! times are the median of 3.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

mod shared;
use shared::median;

use kiln_worker::engine::{
    BaseModel, Device, LoraSpec, Model, Pipeline, RenderRequest, SamplerName,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

struct Setup {
    model: PathBuf,
    size: u32,
    lora: Option<PathBuf>,
    images: usize,
}

impl Setup {
    fn loras(&self, strength: f32) -> Vec<LoraSpec> {
        self.lora
            .iter()
            .map(|path| LoraSpec {
                path: path.clone(),
                strength,
                text_encoder_strength: None,
            })
            .collect()
    }

    fn request(&self, seed: u64, cfg: f32) -> RenderRequest {
        RenderRequest {
            prompt: "a lighthouse on a cliff at dusk, oil painting, dramatic sky".into(),
            negative_prompt: "blurry, lowres".into(),
            seed,
            steps: 4,
            cfg_scale: cfg,
            sampler: SamplerName::LCM,
            width: self.size,
            height: self.size,
            clip_skip: 1,
            ..RenderRequest::default()
        }
    }
}

/// Images/s of a seed sweep rendered in chunks of `batch`.
fn sweep_rate(setup: &Setup, pipeline: &Pipeline, cfg: f32, batch: usize) -> f64 {
    let never = AtomicBool::new(false);
    let requests: Vec<RenderRequest> = (0..setup.images as u64)
        .map(|s| setup.request(s, cfg))
        .collect();
    // Warm-up (allocator, caches) with seeds outside the sweep.
    pipeline
        .render_batch(
            &(0..batch as u64)
                .map(|s| setup.request(1000 + s, cfg))
                .collect::<Vec<_>>(),
            &mut |_| {},
            &never,
        )
        .expect("warm-up");
    let start = Instant::now();
    for chunk in requests.chunks(batch) {
        let out = pipeline
            .render_batch(chunk, &mut |_| {}, &never)
            .expect("renders");
        std::hint::black_box(out);
    }
    setup.images as f64 / start.elapsed().as_secs_f64()
}

/// Runs `a` and `b` alternately `rounds` times each; their median results.
fn alternate(rounds: usize, mut a: impl FnMut() -> f64, mut b: impl FnMut() -> f64) -> (f64, f64) {
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ra.push(a());
        rb.push(b());
    }
    (median(ra), median(rb))
}

fn main() {
    // SAFETY: first thing in main, before any thread is started (as `kiln` does).
    unsafe { kiln_worker::engine::threads::fix_thread_count(None) };
    let args: Vec<String> = shared::args();
    let setup = match args.as_slice() {
        [] => Setup {
            model: fixtures().join("tiny-sd15"),
            size: 64,
            lora: Some(fixtures().join("lora_kohya.safetensors")),
            images: 16,
        },
        [dir, size, rest @ ..] => Setup {
            model: PathBuf::from(dir),
            size: size.parse().expect("SIZE is a number of pixels"),
            lora: rest.first().map(PathBuf::from),
            images: 16,
        },
        _ => panic!("usage: speedups [DIR SIZE [LORA]]"),
    };
    let setup = Setup {
        images: std::env::var("KILN_BENCH_IMAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(setup.images),
        ..setup
    };
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".to_owned());
    println!(
        "model {} at {}², LoRA {:?}, {} images per sweep, LCM 4 steps, CPU f32, threads {threads}",
        setup.model.display(),
        setup.size,
        setup.lora.as_ref().map(|p| p.display().to_string()),
        setup.images
    );

    let env = |name: &str| std::env::var(name).ok();
    let rounds: usize = env("KILN_BENCH_ROUNDS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only = env("KILN_BENCH_ONLY");
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let cfgs: Vec<f32> = env("KILN_BENCH_CFGS")
        .map(|v| {
            v.split(',')
                .map(|c| c.trim().parse().expect("KILN_BENCH_CFGS: numbers"))
                .collect()
        })
        .unwrap_or_else(|| vec![1.0, 1.5]);

    let base = BaseModel::read(&setup.model).expect("base");
    if run("switch") {
        switch(&setup, &base);
    }
    let model = || base.build(&setup.loras(1.0), Device::Cpu).expect("model");
    for &cfg in cfgs.iter().filter(|_| run("cache")) {
        let uncached = Pipeline::with_embedding_cache(model(), 0);
        let cached = Pipeline::new(model());
        let (uncached, cached) = alternate(
            rounds,
            || sweep_rate(&setup, &uncached, cfg, 1),
            || sweep_rate(&setup, &cached, cfg, 1),
        );
        println!(
            "seed sweep at CFG {cfg}: {uncached:.3} images/s encoding every prompt, \
             {cached:.3} with the embedding cache (gain {:.3}×)",
            cached / uncached
        );
    }
    for &cfg in cfgs.iter().filter(|_| run("batch")) {
        let pipeline = Pipeline::new(model());
        let (single, batched) = alternate(
            rounds,
            || sweep_rate(&setup, &pipeline, cfg, 1),
            || sweep_rate(&setup, &pipeline, cfg, 4),
        );
        println!(
            "batch at CFG {cfg}: {single:.3} images/s one at a time, {batched:.3} in batches of 4 \
             (gain {:.3}×)",
            batched / single
        );
    }
}

/// LoRA strength switch: a cold load (read the model, merge, build) against a rebuild from the
/// cached base (merge, build).
fn switch(setup: &Setup, base: &BaseModel) {
    let cold = median(
        (0..3)
            .map(|i| {
                let t = Instant::now();
                let loras = setup.loras(0.5 + i as f32 * 0.1);
                std::hint::black_box(Model::load(&setup.model, &loras, Device::Cpu).expect("cold"));
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let warm = median(
        (0..3)
            .map(|i| {
                let t = Instant::now();
                let loras = setup.loras(0.5 + i as f32 * 0.1);
                std::hint::black_box(base.build(&loras, Device::Cpu).expect("rebuild"));
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!(
        "LoRA strength switch: cold load {:.1} ms, from the cached base {:.1} ms ({:.1}× faster)",
        cold * 1e3,
        warm * 1e3,
        cold / warm
    );
}
