//! `kiln render`: one local image from a model file or folder, without a coordinator.
//!
//! Parses the flags into an engine [`RenderRequest`], loads the pipeline once, shows a
//! per-step progress bar on stderr and writes a PNG with A1111-style metadata.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::prompt::ParsedPrompt;
use kiln_worker::agent::resolve;
use kiln_worker::cache::disk::DiskCache;
use kiln_worker::cache::hashes::{HashMemo, SharedMemo};
use kiln_worker::engine::{
    BaseModel, Device, Hires, HiresSize, InitImage, InversionDb, LoraSpec, Pipeline, RenderRequest,
    RngKind, SamplerName, Upscaler,
};

use crate::init_image;

/// Examples shown by `kiln render --help`.
pub const EXAMPLES: &str = "Examples:
  kiln render --model ./stable-diffusion-v1-5 --lora lcm-lora-sdv1-5.safetensors:1 \\
      --prompt 'a lighthouse at dusk' --seed 42 --steps 4 --cfg 1 -o lighthouse.png
  kiln render --model ./sd15 --prompt 'a red car' --negative 'blurry' \\
      --sampler 'DPM++ 2M Karras' --steps 25 --cfg 7.5 --seed 7 --width 512 --height 768 \\
      --subseed 99 --subseed-strength 0.2 --rng nv -o car.png
  kiln render --model ./sd15 --prompt 'a castle' --sampler 'DPM++ 2M Karras' --steps 20 \\
      --cfg 7 --seed 3 --hires-scale 2 --hires-denoise 0.5 -o castle-1024.png
  kiln render --model ./sd15 --prompt 'an oil painting of a fox' --sampler 'Euler a' \\
      --steps 20 --cfg 7 --seed 5 --init sketch.png --strength 0.6 -o fox.png";

