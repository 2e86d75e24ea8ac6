//! The SD1.5 networks loaded from `tiny-sd15/` through the real loader, against diffusers:
//! text embeddings, one UNet forward (LoRA strength 0, 0.5, 1), the VAE decoder, and the
//! errors for a damaged folder, file or LoRA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_worker::engine::{Device, EngineError, HostTensor, LoraSpec, Model, read_safetensors};

use crate::fixture::{assert_tensor, path};

/// Relative error allowed for f32 tensors (the bound).
const TOL: f64 = 1e-4;

fn expected() -> BTreeMap<String, HostTensor> {
    read_safetensors(&path("expected.safetensors")).expect("expected.safetensors")
}

fn tiny() -> PathBuf {
    path("tiny-sd15")
}

fn load(loras: &[(&str, f32)]) -> Model {
    let specs: Vec<LoraSpec> = loras
        .iter()
        .map(|(file, strength)| LoraSpec {
            path: path(file),
            strength: *strength,
            text_encoder_strength: None,
        })
        .collect();
    Model::load(&tiny(), &specs, Device::Cpu).expect("tiny-sd15 loads")
}

const PROMPTS: [(&str, &str); 3] = [
    ("prompt_a", "a photograph of an astronaut riding a horse"),
    ("prompt_b", "a red car on a street at night, high quality"),
    ("negative_empty", ""),
];

#[test]
fn text_embeddings_match_transformers() {
    let want = expected();
    let model = load(&[]);
    for (key, prompt) in PROMPTS {
        let got = model.encode_prompt(prompt).expect("encode");
        assert_tensor(
            &format!("text/{key}"),
            &got,
            &want[&format!("text/{key}/last_hidden_state")],
            TOL,
        );
    }
}

#[test]
fn text_embeddings_with_the_kohya_lora_match() {
    let want = expected();
    let model = load(&[("lora_kohya.safetensors", 1.0)]);
    for (key, prompt) in PROMPTS {
        let got = model.encode_prompt(prompt).expect("encode");
        assert_tensor(
            &format!("text/{key} lora 1.0"),
            &got,
            &want[&format!("text/{key}/last_hidden_state_lora1.0")],
            TOL,
        );
    }
}

fn unet_case(model: &Model, want: &BTreeMap<String, HostTensor>, t: f32, text: &str, out: &str) {
    let got = model
        .predict_noise(&want["unet/latents"], t, &want[text])
        .expect("unet forward");
    assert_tensor(out, &got, &want[out], TOL);
}

#[test]
fn unet_forward_matches_diffusers() {
    let want = expected();
    let model = load(&[]);
    unet_case(
        &model,
        &want,
        999.0,
        "text/prompt_a/last_hidden_state",
        "unet/out_t999_prompt_a_lora0.0",
    );
    unet_case(
        &model,
        &want,
        259.0,
        "text/negative_empty/last_hidden_state",
        "unet/out_t259_negative_empty_lora0.0",
    );
}

#[test]
fn unet_forward_with_lora_matches_for_both_file_formats() {
    let want = expected();
    for file in ["lora_kohya.safetensors", "lora_peft.safetensors"] {
        for (strength, out) in [
            (0.5, "unet/out_t999_prompt_a_lora0.5"),
            (1.0, "unet/out_t999_prompt_a_lora1.0"),
        ] {
            let model = load(&[(file, strength)]);
            unet_case(&model, &want, 999.0, "text/prompt_a/last_hidden_state", out);
        }
    }
}

#[test]
fn stacked_loras_add_up() {
    // Two halves of the same LoRA equal the whole of it.
    let want = expected();
    let model = load(&[
        ("lora_kohya.safetensors", 0.5),
        ("lora_peft.safetensors", 0.5),
    ]);
    unet_case(
        &model,
        &want,
        999.0,
        "text/prompt_a/last_hidden_state",
        "unet/out_t999_prompt_a_lora1.0",
    );
}

#[test]
fn vae_decode_matches_diffusers() {
    let want = expected();
    let model = load(&[]);
    // decode() divides by scaling_factor itself; the fixture's input is already divided.
    let scaled = HostTensor {
        shape: want["vae/decode_in"].shape.clone(),
        data: want["unet/latents"].data.clone(),
    };
    let got = model.decode(&scaled).expect("decode");
    assert_tensor("vae/decode_out", &got, &want["vae/decode_out"], TOL);
}

