//! The issue's seed recipe on a farm: a real coordinator process (SQLite file), a real worker
//! process (file storage) and the tiny reference model. A sweep with a LoRA at 0.3, A1111's
//! "DPM++ 2S a Karras" at CFG 2.5 for 6 steps, 64×64, and a hires fix at 1.5× with the latent
//! upscaler over two denoising strengths and two seeds completes; its PNGs are 96×96 and say
//! so in A1111's words; `kiln query` finds its cells by sampler and hires columns.

use std::path::Path;

use kiln_worker::engine::image::decode_png;

use crate::spawn;
use crate::util::{fixtures, json_rows, kiln, spawn_worker};

const RECIPE: &str = r#"
name = "recipe"
model = "tiny-sd15"
prompt = "a photograph of an astronaut riding a horse"
sampler = "DPM++ 2S a Karras"
cfg = 2.5
steps = 6
size = "64x64"
seeds = [7, 8]
hires_scale = 1.5
hires_upscaler = "latent"

[[loras]]
name = "lora_kohya"
strength = 0.3

[axes]
hires_denoise = [0.3, 0.5]
"#;

/// One plain cell (no hires fix): the hires columns are missing there.
const PLAIN: &str = r#"
name = "plain"
model = "tiny-sd15"
prompt = "a fox"
size = "64x64"
seeds = [1]
"#;

/// `kiln query FILTER --format json`'s rows.
fn query(addr: &str, filter: &str) -> Vec<serde_json::Value> {
    json_rows(&kiln(addr, &["query", filter, "--format", "json"]))
}

/// The PNG text chunk `parameters` of the file at `path`, and the picture's size.
fn png_parameters(path: &Path) -> ((u32, u32), String) {
    let png = decode_png(&std::fs::read(path).unwrap()).unwrap();
    let parameters = png
        .text
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    ((png.image.width, png.image.height), parameters)
}

#[test]
fn the_hires_recipe_renders_on_a_farm_and_is_queryable() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let out = dir.path().join("out");
    let _worker = spawn_worker(&c.addr, &out, &[&fixtures()]);
    for (name, text) in [("recipe", RECIPE), ("plain", PLAIN)] {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        kiln(&c.addr, &["submit", file.to_str().unwrap()]);
        kiln(&c.addr, &["watch", name]);
    }

    let cells = query(&c.addr, r#"sweep = "recipe""#);
    assert_eq!(cells.len(), 4);
    for cell in &cells {
        assert_eq!(cell["state"], "completed", "{cell}");
        let denoise = cell["bindings"]["hires_denoise"].as_str().unwrap();
        assert!(matches!(denoise, "0.3" | "0.5"), "{cell}");
        assert_eq!(cell["hires"]["scale"], 1.5, "{cell}");
        assert_eq!(cell["hires"]["upscaler"], "latent", "{cell}");
        let key = cell["object_key"].as_str().unwrap();
        let (size, parameters) = png_parameters(&out.join(key));
        assert_eq!(size, (96, 96), "{parameters}");
        for says in [
            "Steps: 6, Sampler: DPM++ 2S a Karras".to_string(),
            "CFG scale: 2.5".into(),
            "Hires upscale: 1.5".into(),
            "Hires upscaler: Latent".into(),
            format!("Denoising strength: {denoise}"),
            "lora_kohya".into(),
        ] {
            assert!(parameters.contains(&says), "{says}: {parameters}");
        }
    }

    // The sampler and hires columns filter on the coordinator; a plain cell has no hires
    // value, so every hires test is false there.
    let count = |filter: &str| query(&c.addr, filter).len();
    assert_eq!(count(r#"sampler = "dpmpp_2s_a_karras""#), 4);
    assert_eq!(count("hires_denoise = 0.5"), 2);
    assert_eq!(count("hires_denoise = 0.3"), 2);
    assert_eq!(
        count(r#"hires_denoise >= 0.5 and hires_upscaler = "latent""#),
        2
    );
    assert_eq!(
        count("hires_scale = 1.5 and hires_width = 96 and hires_height = 96"),
        4
    );
    assert_eq!(count("hires_steps = 0"), 4);
    assert_eq!(count("not hires_denoise > 0"), 1);
    let half = query(
        &c.addr,
        r#"sampler = "dpmpp_2s_a_karras" and hires_denoise = 0.5"#,
    );
    assert!(
        half.iter()
            .all(|r| r["bindings"]["hires_denoise"] == "0.5" && r["hires"]["denoise"] == 0.5),
        "{half:?}"
    );
    let seeds: std::collections::BTreeSet<u64> =
        half.iter().map(|r| r["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [7, 8].into());
}
