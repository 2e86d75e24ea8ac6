//! DPM++ SDE and its Brownian-tree noise against k-diffusion 0.1.1 + torchsde 0.2.6 as A1111
//! builds them (`tools/reference/gen_dpmpp_sde.py`): numpy's `SeedSequence` states, every noise
//! value `sample_dpmpp_sde` asks the tree for (seeds 42 and 2^32 + 5, SD1.5's 6-step Karras
//! schedule), and every per-step latent of two toy-denoiser runs (normal and Karras, 6 steps,
//! one image and a batch of two).

use std::collections::BTreeMap;

use kiln_worker::engine::brownian::{BrownianTree, SeedSequence};
use kiln_worker::engine::read_safetensors;
use kiln_worker::engine::rng::TorchRng;
use kiln_worker::engine::scheduler::dpmpp_sde::sample_dpmpp_sde;
use serde::Deserialize;

use crate::fixture::{load, path};

/// Brownian noise: the tree's increments are bit-exact; the division by `sqrt(|σ_next − σ|)`
/// is not, because torch's float32 `sqrt` (MKL VML `vsSqrt`) is not IEEE's: one ulp of the
/// divisor on some queries.
const NOISE_TOLERANCE: f64 = 2.5e-7;
/// Toy-denoiser latents, relative to the tensor's largest value, while every noise query lands
/// on the same tree nodes as torch's: float32 rounding of the step coefficients (torch's
/// `log`/`exp` are MKL's, within an ulp of Rust's).
const LATENT_TOLERANCE: f64 = 1e-6;
/// The same once a query time differs from torch's by enough ulps to round (`round(t, 6)`) to
/// another 1e-6 grid point: the Brownian path between the two points is then missing or extra,
/// about `sqrt(1e-6 / |Δσ|)` in noise units for that step.
const SHIFTED_QUERY_TOLERANCE: f64 = 1e-3;

#[derive(Deserialize)]
struct Fixture {
    seed_sequences: Vec<SeedCase>,
    schedules: BTreeMap<String, Vec<f32>>,
    noise: BTreeMap<String, NoiseCase>,
    runs: BTreeMap<String, Run>,
}

#[derive(Deserialize)]
struct SeedCase {
    entropy: String,
    spawn_key: Vec<String>,
    pool_size: usize,
    state: Vec<u32>,
}

#[derive(Deserialize)]
struct NoiseCase {
    schedule: String,
    queries: Vec<(f32, f32)>,
}

#[derive(Deserialize)]
struct Run {
    schedule: String,
    seeds: Vec<String>,
    queries: Vec<(f32, f32)>,
}

const NUMEL: usize = 4 * 8 * 8;

fn fixture() -> Fixture {
    load("dpmpp_sde.json")
}

/// `max |got − want| / max(|want|, 1)` over a tensor.
fn worst(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length differs");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - f64::from(w)).abs() / f64::from(w).abs().max(1.0))
        .fold(0.0, f64::max)
}

#[test]
fn seed_sequence_states_match_numpy() {
    for case in fixture().seed_sequences {
        let entropy: u128 = case.entropy.parse().expect("entropy");
        let key: Vec<u128> = case.spawn_key.iter().map(|k| k.parse().unwrap()).collect();
        let seq = SeedSequence::new(entropy, &key, case.pool_size);
        assert_eq!(
            seq.generate_state(case.state.len()),
            case.state,
            "SeedSequence({entropy}, spawn_key={key:?}, pool_size={})",
            case.pool_size
        );
    }
}

#[test]
fn brownian_noise_matches_torchsde_query_by_query() {
    let fixture = fixture();
    let tensors = read_safetensors(&path("dpmpp_sde.safetensors")).expect("tensors");
    assert_eq!(fixture.noise.len(), 2);
    let (mut worst_err, mut exact, mut total) = (0f64, 0usize, 0usize);
    for (seed, case) in &fixture.noise {
        let sigmas = &fixture.schedules[&case.schedule];
        let mut tree = BrownianTree::for_schedule(seed.parse().unwrap(), NUMEL, sigmas);
        assert_eq!(case.queries.len(), 2 * (sigmas.len() - 2));
        for (k, &(sigma, sigma_next)) in case.queries.iter().enumerate() {
            let want = &tensors[&format!("noise/{seed}/q{k}")];
            assert_eq!(want.shape, [1, 4, 8, 8]);
            let w = &tensors[&format!("noise/{seed}/w{k}")];
            assert_eq!(
                tree.increment(sigma, sigma_next),
                w.data,
                "seed {seed} query {k}: the tree's increment is bit-exact"
            );
            let got = tree.noise(sigma, sigma_next);
            let err = worst(&got, &want.data);
            assert!(
                err <= NOISE_TOLERANCE,
                "seed {seed} query {k} ({sigma}, {sigma_next}): error {err:e}"
            );
            worst_err = worst_err.max(err);
            exact += got.iter().zip(&want.data).filter(|(g, w)| g == w).count();
            total += got.len();
        }
    }
    eprintln!("brownian noise: worst error {worst_err:.3e}, {exact}/{total} values bit-exact");
}