#[test]
fn an_unknown_lora_key_is_an_error_naming_it() {
    let err = Model::load(
        &tiny(),
        &[LoraSpec {
            path: path("lora_unknown_key.safetensors"),
            strength: 1.0,
            text_encoder_strength: None,
        }],
        Device::Cpu,
    )
    .expect_err("unknown key must fail");
    let EngineError::LoraUnknownKeys { keys, .. } = &err else {
        panic!("wrong error: {err}");
    };
    let base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z";
    assert_eq!(
        keys,
        &[
            format!("{base}.alpha"),
            format!("{base}.lora_down.weight"),
            format!("{base}.lora_up.weight"),
        ]
    );
    assert!(err.to_string().contains(base), "{err}");
}

/// Copies `tiny-sd15` into a temporary folder for a test to damage.
fn copy_tiny(dir: &Path) -> PathBuf {
    let dst = dir.join("tiny-sd15");
    for part in ["unet", "vae", "text_encoder", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(dst.join(part)).expect("mkdir");
        for entry in std::fs::read_dir(tiny().join(part)).expect("read_dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), dst.join(part).join(entry.file_name())).expect("copy");
        }
    }
    dst
}

#[test]
fn a_folder_missing_a_part_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = copy_tiny(dir.path());
    std::fs::remove_dir_all(model.join("vae")).expect("rm vae");
    let err = Model::load(&model, &[], Device::Cpu).expect_err("must fail");
    assert!(
        matches!(&err, EngineError::MissingPart { part: "vae", .. }),
        "{err}"
    );
    std::fs::remove_file(model.join("unet/diffusion_pytorch_model.fp16.safetensors"))
        .expect("rm unet weights");
    let err = Model::load(&model, &[], Device::Cpu).expect_err("must fail");
    assert!(err.to_string().contains("diffusion_pytorch_model"), "{err}");
}

#[test]
fn a_truncated_weights_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = copy_tiny(dir.path());
    let file = model.join("unet/diffusion_pytorch_model.fp16.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = Model::load(&model, &[], Device::Cpu).expect_err("must fail");
    assert!(matches!(&err, EngineError::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_a_shape_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = copy_tiny(dir.path());
    let config = model.join("unet/config.json");
    let text = std::fs::read_to_string(&config).expect("read");
    let text = text.replace("\"layers_per_block\": 2", "\"layers_per_block\": 3");
    std::fs::write(&config, text).expect("write");
    let err = Model::load(&model, &[], Device::Cpu).expect_err("must fail");
    assert!(
        matches!(
            &err,
            EngineError::MissingTensor { .. } | EngineError::Shape { .. }
        ),
        "{err}"
    );

    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("\"layers_per_block\": 3", "\"layers_per_block\": 2");
    std::fs::write(&config, text).expect("write");
    // A text encoder config whose MLP is narrower than the weights.
    let te_config = model.join("text_encoder/config.json");
    let text = std::fs::read_to_string(&te_config)
        .expect("read")
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 32");
    std::fs::write(&te_config, text).expect("write");
    let err = Model::load(&model, &[], Device::Cpu).expect_err("must fail");
    let EngineError::Shape {
        expected, found, ..
    } = &err
    else {
        panic!("wrong error: {err}");
    };
    assert_eq!((expected[0], found[0]), (32, 64), "{err}");
}

#[test]
fn text_encoder_keys_without_the_text_model_prefix_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = copy_tiny(dir.path());
    // Rewrite the text encoder as transformers 5 saves it: keys without `text_model.`, fp32.
    let file = model.join("text_encoder/model.fp16.safetensors");
    let tensors = read_safetensors(&file).expect("read");
    std::fs::remove_file(&file).expect("rm");
    write_f32_safetensors(
        &model.join("text_encoder/model.safetensors"),
        tensors
            .iter()
            .map(|(k, v)| (k.trim_start_matches("text_model.").to_owned(), v)),
    );
    let want = expected();
    let loaded = Model::load(&model, &[], Device::Cpu).expect("loads");
    let got = loaded.encode_prompt(PROMPTS[0].1).expect("encode");
    assert_tensor(
        "text/prompt_a (fp32, bare keys)",
        &got,
        &want["text/prompt_a/last_hidden_state"],
        TOL,
    );
}

/// A minimal safetensors writer for f32 tensors (the format is a JSON header + raw data).
fn write_f32_safetensors<'a>(path: &Path, tensors: impl Iterator<Item = (String, &'a HostTensor)>) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        let start = data.len();
        for v in &t.data {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name,
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = serde_json::to_vec(&header).expect("json");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(data);
    std::fs::write(path, bytes).expect("write");
}
