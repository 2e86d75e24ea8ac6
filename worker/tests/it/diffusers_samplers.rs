//! `DdimScheduler`, `UniPcScheduler` and `TcdScheduler` against diffusers 0.42
//! (`tools/reference/gen_diffusers_samplers.py` → `diffusers_samplers.json` + `.safetensors`):
//! the timestep tables, and for 13 renders of `tiny-sd15` through diffusers'
//! `StableDiffusionPipeline` every scheduler step replayed from the recorded (guided) UNet
//! outputs, so no UNet runs here. Noise comes from our own `TorchRng` seeded as the pipeline's
//! generator and must reproduce every draw diffusers made, in the same steps.

use std::collections::BTreeMap;

use kiln_worker::engine::rng::{Randn, TorchRng};
use kiln_worker::engine::scheduler::{
    DdimScheduler, MultistepSampler, Sampler, Sampling, ScheduleConfig, StepOutput, TcdScheduler,
    UniPcScheduler, UniPcState,
};
use kiln_worker::engine::{HostTensor, read_safetensors};
use serde::Deserialize;

use crate::fixture::{load, path, relative_error};

/// One step from diffusers' own input sample and model output: `max |ours − diffusers|` over
/// the tensor's largest magnitude. The steps are a few float32 operations; the differences are
/// one-ulp `sqrt`/`log` results (torch's x86 `sqrt` is not correctly rounded) carried through.
const STEP_TOLERANCE: f64 = 1e-6;
/// The whole run chained through our own samples (model outputs still diffusers'): rounding
/// differences compound over at most 6 steps.
const CHAINED_TOLERANCE: f64 = 1e-5;

#[derive(Deserialize)]
struct Fixture {
    schedules: BTreeMap<String, BTreeMap<String, Table>>,
    runs: BTreeMap<String, Run>,
}

#[derive(Deserialize)]
struct Table {
    timesteps: Vec<usize>,
    /// UniPC only.
    sigmas: Option<Vec<f32>>,
    /// TCD only.
    #[serde(rename = "timestep_s_gamma0.3")]
    timestep_s: Option<Vec<usize>>,
}

#[derive(Deserialize)]
struct Run {
    method: String,
    steps: usize,
    cfg: f32,
    seed: u64,
    prompt: String,
    negative_prompt: String,
    /// DDIM only.
    eta: Option<f64>,
    /// TCD only.
    gamma: Option<f64>,
    timesteps: Vec<usize>,
    noise_draws: Vec<NoiseDraw>,
    png: String,
}

#[derive(Deserialize)]
struct NoiseDraw {
    tensor: String,
    drawn_in_step: usize,
}

/// The sampler under test, with UniPC's history for one image.
enum Under {
    Stateless(Box<dyn Sampler>),
    UniPc(UniPcScheduler, UniPcState),
}

impl Under {
    fn new(method: &str, steps: usize, eta: Option<f64>, gamma: Option<f64>) -> Self {
        let config = ScheduleConfig::default();
        match method {
            "ddim" => Under::Stateless(Box::new(
                DdimScheduler::new(&config, steps)
                    .and_then(|s| s.with_eta(eta.unwrap_or(0.0)))
                    .expect("DDIM"),
            )),
            "tcd" => {
                let tcd = TcdScheduler::new(&config, steps).expect("TCD");
                let tcd = match gamma {
                    Some(gamma) => tcd.with_gamma(gamma).expect("gamma"),
                    None => tcd,
                };
                Under::Stateless(Box::new(tcd))
            }
            "unipc" => {
                let unipc = UniPcScheduler::new(&config, steps).expect("UniPC");
                let state = unipc.start();
                Under::UniPc(unipc, state)
            }
            other => panic!("unknown method {other}"),
        }
    }

    fn timesteps(&self) -> Vec<f32> {
        match self {
            Under::Stateless(s) => s.timesteps().to_vec(),
            Under::UniPc(s, _) => s.timesteps().to_vec(),
        }
    }

    fn step(&mut self, i: usize, eps: &[f32], x: &[f32], rng: &mut dyn Randn) -> StepOutput {
        let out = match self {
            Under::Stateless(s) => s.step(i, eps, x, rng),
            Under::UniPc(s, state) => s.step(state, i, eps, x, rng),
        };
        out.expect("step")
    }
}

/// A `TorchRng` that remembers each draw and the step it was made in.
struct Recording {
    rng: TorchRng,
    step: usize,
    draws: Vec<(usize, Vec<f32>)>,
}

impl Randn for Recording {
    fn randn(&mut self, numel: usize) -> Vec<f32> {
        let values = self.rng.randn(numel);
        self.draws.push((self.step, values.clone()));
        values
    }
}

fn tensor<'a>(tensors: &'a BTreeMap<String, HostTensor>, name: &str) -> &'a [f32] {
    &tensors
        .get(name)
        .unwrap_or_else(|| panic!("fixture tensor {name} is missing"))
        .data
}

