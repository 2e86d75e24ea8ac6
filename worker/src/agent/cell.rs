//! A leased cell read into what renders it: the checked [`RenderRequest`] and the
//! [`PipelineKey`] with the model, LoRA and VAE files located (in the `--models` folders, or
//! where the model cache keeps a pinned file). Anything that cannot be is bad input, said in
//! words the submitter can act on; nothing here touches the network or the device.

use std::path::PathBuf;

use kiln_proto::prompt::ParsedPrompt;
use kiln_proto::v1 as pb;

use super::backlog::Plan;
use super::{AgentConfig, pinned, resolve};
use crate::cache::PipelineKey;
use crate::engine::pipeline::MAX_HIRES_STEPS;
use crate::engine::{Hires, HiresSize, LoraSpec, RenderRequest, RngKind, SamplerName, Upscaler};

/// Resolves a leased cell's files and settings (bad input when they cannot be).
pub(super) fn plan(cfg: &AgentConfig, task: &pb::LeasedTask) -> Plan {
    let cell = task.cell.as_ref().ok_or("leased task has no cell")?;
    // A sampler (or noise) this worker does not know is never rendered as another one.
    let sampler = SamplerName::from_proto(cell.sampler, cell.schedule)
        .map_err(|e| format!("{e}: not a sampler this worker renders"))?;
    let rng = match pb::RngSource::try_from(cell.rng) {
        Ok(pb::RngSource::Unspecified | pb::RngSource::Cpu) => RngKind::Cpu,
        Ok(pb::RngSource::Nv) => RngKind::Nv,
        Err(_) => return Err(format!("rng: unknown value {}", cell.rng)),
    };
    let seed_resize_from = match (cell.seed_resize_from_width, cell.seed_resize_from_height) {
        (0, 0) => None,
        (0, _) | (_, 0) => {
            return Err("seed_resize_from: give both width and height, or neither".into());
        }
        (w, h) => Some((w, h)),
    };
    // The largest pass sets what a render needs: the hires pass's size when there is one.
    let (width, height) = (cell.width, cell.height);
    if u64::from(width) * u64::from(height) > cfg.max_pixels {
        return Err(format!(
            "{width}x{height} is past this worker's max pixels {}",
            cfg.max_pixels
        ));
    }
    let hires = hires(cell, sampler)?;
    check_init(cell, sampler, hires.is_some())?;
    if let Some(h) = &hires {
        let (w, h) = h.geometry(width, height).pixels();
        if u64::from(w) * u64::from(h) > cfg.max_pixels {
            return Err(format!(
                "the hires size {w}x{h} is past this worker's max pixels {}",
                cfg.max_pixels
            ));
        }
    }
    let request = RenderRequest {
        prompt: cell.prompt.clone(),
        negative_prompt: cell.negative_prompt.clone(),
        seed: cell.seed,
        steps: cell.steps as usize,
        cfg_scale: cell.cfg,
        sampler,
        width: cell.width,
        height: cell.height,
        clip_skip: cell.clip_skip.max(1) as usize,
        rng,
        subseed: cell.subseed,
        subseed_strength: cell.subseed_strength,
        seed_resize_from,
        hires,
        eta: cell.eta,
        vae_tiling: cfg.vae_tiling,
        ..RenderRequest::default()
    };
    Ok((pipeline_key(cfg, cell)?, request))
}

/// A cell's img2img settings, checked before its picture is fetched (the picture is fetched
/// and put into the request when the cell renders).
fn check_init(cell: &pb::RenderCell, sampler: SamplerName, hires: bool) -> Result<(), String> {
    if cell.init_image_sha256.is_empty() {
        if cell.strength != 0.0 {
            return Err("strength: set without an init image".into());
        }
        return Ok(());
    }
    if !kiln_proto::picture::is_sha256_hex(&cell.init_image_sha256) {
        return Err("init_image_sha256: not 64 lowercase hex digits".into());
    }
    if !(cell.strength > 0.0 && cell.strength <= 1.0) {
        return Err(format!("strength: {} is outside (0, 1]", cell.strength));
    }
    if hires {
        return Err("img2img has no hires fix".into());
    }
    if !sampler.method.is_k_diffusion() {
        return Err(format!(
            "img2img runs a k-diffusion sampler and `{sampler}` is not one"
        ));
    }
    Ok(())
}

