//! Textual-inversion embeddings against an independent Python model of A1111's rules
//! (`tools/reference/gen_inversion.py` → `inversion.json`, `inversion.safetensors`,
//! `embeddings/`): the chunks and where each embedding goes exactly, the conditioning within
//! 1e-4; `TI hashes` in a rendered PNG, through the pipeline and through the worker's render
//! thread; a changed folder never serves stale vectors; and the files that are refused.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use kiln_proto::prompt::ParsedPrompt;
use kiln_worker::agent::renderer::{Item, Renderer};
use kiln_worker::cache::{Budget, PipelineKey};
use kiln_worker::engine::image::decode_png;
use kiln_worker::engine::text::conditioning::chunk_prompt_with;
use kiln_worker::engine::tokenizer::ClipTokenizer;
use kiln_worker::engine::{
    Device, EngineError, HostTensor, Inversion, InversionDb, InversionFormat, Model, Pipeline,
    RenderRequest, SamplerName, read_safetensors,
};
use safetensors::{Dtype, tensor::TensorView};
use serde::Deserialize;

use crate::fixture::{assert_tensor, load, path};

/// Relative error allowed for the embeddings (max |a−b| / max |ref|).
const TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    files: BTreeMap<String, File>,
    cases: BTreeMap<String, Case>,
    pairs: BTreeMap<String, Pair>,
}

#[derive(Deserialize)]
struct File {
    form: String,
    short_hash: String,
    sha256: String,
    vectors: usize,
    width: usize,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    role: String,
    chunks: Vec<Chunk>,
    used: Vec<String>,
    embedding: String,
}

#[derive(Deserialize)]
struct Chunk {
    tokens: Vec<u32>,
    weights: Vec<f32>,
    fixes: Vec<(usize, String)>,
}

#[derive(Deserialize)]
struct Pair {
    prompt_case: String,
    negative_case: String,
    chunks: usize,
    cond: String,
    uncond: String,
}

fn fixture() -> Fixture {
    load("inversion.json")
}

fn db() -> InversionDb {
    InversionDb::load(&[path("embeddings")]).expect("embeddings load")
}

fn parse(case: &Case) -> ParsedPrompt {
    let parsed = match case.role.as_str() {
        "positive" => ParsedPrompt::parse(&case.prompt),
        _ => ParsedPrompt::parse_negative(&case.prompt),
    };
    parsed.unwrap_or_else(|e| panic!("{:?}: {e}", case.prompt))
}

fn request(prompt: &str, negative: &str, cfg: f32) -> RenderRequest {
    RenderRequest {
        prompt: prompt.into(),
        negative_prompt: negative.into(),
        seed: 3,
        steps: 2,
        cfg_scale: cfg,
        sampler: SamplerName::LCM,
        width: 64,
        height: 64,
        clip_skip: 1,
        ..RenderRequest::default()
    }
}

fn pipeline(inversions: InversionDb) -> Pipeline {
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("loads");
    pipeline.set_inversions(Arc::new(inversions));
    pipeline
}

#[test]
fn files_read_as_the_reference_wrote_them() {
    let db = db();
    for (name, file) in &fixture().files {
        let inversion = db.get(name).expect("loaded");
        let form = match inversion.format() {
            InversionFormat::EmbParams => "emb_params",
            InversionFormat::StringToParam => "string_to_param",
            InversionFormat::Concept => "concept",
        };
        assert_eq!(form, file.form, "{name}");
        assert_eq!(
            (inversion.vectors(), inversion.width()),
            (file.vectors, file.width)
        );
        assert_eq!(inversion.hash(), file.sha256);
        assert_eq!(inversion.short_hash(), file.short_hash);
    }
    assert_eq!(db.refused().count(), 0);
}

#[test]
fn chunks_and_embedding_positions_match_the_reference() {
    let fixture = fixture();
    let tokenizer = ClipTokenizer::shared().expect("tokenizer");
    let db = db();
    for (name, case) in &fixture.cases {
        let chunks = chunk_prompt_with(&tokenizer, &parse(case).parts, &db).expect("chunks");
        assert_eq!(chunks.len(), case.chunks.len(), "{name}: chunk count");
        for (i, (got, want)) in chunks.iter().zip(&case.chunks).enumerate() {
            assert_eq!(got.tokens, want.tokens, "{name} chunk {i}: tokens");
            assert_eq!(got.weights, want.weights, "{name} chunk {i}: weights");
            let fixes: Vec<(usize, String)> = got
                .fixes
                .iter()
                .map(|f| (f.offset, f.inversion.name().to_owned()))
                .collect();
            assert_eq!(fixes, want.fixes, "{name} chunk {i}: embeddings");
        }
        let mut used: Vec<&str> = Vec::new();
        for fix in chunks.iter().flat_map(|c| &c.fixes) {
            if !used.contains(&fix.inversion.name()) {
                used.push(fix.inversion.name());
            }
        }
        assert_eq!(used, case.used, "{name}: embeddings used");
    }
}

