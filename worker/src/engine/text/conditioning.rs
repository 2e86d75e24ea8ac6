//! Prompt conditioning as A1111 computes it (`modules/sd_hijack_clip.py`,
//! `modules/sd_emphasis.py`): from a parsed prompt to the embeddings the UNet attends to.
//!
//! Owns the steps after parsing ([`kiln_proto::prompt`] parses):
//!
//! 1. Each part is tokenized on its own, without BOS/EOS; every token carries its part's
//!    weight.
//! 2. The tokens are cut into chunks of 75 ([`chunk_prompt_with`]). `BREAK` ends a chunk. When a
//!    chunk is full and the next token is not a comma, the tokens after the chunk's last comma
//!    move to the next chunk if that comma is within the last 20 tokens (A1111's
//!    `comma_padding_backtrack`, default 20). Each chunk is `[BOS] + 75 + [EOS]`, padded with
//!    EOS (SD1's pad token), weight 1.0 for BOS, EOS and padding.
//! 3. Textual-inversion embeddings (A1111's `tokenize_line`): after the comma rule, at each
//!    position the longest embedding name whose tokens start there ([`InversionDb`], within the
//!    part) takes one placeholder token per vector (id 0), each with the part's weight, and its
//!    position is remembered in the chunk ([`ChunkFix`]). An embedding is never split: when its
//!    vectors do not fit, the chunk is closed (padded) and it starts the next one. A1111 leaves
//!    a remembered position in its chunk even when the comma rule later moves the placeholders
//!    on; kiln does the same, so such a prompt gives A1111's conditioning (the vectors land on
//!    the old chunk's padding, the moved placeholders stay `!`).
//! 4. All chunks go through CLIP in one batch (each is encoded on its own: there is no
//!    attention across chunks), each embedding's vectors replacing the token embeddings after
//!    BOS + its position, before the position embeddings are added (A1111's
//!    `EmbeddingsWithFixes`, cut at the chunk's end as it cuts them). An embedding whose width
//!    is not the text encoder's is an error naming its file. Then A1111's "Original" emphasis per
//!    chunk: `m0 = mean(z)`, `z *= weight`, `z *= m0 / mean(z)`, means over the chunk's
//!    77 × hidden values.
//! 5. The chunks are concatenated on the token axis: `[1, 77·k, hidden]`.
//!
//! A prompt whose weights are all 1.0 skips step 3, which then changes nothing, so a plain
//! prompt of up to 75 tokens is exactly the single 77-token encoding diffusers makes.
//!
//! Under classifier-free guidance the prompt's and the negative prompt's conditionings are
//! padded to the same chunk count with the empty prompt's chunk (`pad_cond_uncond`, A1111's
//! "Pad prompt/negative prompt" option; A1111 by default runs two UNet passes of different
//! lengths instead). The empty prompt's chunk is encoded by the request's own model (LoRAs
//! merged) at its clip skip; A1111 encodes it once when the checkpoint loads, with no LoRA
//! active. Images of one batch whose lengths still differ get separate UNet passes
//! (`group_by_length`) rather than A1111's repeat-the-last-vector padding, so that batching
//! never changes an image.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use kiln_proto::prompt::PromptPart;

use crate::engine::error::{EngineError, Result};
use crate::engine::load::inversion::Inversion;
use crate::engine::model::UsedInversion;
use crate::engine::nets::clip::{ClipTextModel, TokenFix};
use crate::engine::text::inversion::InversionDb;
use crate::engine::text::tokenizer::{BOS_ID, ClipTokenizer, EOS_ID, MAX_LENGTH};

/// Prompt tokens per chunk: the encoder's 77 minus BOS and EOS.
pub const CHUNK_TOKENS: usize = MAX_LENGTH - 2;
/// A1111's `comma_padding_backtrack` default: how far back a comma may be for the text after it
/// to move to the next chunk.
pub const COMMA_PADDING_BACKTRACK: usize = 20;
/// `,</w>`, the token A1111 looks for (`vocab[',</w>']`).
pub const COMMA_ID: u32 = 267;
/// The id A1111 puts where an embedding's vectors go (`!`); the vectors replace its embedding.
pub const PLACEHOLDER_ID: u32 = 0;