/// A cell's hires fix (off when `hires_denoise` is 0), checked against its first pass before
/// any size is worked out from it.
fn hires(cell: &pb::RenderCell, sampler: SamplerName) -> Result<Option<Hires>, String> {
    if cell.hires_denoise == 0.0 {
        return Ok(None);
    }
    let upscaler = match cell.hires_upscaler.as_str() {
        "" => Upscaler::default(),
        name => name
            .parse()
            .map_err(|e| format!("hires_upscaler: {e}: not an upscaler this worker has"))?,
    };
    let hires_sampler = match cell.hires_sampler {
        0 => None,
        _ => Some(
            SamplerName::from_proto(cell.hires_sampler, cell.hires_schedule)
                .map_err(|e| format!("hires_sampler: {e}: not a sampler this worker renders"))?,
        ),
    };
    let size = if cell.hires_scale != 0.0 {
        HiresSize::Scale(cell.hires_scale)
    } else {
        HiresSize::Resize(cell.hires_width, cell.hires_height)
    };
    let hires = Hires {
        size,
        upscaler,
        steps: cell.hires_steps as usize,
        denoise: cell.hires_denoise,
        sampler: hires_sampler,
    };
    if cell.width == 0 || cell.height == 0 {
        return Err(format!("{}x{} is not a size", cell.width, cell.height));
    }
    hires
        .check((cell.width, cell.height), sampler, MAX_HIRES_STEPS)
        .map_err(|e| e.to_string())?;
    Ok(Some(hires))
}

/// Where a reference is found: in the `--models` folders, or, pinned by `sha256`, where the
/// model cache keeps it (made true before the render, [`pinned`]).
fn locate(cfg: &AgentConfig, reference: &str, sha256: &str, what: &str) -> Result<PathBuf, String> {
    if sha256.is_empty() {
        resolve::plan(reference, &cfg.models, what, cfg.paths)
    } else {
        pinned::planned_path(&cfg.model_cache.dir(), reference, sha256)
    }
}

