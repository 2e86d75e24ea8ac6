//! img2img from a sweep file on a farm: a real coordinator process (SQLite file), a real worker
//! process (file storage) and the tiny reference model. The sweep names a picture beside it
//! (`init_image`), of a size unlike the cells' (so it is resized as A1111's "Just resize"),
//! with `strength` and `size` axes; `kiln submit` uploads it, the worker fetches it by hash,
//! and every image equals a local `kiln render --init` of the same file, to the byte. A
//! picture that is not one, an unknown name and a strength out of range are clear errors.

use std::path::Path;
use std::process::Command;

use kiln_worker::engine::image::decode_png;

use crate::spawn;
use crate::util::{fixtures, json_rows, kiln, kiln_fails, spawn_worker};

const SWEEP: &str = r#"
name = "sketches"
model = "tiny-sd15"
prompt = "a photograph of an astronaut riding a horse"
sampler = "euler_a"
steps = 6
seeds = [3]
init_image = "pictures/sketch.png"

[axes]
strength = [0.4, 0.8]
size = ["64x64", "96x64"]
"#;

/// A picture of 80×48 pixels with a gradient and a hard edge (resizing has work to do).
fn write_sketch(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(80, 48, |x, y| {
        let edge = if x > 40 { 200 } else { 30 };
        image::Rgb([(x * 3) as u8, (y * 5) as u8, edge])
    })
    .save(path)
    .unwrap();
}

/// `kiln render --init` of the same cell, here; the picture's pixels.
fn local_render(dir: &Path, init: &Path, strength: &str, size: &str) -> Vec<u8> {
    let out = dir.join(format!("local-{strength}-{size}.png"));
    let (w, h) = size.split_once('x').unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("render")
        .arg("--model")
        .arg(fixtures().join("tiny-sd15"))
        .args(["--prompt", "a photograph of an astronaut riding a horse"])
        .args(["--sampler", "euler_a", "--steps", "6", "--seed", "3"])
        .args(["--width", w, "--height", h, "--strength", strength])
        .arg("--init")
        .arg(init)
        .arg("-o")
        .arg(&out)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    decode_png(&std::fs::read(&out).unwrap())
        .unwrap()
        .image
        .pixels
}

#[test]
fn an_img2img_sweep_renders_on_a_farm_as_kiln_render_does() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let out = dir.path().join("out");
    let _worker = spawn_worker(&c.addr, &out, &[&fixtures()]);
    let sketch = dir.path().join("pictures/sketch.png");
    write_sketch(&sketch);
    let file = dir.path().join("sketches.toml");
    std::fs::write(&file, SWEEP).unwrap();
    let said = kiln(&c.addr, &["submit", file.to_str().unwrap()]);
    assert!(said.contains("4 cells"), "{said}");
    kiln(&c.addr, &["watch", "sketches"]);

    let cells = json_rows(&kiln(
        &c.addr,
        &["query", r#"sweep = "sketches""#, "--format", "json"],
    ));
    assert_eq!(cells.len(), 4);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&sketch).unwrap()))
    };
    for cell in &cells {
        assert_eq!(cell["state"], "completed", "{cell}");
        assert_eq!(cell["init"]["image"], "pictures/sketch.png", "{cell}");
        assert_eq!(cell["init"]["sha256"], sha.as_str(), "{cell}");
        let strength = cell["bindings"]["strength"].as_str().unwrap();
        let size = cell["bindings"]["size"].as_str().unwrap();
        let png =
            decode_png(&std::fs::read(out.join(cell["object_key"].as_str().unwrap())).unwrap())
                .unwrap();
        let (w, h) = size.split_once('x').unwrap();
        assert_eq!(
            (png.image.width.to_string(), png.image.height.to_string()),
            (w.to_string(), h.to_string())
        );
        let parameters = &png.text.iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert!(
            parameters.contains(&format!("Denoising strength: {strength}")),
            "{parameters}"
        );
        assert!(parameters.contains("Sampler: Euler a"), "{parameters}");
        let local = local_render(dir.path(), &sketch, strength, size);
        assert!(
            png.image.pixels == local,
            "{size} at {strength}: the farm's image differs from kiln render's"
        );
    }
    // The strengths made different pictures.
    let keys: std::collections::BTreeSet<&str> = cells
        .iter()
        .map(|c| c["sha256"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 4);
}

#[test]
fn bad_init_pictures_and_strengths_are_clear_errors_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    std::fs::write(dir.path().join("notes.png"), "words, not pixels\n").unwrap();
    write_sketch(&dir.path().join("pictures/sketch.png"));
    image::RgbImage::new(4104, 8)
        .save(dir.path().join("wide.png"))
        .unwrap();
    let cases = [
        (
            "init_image = \"wide.png\"\n",
            "init_image \"wide.png\"",
            "4104x8 pixels: each side must be 1..=4096",
        ),
        (
            "init_image = \"notes.png\"\n",
            "init_image \"notes.png\"",
            "not a PNG, JPEG or WebP picture",
        ),
        ("init_image = \"missing.png\"\n", "missing.png", "looked at"),
        (
            "init_image = \"pictures/sketch.png\"\nstrength = 1.5\n",
            "strength",
            "1.5 is outside (0, 1]",
        ),
        ("strength = 0.5\n", "strength", "needs init_image"),
        (
            "init_image = \"pictures/sketch.png\"\nsampler = \"lcm\"\n",
            "init_image",
            "k-diffusion sampler",
        ),
    ];
    for (i, (extra, names, says)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.toml"));
        let text = format!(
            "model = \"tiny-sd15\"\nprompt = \"a fox\"\nsize = \"64x64\"\nseeds = [1]\n{extra}"
        );
        std::fs::write(&file, text).unwrap();
        let err = kiln_fails(&c.addr, &["submit", file.to_str().unwrap()]);
        assert!(err.contains(names) && err.contains(says), "{extra}: {err}");
        assert!(err.len() < 2000, "{extra}: a short message: {err}");
    }
    let sweeps = kiln(&c.addr, &["sweeps"]);
    assert!(!sweeps.contains("bad"), "nothing stored: {sweeps}");
}