/// Where an embedding's vectors go in a chunk (A1111's `PromptChunkFix`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkFix {
    /// Position among the chunk's prompt tokens, BOS not counted: the vectors replace tokens
    /// `offset + 1 ..` of the 77.
    pub offset: usize,
    /// The embedding.
    pub inversion: Arc<Inversion>,
}

/// One 77-token chunk of a prompt: what the text encoder reads, and each token's weight.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptChunk {
    /// `[BOS] + 75 + [EOS]`.
    pub tokens: Vec<u32>,
    /// One per token, as f32 (A1111 builds the multiplier tensor in torch's default f32).
    pub weights: Vec<f32>,
    /// The embeddings placed in this chunk, in order.
    pub fixes: Vec<ChunkFix>,
}

/// Tokenizes and chunks `parts` as A1111's `tokenize_line` does, with no embeddings; never
/// empty.
pub fn chunk_prompt(tokenizer: &ClipTokenizer, parts: &[PromptPart]) -> Vec<PromptChunk> {
    chunk_prompt_with(tokenizer, parts, &InversionDb::empty())
        .expect("a database of no embeddings refuses no name")
}

/// Tokenizes and chunks `parts` as A1111's `tokenize_line` does, placing the embeddings of
/// `inversions` whose names occur; never empty. Fails when a name's file was refused.
pub fn chunk_prompt_with(
    tokenizer: &ClipTokenizer,
    parts: &[PromptPart],
    inversions: &InversionDb,
) -> Result<Vec<PromptChunk>> {
    let mut chunker = Chunker::default();
    for part in parts {
        let (text, weight) = match part {
            PromptPart::Break => {
                chunker.close();
                continue;
            }
            PromptPart::Text { text, weight } => (text, *weight as f32),
        };
        let tokens = tokenizer.tokenize(text);
        let mut at = 0;
        while at < tokens.len() {
            chunker.make_room(tokens[at]);
            match inversions.find(&tokens, at)? {
                Some((inversion, name_tokens)) => {
                    chunker.place(inversion, weight);
                    at += name_tokens;
                }
                None => {
                    chunker.tokens.push(tokens[at]);
                    chunker.weights.push(weight);
                    at += 1;
                }
            }
        }
    }
    Ok(chunker.finish())
}

/// The embeddings placed in `chunks`, each once, in order of first use.
pub(crate) fn inversions_used(chunks: &[PromptChunk]) -> Vec<Arc<Inversion>> {
    let mut used: Vec<Arc<Inversion>> = Vec::new();
    for fix in chunks.iter().flat_map(|c| &c.fixes) {
        if !used.iter().any(|u| u.name() == fix.inversion.name()) {
            used.push(fix.inversion.clone());
        }
    }
    used
}

#[derive(Default)]
struct Chunker {
    done: Vec<PromptChunk>,
    tokens: Vec<u32>,
    weights: Vec<f32>,
    fixes: Vec<ChunkFix>,
    /// Index in `tokens` of the last comma since the chunk began.
    last_comma: Option<usize>,
}

impl Chunker {
    /// A1111's steps before a token (or an embedding starting with it) is added: the comma
    /// rule, then closing a full chunk.
    fn make_room(&mut self, token: u32) {
        if token == COMMA_ID {
            self.last_comma = Some(self.tokens.len());
        } else if let Some(comma) = self.last_comma
            && self.tokens.len() == CHUNK_TOKENS
            && self.tokens.len() - comma <= COMMA_PADDING_BACKTRACK
        {
            let moved_tokens = self.tokens.split_off(comma + 1);
            let moved_weights = self.weights.split_off(comma + 1);
            // The fixes stay with the chunk being closed, as A1111 leaves them.
            self.close();
            self.tokens = moved_tokens;
            self.weights = moved_weights;
        }
        // A full chunk is closed even when the new token is a comma; that comma then starts
        // the next chunk without counting as its last comma (A1111 resets it on close).
        if self.tokens.len() == CHUNK_TOKENS {
            self.close();
        }
    }