/// Render one image locally.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An SD1.5 model: a single-file checkpoint (.safetensors, CompVis/LDM layout, with its
    /// .yaml beside it if it has one) or a diffusers folder (unet/, vae/, text_encoder/, …);
    /// or `hf:OWNER/REPO[@REVISION][/FILE]` or an `https://` URL, fetched once into the
    /// Hugging Face cache (HF_ENDPOINT, HF_TOKEN, HF_HOME; KILN_OFFLINE=1: cached only).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA to merge, as FILE or FILE:STRENGTH (default strength 1); repeat to stack. FILE
    /// may be an `hf:` reference or a URL too.
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]", value_parser = parse_lora)]
    loras: Vec<LoraSpec>,
    /// Where `<lora:name:weight>` in the prompt finds `name.safetensors` (subfolders too);
    /// repeat for more. Default: the current folder.
    #[arg(long = "lora-dir", value_name = "DIR")]
    lora_dirs: Vec<PathBuf>,
    /// A folder of textual-inversion embeddings (`NAME.safetensors`, subfolders too): NAME in
    /// the prompt or negative prompt stands for the embedding, as in A1111. Repeat for more (a
    /// later folder wins a name).
    #[arg(long = "embeddings", value_name = "DIR")]
    embeddings: Vec<PathBuf>,
    /// A VAE file to use instead of the model's own (A1111's "SD VAE").
    #[arg(long)]
    vae: Option<PathBuf>,
    /// CLIP layers to skip from the end, 1..=4 (A1111's "Clip skip"; 1 is the last layer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    clip_skip: u8,
    /// The prompt, in A1111's syntax: `(word:1.2)`, `[word]`, `BREAK`, `<lora:name:0.7>`.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (used only when --cfg is above 1).
    #[arg(long, default_value = "")]
    negative: String,
    /// Seed of the PyTorch-compatible noise generator (see --rng).
    #[arg(long)]
    seed: u64,
    /// A1111's variation seed, blended in by --subseed-strength.
    #[arg(long, default_value_t = 0)]
    subseed: u64,
    /// How much of the variation seed's noise to blend in, 0..=1 (0: none).
    #[arg(long, default_value_t = 0.0, value_parser = parse_strength)]
    subseed_strength: f32,
    /// The sampler's stochasticity where it has one: DDIM's η (default 0) or TCD's γ (default
    /// 0.3), 0..=1.
    #[arg(long, value_parser = parse_strength)]
    eta: Option<f32>,
    /// A1111's "Resize seed from": draw the noise for this size and centre it, so a seed keeps
    /// its composition at another size.
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    seed_resize_from: Option<(u32, u32)>,
    /// Noise generator: cpu (PyTorch's CPU generator, as diffusers on the CPU) or nv (its CUDA
    /// generator computed on any device, A1111's "NV").
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "nv"])]
    rng: String,
    /// Sampling steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Classifier-free guidance scale; 1 or less runs one UNet pass per step.
    #[arg(long, default_value_t = 1.0)]
    cfg: f32,
    /// Sampler, by kiln's name (lcm, euler, euler_a, heun, dpmpp_2m, dpmpp_2s_a, dpmpp_sde,
    /// each k-diffusion one also with _karras, e.g. dpmpp_2m_karras; ddim, unipc, tcd,
    /// euler_a_diffusers) or A1111's ("DPM++ 2M Karras", "Euler a"). The schedule is part of
    /// the name.
    #[arg(long, default_value = "lcm", value_parser = parse_sampler)]
    sampler: SamplerName,
    /// Width in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    width: u32,
    /// Height in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    height: u32,
    /// Hires fix (A1111's "Hires. fix"): render at --width x --height, upscale by this, 1..=4,
    /// and denoise again at the larger size. Turns the hires fix on (or --hires-size).
    #[arg(long, value_name = "SCALE", value_parser = parse_hires_scale, conflicts_with = "hires_size")]
    hires_scale: Option<f32>,
    /// Hires fix to this size instead of a scale (A1111's "Resize width/height to"); another
    /// aspect ratio is filled and cropped. Turns the hires fix on.
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    hires_size: Option<(u32, u32)>,
    /// How the hires fix enlarges the first pass: latent (default), latent_nearest,
    /// latent_nearest_exact, lanczos, or A1111's names ("Latent (nearest)").
    #[arg(long, value_name = "UPSCALER", value_parser = parse_upscaler)]
    hires_upscaler: Option<Upscaler>,
    /// Hires pass steps; 0 (default) runs as many as --steps.
    #[arg(long, value_name = "N")]
    hires_steps: Option<usize>,
    /// Hires pass denoising strength, above 0 and at most 1 (default 0.7, A1111's).
    #[arg(long, value_name = "STRENGTH", value_parser = parse_denoise)]
    hires_denoise: Option<f32>,
    /// Hires pass sampler, a k-diffusion one (any --sampler spelling); default: --sampler's,
    /// which must then be a k-diffusion sampler.
    #[arg(long, value_name = "SAMPLER", value_parser = parse_sampler)]
    hires_sampler: Option<SamplerName>,
    /// img2img: start from this picture (PNG, JPEG or WebP, at most 64 MiB and 8192 pixels a
    /// side) instead of noise. A picture of another size is resized to --width x --height with
    /// a Lanczos filter, stretching it if the aspect differs (A1111's "Just resize"). Runs
    /// k-diffusion samplers only.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["hires_scale", "hires_size"])]
    init: Option<PathBuf>,
    /// How much of the --init picture is noised and redrawn, above 0 and at most 1 (A1111's
    /// "Denoising strength"; default 0.75, its img2img default).
    #[arg(long, value_name = "STRENGTH", default_value_t = 0.75, value_parser = parse_denoise, requires = "init")]
    strength: f32,
    /// Compute device: cpu, cuda:N or metal:N (GPUs need a build with that feature).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Output PNG file.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
}

