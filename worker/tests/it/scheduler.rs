//! `LcmScheduler` and `EulerAncestralScheduler` against diffusers 0.42
//! (`tools/reference/gen_schedulers.py` → `schedulers.json`).
//!
//! The sampler runs replay diffusers' synthetic loop with our own RNG and our own fake model,
//! `eps = 0.5·tanh(model_input) + 0.01·t/1000`, and compare every intermediate tensor.

use std::collections::BTreeMap;

use kiln_worker::engine::rng::TorchRng;
use kiln_worker::engine::scheduler::{
    EulerAncestralScheduler, LcmScheduler, Sampler, ScheduleConfig, alphas_cumprod,
};
use serde::Deserialize;

use crate::fixture::{assert_close, load};

/// Schedule values (ᾱ, c_skip/c_out, timesteps, sigmas): relative tolerance.
const SCHEDULE_TOLERANCE: f64 = 1e-6;
/// Sampler tensors: `|ours − diffusers| ≤ 1e-4 · max(|diffusers|, 1)`, i.e. relative error 1e-4
/// for values above 1 and absolute 1e-4 below. float32 rounding differences (tanh, the order of
/// a few products) stay far below this over 4–6 chained steps.
const SAMPLER_TOLERANCE: f64 = 1e-4;

#[derive(Deserialize)]
struct SchedulersFixture {
    config: serde_json::Value,
    alphas_cumprod: Vec<f32>,
    lcm_timesteps: BTreeMap<String, Vec<usize>>,
    lcm_boundary: BTreeMap<String, Vec<Boundary>>,
    euler_a: EulerTables,
    lcm_run: Run<LcmStep>,
    euler_a_run: Run<EulerStep>,
}

#[derive(Deserialize)]
struct Boundary {
    timestep: usize,
    c_skip: f32,
    c_out: f32,
}

#[derive(Deserialize)]
struct EulerTables {
    by_steps: BTreeMap<String, EulerTable>,
}

