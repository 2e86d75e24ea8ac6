//! A1111 prompt syntax against an independent Python model of A1111's parsing, chunking and
//! emphasis (`tools/reference/gen_prompts.py` → `prompts.json`, `prompts.safetensors`): the
//! parsed parts and the token chunks exactly, the embeddings within 1e-4; plus renders whose
//! negative prompt has another chunk count than the prompt.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use kiln_proto::prompt::{ParsedPrompt, PromptPart};
use kiln_worker::engine::text::conditioning::chunk_prompt;
use kiln_worker::engine::tokenizer::ClipTokenizer;
use kiln_worker::engine::{
    Device, EngineError, HostTensor, Model, Pipeline, RenderRequest, SamplerName, read_safetensors,
};
use serde::Deserialize;

use crate::fixture::{assert_tensor, load, path};

/// Relative error allowed for the embeddings (max |a−b| / max |ref|).
const TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    cases: BTreeMap<String, Case>,
    pairs: BTreeMap<String, Pair>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    role: String,
    clip_skip: usize,
    parsed: Vec<(String, f64)>,
    networks: Vec<Network>,
    chunks: Vec<Chunk>,
    embedding: String,
}

#[derive(Deserialize)]
struct Network {
    kind: String,
    items: Vec<String>,
}

#[derive(Deserialize)]
struct Chunk {
    tokens: Vec<u32>,
    weights: Vec<f32>,
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
    load("prompts.json")
}

fn tensors() -> BTreeMap<String, HostTensor> {
    read_safetensors(&path("prompts.safetensors")).expect("prompts.safetensors")
}

fn parse(case: &Case) -> ParsedPrompt {
    let parsed = match case.role.as_str() {
        "positive" => ParsedPrompt::parse(&case.prompt),
        _ => ParsedPrompt::parse_negative(&case.prompt),
    };
    parsed.unwrap_or_else(|e| panic!("{:?}: {e}", case.prompt))
}

#[test]
fn parsed_parts_and_extra_networks_match_the_reference() {
    let fixture = fixture();
    for (name, case) in &fixture.cases {
        let parsed = parse(case);
        let got: Vec<(&str, f64)> = parsed.parts.iter().map(PromptPart::as_a1111_pair).collect();
        assert_eq!(got.len(), case.parsed.len(), "{name}: {got:?}");
        for ((text, weight), (want_text, want_weight)) in got.iter().zip(&case.parsed) {
            assert_eq!(text, want_text, "{name}");
            // The same f64 arithmetic in the same order; JSON costs at most the last bit.
            assert!(
                (weight - want_weight).abs() <= f64::EPSILON * want_weight.abs()
                    && *weight as f32 == *want_weight as f32,
                "{name}: {text:?} has weight {weight}, A1111 {want_weight}"
            );
        }
        let networks: Vec<(String, Vec<String>)> = parsed
            .networks
            .iter()
            .map(|n| {
                let items = std::iter::once(n.name.clone()).chain(n.args.clone());
                (n.kind.clone(), items.collect())
            })
            .collect();
        let want: Vec<(String, Vec<String>)> = case
            .networks
            .iter()
            .map(|n| (n.kind.clone(), n.items.clone()))
            .collect();
        assert_eq!(networks, want, "{name}");
    }
}

#[test]
fn token_chunks_match_the_reference() {
    let fixture = fixture();
    let tokenizer = ClipTokenizer::new().expect("tokenizer");
    for (name, case) in &fixture.cases {
        let chunks = chunk_prompt(&tokenizer, &parse(case).parts);
        assert_eq!(chunks.len(), case.chunks.len(), "{name}: chunk count");
        for (i, (got, want)) in chunks.iter().zip(&case.chunks).enumerate() {
            assert_eq!(got.tokens, want.tokens, "{name} chunk {i}: tokens");
            assert_eq!(got.weights, want.weights, "{name} chunk {i}: weights");
        }
    }
    // The long tag list is three chunks, each of the first two cut early at a comma.
    let long = &fixture.cases["long"].chunks;
    assert_eq!(long.len(), 3);
    assert!(long[..2].iter().all(|c| c.tokens[75] == 49407));
}

#[test]
fn embeddings_match_the_reference() {
    let fixture = fixture();
    let want = tensors();
    let model = Model::load(&path("tiny-sd15"), &[], Device::Cpu).expect("tiny-sd15 loads");
    for (name, case) in &fixture.cases {
        let got = model
            .encode_parsed(&parse(case), case.clip_skip)
            .expect("encode");
        assert_tensor(name, &got, &want[&case.embedding], TOL);
    }
    // A plain prompt through the parser is the plain encoding.
    let plain = &fixture.cases["plain"];
    assert_eq!(
        model.encode_prompt(&plain.prompt).expect("encode").data,
        model.encode_parsed(&parse(plain), 1).expect("encode").data
    );
}

