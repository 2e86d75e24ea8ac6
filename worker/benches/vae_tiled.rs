//! Memory and time of one VAE decode, whole or in tiles (`kiln_worker::engine::tiling`).
//!
//! Loads a model folder, decodes one random `SIZE`² latent (torch's CPU generator, seed 0) on
//! the CPU in f32 with `--vae-tiling MODE`, and prints one JSON object: seconds, the process's
//! resident memory before the decode, and the decode's peak above it. The peak is the kernel's
//! high-water mark (`VmHWM`), reset after loading (`/proc/self/clear_refs`, Linux), so model
//! loading does not count; run one process per mode. `compare` decodes both ways and also
//! prints the largest tiled-vs-whole pixel difference in 8-bit levels.
//!
//! The full-size SD1.5 VAE with random weights beside tiny-sd15's UNet and text encoder (only
//! the VAE runs; this keeps loading cheap):
//!
//! ```sh
//! cp -r worker/tests/fixtures/reference/tiny-sd15 /tmp/kiln-bench/tiny-sd15-vae
//! /work/venv/bin/python tools/bench/make_sd15_random.py --vae-only /tmp/kiln-bench/tiny-sd15-vae
//! RAYON_NUM_THREADS=2 cargo bench -p kiln-worker --bench vae_tiled --profile dev -- \
//!     /tmp/kiln-bench/tiny-sd15-vae 1024 on
//! ```

use std::time::Instant;

mod shared;

use kiln_worker::engine::rng::TorchRng;
use kiln_worker::engine::{Device, HostTensor, Model, VaeTiling};

/// A `/proc/self/status` field in GiB.
fn status_gib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0)
}

/// Resets the peak-RSS mark to the current RSS (Linux ≥ 4.0).
fn reset_peak() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset the peak RSS ({e}); the peak includes loading");
    }
}

/// One decode's seconds and its peak memory above what was resident before it (GiB).
fn measure(model: &Model, latents: &HostTensor, tiling: VaeTiling) -> (HostTensor, f64, f64, f64) {
    reset_peak();
    let before = status_gib("VmRSS:");
    let start = Instant::now();
    let out = model.decode_with(latents, tiling).expect("decode");
    let seconds = start.elapsed().as_secs_f64();
    (out, seconds, before, status_gib("VmHWM:") - before)
}

fn main() {
    // SAFETY: first thing in main, before any thread is started (as `kiln` does).
    unsafe { kiln_worker::engine::threads::fix_thread_count(None) };
    let args: Vec<String> = shared::args();
    let [dir, size, mode] = args.as_slice() else {
        eprintln!("usage: vae_tiled MODEL_DIR SIZE auto|on|off|compare");
        std::process::exit(2);
    };
    let size: usize = size.parse().expect("SIZE is a number of pixels");
    let model = Model::load(dir.as_ref(), &[], Device::Cpu).expect("model loads");
    let side = size / 8;
    let latents = HostTensor {
        shape: vec![1, 4, side, side],
        data: TorchRng::new(0).randn(4 * side * side),
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    let grid = model.vae_tile_grid();
    let report = |tiling: VaeTiling, (_, s, before, peak): &(HostTensor, f64, f64, f64)| {
        println!(
            "{{\"size\":{size},\"tiling\":\"{tiling}\",\"tile_px\":{},\"seconds\":{s:.2},\
             \"rss_before_gib\":{before:.3},\"decode_peak_gib\":{peak:.3},\"loadavg_1m\":{load}}}",
            grid.sample_tile
        );
    };
    if mode == "compare" {
        let tiled = measure(&model, &latents, VaeTiling::On);
        report(VaeTiling::On, &tiled);
        let whole = measure(&model, &latents, VaeTiling::Off);
        report(VaeTiling::Off, &whole);
        let worst = tiled
            .0
            .data
            .iter()
            .zip(&whole.0.data)
            .map(|(&a, &b)| f64::from((a - b).abs()) * 127.5)
            .fold(0.0, f64::max);
        println!("{{\"size\":{size},\"tiled_vs_whole_max_255\":{worst:.3}}}");
    } else {
        let tiling: VaeTiling = mode.parse().expect("MODE");
        report(tiling, &measure(&model, &latents, tiling));
    }
}
