//! `kiln render` as a process on the tiny reference model: the PNG equals the one diffusers
//! made for the same seed (every pixel within 1/255) at CFG 1 and 1.5, bad input is a clear
//! error with a non-zero exit, and a checkpoint is hashed once per version of the file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_worker::engine::image::decode_png;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../worker/tests/fixtures/reference")
        .join(name)
}

fn kiln_render(extra: &[&str], out: &Path) -> Output {
    let model = fixture("tiny-sd15");
    let lora = format!("{}:1", fixture("lora_kohya.safetensors").display());
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("render")
        .arg("--model")
        .arg(&model)
        .args(["--lora", &lora])
        .args(["--prompt", "a photograph of an astronaut riding a horse"])
        .args(["--steps", "4", "--sampler", "lcm", "--height", "64"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .env("KILN_LOG", "warn")
        .output()
        .expect("run kiln render")
}

fn assert_matches_fixture(png: &Path, fixture_png: &str) {
    let got = decode_png(&std::fs::read(png).expect("output png")).expect("decode");
    let want = decode_png(&std::fs::read(fixture(fixture_png)).expect("fixture")).expect("decode");
    assert_eq!(
        (got.image.width, got.image.height),
        (want.image.width, want.image.height)
    );
    let max = got
        .image
        .pixels
        .iter()
        .zip(&want.image.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(max <= 1, "{fixture_png}: a pixel differs by {max}/255");
    let parameters = &got
        .text
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    assert!(
        parameters.starts_with(
            "a photograph of an astronaut riding a horse <lora:lora_kohya:1>\nSteps: 4, \
                 Sampler: LCM"
        ),
        "{parameters}"
    );
    assert!(
        parameters.contains("Lora hashes: \"lora_kohya: "),
        "{parameters}"
    );
}

#[test]
fn render_equals_the_diffusers_image_at_cfg_1_and_1_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (cfg, seed, png) in [
        ("1", "42", "lcm_cfg1_seed42.png"),
        ("1.5", "4294967301", "lcm_cfg1p5_seed4294967301.png"),
    ] {
        let out = dir.path().join(format!("cfg{cfg}.png"));
        let result = kiln_render(&["--cfg", cfg, "--seed", seed, "--width", "64"], &out);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "kiln render failed: {stderr}");
        assert_matches_fixture(&out, png);
        // The last line says where the time went, loading first (BENCHMARKS.md reads it).
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!(
                "wrote {} (64x64, 4 steps, seed {seed}) in ",
                out.display()
            )) && ["s: loading ", " s, text ", " s, steps ", " s, VAE "]
                .iter()
                .all(|part| last.contains(part)),
            "{last}"
        );
    }
}

#[test]
fn render_rejects_a_width_that_is_not_a_multiple_of_8() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bad.png");
    let result = kiln_render(&["--cfg", "1", "--seed", "1", "--width", "100"], &out);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("width 100 is not a positive multiple of 8"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn render_names_unknown_lora_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bad.png");
    let bad = fixture("lora_unknown_key.safetensors");
    let bad = format!("{}:0.5", bad.display());
    let result = kiln_render(&["--seed", "1", "--width", "64", "--lora", &bad], &out);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight"
        ),
        "{stderr}"
    );
}