    /// Adds an embedding's placeholders, first closing the chunk if they do not fit in it.
    fn place(&mut self, inversion: Arc<Inversion>, weight: f32) {
        let n = inversion.vectors();
        if self.tokens.len() + n > CHUNK_TOKENS {
            self.close();
        }
        self.fixes.push(ChunkFix {
            offset: self.tokens.len(),
            inversion,
        });
        self.tokens.extend(std::iter::repeat_n(PLACEHOLDER_ID, n));
        self.weights.extend(std::iter::repeat_n(weight, n));
    }

    /// Pads the chunk being filled to 75, wraps it in BOS/EOS and starts the next one.
    fn close(&mut self) {
        let mut tokens = Vec::with_capacity(MAX_LENGTH);
        tokens.push(BOS_ID);
        tokens.append(&mut self.tokens);
        tokens.resize(MAX_LENGTH, EOS_ID);
        let mut weights = Vec::with_capacity(MAX_LENGTH);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.resize(MAX_LENGTH, 1.0);
        let fixes = std::mem::take(&mut self.fixes);
        self.done.push(PromptChunk {
            tokens,
            weights,
            fixes,
        });
        self.last_comma = None;
    }

    fn finish(mut self) -> Vec<PromptChunk> {
        if !self.tokens.is_empty() || self.done.is_empty() {
            self.close();
        }
        self.done
    }
}

/// A prompt's conditioning and the embeddings that went into it.
#[derive(Clone, Debug)]
pub(crate) struct Encoded {
    /// `[1, 77·k, hidden]`, f32.
    pub(crate) z: Tensor,
    /// The textual-inversion embeddings placed, each once, in order of first use.
    pub(crate) inversions: Vec<Arc<Inversion>>,
}

/// The embeddings `encoded` used, each once, in order (the prompt's, then those only the
/// negative prompt used), for the image metadata.
pub(crate) fn used_inversions(encoded: &[&Encoded]) -> Vec<UsedInversion> {
    let mut used: Vec<UsedInversion> = Vec::new();
    for inversion in encoded.iter().flat_map(|e| &e.inversions) {
        if !used.iter().any(|u| u.name == inversion.name()) {
            used.push(UsedInversion {
                name: inversion.name().to_owned(),
                hash: inversion.hash().to_owned(),
            });
        }
    }
    used
}

/// The conditioning (`[1, 77·k, hidden]`, f32) of `chunks`, `clip_skip` layers from the end.
pub(crate) fn encode_chunks(
    clip: &ClipTextModel,
    chunks: &[PromptChunk],
    clip_skip: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let k = chunks.len();
    let ids: Vec<u32> = chunks
        .iter()
        .flat_map(|c| c.tokens.iter().copied())
        .collect();
    let ids = Tensor::from_vec(ids, (k, MAX_LENGTH), device)?;
    let fixes = token_fixes(chunks, clip.hidden_size(), device)?;
    let z = clip
        .forward(&ids, clip_skip, &fixes)?
        .to_dtype(DType::F32)?;
    let hidden = z.dim(2)?;
    let z = if chunks.iter().all(|c| c.weights.iter().all(|&w| w == 1.0)) {
        z
    } else {
        let weights: Vec<f32> = chunks
            .iter()
            .flat_map(|c| c.weights.iter().copied())
            .collect();
        emphasis(&z, &Tensor::from_vec(weights, (k, MAX_LENGTH), device)?)?
    };
    Ok(z.reshape((1, k * MAX_LENGTH, hidden))?)
}

/// The embeddings' vectors for the text encoder: chunk `row`'s token embeddings from `start`
/// on, as many as fit before the chunk's end (A1111's `EmbeddingsWithFixes` cut).
fn token_fixes(
    chunks: &[PromptChunk],
    hidden: usize,
    device: &candle_core::Device,
) -> Result<Vec<TokenFix>> {
    let mut fixes = Vec::new();
    for (row, chunk) in chunks.iter().enumerate() {
        for fix in &chunk.fixes {
            let inversion = &fix.inversion;
            if inversion.width() != hidden {
                return Err(EngineError::Inversion {
                    path: inversion.path().to_owned(),
                    reason: format!(
                        "{} vectors of width {}, but this model's text encoder is {hidden} wide \
                         (an embedding for another model family? SD1.x is 768, SD2.x 1024)",
                        inversion.vectors(),
                        inversion.width()
                    ),
                });
            }
            let start = fix.offset + 1;
            let n = inversion.vectors().min(MAX_LENGTH.saturating_sub(start));
            if n == 0 {
                continue;
            }
            let values = &inversion.values()[..n * hidden];
            fixes.push(TokenFix {
                row,
                start,
                vectors: Tensor::from_slice(values, (n, hidden), device)?,
            });
        }
    }
    Ok(fixes)
}

