//! The VAE encoder against diffusers' `AutoencoderKL.encode` (`vae_encoder.safetensors`,
//! written by `tools/reference/gen_vae_encoder.py`): two PNG patterns (64×64 and 64×96) turned
//! into encoder input as `VaeImageProcessor.preprocess` does, their mean and log-variance, the
//! argmax and sampled img2img latents, the round trip through the decoder; and the single-file
//! checkpoint `tiny-ldm.safetensors` encoding exactly as its diffusers folder does.

use std::collections::BTreeMap;

use kiln_worker::engine::image::{decode_png, to_vae_input};
use kiln_worker::engine::model::EncodedLatents;
use kiln_worker::engine::rng::TorchRng;
use kiln_worker::engine::{BaseModel, Device, EngineError, HostTensor, Model, read_safetensors};
use serde::Deserialize;

use crate::fixture::{assert_tensor, load, path};

/// Relative error allowed (the decoder's bound; observed: about 1e-6, see the README).
const TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    model: String,
    ldm_model: String,
    scaling_factor: f32,
    sample_seed: u64,
    images: BTreeMap<String, Image>,
}

#[derive(Deserialize)]
struct Image {
    png: String,
    height: usize,
    width: usize,
}

fn expected() -> BTreeMap<String, HostTensor> {
    read_safetensors(&path("vae_encoder.safetensors")).expect("vae_encoder.safetensors")
}

/// The fixture PNG `name` as encoder input.
fn input(image: &Image) -> HostTensor {
    let bytes = std::fs::read(path(&image.png)).expect("png fixture");
    let tensor = to_vae_input(&decode_png(&bytes).expect("png").image).expect("rgb");
    assert_eq!(tensor.shape, [1, 3, image.height, image.width]);
    tensor
}

fn encode(model: &Model, image: &Image) -> EncodedLatents {
    model.encode_image(&input(image)).expect("encode")
}

#[test]
fn png_to_encoder_input_is_diffusers_preprocess_exactly() {
    let r: Reference = load("vae_encoder.json");
    let want = expected();
    for (name, image) in &r.images {
        assert_eq!(input(image), want[&format!("{name}/image")], "{name}");
    }
}

#[test]
fn mean_and_logvar_match_diffusers() {
    let r: Reference = load("vae_encoder.json");
    let want = expected();
    let model = Model::load(&path(&r.model), &[], Device::Cpu).expect("tiny-sd15 loads");
    for (name, image) in &r.images {
        let got = encode(&model, image);
        assert_tensor(
            &format!("{name}/mean"),
            &got.mean,
            &want[&format!("{name}/mean")],
            TOL,
        );
        assert_tensor(
            &format!("{name}/logvar"),
            &got.logvar,
            &want[&format!("{name}/logvar")],
            TOL,
        );
        // decode() divides by scaling_factor: give it the scaled (argmax) latents.
        let roundtrip = model.decode(&got.latents()).expect("decode");
        assert_tensor(
            &format!("{name}/roundtrip"),
            &roundtrip,
            &want[&format!("{name}/roundtrip")],
            TOL,
        );
    }
}

#[test]
fn argmax_and_sampled_latents_match_retrieve_latents() {
    let r: Reference = load("vae_encoder.json");
    let want = expected();
    let model = Model::load(&path(&r.model), &[], Device::Cpu).expect("tiny-sd15 loads");
    let got = encode(&model, &r.images["a"]);
    assert_eq!(got.scaling_factor, r.scaling_factor);
    assert_tensor(
        "a/argmax_latents",
        &got.latents(),
        &want["a/argmax_latents"],
        TOL,
    );
    // diffusers draws the sample's noise first from the img2img generator.
    let n = got.mean.data.len();
    let noise = HostTensor {
        shape: got.mean.shape.clone(),
        data: TorchRng::new(r.sample_seed).randn(n),
    };
    let key = format!("a/sample_latents_seed{}", r.sample_seed);
    assert_tensor(&key, &got.sample(&noise).expect("sample"), &want[&key], TOL);
    let wrong = HostTensor {
        shape: vec![1, n],
        data: noise.data,
    };
    assert!(matches!(
        got.sample(&wrong),
        Err(EngineError::InvalidRequest(_))
    ));
}

#[test]
fn an_image_of_the_wrong_shape_is_refused() {
    let r: Reference = load("vae_encoder.json");
    let model = Model::load(&path(&r.model), &[], Device::Cpu).expect("tiny-sd15 loads");
    for shape in [vec![1, 3, 60, 64], vec![1, 4, 64, 64], vec![3, 64, 64]] {
        let image = HostTensor {
            data: vec![0.0; shape.iter().product()],
            shape,
        };
        let err = model.encode_image(&image).expect_err("must fail");
        assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
    }
}

#[test]
fn a_single_file_checkpoint_encodes_as_its_diffusers_folder() {
    let r: Reference = load("vae_encoder.json");
    let want = expected();
    let image = &r.images["a"];
    let folder = Model::load(&path(&r.ldm_model), &[], Device::Cpu).expect("folder loads");
    let single = BaseModel::read(&path("tiny-ldm.safetensors"))
        .expect("single file reads")
        .build(&[], Device::Cpu)
        .expect("builds");
    let from_folder = encode(&folder, image);
    let from_file = encode(&single, image);
    // The same f16 weights, widened to f32 either way: bit-identical.
    assert_eq!(from_file, from_folder);
    assert_tensor("ldm/a/mean", &from_file.mean, &want["ldm/a/mean"], TOL);
    assert_tensor(
        "ldm/a/logvar",
        &from_file.logvar,
        &want["ldm/a/logvar"],
        TOL,
    );
}