#[test]
fn render_takes_a_single_file_a_vae_and_prompt_loras_and_says_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The single-file checkpoint renders diffusers' from_single_file image.
    let out = dir.path().join("single.png");
    let result = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("render")
        .arg("--model")
        .arg(fixture("tiny-ldm.safetensors"))
        .args(["--prompt", "a photograph of an astronaut riding a horse"])
        .args(["--seed", "42", "--width", "128", "--height", "128"])
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let got = decode_png(&std::fs::read(&out).unwrap()).unwrap();
    let want = decode_png(&std::fs::read(fixture("single_file_lcm_seed42.png")).unwrap()).unwrap();
    assert!(crate::util::max_pixel_diff(&got.image, &want.image) <= 1);

    // A prompt LoRA found in --lora-dir, a VAE file and clip skip reach the PNG's parameters.
    let out = dir.path().join("tagged.png");
    let result = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("render")
        .arg("--model")
        .arg(fixture("tiny-sd15"))
        .args(["--prompt", "a (fox:1.2) <lora:lora_kohya:0.5>"])
        .arg("--lora-dir")
        .arg(fixture(""))
        .arg("--vae")
        .arg(fixture("vae_override.safetensors"))
        .args([
            "--clip-skip",
            "2",
            "--seed",
            "1",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let parameters = decode_png(&std::fs::read(&out).unwrap()).unwrap().text[0]
        .1
        .clone();
    for field in [
        "a (fox:1.2) <lora:lora_kohya:0.5>\n",
        "VAE: vae_override.safetensors",
        "Clip skip: 2",
        "Lora hashes: \"lora_kohya: ",
    ] {
        assert!(parameters.contains(field), "{field}: {parameters}");
    }

    // Mistakes a new user makes, each said plainly.
    let model = fixture("tiny-sd15");
    let model = model.to_str().unwrap();
    for (args, says) in [
        (
            ["--model", "no-such-model", "--prompt", "a fox"],
            "no model folder or checkpoint file at no-such-model",
        ),
        (
            ["--model", model, "--lora", "<lora:x:0.5>"],
            "is a prompt tag: write it in --prompt",
        ),
        (
            ["--model", model, "--prompt", "a (fox"],
            "`(` at column 3 is never closed",
        ),
        (
            ["--model", model, "--prompt", "a <lora:nowhere:1>"],
            "LoRA not found",
        ),
    ] {
        let result = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("render")
            .args(args)
            .args(
                ["--prompt", "a fox"]
                    .iter()
                    .filter(|_| !args.contains(&"--prompt")),
            )
            .args(["--seed", "1", "--width", "64", "--height", "64", "-o"])
            .arg(&out)
            .output()
            .expect("run");
        assert!(!result.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn render_finds_prompt_embeddings_in_embeddings_folders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("ti.png");
    let render = |prompt: &str, embeddings: &Path| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("render")
            .arg("--model")
            .arg(fixture("tiny-sd15"))
            .args([
                "--prompt",
                prompt,
                "--negative",
                "kiln, blurry",
                "--cfg",
                "1.5",
            ])
            .arg("--embeddings")
            .arg(embeddings)
            .args(["--seed", "1", "--width", "64", "--height", "64", "-o"])
            .arg(&out)
            .output()
            .expect("run")
    };
    // kiln-glow in the prompt and kiln in the negative prompt, both listed with A1111's hash.
    let result = render("a (kiln-glow:1.2) castle", &fixture("embeddings"));
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let parameters = decode_png(&std::fs::read(&out).unwrap()).unwrap().text[0]
        .1
        .clone();
    assert!(
        parameters.contains("TI hashes: \"kiln-glow: 45299b967a00, kiln: 296a5092d06a\""),
        "{parameters}"
    );
    // An embedding of another width fails the render, naming the file.
    let result = render("a narrow castle", &fixture("embeddings"));
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("narrow.safetensors") && stderr.contains("width 8"),
        "{stderr}"
    );
    // A folder that is not there is said so.
    let result = render("a castle", &dir.path().join("nowhere"));
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("--embeddings") && stderr.contains("not a folder"),
        "{stderr}"
    );
}

/// `kiln render` at 64×64 with `extra` flags (no LoRA), by default with the k-diffusion
/// Euler a.
fn kiln_render_k(extra: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("render")
        .arg("--model")
        .arg(fixture("tiny-sd15"))
        .args(["--prompt", "a photograph of an astronaut riding a horse"])
        .args(["--steps", "4", "--seed", "3"])
        .args(if extra.contains(&"--sampler") {
            &[][..]
        } else {
            &["--sampler", "Euler a"][..]
        })
        .args(["--width", "64", "--height", "64"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .env("KILN_LOG", "warn")
        .output()
        .expect("run kiln render")
}

/// The output's size and `parameters` text, after asserting the command succeeded.
fn rendered(result: &Output, png: &Path) -> ((u32, u32), String) {
    assert!(
        result.status.success(),
        "kiln render failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let got = decode_png(&std::fs::read(png).expect("output png")).expect("decode");
    let parameters = got
        .text
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    ((got.image.width, got.image.height), parameters)
}

#[test]
fn render_img2img_from_a_picture_of_any_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let init = fixture("vae_encoder_a.png");
    let out = dir.path().join("img2img.png");
    let result = kiln_render_k(
        &["--init", init.to_str().unwrap(), "--strength", "0.5"],
        &out,
    );
    let (size, parameters) = rendered(&result, &out);
    assert_eq!(size, (64, 64));
    assert!(
        parameters.contains("Denoising strength: 0.5"),
        "{parameters}"
    );
    assert!(parameters.contains("Sampler: Euler a"), "{parameters}");

    // A 32×32 picture is resized to the render size (A1111's "Just resize"); the default
    // strength is A1111's 0.75.
    let small = dir.path().join("small.png");
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 128])
    })
    .save(&small)
    .unwrap();
    let out = dir.path().join("from-small.png");
    let result = kiln_render_k(&["--init", small.to_str().unwrap()], &out);
    let (size, parameters) = rendered(&result, &out);
    assert_eq!(size, (64, 64));
    assert!(
        parameters.contains("Denoising strength: 0.75"),
        "{parameters}"
    );
}

