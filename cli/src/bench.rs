//! `kiln bench`: how fast this machine renders with this build, on the device a worker would
//! use. Loads a model once, renders one warm-up batch and then `--reps` timed batches for each
//! `--batch` size, and prints, per batch size, images/s, UNet ms per step (per UNet pass, so a
//! CFG > 1 step counts its two halves as one batch), VAE decode ms per image and the peak
//! memory (on a GPU: free memory before loading minus the lowest seen, the way
//! `tools/gpu/bench_diffusers.py` measures diffusers; on the CPU: the process's peak RSS).
//! `--json` prints one object per line for scripts (`tools/gpu/check.sh`).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use kiln_worker::engine::device::MemoryWatch;
use kiln_worker::engine::{Device, LoraSpec, Pipeline, RenderRequest, SamplerName};

pub const EXAMPLES: &str = "Examples:
  kiln bench --model ./sd15 --lora lcm-lora-sdv1-5.safetensors --device cuda:0 --batch 1,8
  kiln bench --model ./sd15 --device cuda:0 --size 768 --cfg 1.5 --json";

/// Flags of `kiln bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Diffusers-layout SD1.5 folder.
    #[arg(long)]
    model: PathBuf,
    /// A LoRA to merge, as FILE or FILE:STRENGTH; repeat to stack.
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]", value_parser = crate::render::parse_lora)]
    loras: Vec<LoraSpec>,
    /// Compute device: cpu, cuda:N or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Image width and height, pixels.
    #[arg(long, default_value_t = 512)]
    size: u32,
    /// Sampling steps (LCM).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// CFG scale; above 1 every step is a batch of two UNet halves.
    #[arg(long, default_value_t = 1.0)]
    cfg: f32,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Timed batches per batch size (after one warm-up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// One JSON object per batch size instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one batch size measured.
#[derive(Debug, serde::Serialize)]
struct Row {
    engine: &'static str,
    device: String,
    size: u32,
    steps: usize,
    cfg: f32,
    batch: usize,
    images_per_s: f64,
    unet_ms_per_step: f64,
    vae_ms_per_image: f64,
    text_encode_ms: f64,
    /// Device memory (GPU) or peak RSS (CPU), MiB; the peak over the whole run so far.
    peak_mib: Option<f64>,
    load_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The process's peak resident set, MiB (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs `kiln bench`.
pub fn main(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(
        args.batch.iter().all(|&b| (1..=64).contains(&b)),
        "--batch sizes must be 1..=64"
    );
    let device: Device = args
        .device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let before = device.probe()?.free_bytes;
    let watch = MemoryWatch::start(device)?;
    let started = Instant::now();
    let pipeline = Pipeline::load(&args.model, &args.loras, device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let never = AtomicBool::new(false);
    let mut rows = Vec::new();
    for &batch in &args.batch {
        let requests: Vec<RenderRequest> = (0..batch as u64)
            .map(|seed| RenderRequest {
                prompt: "a photograph of an astronaut riding a horse".into(),
                negative_prompt: String::new(),
                seed,
                steps: args.steps,
                cfg_scale: args.cfg,
                sampler: SamplerName::LCM,
                width: args.size,
                height: args.size,
                clip_skip: 1,
                ..RenderRequest::default()
            })
            .collect();
        let mut walls = Vec::new();
        let mut unet = Vec::new();
        let mut vae = Vec::new();
        let mut text = Vec::new();
        for rep in 0..=args.reps {
            let t = Instant::now();
            let out = pipeline.render_batch(&requests, &mut |_| {}, &never)?;
            let wall = t.elapsed().as_secs_f64();
            if rep == 0 {
                continue; // warm-up: kernels compiled, buffers allocated
            }
            let times = out[0].times;
            walls.push(wall);
            // PhaseTimes are each image's share of the batch.
            unet.push(times.unet_ms * batch as f64 / args.steps as f64);
            vae.push(times.vae_ms);
            text.push(times.text_encode_ms * batch as f64);
        }
        rows.push(Row {
            engine: "kiln",
            device: device.to_string(),
            size: args.size,
            steps: args.steps,
            cfg: args.cfg,
            batch,
            images_per_s: batch as f64 / median(walls),
            unet_ms_per_step: median(unet),
            vae_ms_per_image: median(vae),
            text_encode_ms: median(text),
            peak_mib: None,
            load_s,
        });
    }
    let peak = match (watch, before) {
        (Some(w), Some(before)) => w
            .stop()
            .map(|lowest| before.saturating_sub(lowest) as f64 / (1 << 20) as f64),
        _ => peak_rss_mib(),
    };
    for row in &mut rows {
        row.peak_mib = peak;
    }
    if args.json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(());
    }
    println!(
        "{} on {}, {}², {} LCM steps, CFG {}, loaded in {:.1} s, peak memory {}",
        args.model.display(),
        device,
        args.size,
        args.steps,
        args.cfg,
        load_s,
        peak.map_or("unknown".into(), |m| format!("{m:.0} MiB"))
    );
    println!("batch  images/s  UNet ms/step  VAE ms/image  text ms");
    for r in &rows {
        println!(
            "{:>5}  {:>8.3}  {:>12.1}  {:>12.1}  {:>7.1}",
            r.batch, r.images_per_s, r.unet_ms_per_step, r.vae_ms_per_image, r.text_encode_ms
        );
    }
    Ok(())
}