#[test]
fn timesteps_sigmas_and_tcd_intermediates_match_diffusers() {
    let fixture: Fixture = load("diffusers_samplers.json");
    let config = ScheduleConfig::default();
    assert_eq!(fixture.schedules.len(), 3);
    for (method, tables) in &fixture.schedules {
        for (steps, table) in tables {
            let steps: usize = steps.parse().expect("steps");
            let want: Vec<f32> = table.timesteps.iter().map(|&t| t as f32).collect();
            let under = Under::new(method, steps, None, None);
            assert_eq!(under.timesteps(), want, "{method} {steps}");
            if let Some(sigmas) = &table.sigmas {
                let unipc = UniPcScheduler::new(&config, steps).expect("UniPC");
                // float32 sqrt of the training sigmas: equal, or one ulp apart.
                let err = relative_error(unipc.sigmas(), sigmas);
                assert!(err <= 2e-7, "{method} {steps} sigmas: {err:e}");
            }
            if let Some(s) = &table.timestep_s {
                let tcd = TcdScheduler::new(&config, steps).expect("TCD");
                let ours: Vec<usize> = (0..steps).map(|i| tcd.prev_and_intermediate(i).1).collect();
                assert_eq!(&ours, s, "{method} {steps} timestep_s");
            }
        }
    }
}

#[test]
fn every_step_of_every_render_matches_diffusers_given_its_model_outputs() {
    let fixture: Fixture = load("diffusers_samplers.json");
    let tensors = read_safetensors(&path("diffusers_samplers.safetensors")).expect("tensors");
    assert_eq!(fixture.runs.len(), 13);
    // method -> worst (step, x0, chained) relative error.
    let mut worst: BTreeMap<&str, [f64; 3]> = BTreeMap::new();
    for (name, run) in &fixture.runs {
        assert!(
            std::path::Path::new(&path(&run.png)).exists(),
            "{name}: png"
        );
        assert!(!run.prompt.is_empty() && (run.cfg > 1.0) != run.negative_prompt.is_empty());
        let key = |what: &str| format!("run/{name}/{what}");
        for chained in [false, true] {
            let mut under = Under::new(&run.method, run.steps, run.eta, run.gamma);
            let want_t: Vec<f32> = run.timesteps.iter().map(|&t| t as f32).collect();
            assert_eq!(under.timesteps(), want_t, "{name}");
            let mut rng = Recording {
                rng: TorchRng::new(run.seed),
                step: 0,
                draws: Vec::new(),
            };
            // init_noise_sigma is 1 for all three: the first draw is the initial latent.
            let mut x = rng.rng.randn(4 * 8 * 8);
            assert_eq!(x, tensor(&tensors, &key("initial_latents")), "{name}");
            for i in 0..run.steps {
                rng.step = i;
                let sample = tensor(&tensors, &key(&format!("step{i}/sample")));
                if !chained {
                    x = sample.to_vec();
                }
                let eps = tensor(&tensors, &key(&format!("step{i}/model_output")));
                let out = under.step(i, eps, &x, &mut rng);
                let want = tensor(&tensors, &key(&format!("step{i}/latents")));
                let err = relative_error(&out.prev_sample, want);
                let seen = worst.entry(&run.method).or_default();
                let (slot, tol) = match chained {
                    false => (0, STEP_TOLERANCE),
                    true => (2, CHAINED_TOLERANCE),
                };
                seen[slot] = seen[slot].max(err);
                assert!(err <= tol, "{name} step {i} (chained {chained}): {err:e}");
                if let (false, Some(x0)) = (chained, tensors.get(&key(&format!("step{i}/x0")))) {
                    let err = relative_error(&out.denoised, &x0.data);
                    seen[1] = seen[1].max(err);
                    assert!(err <= STEP_TOLERANCE, "{name} step {i} x0: {err:e}");
                }
                x = out.prev_sample;
            }
            assert_eq!(rng.draws.len(), run.noise_draws.len(), "{name}: draws");
            for ((step, values), want) in rng.draws.iter().zip(&run.noise_draws) {
                assert_eq!(*step, want.drawn_in_step, "{name}: {}", want.tensor);
                assert_eq!(values, tensor(&tensors, &want.tensor), "{name}");
            }
        }
    }
    // TCD's fixture records `pred_noised`, not x₀, so its x₀ column stays 0.
    for (method, [step, x0, chained]) in worst {
        eprintln!(
            "{method}: worst relative error step {step:.3e}, x0 {x0:.3e}, chained {chained:.3e}"
        );
    }
}