/// `FILE` or `FILE:STRENGTH`; a suffix that is not a number stays part of the path.
pub(crate) fn parse_lora(value: &str) -> Result<LoraSpec, String> {
    if value.trim_start().starts_with('<') {
        return Err(format!(
            "{value:?} is a prompt tag: write it in --prompt, or give the file as \
             --lora FILE[:STRENGTH]"
        ));
    }
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

/// A `--model`, `--lora` or `--vae` value: a path as it is, or an `hf:` or URL reference
/// fetched (or found in the cache) by the hub client.
fn local(path: &Path, what: &str) -> anyhow::Result<PathBuf> {
    match path.to_str() {
        Some(text) if kiln_worker::hub::is_reference(text) => {
            kiln_worker::hub::resolve(text, what, true).map_err(anyhow::Error::msg)
        }
        _ => Ok(path.to_path_buf()),
    }
}

/// The `<lora:name:te:unet>` tags of `prompt`, each found by name in `dirs` (default: the
/// current folder), merged after the `--lora` stack as a worker merges them.
fn prompt_loras(prompt: &str, dirs: &[PathBuf]) -> anyhow::Result<Vec<LoraSpec>> {
    let parsed = ParsedPrompt::parse(prompt).context("--prompt")?;
    let dirs = if dirs.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        dirs.to_vec()
    };
    parsed
        .loras()
        .into_iter()
        .map(|l| {
            let path = resolve::resolve(&l.name, &dirs, "LoRA", resolve::PathPolicy::AnyPath)
                .map_err(|e| anyhow::anyhow!("<lora:{}>: {e} (set --lora-dir)", l.name))?;
            Ok(LoraSpec {
                path,
                strength: l.unet,
                text_encoder_strength: (l.te != l.unet).then_some(l.te),
            })
        })
        .collect()
}

/// The textual-inversion embeddings under `dirs`; each refused file is reported (a prompt that
/// uses it fails).
fn load_inversions(dirs: &[PathBuf]) -> anyhow::Result<InversionDb> {
    for dir in dirs {
        anyhow::ensure!(dir.is_dir(), "--embeddings {}: not a folder", dir.display());
    }
    let db = InversionDb::load(dirs)?;
    for (name, error) in db.refused() {
        eprintln!("warning: embedding {name} cannot be used: {error}");
    }
    Ok(db)
}

fn parse_sampler(value: &str) -> Result<SamplerName, String> {
    value
        .parse()
        .map_err(|e: kiln_proto::sampler::UnknownSampler| e.to_string())
}

fn parse_upscaler(value: &str) -> Result<Upscaler, String> {
    value
        .parse()
        .map_err(|e: kiln_proto::hires::UnknownUpscaler| e.to_string())
}

fn parse_hires_scale(value: &str) -> Result<f32, String> {
    match value.parse::<f32>() {
        Ok(v) if (1.0..=4.0).contains(&v) => Ok(v),
        _ => Err(format!("{value} is not a number in 1..=4")),
    }
}

/// A denoising strength: above 0, at most 1.
fn parse_denoise(value: &str) -> Result<f32, String> {
    match value.parse::<f32>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{value} is not a number above 0 and at most 1")),
    }
}

/// The hires fix the flags ask for: on with --hires-scale or --hires-size.
fn hires(args: &Args) -> anyhow::Result<Option<Hires>> {
    let size = match (args.hires_scale, args.hires_size) {
        (Some(scale), _) => HiresSize::Scale(scale),
        (None, Some((w, h))) => HiresSize::Resize(w, h),
        (None, None) => {
            let set = [
                ("--hires-upscaler", args.hires_upscaler.is_some()),
                ("--hires-steps", args.hires_steps.is_some()),
                ("--hires-denoise", args.hires_denoise.is_some()),
                ("--hires-sampler", args.hires_sampler.is_some()),
            ];
            if let Some((flag, _)) = set.iter().find(|(_, on)| *on) {
                anyhow::bail!("{flag} needs --hires-scale or --hires-size (the hires fix is off)");
            }
            return Ok(None);
        }
    };
    Ok(Some(Hires {
        size,
        upscaler: args.hires_upscaler.unwrap_or_default(),
        steps: args.hires_steps.unwrap_or(0),
        denoise: args.hires_denoise.unwrap_or(0.7),
        sampler: args.hires_sampler,
    }))
}

fn parse_strength(value: &str) -> Result<f32, String> {
    match value.parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{value} is not a number in 0..=1")),
    }
}

/// Loads take the metadata's file hashes from the model cache folder's memo, shared with
/// workers on this PC, so a checkpoint is hashed once per version of the file, not per render.
fn remember_hashes() {
    let Some(dir) = DiskCache::default_dir() else {
        return;
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::debug!(dir = %dir.display(), error = %e, "no hash memo");
        return;
    }
    let memo = HashMemo::open(dir.join("hashes.json"));
    kiln_worker::engine::load::hashes::install(Box::new(SharedMemo(Arc::new(Mutex::new(memo)))));
}

