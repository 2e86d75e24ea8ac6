//! How much of LCM's ideal edge over a classic sampler kiln delivers end to end (issue 19).
//!
//! On one loaded model (CPU, f32, candle's thread count from `RAYON_NUM_THREADS`), at one size,
//! `rounds` times: times the parts an image is made of (one text encode, one UNet evaluation at
//! batch 1 and at batch 2, one VAE decode; median of 3 calls after a warm-up), renders an LCM
//! 4-step CFG 1 image, an Euler a 25-step CFG 7.5 one and two more LCM ones through
//! [`Pipeline::render`] (the prompt-embedding cache off, so every render encodes its prompts;
//! the LCM time is the median of the three), then times the parts again. Each render is
//! compared with the mean of its own round's two measurements of the parts: this machine's
//! speed drifts by more than the 5 % checked over the minutes a run takes, so parts timed once
//! for the whole run cannot tell an overhead from the drift. The ideal ratio is what the parts
//! give (Euler a: 2 text encodes + 25 batch-2 evaluations + 1 decode; LCM: 1 encode + 4
//! batch-1 evaluations + 1 decode); the measured one is the Euler a render over the LCM render.
//! Everything a render does besides the parts (sampler arithmetic, noise, copies between steps,
//! PNG-ready pixels) shows as the gap.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kiln-worker --bench lcm_vs_euler --profile release -- DIR [SIZE] [ROUNDS]
//! ```

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use kiln_worker::engine::rng::TorchRng;
use kiln_worker::engine::{Device, HostTensor, Model, Pipeline, RenderRequest, SamplerName};

mod shared;
use shared::{loadavg, median, timed};

fn request(sampler: &str, steps: usize, cfg: f32, size: u32) -> RenderRequest {
    RenderRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: "blurry, lowres".into(),
        seed: 1,
        steps,
        cfg_scale: cfg,
        sampler: sampler.parse::<SamplerName>().expect("a known sampler"),
        width: size,
        height: size,
        ..RenderRequest::default()
    }
}

/// One text encode, one UNet evaluation at batch 1 and at batch 2, one VAE decode: median
/// seconds of `reps` calls each, after a warm-up.
struct Parts {
    text: f64,
    unet_1: f64,
    unet_2: f64,
    vae: f64,
}

impl Parts {
    fn measure(model: &Model, size: u32, reps: usize, rng: &mut TorchRng) -> Self {
        let prompt = "a photograph of an astronaut riding a horse";
        let context = model.encode_prompt(prompt).expect("encode");
        let text = timed(reps, || {
            model.encode_prompt(prompt).expect("encode");
        });
        let latent = (size / 8) as usize;
        let mut unet = |batch: usize| {
            let latents = HostTensor {
                shape: vec![batch, 4, latent, latent],
                data: rng.randn(batch * 4 * latent * latent),
            };
            let contexts = HostTensor {
                shape: vec![batch, context.shape[1], context.shape[2]],
                data: context.data.repeat(batch),
            };
            timed(reps, || {
                model
                    .predict_noise(&latents, 999.0, &contexts)
                    .expect("unet");
            })
        };
        let unet_1 = unet(1);
        let unet_2 = unet(2);
        let latents = HostTensor {
            shape: vec![1, 4, latent, latent],
            data: rng.randn(4 * latent * latent),
        };
        let vae = timed(reps, || {
            model.decode(&latents).expect("decode");
        });
        println!(
            "  parts (s): text encode {text:.3}, UNet batch 1 {unet_1:.3}, batch 2 {unet_2:.3} \
             ({:.2}× batch 1), VAE decode {vae:.3}",
            unet_2 / unet_1
        );
        Self {
            text,
            unet_1,
            unet_2,
            vae,
        }
    }

    /// What an LCM 4-step CFG 1 image costs in parts: 1 encode, 4 batch-1 steps, 1 decode.
    fn lcm(&self) -> f64 {
        self.text + 4.0 * self.unet_1 + self.vae
    }