#[test]
fn conditioning_matches_the_reference() {
    let fixture = fixture();
    let want = read_safetensors(&path("inversion.safetensors")).expect("inversion.safetensors");
    let model = Model::load(&path("tiny-sd15"), &[], Device::Cpu).expect("tiny-sd15 loads");
    let db = db();
    for (name, case) in &fixture.cases {
        let got = model
            .encode_parsed_with(&parse(case), 1, &db)
            .expect("encode");
        assert_tensor(name, &got, &want[&case.embedding], TOL);
    }
    // Under CFG the negative prompt's embeddings apply too, and it is padded to the prompt.
    let pipeline = pipeline(db);
    for (name, pair) in &fixture.pairs {
        let r = request(
            &fixture.cases[&pair.prompt_case].prompt,
            &fixture.cases[&pair.negative_case].prompt,
            2.0,
        );
        let (cond, uncond) = pipeline.conditioning(&r).expect("conditioning");
        let uncond: HostTensor = uncond.expect("guided");
        assert_eq!(uncond.shape[1], 77 * pair.chunks);
        assert_tensor(&format!("{name}/cond"), &cond, &want[&pair.cond], TOL);
        assert_tensor(&format!("{name}/uncond"), &uncond, &want[&pair.uncond], TOL);
    }
}

fn parameters_of(png: &[u8]) -> String {
    let decoded = decode_png(png).expect("decode");
    let (_, text) = decoded
        .text
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk");
    text
}

#[test]
fn a_render_lists_the_embeddings_of_both_prompts_in_ti_hashes() {
    let fixture = fixture();
    let hash = |name: &str| fixture.files[name].short_hash.clone();
    let pipeline = pipeline(db());
    let never = AtomicBool::new(false);
    let render = |r: &RenderRequest| pipeline.render(r, &mut |_| {}, &never).expect("renders");
    // The prompt's first, then the negative prompt's; each once.
    let guided = render(&request(
        "a (kiln-glow:1.2) castle",
        "kiln, kiln-glow, blurry",
        1.5,
    ));
    let want = format!(
        "TI hashes: \"kiln-glow: {}, kiln: {}\"",
        hash("kiln-glow"),
        hash("kiln")
    );
    let text = parameters_of(&guided.to_png().expect("png"));
    assert!(text.contains(&want), "{text}");
    assert!(text.starts_with("a (kiln-glow:1.2) castle\nNegative prompt: kiln, kiln-glow"));
    // At CFG 1 the negative prompt is not encoded, and neither are its embeddings.
    let unguided = render(&request("a castle", "kiln, blurry", 1.0));
    assert!(
        !unguided.parameters.contains("TI hashes"),
        "{}",
        unguided.parameters
    );
    // A word that only starts like a name is no embedding.
    let plain = render(&request("kilnglow castle", "", 1.0));
    assert!(!plain.parameters.contains("TI hashes"));
    // The embedding changes the image: the same words without the database render otherwise.
    let words = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("loads");
    let r = request("a (kiln-glow:1.2) castle", "kiln, kiln-glow, blurry", 1.5);
    let as_words = words.render(&r, &mut |_| {}, &never).expect("renders");
    assert_ne!(as_words.image, guided.image);
    assert!(!as_words.parameters.contains("TI hashes"));
}

/// Writes an `emb_params` embedding of `vectors` × `width` values, all `fill`.
fn write_embedding(file: &Path, vectors: usize, width: usize, fill: f32) {
    let data: Vec<u8> = std::iter::repeat_n(fill.to_le_bytes(), vectors * width)
        .flatten()
        .collect();
    let view = TensorView::new(Dtype::F32, vec![vectors, width], &data).unwrap();
    safetensors::serialize_to_file([("emb_params", view)], None, file).unwrap();
}

