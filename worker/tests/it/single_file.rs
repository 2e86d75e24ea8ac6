//! Single-file checkpoints in the CompVis/LDM layout against diffusers' `from_single_file`:
//! `tiny-ldm.safetensors` (written by `tools/reference/gen_single_file.py`, whose script checks
//! that diffusers loads it back bit-identical to the diffusers modules it was written from)
//! renders the reference image with and without its yaml, in fp16 and fp32, with EMA copies,
//! as its diffusers folder (`tiny-ldm-diffusers/`) does;
//! and every kind of file a user may wrongly name is refused with the reason.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use kiln_worker::engine::image::decode_png;
use kiln_worker::engine::{
    BaseModel, Device, EngineError, HostTensor, Pipeline, RenderRequest, SamplerName,
    read_safetensors,
};
use safetensors::tensor::{Dtype, TensorView};
use serde::Deserialize;

use crate::fixture::{load, path, relative_error};

#[derive(Deserialize)]
struct Reference {
    file: String,
    yaml: String,
    prompt: String,
    seed: u64,
    steps: usize,
    guidance: f32,
    width: u32,
    height: u32,
    png: String,
    sha256: String,
}

fn request(r: &Reference) -> RenderRequest {
    RenderRequest {
        prompt: r.prompt.clone(),
        negative_prompt: String::new(),
        seed: r.seed,
        steps: r.steps,
        cfg_scale: r.guidance,
        sampler: SamplerName::LCM,
        width: r.width,
        height: r.height,
        clip_skip: 1,
        ..RenderRequest::default()
    }
}

/// How a copy of the fixture is written.
#[derive(Clone, Copy, Debug)]
enum Variant {
    /// The committed bytes.
    AsIs,
    /// Every float tensor widened to f32.
    F32,
    /// Every float tensor narrowed to bf16 (changes the weights: no reference).
    Bf16,
    /// As committed, plus `model_ema.*` copies of the UNet holding other values.
    WithEma,
}

