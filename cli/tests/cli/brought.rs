//! What users bring from A1111, end to end with real processes: a sweep naming a Civitai-style
//! single-file checkpoint by its stem, `<lora:name:weight>` and emphasis in prompts, a clip
//! skip axis; cells found afterwards by the prompt LoRA's weight; the PNG parameters as A1111
//! writes them; and files a worker must refuse (a pickle, an SDXL checkpoint) discarded with
//! their reason while the worker goes on rendering.

use crate::spawn;
use crate::util::{fixtures, json_rows, kiln, max_pixel_diff, spawn_worker};

fn rows(addr: &str, filter: &str) -> Vec<serde_json::Value> {
    json_rows(&kiln(addr, &["query", filter, "--format", "json"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_files_prompt_loras_and_refusals_through_a_farm() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    // A second models folder with what a worker must refuse.
    let bad = dir.path().join("bad-models");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("old.ckpt"), b"PK\x03\x04 a torch zip").unwrap();
    let out_dir = dir.path().join("out");
    let mut worker = spawn_worker(&c.addr, &out_dir, &[&fixtures(), &bad]);

    // Files a worker refuses: discarded with the reason, nothing else stops.
    let refused = dir.path().join("refused.toml");
    std::fs::write(
        &refused,
        "name = \"refused\"\nprompt = \"a fox\"\nwidth = 64\nheight = 64\nseeds = [1]\n\
         [axes]\nmodel = [\"old.ckpt\", \"lora_kohya\"]\n",
    )
    .unwrap();
    kiln(&c.addr, &["submit", refused.to_str().unwrap()]);
    kiln(&c.addr, &["watch", "refused"]);
    let discarded = rows(&c.addr, r#"sweep = "refused" and state = "discarded""#);
    assert_eq!(discarded.len(), 2, "{discarded:?}");
    let errors: Vec<&str> = discarded
        .iter()
        .map(|r| r["error"].as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("pickle") && e.contains("old.ckpt")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("a LoRA, not a model")),
        "{errors:?}"
    );
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker is up");
    // Named after the PC (not $HOSTNAME, which shells do not export).
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let workers = kiln(&c.addr, &["workers"]);
    assert!(workers.contains(&host), "{host}: {workers}");

    // A1111 prompts on the diffusers folder: prompt LoRA weights and a clip skip axis.
    let a1111 = dir.path().join("a1111.toml");
    std::fs::write(
        &a1111,
        "name = \"a1111\"\nmodel = \"tiny-sd15\"\n\
         prompt = \"a (red:1.2) fox, [forest] BREAK night <lora:{lora_kohya:0.7|lora_kohya:0.3}>\"\n\
         width = 64\nheight = 64\nseeds = [1]\n[axes]\nclip_skip = [1, 2]\n",
    )
    .unwrap();
    // The single-file checkpoint, named by its stem, with its yaml beside it.
    let civitai = dir.path().join("civitai.toml");
    std::fs::write(
        &civitai,
        "name = \"civitai\"\nmodel = \"tiny-ldm\"\nprompt = \"a photograph of an astronaut riding a horse\"\n\
         width = 128\nheight = 128\nseeds = [42]\n",
    )
    .unwrap();
    kiln(&c.addr, &["submit", a1111.to_str().unwrap()]);
    kiln(&c.addr, &["submit", civitai.to_str().unwrap()]);
    kiln(&c.addr, &["watch", "a1111"]);
    kiln(&c.addr, &["watch", "civitai"]);

    let strong = rows(&c.addr, r#"sweep = "a1111" and lora.lora_kohya = 0.7"#);
    assert_eq!(strong.len(), 2, "{strong:?}");
    assert!(
        strong.iter().all(|r| r["state"] == "completed"),
        "{strong:?}"
    );
    let skipped = rows(
        &c.addr,
        r#"sweep = "a1111" and lora.lora_kohya = 0.3 and clip_skip = 2"#,
    );
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0]["clip_skip"], 2);

    let fetched = dir.path().join("fetched");
    kiln(
        &c.addr,
        &[
            "fetch",
            r#"sweep = "a1111" and lora.lora_kohya = 0.3 and clip_skip = 2"#,
            "-o",
            fetched.to_str().unwrap(),
        ],
    );
    let file = std::fs::read_dir(&fetched)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let png = kiln_worker::engine::image::decode_png(&std::fs::read(file.path()).unwrap()).unwrap();
    let parameters = &png.text[0].1;
    assert!(
        parameters.starts_with("a (red:1.2) fox, [forest] BREAK night <lora:lora_kohya:0.3>\n"),
        "{parameters}"
    );
    assert!(
        parameters.contains("Clip skip: 2") && parameters.contains("Lora hashes: "),
        "{parameters}"
    );

    // The single file renders what diffusers' from_single_file renders.
    let civitai = rows(&c.addr, r#"sweep = "civitai""#);
    assert_eq!(civitai[0]["state"], "completed", "{civitai:?}");
    let fetched = dir.path().join("civitai");
    kiln(
        &c.addr,
        &[
            "fetch",
            r#"sweep = "civitai""#,
            "-o",
            fetched.to_str().unwrap(),
        ],
    );
    let file = std::fs::read_dir(&fetched)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let got = kiln_worker::engine::image::decode_png(&std::fs::read(file.path()).unwrap()).unwrap();
    let want = kiln_worker::engine::image::decode_png(
        &std::fs::read(fixtures().join("single_file_lcm_seed42.png")).unwrap(),
    )
    .unwrap();
    let max = max_pixel_diff(&got.image, &want.image);
    assert!(max <= 1, "max pixel diff {max}");
    assert!(
        got.text[0].1.contains("Model: tiny-ldm"),
        "{}",
        got.text[0].1
    );
}