    /// What an Euler a 25-step CFG 7.5 image costs: 2 encodes, 25 batch-2 steps, 1 decode.
    fn euler(&self) -> f64 {
        2.0 * self.text + 25.0 * self.unet_2 + self.vae
    }
}

fn main() {
    // SAFETY: first thing in main, before any thread is started (as `kiln` does).
    unsafe { kiln_worker::engine::threads::fix_thread_count(None) };
    let args: Vec<String> = shared::args();
    let model_dir = PathBuf::from(
        args.first()
            .cloned()
            .unwrap_or_else(|| "/tmp/kiln-bench/sd15-random".to_owned()),
    );
    let size: u32 = args.get(1).map_or(256, |s| s.parse().expect("SIZE"));
    let rounds: usize = args.get(2).map_or(2, |s| s.parse().expect("ROUNDS"));
    let reps = 3;
    let model = Model::load(&model_dir, &[], Device::Cpu).expect("model loads");
    let pipeline = Pipeline::with_embedding_cache(model, 0);
    let model = pipeline.model();
    println!(
        "{size}², {} threads, load average at start {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        loadavg()
    );

    let lcm = request("lcm", 4, 1.0, size);
    let euler = request("Euler a", 25, 7.5, size);
    let never = AtomicBool::new(false);
    let render = |r: &RenderRequest| {
        let start = Instant::now();
        let out = pipeline.render(r, &mut |_| {}, &never).expect("renders");
        let wall = start.elapsed().as_secs_f64();
        let t = out.times;
        println!(
            "  {:>7}: {wall:.2} s (text {:.2}, steps {:.2}, VAE {:.2}; load {})",
            if r.cfg_scale > 1.0 { "Euler a" } else { "LCM" },
            t.text_encode_ms / 1e3,
            t.unet_ms / 1e3,
            t.vae_ms / 1e3,
            loadavg()
        );
        wall
    };
    // Warm-up: the first calls at each shape also grow the heap (measured: the first round's
    // batch-2 evaluations up to 20 % slower than every later one's).
    let mut rng = TorchRng::new(0);
    Parts::measure(model, size, 1, &mut rng);
    render(&lcm);
    let (mut lcm_gap, mut euler_gap, mut of_ideal) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        // Parts on both sides of the renders, so each render is compared with the machine's
        // speed of its own minute (this CPU's throughput drifts more than the 5 % checked).
        println!("round {round}:");
        let before = Parts::measure(model, size, reps, &mut rng);
        // An LCM render takes a few seconds, where this machine's speed moves by several per
        // cent: the median of three, around the one long Euler a render.
        let mut lcm_renders = vec![render(&lcm)];
        let euler_s = render(&euler);
        lcm_renders.push(render(&lcm));
        lcm_renders.push(render(&lcm));
        let lcm_s = median(lcm_renders);
        let after = Parts::measure(model, size, reps, &mut rng);
        let ideal_lcm = (before.lcm() + after.lcm()) / 2.0;
        let ideal_euler = (before.euler() + after.euler()) / 2.0;
        let ratio = (euler_s / lcm_s) / (ideal_euler / ideal_lcm);
        println!(
            "  LCM {lcm_s:.2} s against parts {ideal_lcm:.2} s ({:+.1} %); Euler a {euler_s:.2} s \
             against parts {ideal_euler:.2} s ({:+.1} %); ratio measured {:.2}×, ideal {:.2}×: \
             {ratio:.3} of the ideal",
            100.0 * (lcm_s / ideal_lcm - 1.0),
            100.0 * (euler_s / ideal_euler - 1.0),
            euler_s / lcm_s,
            ideal_euler / ideal_lcm,
        );
        lcm_gap.push(lcm_s / ideal_lcm);
        euler_gap.push(euler_s / ideal_euler);
        of_ideal.push(ratio);
    }
    println!(
        "medians over {rounds} rounds: LCM render / its parts {:.3}, Euler a render / its parts \
         {:.3}, measured ratio / ideal {:.3} (load average at end {})",
        median(lcm_gap),
        median(euler_gap),
        median(of_ideal),
        loadavg()
    );
}