/// Writes the fixture as `variant` into `dir` under `name`, with the yaml beside it if asked.
fn write_variant(dir: &Path, name: &str, variant: Variant, yaml: bool) -> PathBuf {
    let r: Reference = load("single_file.json");
    let bytes = std::fs::read(path(&r.file)).expect("fixture");
    let out = dir.join(format!("{name}.safetensors"));
    if yaml {
        std::fs::copy(path(&r.yaml), dir.join(format!("{name}.yaml"))).expect("yaml");
    }
    if let Variant::AsIs = variant {
        std::fs::write(&out, &bytes).expect("write");
        return out;
    }
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        let (dtype, data) = match (variant, view.dtype()) {
            (Variant::F32, Dtype::F16) => (Dtype::F32, convert(view.data(), |h| h.to_f32())),
            (Variant::Bf16, Dtype::F16) => (
                Dtype::BF16,
                view.data()
                    .chunks_exact(2)
                    .flat_map(|b| {
                        let v = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                        half::bf16::from_f32(v).to_le_bytes()
                    })
                    .collect(),
            ),
            _ => (view.dtype(), view.data().to_vec()),
        };
        if let Variant::WithEma = variant
            && let Some(rest) = name.strip_prefix("model.diffusion_model.")
        {
            // EMA copies as LDM saves them: the dots dropped from the name, other values.
            let ema: Vec<u8> = view.data().iter().map(|b| b ^ 0x55).collect();
            tensors.push((
                format!("model_ema.diffusion_model{}", rest.replace('.', "")),
                dtype,
                view.shape().to_vec(),
                ema,
            ));
        }
        tensors.push((name, dtype, view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, &out).expect("serialize");
    out
}

fn convert(data: &[u8], f: impl Fn(half::f16) -> f32) -> Vec<u8> {
    data.chunks_exact(2)
        .flat_map(|b| f(half::f16::from_le_bytes([b[0], b[1]])).to_le_bytes())
        .collect()
}

/// Renders the reference request, returning the final latents and the output.
fn render(model: &Path) -> (Vec<f32>, kiln_worker::engine::RenderOutput) {
    let r: Reference = load("single_file.json");
    let pipeline = Pipeline::load(model, &[], Device::Cpu).expect("single file loads");
    let mut last = Vec::new();
    let out = pipeline
        .render(
            &request(&r),
            &mut |p| {
                if p.step == p.steps {
                    last = p.latents.to_vec();
                }
            },
            &AtomicBool::new(false),
        )
        .expect("render");
    (last, out)
}

fn max_pixel_diff(out: &kiln_worker::engine::RenderOutput, png: &str) -> u8 {
    let want = decode_png(&std::fs::read(path(png)).expect("png")).expect("decode");
    assert_eq!(
        (want.image.width, want.image.height),
        (out.image.width, out.image.height)
    );
    out.image
        .pixels
        .iter()
        .zip(&want.image.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
}

#[test]
fn a_single_file_renders_what_diffusers_from_single_file_renders() {
    let r: Reference = load("single_file.json");
    let expected = read_safetensors(&path("single_file_expected.safetensors")).expect("expected");
    let want: &HostTensor = &expected["final_latents"];
    let dir = tempfile::tempdir().unwrap();
    for (name, variant, yaml) in [
        ("fp16-yaml", Variant::AsIs, true),
        ("fp16", Variant::AsIs, false),
        ("fp32-ema", Variant::F32, false),
        ("fp16-ema-yaml", Variant::WithEma, true),
    ] {
        let file = write_variant(dir.path(), name, variant, yaml);
        let (latents, out) = render(&file);
        let err = relative_error(&latents, &want.data);
        let max = max_pixel_diff(&out, &r.png);
        eprintln!("{name}: final latents relative error {err:.3e}, max pixel diff {max}/255");
        assert!(err <= 1e-4, "{name}: latents relative error {err:e}");
        assert!(max <= 1, "{name}: max pixel diff {max}/255");
        assert!(
            out.parameters.contains(&format!(", Model: {name},")),
            "{name}: {}",
            out.parameters
        );
        if let Variant::AsIs = variant {
            let hash = format!("Model hash: {}, ", &r.sha256[..10]);
            assert!(out.parameters.contains(&hash), "{}", out.parameters);
        }
    }
    // The same model as a diffusers folder renders the same image.
    let (latents, out) = render(&path("tiny-ldm-diffusers"));
    let err = relative_error(&latents, &want.data);
    let max = max_pixel_diff(&out, &r.png);
    eprintln!("diffusers folder: final latents relative error {err:.3e}, max pixel diff {max}/255");
    assert!(
        err <= 1e-4 && max <= 1,
        "diffusers folder: {err:e}, {max}/255"
    );
    // bf16 weights differ from the reference's, so only that it loads and renders is checked.
    let bf16 = write_variant(dir.path(), "bf16", Variant::Bf16, false);
    let (latents, _) = render(&bf16);
    assert!(latents.iter().all(|v| v.is_finite()));
}

#[test]
fn the_model_hash_is_a1111s_short_hash_of_the_file() {
    let r: Reference = load("single_file.json");
    let base = BaseModel::read(&path(&r.file)).expect("loads");
    assert_eq!(base.name(), "tiny-ldm");
    let model = base.build(&[], Device::Cpu).expect("builds");
    assert_eq!(model.hash(), r.sha256);
    assert_eq!(model.name(), "tiny-ldm");
}

fn refusal(path: &Path) -> EngineError {
    match BaseModel::read(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

/// A safetensors file holding `names` (each a one-element f16 tensor, or `shape`).
fn write_tensors(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, s)| vec![0u8; 2 * s.iter().product::<usize>()])
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            (
                (*n).to_owned(),
                TensorView::new(Dtype::F16, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn files_that_are_not_sd1_checkpoints_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Pickles, by name and by content, are never opened.
    std::fs::write(d.join("old.ckpt"), b"PK\x03\x04 whatever").unwrap();
    std::fs::write(d.join("renamed.safetensors"), b"PK\x03\x04 a zip").unwrap();
    for name in ["old.ckpt", "renamed.safetensors"] {
        let e = refusal(&d.join(name));
        let text = e.to_string();
        assert!(matches!(e, EngineError::Pickle { .. }), "{name}: {e:?}");
        assert!(
            text.contains("run any code") && text.contains(".safetensors"),
            "{text}"
        );
    }

    let unet = |rest: &str| format!("model.diffusion_model.{rest}");
    /// (file stem, its tensors, what the refusal must say)
    type Case<'a> = (&'a str, Vec<(String, Vec<usize>)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "sdxl",
            vec![
                (
                    "conditioner.embedders.0.transformer.text_model.x".into(),
                    vec![1],
                ),
                (unet("input_blocks.0.0.weight"), vec![320, 4, 3, 3]),
            ],
            "SDXL",
        ),
        (
            "sd2",
            vec![
                (
                    "cond_stage_model.model.token_embedding.weight".into(),
                    vec![1],
                ),
                (unet("input_blocks.0.0.weight"), vec![320, 4, 3, 3]),
            ],
            "SD2",
        ),
        (
            "inpaint",
            vec![(unet("input_blocks.0.0.weight"), vec![320, 9, 3, 3])],
            "inpainting",
        ),
        (
            "a-lora",
            vec![("lora_unet_down_blocks_0_x.lora_down.weight".into(), vec![1])],
            "a LoRA, not a model",
        ),
        (
            "random",
            vec![("foo".into(), vec![1])],
            "not a Stable Diffusion checkpoint",
        ),
    ];
    for (name, tensors, says) in cases {
        let file = d.join(format!("{name}.safetensors"));
        let tensors: Vec<(&str, Vec<usize>)> = tensors
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        write_tensors(&file, &tensors);
        let e = refusal(&file);
        assert!(
            matches!(e, EngineError::Unsupported { .. }),
            "{name}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(says), "{name}: {text}");
        assert!(text.contains(&format!("{name}.safetensors")), "{text}");
    }

    // A truncated download: the safetensors parser's reason, naming the file.
    let r: Reference = load("single_file.json");
    let bytes = std::fs::read(path(&r.file)).unwrap();
    let cut = d.join("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = refusal(&cut);
    assert!(matches!(e, EngineError::Safetensors { .. }), "{e:?}");
    assert!(e.to_string().contains("truncated.safetensors"), "{e}");

    // A yaml that describes another model than the file beside it.
    let file = write_variant(d, "lying", Variant::AsIs, true);
    let yaml = d.join("lying.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(
        &yaml,
        text.replace("model_channels: 32", "model_channels: 320"),
    )
    .unwrap();
    let e = refusal(&file);
    assert!(matches!(e, EngineError::Config { .. }), "{e:?}");
    assert!(
        e.to_string().contains("lying.yaml") && e.to_string().contains("different model"),
        "{e}"
    );
    std::fs::write(&yaml, text.replace("use_ema: False", "parameterization: v")).unwrap();
    assert!(refusal(&file).to_string().contains("v-prediction"));

    // A name that is neither a folder nor a file.
    let e = refusal(&d.join("nowhere"));
    assert!(
        e.to_string()
            .contains("no model folder or checkpoint file at"),
        "{e}"
    );
}

#[derive(Deserialize)]
struct VaeReference {
    file: String,
    model: String,
    prompt: String,
    seed: u64,
    png: String,
    sha256: String,
}

#[test]
fn a_vae_file_replaces_the_models_own_as_a1111s_sd_vae() {
    let r: VaeReference = load("vae_override.json");
    let base = BaseModel::read(&path(&r.model)).expect("model");
    let model = base
        .build_with_vae(&[], Some(&path(&r.file)), Device::Cpu)
        .expect("builds with the VAE");
    let pipeline = Pipeline::new(model);
    let request = RenderRequest {
        prompt: r.prompt.clone(),
        negative_prompt: String::new(),
        seed: r.seed,
        steps: 4,
        cfg_scale: 1.0,
        sampler: SamplerName::LCM,
        width: 64,
        height: 64,
        clip_skip: 1,
        ..RenderRequest::default()
    };
    let out = pipeline
        .render(&request, &mut |_| {}, &AtomicBool::new(false))
        .expect("render");
    let max = max_pixel_diff(&out, &r.png);
    eprintln!("vae override: max pixel diff {max}/255");
    assert!(max <= 1, "max pixel diff {max}");
    let fields = format!(
        "Model: tiny-sd15, VAE hash: {}, VAE: {}, ",
        &r.sha256[..10],
        r.file
    );
    assert!(out.parameters.contains(&fields), "{}", out.parameters);
    // Not a VAE: named, not a panic.
    let e = base
        .build_with_vae(&[], Some(&path("lora_kohya.safetensors")), Device::Cpu)
        .unwrap_err();
    assert!(e.to_string().contains("not a VAE"), "{e}");
}