fn request(prompt: &str, negative: &str, seed: u64, cfg: f32) -> RenderRequest {
    RenderRequest {
        prompt: prompt.into(),
        negative_prompt: negative.into(),
        seed,
        steps: 2,
        cfg_scale: cfg,
        sampler: SamplerName::EULER_A_DIFFUSERS,
        width: 64,
        height: 48,
        clip_skip: 1,
        ..RenderRequest::default()
    }
}

#[test]
fn a_negative_prompt_is_padded_to_the_prompts_chunk_count() {
    let fixture = fixture();
    let want = tensors();
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("loads");
    for (name, pair) in &fixture.pairs {
        let prompt = &fixture.cases[&pair.prompt_case].prompt;
        let negative = &fixture.cases[&pair.negative_case].prompt;
        let (cond, uncond) = pipeline
            .conditioning(&request(prompt, negative, 1, 7.5))
            .expect("conditioning");
        let uncond = uncond.expect("CFG 7.5 has an unconditional branch");
        assert_eq!(uncond.shape[1], 77 * pair.chunks, "{name}");
        assert_tensor(&format!("{name}/cond"), &cond, &want[&pair.cond], TOL);
        assert_tensor(&format!("{name}/uncond"), &uncond, &want[&pair.uncond], TOL);
        // Without guidance there is nothing to pad.
        let (cond, uncond) = pipeline
            .conditioning(&request(prompt, negative, 1, 1.0))
            .expect("conditioning");
        assert!(uncond.is_none());
        assert_eq!(cond.shape[1], 77 * pair.chunks);
    }
}

#[test]
fn a_negative_prompt_of_another_length_renders_under_cfg() {
    let fixture = fixture();
    let long = &fixture.cases["long"].prompt;
    let never = AtomicBool::new(false);
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("loads");
    // Three prompt chunks against one negative chunk, and the other way round.
    let a = request(long, "blurry", 7, 7.5);
    let b = request("a (red:1.2) fox", long, 8, 7.5);
    let c = request("a red fox", "blurry", 9, 7.5);
    let single: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|r| pipeline.render(r, &mut |_| {}, &never).expect("renders"))
        .collect();
    assert!(single[0].parameters.ends_with("RNG: CPU, Pad conds: True"));
    assert!(single[1].parameters.ends_with("RNG: CPU, Pad conds: True"));
    assert!(single[2].parameters.ends_with("RNG: CPU"));
    // In one batch the three lengths (231, 231, 77 tokens) take two UNet passes per step, and
    // each image is still its single render.
    let batch = pipeline
        .render_batch(&[a, b, c], &mut |_| {}, &never)
        .expect("batch renders");
    for (i, (got, want)) in batch.iter().zip(&single).enumerate() {
        let max = got
            .image
            .pixels
            .iter()
            .zip(&want.image.pixels)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        assert!(
            max <= 1,
            "image {i} differs from its single render by {max}/255"
        );
        assert_eq!(got.parameters, want.parameters);
    }
}

#[test]
fn bad_prompts_and_clip_skips_are_refused_before_rendering() {
    let pipeline = Pipeline::load(&path("tiny-sd15"), &[], Device::Cpu).expect("loads");
    let never = AtomicBool::new(false);
    let bad = request("a (red fox", "", 1, 1.0);
    let err = bad.check().expect_err("unbalanced bracket");
    assert!(
        matches!(
            &err,
            EngineError::Prompt {
                which: "prompt",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("column 3") && msg.contains("`\\(`"), "{msg}");
    let err = pipeline
        .render(&request("a fox", "ugly]", 1, 7.5), &mut |_| {}, &never)
        .expect_err("stray bracket");
    assert!(err.to_string().contains("negative prompt"), "{err}");
    let err = request("<lora:x:abc> fox", "", 1, 1.0)
        .check()
        .expect_err("bad weight");
    assert!(err.to_string().contains("abc"), "{err}");

    for clip_skip in [0, 5] {
        let mut r = request("a fox", "", 1, 1.0);
        r.clip_skip = clip_skip;
        assert!(r.check().is_err(), "clip skip {clip_skip}");
    }
    // tiny-sd15's text encoder has 2 layers: clip skip 2 renders, 3 does not.
    let mut r = request("a fox", "", 1, 1.0);
    r.clip_skip = 3;
    assert!(r.check().is_ok());
    assert!(pipeline.validate(&r).is_err());
    r.clip_skip = 2;
    let out = pipeline.render(&r, &mut |_| {}, &never).expect("renders");
    assert!(
        out.parameters.contains("Clip skip: 2"),
        "{}",
        out.parameters
    );
}