#[derive(Deserialize)]
struct EulerTable {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

#[derive(Deserialize)]
struct Run<S> {
    steps: usize,
    seed: u64,
    shape: Vec<usize>,
    init_noise_sigma: f32,
    initial_noise: Tensor,
    noise_draws: Vec<NoiseDraw>,
    steps_detail: Vec<S>,
    final_latents: Tensor,
}

#[derive(Deserialize)]
struct Tensor {
    values: Vec<f32>,
}

#[derive(Deserialize)]
struct NoiseDraw {
    step_index: usize,
    values: Vec<f32>,
}

#[derive(Deserialize)]
struct LcmStep {
    timestep: usize,
    sample_in: Tensor,
    model_output: Tensor,
    denoised: Tensor,
    prev_sample: Tensor,
    noise_drawn: bool,
}

#[derive(Deserialize)]
struct EulerStep {
    timestep: f32,
    sample_in: Tensor,
    sample_in_scaled: Tensor,
    model_output: Tensor,
    pred_original_sample: Tensor,
    prev_sample: Tensor,
    noise_drawn: bool,
}

fn fixture() -> SchedulersFixture {
    load("schedulers.json")
}

/// The config the fixture built its schedulers from, parsed by our loader.
fn config(fixture: &SchedulersFixture) -> ScheduleConfig {
    ScheduleConfig::from_json(&fixture.config.to_string()).expect("fixture config parses")
}

/// The fake UNet of the fixture, in float32 like the torch expression.
fn fake_eps(model_input: &[f32], timestep: f32) -> Vec<f32> {
    let shift = 0.01 * timestep / 1000.0;
    model_input
        .iter()
        .map(|&x| 0.5 * x.tanh() + shift)
        .collect()
}

fn assert_relative(what: &str, got: &[f32], want: &[f32]) {
    assert_close(what, got, want, SCHEDULE_TOLERANCE, 0.0);
}

fn assert_sampler(what: &str, got: &[f32], want: &[f32]) {
    assert_close(what, got, want, SAMPLER_TOLERANCE, 1.0);
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let fixture = fixture();
    let ours = alphas_cumprod(&config(&fixture));
    assert_relative("alphas_cumprod", &ours, &fixture.alphas_cumprod);
}

#[test]
fn lcm_timesteps_match_for_every_step_count() {
    let fixture = fixture();
    let config = config(&fixture);
    assert_eq!(
        fixture.lcm_timesteps.len(),
        50,
        "fixture covers 1..=50 steps"
    );
    for (steps, want) in &fixture.lcm_timesteps {
        let steps: usize = steps.parse().expect("step count key");
        let lcm = LcmScheduler::new(&config, steps).expect("valid step count");
        assert_eq!(lcm.discrete_timesteps(), want.as_slice(), "{steps} steps");
    }
}

#[test]
fn lcm_boundary_scalings_match() {
    let fixture = fixture();
    let lcm = LcmScheduler::new(&config(&fixture), 4).expect("4 steps");
    let rows: Vec<&Boundary> = fixture.lcm_boundary.values().flatten().collect();
    assert!(!rows.is_empty());
    for row in rows {
        let (c_skip, c_out) = lcm.boundary_scalings(row.timestep);
        let what = format!("t={}", row.timestep);
        assert_relative(&format!("{what} c_skip"), &[c_skip], &[row.c_skip]);
        assert_relative(&format!("{what} c_out"), &[c_out], &[row.c_out]);
    }
}

#[test]
fn euler_ancestral_schedules_match() {
    let fixture = fixture();
    let config = config(&fixture);
    assert!(!fixture.euler_a.by_steps.is_empty());
    for (steps, want) in &fixture.euler_a.by_steps {
        let steps: usize = steps.parse().expect("step count key");
        let euler = EulerAncestralScheduler::new(&config, steps).expect("valid step count");
        assert_relative(
            &format!("{steps}: timesteps"),
            euler.timesteps(),
            &want.timesteps,
        );
        assert_relative(&format!("{steps}: sigmas"), euler.sigmas(), &want.sigmas);
        assert_relative(
            &format!("{steps}: init_noise_sigma"),
            &[euler.init_noise_sigma()],
            &[want.init_noise_sigma],
        );
    }
}

/// Initial latents as the pipeline makes them: `randn · init_noise_sigma`.
fn initial_latents<S>(run: &Run<S>, sampler: &impl Sampler, rng: &mut TorchRng) -> Vec<f32> {
    let numel: usize = run.shape.iter().product();
    let noise = rng.randn(numel);
    assert_eq!(noise, run.initial_noise.values, "initial noise");
    assert_relative(
        "init_noise_sigma",
        &[sampler.init_noise_sigma()],
        &[run.init_noise_sigma],
    );
    noise
        .iter()
        .map(|&z| z * sampler.init_noise_sigma())
        .collect()
}

/// The noise draws the fixture recorded for `step`, if any (one at most).
fn recorded_noise<S>(run: &Run<S>, step: usize) -> Option<&[f32]> {
    let mut draws = run.noise_draws.iter().filter(|d| d.step_index == step);
    let draw = draws.next().map(|d| d.values.as_slice());
    assert!(draws.next().is_none(), "step {step} drew noise twice");
    draw
}

#[test]
fn lcm_four_step_run_matches_diffusers() {
    let fixture = fixture();
    let run = &fixture.lcm_run;
    let lcm = LcmScheduler::new(&config(&fixture), run.steps).expect("4 steps");
    let mut rng = TorchRng::new(run.seed);
    let mut latents = initial_latents(run, &lcm, &mut rng);
    assert_eq!(run.steps_detail.len(), run.steps);

    for (index, want) in run.steps_detail.iter().enumerate() {
        let what = format!("LCM step {index}");
        assert_eq!(
            lcm.discrete_timesteps()[index],
            want.timestep,
            "{what}: timestep"
        );
        assert_sampler(&format!("{what}: sample"), &latents, &want.sample_in.values);
        let input = lcm
            .scale_model_input(&latents, index)
            .expect("index in range");
        let eps = fake_eps(&input, lcm.timesteps()[index]);
        assert_sampler(
            &format!("{what}: model_output"),
            &eps,
            &want.model_output.values,
        );

        // Replay the stream position to check the noise this step draws.
        let mut probe = rng.clone();
        let out = lcm.step(index, &eps, &latents, &mut rng).expect("step");
        match recorded_noise(run, index) {
            Some(noise) => {
                assert!(want.noise_drawn);
                assert_eq!(probe.randn(noise.len()), noise, "{what}: noise");
            }
            None => assert!(!want.noise_drawn && index == run.steps - 1, "{what}"),
        }
        assert_sampler(
            &format!("{what}: denoised"),
            &out.denoised,
            &want.denoised.values,
        );
        assert_sampler(
            &format!("{what}: prev_sample"),
            &out.prev_sample,
            &want.prev_sample.values,
        );
        latents = out.prev_sample;
    }
    assert_sampler("LCM final latents", &latents, &run.final_latents.values);
}

#[test]
fn euler_ancestral_six_step_run_matches_diffusers() {
    let fixture = fixture();
    let run = &fixture.euler_a_run;
    let euler = EulerAncestralScheduler::new(&config(&fixture), run.steps).expect("6 steps");
    let mut rng = TorchRng::new(run.seed);
    let mut latents = initial_latents(run, &euler, &mut rng);
    assert_eq!(run.steps_detail.len(), run.steps);

    for (index, want) in run.steps_detail.iter().enumerate() {
        let what = format!("Euler a step {index}");
        let timestep = euler.timesteps()[index];
        assert_relative(&format!("{what}: timestep"), &[timestep], &[want.timestep]);
        assert_sampler(&format!("{what}: sample"), &latents, &want.sample_in.values);
        let input = euler
            .scale_model_input(&latents, index)
            .expect("index in range");
        assert_sampler(
            &format!("{what}: scaled"),
            &input,
            &want.sample_in_scaled.values,
        );
        let eps = fake_eps(&input, timestep);
        assert_sampler(
            &format!("{what}: model_output"),
            &eps,
            &want.model_output.values,
        );

        let mut probe = rng.clone();
        let out = euler.step(index, &eps, &latents, &mut rng).expect("step");
        let noise = recorded_noise(run, index).expect("Euler a draws noise on every step");
        assert!(want.noise_drawn);
        assert_eq!(probe.randn(noise.len()), noise, "{what}: noise");
        let x0 = &want.pred_original_sample.values;
        assert_sampler(&format!("{what}: pred_original_sample"), &out.denoised, x0);
        assert_sampler(
            &format!("{what}: prev_sample"),
            &out.prev_sample,
            &want.prev_sample.values,
        );
        latents = out.prev_sample;
    }
    assert_sampler("Euler a final latents", &latents, &run.final_latents.values);
}