/// A1111's `EmphasisOriginal` on each chunk of `z` (`[k, tokens, hidden]`) with `weights`
/// (`[k, tokens]`): scale each token's vector by its weight, then restore the chunk's mean.
fn emphasis(z: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (k, _, _) = z.dims3()?;
    let chunk_mean = |t: &Tensor| -> Result<Tensor> {
        Ok(t.reshape((k, ()))?.mean_keepdim(1)?.reshape((k, 1, 1))?)
    };
    let original = chunk_mean(z)?;
    let weighted = z.broadcast_mul(&weights.unsqueeze(2)?)?;
    let ratio = (original / chunk_mean(&weighted)?)?;
    Ok(weighted.broadcast_mul(&ratio)?)
}

/// A prompt's and a negative prompt's conditionings (`[1, 77·k, hidden]`), the shorter one
/// padded with `empty()` (the empty prompt's, `[1, 77, hidden]`) to the other's chunk count, as
/// A1111's `pad_cond_uncond` does; and whether it padded.
pub(crate) fn pad_cond_uncond(
    cond: Tensor,
    uncond: Tensor,
    empty: impl FnOnce() -> Result<Tensor>,
) -> Result<(Tensor, Tensor, bool)> {
    let (c, u) = (cond.dim(1)?, uncond.dim(1)?);
    if c == u {
        return Ok((cond, uncond, false));
    }
    let empty = empty()?;
    let tokens = c.max(u);
    Ok((
        pad_chunks(&cond, tokens, &empty)?,
        pad_chunks(&uncond, tokens, &empty)?,
        true,
    ))
}

/// `conditioning` (`[1, 77·k, hidden]`) with copies of `empty` appended up to `tokens` tokens.
fn pad_chunks(conditioning: &Tensor, tokens: usize, empty: &Tensor) -> Result<Tensor> {
    let have = conditioning.dim(1)?;
    if have >= tokens {
        return Ok(conditioning.clone());
    }
    let pad = empty
        .to_dtype(conditioning.dtype())?
        .repeat((1, (tokens - have) / MAX_LENGTH, 1))?;
    Ok(Tensor::cat(&[conditioning, &pad], 1)?)
}

/// Images of a batch whose conditionings have the same number of tokens: they share UNet
/// passes.
#[derive(Debug)]
pub(crate) struct ContextGroup {
    /// Their indices in the batch, ascending.
    pub(crate) images: Vec<usize>,
    /// `[cond × b]`, or `[uncond × b, cond × b]` under classifier-free guidance.
    pub(crate) context: Tensor,
}

/// Groups a batch's `(cond, uncond)` pairs by length, in order of first appearance; with all
/// lengths equal this is one group of the whole batch.
pub(crate) fn group_by_length(pairs: &[(Tensor, Option<Tensor>)]) -> Result<Vec<ContextGroup>> {
    let mut lengths: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, (cond, _)) in pairs.iter().enumerate() {
        let tokens = cond.dim(1)?;
        match lengths.iter_mut().find(|(t, _)| *t == tokens) {
            Some((_, images)) => images.push(i),
            None => lengths.push((tokens, vec![i])),
        }
    }
    lengths
        .into_iter()
        .map(|(_, images)| {
            let unconds = images.iter().filter_map(|&i| pairs[i].1.as_ref());
            let conds = images.iter().map(|&i| &pairs[i].0);
            let all: Vec<&Tensor> = unconds.chain(conds).collect();
            Ok(ContextGroup {
                context: Tensor::cat(&all, 0)?,
                images,
            })
        })
        .collect()
}