fn pipeline_key(cfg: &AgentConfig, cell: &pb::RenderCell) -> Result<PipelineKey, String> {
    let model = locate(cfg, &cell.model, &cell.model_sha256, "model")?;
    let mut loras = cell
        .loras
        .iter()
        .map(|l| {
            Ok(LoraSpec {
                path: locate(cfg, &l.name, &l.sha256, "LoRA")?,
                strength: l.strength,
                text_encoder_strength: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    // `<lora:name:te:unet>` in the prompt, merged after the cell's own stack, as A1111 does.
    let prompt = ParsedPrompt::parse(&cell.prompt).map_err(|e| format!("prompt: {e}"))?;
    for lora in prompt.loras() {
        loras.push(LoraSpec {
            path: resolve::plan(&lora.name, &cfg.models, "LoRA", cfg.paths)?,
            strength: lora.unet,
            text_encoder_strength: (lora.te != lora.unet).then_some(lora.te),
        });
    }
    let vae = if cell.vae.is_empty() {
        None
    } else {
        Some(locate(cfg, &cell.vae, &cell.vae_sha256, "VAE")?)
    };
    Ok(PipelineKey {
        model,
        loras,
        vae,
        device: cfg.device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::config;

    fn task(sampler: i32) -> pb::LeasedTask {
        pb::LeasedTask {
            cell: Some(pb::RenderCell {
                model: "tiny-sd15".into(),
                prompt: "a fox".into(),
                steps: 4,
                cfg: 1.0,
                sampler,
                width: 64,
                height: 64,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_prompt_lora_is_the_same_merge_and_image_as_a_listed_one() {
        use std::sync::atomic::AtomicBool;
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
        let cfg = config(fixtures.clone());
        let with_prompt = |prompt: &str| {
            let mut t = task(pb::Sampler::Lcm as i32);
            t.cell.as_mut().unwrap().prompt = prompt.into();
            plan(&cfg, &t)
        };
        let (tagged, tagged_request) = with_prompt("a fox <lora:lora_kohya:0.7>").unwrap();
        let mut listed = task(pb::Sampler::Lcm as i32);
        listed.cell.as_mut().unwrap().loras = vec![pb::LoraRef {
            name: "lora_kohya".into(),
            strength: 0.7,
            sha256: String::new(),
        }];
        let (listed, listed_request) = plan(&cfg, &listed).unwrap();
        assert_eq!(tagged, listed);
        assert_eq!(
            tagged.loras[0].path,
            fixtures.join("lora_kohya.safetensors")
        );

        let base = crate::engine::BaseModel::read(&tagged.model).unwrap();
        let render = |key: &PipelineKey, request: &RenderRequest| {
            key.build(&base)
                .unwrap()
                .render(request, &mut |_| {}, &AtomicBool::new(false))
                .unwrap()
        };
        let a = render(&tagged, &tagged_request);
        let b = render(&listed, &listed_request);
        assert_eq!(
            a.image, b.image,
            "the tag is cut from the text the encoder sees"
        );
        assert!(a.parameters.starts_with("a fox <lora:lora_kohya:0.7>"));

        // Separate text-encoder and UNet strengths, and the errors a user can make.
        let (split, _) = with_prompt("a fox <lora:lora_kohya:0.5:0.25>").unwrap();
        assert_eq!(
            (
                split.loras[0].strength,
                split.loras[0].text_encoder_strength
            ),
            (0.25, Some(0.5))
        );
        let e = with_prompt("a fox <lora:no_such_lora:1>").unwrap_err();
        assert!(
            e.contains("LoRA not found") && e.contains("no_such_lora"),
            "{e}"
        );
        let e = with_prompt("a (fox").unwrap_err();
        assert!(e.contains("never closed"), "{e}");
    }

    #[test]
    fn an_unknown_sampler_is_bad_input_never_another_sampler() {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
        let cfg = config(fixtures);
        let (_, lcm) = plan(&cfg, &task(pb::Sampler::Lcm as i32)).expect("lcm");
        assert_eq!(lcm.sampler, SamplerName::LCM);
        // Value 2, what older coordinators call SAMPLER_EULER_A: diffusers' Euler a.
        let (_, euler) = plan(&cfg, &task(2)).expect("euler a");
        assert_eq!(euler.sampler, SamplerName::EULER_A_DIFFUSERS);
        for unknown in [pb::Sampler::Unspecified as i32, 99] {
            let e = plan(&cfg, &task(unknown)).unwrap_err();
            assert!(
                e.contains("not a sampler this worker renders"),
                "{unknown}: {e}"
            );
        }
        let mut karras_lcm = task(pb::Sampler::Lcm as i32);
        karras_lcm.cell.as_mut().unwrap().schedule = pb::Schedule::Karras as i32;
        assert!(plan(&cfg, &karras_lcm).unwrap_err().contains("Karras"));
        let mut bad = task(pb::Sampler::Lcm as i32);
        bad.cell.as_mut().unwrap().schedule = 9;
        assert!(plan(&cfg, &bad).unwrap_err().contains("schedule"));
        let mut bad = task(pb::Sampler::Lcm as i32);
        bad.cell.as_mut().unwrap().rng = 9;
        assert!(plan(&cfg, &bad).unwrap_err().contains("rng"));
        let mut bad = task(pb::Sampler::Lcm as i32);
        bad.cell.as_mut().unwrap().seed_resize_from_width = 512;
        assert!(plan(&cfg, &bad).unwrap_err().contains("seed_resize_from"));
    }

    #[test]
    fn a_cell_with_k_diffusion_and_variation_seeds_maps_to_the_request() {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
        let cfg = config(fixtures);
        let mut t = task(pb::Sampler::Dpmpp2sA as i32);
        let c = t.cell.as_mut().unwrap();
        c.schedule = pb::Schedule::Karras as i32;
        c.rng = pb::RngSource::Nv as i32;
        c.subseed = 77;
        c.subseed_strength = 0.3;
        c.seed_resize_from_width = 640;
        c.seed_resize_from_height = 512;
        let (_, r) = plan(&cfg, &t).expect("plan");
        assert_eq!(r.sampler.as_str(), "dpmpp_2s_a_karras");
        assert_eq!(r.rng, RngKind::Nv);
        assert_eq!(
            (r.subseed, r.subseed_strength, r.seed_resize_from),
            (77, 0.3, Some((640, 512)))
        );
        // Unset, they are the defaults: CPU noise, no variation, the cell's own size.
        let (_, plain) = plan(&cfg, &task(pb::Sampler::Euler as i32)).expect("plan");
        assert_eq!(plain.sampler, "euler".parse().unwrap());
        assert_eq!(plain.rng, RngKind::Cpu);
        assert_eq!(
            (
                plain.subseed,
                plain.subseed_strength,
                plain.seed_resize_from
            ),
            (0, 0.0, None)
        );
    }

    #[test]
    fn a_hires_cell_maps_to_the_request_and_is_checked_at_its_final_size() {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
        let mut cfg = config(fixtures);
        let mut t = task(pb::Sampler::Dpmpp2sA as i32);
        let c = t.cell.as_mut().unwrap();
        c.hires_scale = 1.5;
        c.hires_upscaler = "latent_nearest".into();
        c.hires_steps = 3;
        c.hires_denoise = 0.5;
        c.hires_sampler = pb::Sampler::Euler as i32;
        c.hires_schedule = pb::Schedule::Karras as i32;
        let (_, r) = plan(&cfg, &t).expect("plan");
        let h = r.hires.expect("hires");
        assert_eq!(h.size, HiresSize::Scale(1.5));
        assert_eq!(h.upscaler.as_str(), "latent_nearest");
        assert_eq!((h.steps, h.denoise), (3, 0.5));
        assert_eq!(
            h.sampler.map(|s| s.as_str()).as_deref(),
            Some("euler_karras")
        );
        assert_eq!(h.geometry(64, 64).pixels(), (96, 96));
        // Off when the denoising strength is 0, whatever else is set.
        t.cell.as_mut().unwrap().hires_denoise = 0.0;
        assert_eq!(plan(&cfg, &t).unwrap().1.hires, None);

        // The final size is what --max-pixels limits; bad values are bad input.
        let mut t = task(pb::Sampler::Euler as i32);
        let c = t.cell.as_mut().unwrap();
        (c.hires_width, c.hires_height, c.hires_denoise) = (128, 128, 0.7);
        let (_, r) = plan(&cfg, &t).expect("plan");
        assert_eq!(r.hires.unwrap().size, HiresSize::Resize(128, 128));
        cfg.max_pixels = 100 * 100;
        let e = plan(&cfg, &t).unwrap_err();
        assert!(e.contains("hires size 128x128 is past"), "{e}");
        cfg.max_pixels = 1 << 20;
        for (what, set) in [
            (
                "upscaler",
                (|c: &mut pb::RenderCell| c.hires_upscaler = "esrgan".into()) as fn(&mut _),
            ),
            ("denoising", |c| c.hires_denoise = 1.5),
            ("k-diffusion", |c| c.sampler = pb::Sampler::Lcm as i32),
            ("hires_sampler", |c| c.hires_sampler = 99),
        ] {
            let mut bad = t.clone();
            set(bad.cell.as_mut().unwrap());
            let e = plan(&cfg, &bad).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        }
    }
}
