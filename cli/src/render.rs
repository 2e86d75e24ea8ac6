//! `kiln render`: one local image from a model folder, without a coordinator.
//!
//! Parses the flags into an engine [`RenderRequest`], loads the pipeline once, shows a
//! per-step progress bar on stderr and writes a PNG with A1111-style metadata.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_worker::engine::{Device, LoraSpec, Pipeline, RenderRequest, SamplerKind};

/// Examples shown by `kiln render --help`.
pub const EXAMPLES: &str = "Examples:
  kiln render --model ./stable-diffusion-v1-5 --lora lcm-lora-sdv1-5.safetensors:1 \\
      --prompt 'a lighthouse at dusk' --seed 42 --steps 4 --cfg 1 -o lighthouse.png
  kiln render --model ./sd15 --prompt 'a red car' --negative 'blurry' --sampler euler_a \\
      --steps 25 --cfg 7.5 --seed 7 --width 512 --height 768 -o car.png";

/// Render one image locally.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Diffusers-layout SD1.5 folder (unet/, vae/, text_encoder/, scheduler/).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA to merge, as FILE or FILE:STRENGTH (default strength 1); repeat to stack.
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]", value_parser = parse_lora)]
    loras: Vec<LoraSpec>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (used only when --cfg is above 1).
    #[arg(long, default_value = "")]
    negative: String,
    /// Seed of the PyTorch-compatible CPU noise generator.
    #[arg(long)]
    seed: u64,
    /// Sampling steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Classifier-free guidance scale; 1 or less runs one UNet pass per step.
    #[arg(long, default_value_t = 1.0)]
    cfg: f32,
    /// Sampler: lcm or euler_a.
    #[arg(long, default_value = "lcm", value_parser = ["lcm", "euler_a"])]
    sampler: String,
    /// Width in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    width: u32,
    /// Height in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    height: u32,
    /// Compute device: cpu, cuda:N or metal:N (GPUs need a build with that feature).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Output PNG file.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
}

/// `FILE` or `FILE:STRENGTH`; a suffix that is not a number stays part of the path.
pub(crate) fn parse_lora(value: &str) -> Result<LoraSpec, String> {
    if let Some((file, strength)) = value.rsplit_once(':')
        && let Ok(strength) = strength.parse::<f32>()
    {
        if !strength.is_finite() {
            return Err(format!("LoRA strength {strength} is not finite"));
        }
        return Ok(LoraSpec {
            path: PathBuf::from(file),
            strength,
            text_encoder_strength: None,
        });
    }
    Ok(LoraSpec {
        path: PathBuf::from(value),
        strength: 1.0,
        text_encoder_strength: None,
    })
}

fn parse_device(value: &str) -> Result<Device, String> {
    value
        .parse()
        .map_err(|e: kiln_worker::engine::EngineError| e.to_string())
}

/// Runs `kiln render`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let sampler: SamplerKind = args.sampler.parse()?;
    let request = RenderRequest {
        prompt: args.prompt,
        negative_prompt: args.negative,
        seed: args.seed,
        steps: args.steps,
        cfg_scale: args.cfg,
        sampler,
        width: args.width,
        height: args.height,
        clip_skip: 1,
    };
    // Reject a bad size before spending seconds loading weights.
    request.check()?;

    let loading = ProgressBar::new_spinner().with_message(format!(
        "loading {} ({} LoRA)",
        args.model.display(),
        args.loras.len()
    ));
    loading.enable_steady_tick(std::time::Duration::from_millis(120));
    let pipeline = Pipeline::load(&args.model, &args.loras, args.device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    loading.finish_and_clear();
    pipeline.validate(&request)?;

    let bar = ProgressBar::new(request.steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] step {pos}/{len} {elapsed_precise}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} seed {}", sampler.a1111_name(), request.seed));
    let never = AtomicBool::new(false);
    let output = pipeline.render(&request, &mut |p| bar.set_position(p.step as u64), &never)?;
    bar.finish_and_clear();

    for note in &output.notes {
        eprintln!("note: {note}");
    }
    let png = output.to_png()?;
    std::fs::write(&args.output, png)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "wrote {} ({}x{}, {} steps, seed {})",
        args.output.display(),
        request.width,
        request.height,
        request.steps,
        request.seed
    );
    Ok(())
}