/// `WxH` (`512x768`), as a sweep file writes sizes.
fn parse_size(value: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{value}` is not WIDTHxHEIGHT, e.g. 512x768");
    let (w, h) = value.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let w = w.trim().parse().map_err(|_| bad())?;
    let h = h.trim().parse().map_err(|_| bad())?;
    Ok((w, h))
}

fn parse_device(value: &str) -> Result<Device, String> {
    value
        .parse()
        .map_err(|e: kiln_worker::engine::EngineError| e.to_string())
}

/// Runs `kiln render`.
pub fn main(mut args: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    crate::hub::install(args.device != Device::Cpu, true)?;
    remember_hashes();
    let sampler = args.sampler;
    let hires = hires(&args)?;
    let mut request = RenderRequest {
        prompt: args.prompt,
        negative_prompt: args.negative,
        seed: args.seed,
        steps: args.steps,
        cfg_scale: args.cfg,
        sampler,
        width: args.width,
        height: args.height,
        clip_skip: usize::from(args.clip_skip),
        rng: if args.rng == "nv" {
            RngKind::Nv
        } else {
            RngKind::Cpu
        },
        subseed: args.subseed,
        subseed_strength: args.subseed_strength,
        seed_resize_from: args.seed_resize_from,
        hires,
        eta: args.eta,
        ..RenderRequest::default()
    };
    // Reject a bad size before spending seconds reading a picture or loading weights.
    request.check()?;
    if let Some(path) = &args.init {
        request.init_image = Some(InitImage {
            image: init_image::read(path, request.width, request.height)?,
            strength: args.strength,
        });
        request.check()?;
    }
    let inversions = load_inversions(&args.embeddings)?;
    args.model = local(&args.model, "model")?;
    for lora in &mut args.loras {
        lora.path = local(&lora.path, "LoRA")?;
    }
    if let Some(vae) = &args.vae {
        args.vae = Some(local(vae, "VAE")?);
    }

    let loading = ProgressBar::new_spinner().with_message(format!(
        "loading {} ({} LoRA)",
        args.model.display(),
        args.loras.len()
    ));
    loading.enable_steady_tick(std::time::Duration::from_millis(120));
    let mut loras = args.loras.clone();
    loras.extend(prompt_loras(&request.prompt, &args.lora_dirs)?);
    let base = BaseModel::read(&args.model)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let pipeline = Pipeline::new(
        base.build_with_vae(&loras, args.vae.as_deref(), args.device)
            .with_context(|| format!("building model {}", args.model.display()))?,
    );
    loading.finish_and_clear();
    let loaded = started.elapsed();
    pipeline.set_inversions(std::sync::Arc::new(inversions));
    pipeline.validate(&request)?;

    let bar = ProgressBar::new(request.steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] step {pos}/{len} {elapsed_precise}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} seed {}", sampler.a1111_name(), request.seed));
    let never = AtomicBool::new(false);
    let output = pipeline.render(
        &request,
        &mut |p| {
            bar.set_length(p.steps as u64);
            bar.set_position(p.step as u64)
        },
        &never,
    )?;
    bar.finish_and_clear();

    for note in &output.notes {
        eprintln!("note: {note}");
    }
    let png = output.to_png()?;
    std::fs::write(&args.output, png)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let (width, height) = match &request.hires {
        Some(h) => h.geometry(request.width, request.height).pixels(),
        None => (request.width, request.height),
    };
    let t = output.times;
    eprintln!(
        "wrote {} ({width}x{height}, {} steps, seed {}) in {:.1} s: loading {:.1} s, \
         text {:.1} s, steps {:.1} s, VAE {:.1} s",
        args.output.display(),
        request.steps,
        request.seed,
        started.elapsed().as_secs_f64(),
        loaded.as_secs_f64(),
        t.text_encode_ms / 1e3,
        t.unet_ms / 1e3,
        t.vae_ms / 1e3,
    );
    Ok(())
}