#[test]
fn a_changed_embeddings_folder_never_serves_stale_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kiln-glow.safetensors");
    write_embedding(&file, 3, 16, 0.25);
    let pipeline = pipeline(InversionDb::load(&[dir.path().to_owned()]).unwrap());
    let r = request("a kiln-glow castle", "", 1.0);
    let (before, _) = pipeline.conditioning(&r).expect("conditioning");
    let (again, _) = pipeline.conditioning(&r).expect("conditioning");
    assert_eq!(before, again);
    assert_eq!(pipeline.embedding_stats().hits, 1);

    write_embedding(&file, 3, 16, -0.5);
    let db = pipeline.inversions();
    assert!(db.changed());
    pipeline.set_inversions(Arc::new(InversionDb::load(db.dirs()).unwrap()));
    let (after, _) = pipeline.conditioning(&r).expect("conditioning");
    assert_ne!(before, after, "the new vectors were used");
    assert_eq!(pipeline.embedding_stats().misses, 2);
}

#[test]
fn refused_embeddings_are_clear_errors_naming_the_file() {
    // Width 8 against tiny-sd15's 16: an error when a prompt uses it, not at load.
    let tiny = pipeline(db());
    let e = tiny
        .conditioning(&request("a narrow castle", "", 1.0))
        .expect_err("wrong width");
    let text = e.to_string();
    assert!(matches!(e, EngineError::Inversion { .. }), "{e:?}");
    assert!(
        text.contains("narrow.safetensors") && text.contains("width 8") && text.contains("16 wide"),
        "{text}"
    );
    // Under CFG a negative prompt's wrong-width embedding fails the render too.
    let never = AtomicBool::new(false);
    let e = tiny
        .render(&request("a castle", "narrow", 2.0), &mut |_| {}, &never)
        .expect_err("negative prompt");
    assert!(e.to_string().contains("narrow.safetensors"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A pickle embedding (A1111's .pt) is never opened.
    std::fs::write(d.join("easyneg.pt"), b"PK\x03\x04 a torch zip").unwrap();
    let e = Inversion::read(&d.join("easyneg.pt")).expect_err("pickle");
    assert!(matches!(e, EngineError::Pickle { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("easyneg.pt") && text.contains("run any code") && text.contains("emb_params"),
        "{text}"
    );
    // An SDXL embedding names both halves' widths.
    let data = vec![0u8; 4 * 2 * 1280];
    let (l, g) = (
        TensorView::new(Dtype::F32, vec![2, 768], &data[..4 * 2 * 768]).unwrap(),
        TensorView::new(Dtype::F32, vec![2, 1280], &data).unwrap(),
    );
    safetensors::serialize_to_file(
        [("clip_l", l), ("clip_g", g)],
        None,
        &d.join("xl.safetensors"),
    )
    .unwrap();
    let e = Inversion::read(&d.join("xl.safetensors")).expect_err("sdxl");
    assert!(matches!(e, EngineError::Unsupported { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("xl.safetensors") && text.contains("SDXL") && text.contains("768"),
        "{text}"
    );
    // Both sit in the folder as refused names: a prompt using one fails with the reason,
    // one using neither renders.
    let folder = InversionDb::load(&[d.to_owned()]).unwrap();
    assert_eq!(folder.refused().count(), 2);
    let pipeline = pipeline(folder);
    for (prompt, says) in [("easyneg, a castle", "easyneg.pt"), ("xl castle", "SDXL")] {
        let e = pipeline
            .conditioning(&request(prompt, "", 1.0))
            .expect_err(prompt);
        assert!(matches!(e, EngineError::InversionRefused { .. }), "{e:?}");
        assert!(e.to_string().contains(says), "{e}");
    }
    assert!(pipeline.conditioning(&request("a castle", "", 1.0)).is_ok());
}

#[tokio::test]
async fn the_worker_render_thread_reads_the_models_embeddings_folder() {
    // The reference folder is a models folder whose `embeddings/` holds the fixtures.
    let renderer = Renderer::spawn_with_inversions(Budget::both(1 << 30), vec![path("embeddings")]);
    let key = PipelineKey {
        model: path("tiny-sd15"),
        loras: Vec::new(),
        vae: None,
        device: Device::Cpu,
    };
    let (progress, _rx) = tokio::sync::watch::channel((0, 0));
    let item = Item {
        request: request("kiln-glow, a castle", "", 1.0),
        cancel: Arc::new(AtomicBool::new(false)),
        progress,
    };
    let out = renderer.render(key, vec![item]).await;
    let rendered = out.into_iter().next().unwrap().expect("renders");
    let hash = &fixture().files["kiln-glow"].short_hash;
    assert!(
        rendered
            .parameters
            .contains(&format!("TI hashes: \"kiln-glow: {hash}\"")),
        "{}",
        rendered.parameters
    );
    assert_eq!(parameters_of(&rendered.png), rendered.parameters);
}