/// The `(σ, σ_next)` pairs `sample_dpmpp_sde` hands its noise sampler, in the loop's float32
/// maths: `(exp(ln σ), σ_s)` then `(exp(ln σ), exp(ln σ_next))` per step before the last.
fn queries(sigmas: &[f32]) -> Vec<(f32, f32)> {
    let mut out = Vec::new();
    for pair in sigmas.windows(2).filter(|pair| pair[1] > 0.0) {
        let (t, t_next) = (-pair[0].ln(), -pair[1].ln());
        let s = t + (t_next - t) * 0.5;
        out.push(((-t).exp(), (-s).exp()));
        out.push(((-t).exp(), (-t_next).exp()));
    }
    out
}

/// Python's `round(t, 6)` of a query time, as torchsde quantizes it.
fn grid(t: f32) -> String {
    format!("{:.6}", f64::from(t))
}

#[test]
fn toy_dpmpp_sde_runs_match_k_diffusion_step_by_step() {
    let fixture = fixture();
    let tensors = read_safetensors(&path("dpmpp_sde.safetensors")).expect("tensors");
    assert_eq!(fixture.runs.len(), 2);
    for (name, run) in &fixture.runs {
        let sigmas = &fixture.schedules[&run.schedule];
        let seeds: Vec<u64> = run.seeds.iter().map(|s| s.parse().unwrap()).collect();
        let ours = queries(sigmas);
        assert_eq!(ours.len(), run.queries.len(), "{name}: query count");
        let mut same_nodes = true;
        for (&(a, b), &(c, d)) in ours.iter().zip(&run.queries) {
            for (got, want) in [(a, c), (b, d)] {
                let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulps <= 4, "{name}: query time {got} vs torch's {want}");
                same_nodes &= grid(got) == grid(want);
            }
        }
        // In these fixtures only karras_6 lands elsewhere: step 1's σ_s (9.428073 vs torch's
        // 9.428070) and exp(ln σ₁) (6.082156 vs 6.082155), queried in steps 1 and 2.
        let tolerance = if same_nodes {
            LATENT_TOLERANCE
        } else {
            SHIFTED_QUERY_TOLERANCE
        };
        eprintln!("{name}: same tree nodes as torch: {same_nodes}");
        let x0 = &tensors[&format!("run/{name}/x0")];
        assert_eq!(x0.shape, [seeds.len(), 4, 8, 8]);
        let mut xs: Vec<Vec<f32>> = x0.data.chunks(NUMEL).map(<[f32]>::to_vec).collect();
        for (x, &seed) in xs.iter().zip(&seeds) {
            let want: Vec<f32> = TorchRng::new(seed)
                .randn(NUMEL)
                .iter()
                .map(|v| v * sigmas[0])
                .collect();
            assert_eq!(x, &want, "{name}: initial noise of seed {seed}");
        }
        let mut trees: Vec<BrownianTree> = seeds
            .iter()
            .map(|&seed| BrownianTree::for_schedule(seed, NUMEL, sigmas))
            .collect();
        let mut denoise = |xs: &[Vec<f32>], sigma: f32| {
            let scale = 0.5_f32 / (1.0 + sigma);
            Ok(xs
                .iter()
                .map(|x| x.iter().map(|&v| v * scale + 0.01).collect())
                .collect())
        };
        let mut seen = 0;
        let mut on_step = |n: usize, xs: &[Vec<f32>]| {
            let want = &tensors[&format!("run/{name}/step{}", n - 1)];
            let got: Vec<f32> = xs.concat();
            let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            let err = got
                .iter()
                .zip(&want.data)
                .map(|(&g, &w)| f64::from((g - w).abs() / scale))
                .fold(0.0, f64::max);
            eprintln!("{name} step {n}: relative error {err:.3e}");
            assert!(err <= tolerance, "{name} step {n}: error {err:e}");
            seen = n;
        };
        sample_dpmpp_sde(sigmas, &mut xs, &mut trees, &mut denoise, &mut on_step).expect("runs");
        assert_eq!(seen, sigmas.len() - 1, "{name}: every step reported");
    }
}