#[test]
fn render_img2img_says_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("x.png");
    let not_a_picture = dir.path().join("notes.png");
    std::fs::write(&not_a_picture, "these are words, not pixels\n").unwrap();
    let init = fixture("vae_encoder_a.png");
    let init = init.to_str().unwrap();
    for (extra, says) in [
        (
            vec!["--init", not_a_picture.to_str().unwrap()],
            "notes.png: not a PNG, JPEG or WebP picture",
        ),
        (
            vec!["--init", "no-such-picture.png"],
            "--init no-such-picture.png",
        ),
        (
            vec!["--init", init, "--strength", "1.5"],
            "1.5 is not a number above 0 and at most 1",
        ),
        (
            vec!["--init", init, "--strength", "0"],
            "0 is not a number above 0 and at most 1",
        ),
        (vec!["--strength", "0.5"], "--init"),
        (
            vec!["--init", init, "--hires-scale", "2"],
            "cannot be used with",
        ),
    ] {
        let result = kiln_render_k(&extra, &out);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{extra:?} succeeded");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
        assert!(stderr.len() < 2000, "{extra:?}: a short message: {stderr}");
    }
    assert!(!out.exists());
}

#[test]
fn render_hires_fix_writes_the_larger_picture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("hires.png");
    let result = kiln_render_k(
        &[
            "--hires-scale",
            "1.5",
            "--hires-denoise",
            "0.5",
            "--hires-upscaler",
            "Latent (nearest)",
        ],
        &out,
    );
    let (size, parameters) = rendered(&result, &out);
    assert_eq!(size, (96, 96));
    for says in [
        "Hires upscale: 1.5",
        "Hires upscaler: Latent (nearest)",
        "Denoising strength: 0.5",
    ] {
        assert!(parameters.contains(says), "{says}: {parameters}");
    }
    // LCM cannot run the hires pass; a hires option alone turns nothing on.
    for (extra, says) in [
        (
            vec!["--hires-scale", "2", "--sampler", "lcm"],
            "k-diffusion",
        ),
        (
            vec!["--hires-denoise", "0.5"],
            "--hires-denoise needs --hires-scale or --hires-size",
        ),
        (vec!["--hires-scale", "5"], "5 is not a number in 1..=4"),
    ] {
        let result = kiln_render_k(&extra, &out);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{extra:?} succeeded");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
}

/// A checkpoint's hash for the PNG's `Model hash` is computed once per version of the file
/// and then read from the model cache folder's memo (as A1111's `cache.json`): a planted memo
/// entry shows in the next render's metadata, and rewriting the file hashes it again.
#[test]
fn render_hashes_a_checkpoint_once_per_version_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.safetensors");
    std::fs::copy(fixture("tiny-ldm.safetensors"), &model).unwrap();
    let real = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(std::fs::read(&model).unwrap()))
    };
    let cache = dir.path().join("cache");
    let render = |n: u32| {
        let out = dir.path().join(format!("{n}.png"));
        let result = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("render")
            .arg("--model")
            .arg(&model)
            .args([
                "--prompt",
                "a fox",
                "--seed",
                "1",
                "--steps",
                "1",
                "--sampler",
                "lcm",
            ])
            .args(["--width", "64", "--height", "64", "-o"])
            .arg(&out)
            .env("XDG_CACHE_HOME", &cache)
            .env("KILN_LOG", "warn")
            .output()
            .unwrap();
        rendered(&result, &out).1
    };
    let memo_file = cache.join("kiln/models/hashes.json");
    assert!(render(1).contains(&format!("Model hash: {}, ", &real[..10])));
    let memo: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&memo_file).unwrap()).unwrap();
    let key = model.canonicalize().unwrap().display().to_string();
    assert_eq!(memo[&key]["sha256"], real.as_str(), "{memo}");

    let planted = "0123456789".repeat(6) + "abcd";
    let text = std::fs::read_to_string(&memo_file)
        .unwrap()
        .replace(&real, &planted);
    std::fs::write(&memo_file, text).unwrap();
    assert!(
        render(2).contains("Model hash: 0123456789, "),
        "the memo's hash, not a new one"
    );

    // The same bytes written again: a new modification time, so hashed again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&model, std::fs::read(&model).unwrap()).unwrap();
    assert!(render(3).contains(&format!("Model hash: {}, ", &real[..10])));
}