/// A key that is equal for two prompts exactly when they encode the same: their parts (text
/// and the weight's bits, or BREAK), the clip skip and the embedding database's identity.
/// `(a:1)` and `a` share one.
pub(crate) fn cache_key(
    parts: &[PromptPart],
    clip_skip: usize,
    inversions: &InversionDb,
) -> String {
    let mut key = format!("skip {clip_skip} ti {}", inversions.fingerprint());
    for part in parts {
        match part {
            PromptPart::Break => key.push_str("|B"),
            PromptPart::Text { text, weight } => {
                key.push_str(&format!("|T{:x}:{}:{text}", weight.to_bits(), text.len()));
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(text: &str, weight: f64) -> PromptPart {
        PromptPart::Text {
            text: text.into(),
            weight,
        }
    }

    fn tokenizer() -> std::sync::Arc<ClipTokenizer> {
        ClipTokenizer::shared().expect("tokenizer")
    }

    #[test]
    fn the_comma_id_is_clips() {
        assert_eq!(tokenizer().tokenize(","), [COMMA_ID]);
    }

    #[test]
    fn a_short_prompt_is_one_chunk_as_the_tokenizer_pads_it() {
        let tok = tokenizer();
        let chunks = chunk_prompt(&tok, &[text("a red fox", 1.0)]);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].tokens, tok.encode("a red fox"));
        assert!(chunks[0].weights.iter().all(|&w| w == 1.0));
        let empty = chunk_prompt(&tok, &[text("", 1.0)]);
        assert_eq!(empty[0].tokens, tok.encode(""));
    }

    #[test]
    fn weights_follow_their_tokens_and_break_starts_a_chunk() {
        let tok = tokenizer();
        let chunks = chunk_prompt(
            &tok,
            &[
                text("a ", 1.0),
                text("fox", 1.5),
                PromptPart::Break,
                text("b", 1.0),
            ],
        );
        assert_eq!(chunks.len(), 2);
        assert_eq!(&chunks[0].weights[..4], &[1.0, 1.0, 1.5, 1.0]);
        assert_eq!(chunks[1].tokens[1], tok.tokenize("b")[0]);
        // A trailing BREAK adds no empty chunk; a leading one does.
        assert_eq!(
            chunk_prompt(&tok, &[text("a", 1.0), PromptPart::Break]).len(),
            1
        );
        assert_eq!(
            chunk_prompt(&tok, &[PromptPart::Break, text("a", 1.0)]).len(),
            2
        );
    }

    #[test]
    fn text_after_a_late_comma_moves_to_the_next_chunk() {
        let tok = tokenizer();
        // "a" is one token: 60 of them, a comma (token 61), then 20 more.
        let prompt = format!("{}, {}", "a ".repeat(60), "b ".repeat(20));
        let chunks = chunk_prompt(&tok, &[text(&prompt, 1.0)]);
        assert_eq!(chunks.len(), 2);
        // The first chunk ends at the comma and is padded; the b's all moved.
        assert_eq!(chunks[0].tokens[61], COMMA_ID);
        assert!(chunks[0].tokens[62..].iter().all(|&t| t == EOS_ID));
        assert_eq!(chunks[1].tokens[1..21], vec![tok.tokenize("b")[0]; 20][..]);
        // A comma further back than 20 tokens is ignored: the chunk is simply cut at 75.
        let prompt = format!("{}, {}", "a ".repeat(30), "b ".repeat(60));
        let chunks = chunk_prompt(&tok, &[text(&prompt, 1.0)]);
        assert_eq!(chunks[0].tokens[76], EOS_ID);
        assert_ne!(chunks[0].tokens[75], EOS_ID);
    }

    #[test]
    fn equal_parts_share_a_cache_key() {
        let none = InversionDb::empty();
        let key = |parts: &[PromptPart], skip| cache_key(parts, skip, &none);
        let a = [text("a", 1.0)];
        assert_eq!(key(&a, 1), key(&[text("a", 1.0)], 1));
        assert_ne!(key(&a, 1), key(&a, 2));
        assert_ne!(key(&a, 1), key(&[text("a", 1.1)], 1));
        assert_ne!(
            key(&[text("a", 1.0), PromptPart::Break], 1),
            key(&[text("a", 1.0)], 1)
        );
    }
}
