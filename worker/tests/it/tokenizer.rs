//! `ClipTokenizer` against transformers' `CLIPTokenizer` (`tools/reference/gen_tokenizer.py`
//! → `tokenizer.json`), called as diffusers' SD1.5 pipeline calls it.

use kiln_worker::engine::tokenizer::{ClipTokenizer, MAX_LENGTH};
use serde::Deserialize;

use crate::fixture::load;

#[derive(Deserialize)]
struct TokenizerFixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
}

#[test]
fn every_prompt_gives_transformers_ids() {
    let fixture: TokenizerFixture = load("tokenizer.json");
    assert!(!fixture.cases.is_empty(), "tokenizer.json has no cases");
    let tokenizer = ClipTokenizer::new().expect("embedded vocabulary loads");
    let mut failures = Vec::new();
    for case in &fixture.cases {
        assert_eq!(case.ids.len(), MAX_LENGTH, "fixture for {:?}", case.prompt);
        let got = tokenizer.encode(&case.prompt);
        if got != case.ids {
            failures.push(format!(
                "{:?}\n  ours:         {got:?}\n  transformers: {:?}",
                case.prompt, case.ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} prompt(s) differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn repeated_encodes_hit_the_cache_and_agree() {
    let tokenizer = ClipTokenizer::new().expect("embedded vocabulary loads");
    let prompt = "a photograph of an astronaut riding a horse, photograph";
    assert_eq!(tokenizer.encode(prompt), tokenizer.encode(prompt));
}