#[test]
fn sampling_runs_each_method_per_image_as_the_pipeline_drives_it() {
    // Two identical images in one batch through `Sampling::sample`: each must come out as
    // diffusers' render, so UniPC's history is per image and the noise streams are per image.
    let fixture: Fixture = load("diffusers_samplers.json");
    let tensors = read_safetensors(&path("diffusers_samplers.safetensors")).expect("tensors");
    let config = ScheduleConfig::default();
    for name in ["ddim_eta0p5_s6_cfg2p5", "unipc_s6_cfg2p5", "tcd_s6_cfg2p5"] {
        let run = &fixture.runs[name];
        let key = |what: String| format!("run/{name}/{what}");
        let sampling = match run.method.as_str() {
            "ddim" => Sampling::Ddim(
                DdimScheduler::new(&config, run.steps)
                    .and_then(|s| s.with_eta(0.5))
                    .expect("DDIM"),
            ),
            "unipc" => Sampling::UniPc(UniPcScheduler::new(&config, run.steps).expect("UniPC")),
            _ => Sampling::Tcd(TcdScheduler::new(&config, run.steps).expect("TCD")),
        };
        assert_eq!(sampling.steps(), run.steps);
        assert_eq!(sampling.init_noise_sigma(), 1.0);
        let (mut a, mut b) = (TorchRng::new(run.seed), TorchRng::new(run.seed));
        let mut xs = vec![a.randn(256), b.randn(256)];
        let mut noise: [&mut dyn Randn; 2] = [&mut a, &mut b];
        let mut step = 0;
        let mut model = |inputs: &[Vec<f32>], t: f32| {
            assert_eq!(t, run.timesteps[step] as f32);
            let eps = tensor(&tensors, &key(format!("step{step}/model_output")));
            step += 1;
            Ok(inputs.iter().map(|_| eps.to_vec()).collect())
        };
        let mut on_step = |done: usize, _t: f32, xs: &[Vec<f32>]| {
            let want = tensor(&tensors, &key(format!("step{}/latents", done - 1)));
            for x in xs {
                let err = relative_error(x, want);
                assert!(err <= CHAINED_TOLERANCE, "{name} step {done}: {err:e}");
            }
        };
        sampling
            .sample(&mut xs, &mut noise, &mut model, &mut on_step)
            .expect("sample");
        assert_eq!(xs[0], xs[1], "{name}");
    }
}

#[test]
fn the_fixture_covers_each_method_with_and_without_noise() {
    let fixture: Fixture = load("diffusers_samplers.json");
    let count = |f: &dyn Fn(&Run) -> bool| fixture.runs.values().filter(|r| f(r)).count();
    assert_eq!(count(&|r| r.method == "ddim" && r.eta == Some(0.0)), 4);
    assert_eq!(count(&|r| r.method == "ddim" && r.eta == Some(0.5)), 1);
    assert_eq!(count(&|r| r.method == "unipc"), 4);
    assert_eq!(count(&|r| r.method == "tcd" && r.gamma == Some(0.3)), 4);
    // Noisy runs draw on every DDIM step, and on every TCD step but the last.
    for run in fixture.runs.values() {
        let draws = match (run.method.as_str(), run.eta, run.gamma) {
            ("ddim", Some(eta), _) if eta > 0.0 => run.steps,
            ("tcd", _, Some(gamma)) if gamma > 0.0 => run.steps - 1,
            _ => 0,
        };
        assert_eq!(run.noise_draws.len(), draws, "{}", run.method);
    }
}

#[test]
fn full_renders_match_diffusers_step_by_step_and_pixel_for_pixel() {
    use kiln_worker::engine::image::decode_png;
    use kiln_worker::engine::{Device, Pipeline, Progress, RenderRequest};
    use std::sync::atomic::AtomicBool;

    let fixture: Fixture = load("diffusers_samplers.json");
    let tensors = read_safetensors(&path("diffusers_samplers.safetensors")).expect("tensors");
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("pipeline loads");
    let never = AtomicBool::new(false);
    for (name, run) in &fixture.runs {
        let request = RenderRequest {
            prompt: run.prompt.clone(),
            negative_prompt: run.negative_prompt.clone(),
            seed: run.seed,
            steps: run.steps,
            cfg_scale: run.cfg,
            sampler: run.method.parse().expect("sampler name"),
            width: 64,
            height: 64,
            eta: run.eta.or(run.gamma).map(|v| v as f32),
            ..RenderRequest::default()
        };
        let mut worst = 0f64;
        let mut on_step = |p: Progress<'_>| {
            let want = tensor(&tensors, &format!("run/{name}/step{}/latents", p.step - 1));
            let err = relative_error(p.latents, want);
            worst = worst.max(err);
            assert!(err <= 1e-4, "{name} step {}: {err:e}", p.step);
        };
        let out = pipeline
            .render(&request, &mut on_step, &never)
            .expect("render");
        let want = decode_png(&std::fs::read(path(&run.png)).expect("png")).expect("png");
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
    }
}
