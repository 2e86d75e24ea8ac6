//! The CLIP BPE tokenizer for SD1.5's text encoder (openai/clip-vit-large-patch14).
//!
//! Owns turning a prompt into the 77 token ids the text encoder reads, identical to
//! `CLIPTokenizer(prompt, padding="max_length", max_length=77, truncation=True)` in
//! transformers 5, which is what diffusers' SD1.5 pipeline calls. It does not parse prompt
//! syntax (weights, `BREAK`, LoRA tags) and does not chunk long prompts: text past 75 tokens is
//! cut ([`ClipTokenizer::tokenize`] gives the uncut ids to the chunker in `super::conditioning`).
//!
//! # The pipeline
//!
//! The work is done by the `tokenizers` crate, set up in code the way transformers 5's
//! `models/clip/tokenization_clip.py` (and `convert_slow_tokenizer.CLIPConverter`) set up
//! `tokenizer.json`, so no tokenizer file is downloaded:
//!
//! 1. Added vocabulary: `<|startoftext|>` and `<|endoftext|>` are special, un-normalized added
//!    tokens, cut out of the raw text first; the text between them is handled piece by piece.
//!    Written in capitals they are ordinary text.
//! 2. Normalizer `NFC → Replace(\s+, " ") → Lowercase` (char by char, so no final-sigma rule).
//!    There is no ftfy and no HTML unescaping: that was transformers 4's slow tokenizer.
//! 3. Pre-tokenizer `Split` on [`PRE_TOKEN_PATTERN`] (`Removed`, inverted), then `ByteLevel`
//!    (no prefix space, GPT-2 split on): the pattern's matches are the words, the spaces between
//!    them are dropped, digits come out one per word; `ByteLevel` maps each word's bytes to
//!    GPT-2's printable characters.
//! 4. Model `BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk=<|endoftext|>)`.
//! 5. `[BOS] + ids[..75] + [EOS]`, padded to 77 with EOS (the `pad_token` of CLIP's
//!    tokenizer). This step is done here rather than by `RobertaProcessing` with the crate's
//!    `TruncationParams`/`PaddingParams`, because the crate applies those to every encode,
//!    including the special-token-free one [`ClipTokenizer::tokenize`] must leave uncut.
//!
//! # The vocabulary
//!
//! `assets/bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP, MIT; see `assets/LICENSE-CLIP-BPE`)
//! holds the merges; the vocabulary is derived from them exactly as OpenAI's
//! `simple_tokenizer.py` does: the 256 byte characters, the same with `</w>`, one entry per
//! merge, then the two specials. That gives 49,408 ids, BOS 49406 and EOS 49407. Reading the
//! file and GPT-2's byte table are the only hand-written parts: the crate reads `vocab.json` +
//! `merges.txt`, not this format, and keeps its own byte table private.

use std::io::Read;
use std::sync::{Arc, OnceLock};

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The gzipped merges list shipped with OpenAI CLIP.
const VOCAB_GZ: &[u8] = include_bytes!("../../../assets/bpe_simple_vocab_16e6.txt.gz");

/// Number of merges CLIP uses: lines `1..=48894` of the merges file (`49152 - 256 - 2`).
const MERGE_COUNT: usize = 49_152 - 256 - 2;
/// Vocabulary size of SD1.5's text encoder.
pub const VOCAB_SIZE: usize = 49_408;
/// `<|startoftext|>`.
pub const BOS_ID: u32 = 49_406;
/// `<|endoftext|>`, also used as padding for SD1.5.
pub const EOS_ID: u32 = 49_407;
/// Sequence length of the text encoder (`max_position_embeddings`).
pub const MAX_LENGTH: usize = 77;

const BOS_TEXT: &str = "<|startoftext|>";
const EOS_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// CLIP's pre-token pattern, as transformers 5 and OpenAI write it (without case folding). The
/// special-token alternatives only see a special token typed in other capitals (step 1 took the
/// exact ones): it stays one word, which `ByteLevel`'s GPT-2 split then cuts into `<|`,
/// `endoftext`, `|>`, so a `'s` after it stays a word of its own.
pub const PRE_TOKEN_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Words whose BPE result the model caches (per thread); prompts of a sweep repeat a lot of
/// words. The crate's default is 10,000.
const CACHE_CAPACITY: usize = 16_384;

/// Why the tokenizer could not be built or could not encode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The embedded gzip stream could not be read.
    #[error("cannot decompress the CLIP merges file: {0}")]
    Decompress(#[from] std::io::Error),
    /// The merges file is shorter than CLIP's 48,894 merges or has a malformed line.
    #[error("CLIP merges file is malformed at line {line}: {reason}")]
    Merges {
        /// 1-based line in the decompressed file.
        line: usize,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The derived vocabulary does not have CLIP's size (duplicate entries).
    #[error("CLIP vocabulary has {found} entries, expected {VOCAB_SIZE}")]
    VocabSize {
        /// Distinct entries found.
        found: usize,
    },
    /// The `tokenizers` pipeline refused the vocabulary or a pattern.
    #[error("cannot build the CLIP tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    /// The `tokenizers` pipeline failed on a prompt.
    #[error("cannot tokenize the prompt: {0}")]
    Encode(#[source] tokenizers::Error),
}

/// SD1.5's CLIP tokenizer. Cheap to share: `encode` takes `&self` and is thread-safe.
pub struct ClipTokenizer {
    inner: Tokenizer,
}

impl ClipTokenizer {
    /// The process-wide tokenizer: built once (parsing the vocabulary takes tens of
    /// milliseconds) and shared by every model, so rebuilding a model for a new LoRA strength
    /// does not pay for it again.
    pub fn shared() -> Result<Arc<Self>, TokenizerError> {
        static SHARED: OnceLock<Arc<ClipTokenizer>> = OnceLock::new();
        if let Some(t) = SHARED.get() {
            return Ok(t.clone());
        }
        let built = Arc::new(Self::new()?);
        Ok(SHARED.get_or_init(|| built).clone())
    }

    /// Builds the tokenizer from the embedded CLIP merges file.
    pub fn new() -> Result<Self, TokenizerError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(VOCAB_GZ).read_to_string(&mut text)?;
        let merges = parse_merges(&text)?;

        let byte_chars = bytes_to_unicode();
        // Vocabulary order of `simple_tokenizer.py`: bytes, bytes + `</w>`, merges, specials.
        let tokens = (byte_chars.iter().map(|&(_, c)| c.to_string()))
            .chain(byte_chars.iter().map(|&(_, c)| format!("{c}{END_OF_WORD}")))
            .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
            .chain([BOS_TEXT.to_owned(), EOS_TEXT.to_owned()]);
        let vocab: Vocab = tokens.zip(0u32..).collect();
        // A duplicate token (or merge: its joined form would repeat) would make ids ambiguous.
        if vocab.len() != VOCAB_SIZE {
            return Err(TokenizerError::VocabSize { found: vocab.len() });
        }
        let merges = merges
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();

        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD.to_owned())
            .unk_token(EOS_TEXT.to_owned())
            .fuse_unk(false)
            .cache_capacity(CACHE_CAPACITY)
            .build()
            .map_err(TokenizerError::Build)?;
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(TokenizerError::Build)?;
        let words = Split::new(
            SplitPattern::Regex(PRE_TOKEN_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(TokenizerError::Build)?;

        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(Sequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(TokenizerError::Build)?
            .with_pre_tokenizer(Some(PreSequence::new(vec![
                words.into(),
                ByteLevel::new(false, true, true).into(),
            ])))
            // Nothing in the engine decodes; set as transformers sets it, for debugging.
            .with_decoder(Some(ByteLevel::default()));
        inner
            .add_special_tokens([
                AddedToken::from(BOS_TEXT, true),
                AddedToken::from(EOS_TEXT, true),
            ])
            .map_err(TokenizerError::Build)?;
        Ok(Self { inner })
    }

    /// The 77 ids for `text`: BOS, at most 75 prompt tokens, EOS, then EOS padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(BOS_ID);
        ids.extend(self.tokenize(text).into_iter().take(MAX_LENGTH - 2));
        ids.resize(MAX_LENGTH, EOS_ID);
        ids
    }

    /// The prompt's token ids without BOS, EOS, truncation or padding.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        // Cannot fail with this pipeline: the only look-around (`ByteLevel`'s `\s+(?!\S)`) never
        // sees whitespace, which `Split` removed, so the regex engine has no backtracking limit
        // to hit; every byte has a vocabulary entry; the unknown token is in the vocabulary.
        self.try_tokenize(text)
            .expect("the CLIP pipeline has no failing step")
    }

    /// [`Self::tokenize`], returning the `tokenizers` error (which this pipeline never gives)
    /// instead of panicking on it.
    pub fn try_tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }
}

impl std::fmt::Debug for ClipTokenizer {
    // The derived form would print all 49,408 tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish_non_exhaustive()
    }
}

/// Reads CLIP's merges: line 0 is a version header, lines `1..=MERGE_COUNT` are `left right`.
fn parse_merges(text: &str) -> Result<Vec<(&str, &str)>, TokenizerError> {
    let mut lines = text.split('\n').skip(1);
    let mut merges = Vec::with_capacity(MERGE_COUNT);
    for index in 0..MERGE_COUNT {
        let line_no = index + 2;
        let line = lines.next().ok_or(TokenizerError::Merges {
            line: line_no,
            reason: "file ends before the last merge",
        })?;
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a, b)),
            _ => {
                return Err(TokenizerError::Merges {
                    line: line_no,
                    reason: "expected two space-separated symbols",
                });
            }
        }
    }
    Ok(merges)
}

/// GPT-2's reversible byte → printable character table, in its canonical (vocabulary) order:
/// the printable Latin-1 bytes map to themselves, then the other 68 bytes to U+0100 onwards.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut order: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let shifted = (0..=255u8).filter(|&b| !printable(b));
    // 256 + at most 68 are valid scalar values, so `filter_map` never drops one.
    order.extend(
        shifted
            .zip(256u32..)
            .filter_map(|(b, cp)| Some((b, char::from_u32(cp)?))),
    );
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ClipTokenizer {
        ClipTokenizer::new().expect("embedded vocabulary loads")
    }

    #[test]
    fn empty_prompt_is_bos_then_eos_padding() {
        let ids = tokenizer().encode("");
        assert_eq!(ids.len(), MAX_LENGTH);
        assert_eq!(ids[0], BOS_ID);
        assert!(ids[1..].iter().all(|&id| id == EOS_ID));
    }

    #[test]
    fn long_prompts_are_cut_to_75_tokens_with_eos_last() {
        let tok = tokenizer();
        let ids = tok.encode(&"hello world ".repeat(60));
        assert_eq!(ids.len(), MAX_LENGTH);
        assert_eq!(ids[MAX_LENGTH - 1], EOS_ID);
        let uncut = tok.tokenize(&"hello world ".repeat(60));
        assert_eq!(uncut.len(), 120);
        assert_eq!(&ids[1..MAX_LENGTH - 1], &uncut[..75]);
    }

    #[test]
    fn literal_special_tokens_map_to_their_ids() {
        let ids = tokenizer().tokenize("a<|endoftext|>b <|startoftext|>");
        assert_eq!(ids.len(), 4);
        assert_eq!((ids[1], ids[3]), (EOS_ID, BOS_ID));
    }

    #[test]
    fn capitalised_special_tokens_are_split_like_byte_level() {
        // transformers 5.24 CLIPTokenizer("<|ENDOFTEXT|> <|StartOfText|>").input_ids[1:15]
        let tok = tokenizer();
        let ids = tok.tokenize("<|ENDOFTEXT|> <|StartOfText|>");
        assert_eq!(
            ids,
            [
                27, 347, 40786, 4160, 91, 285, 27, 347, 993, 6659, 4160, 91, 285
            ]
        );
        // The whole special token is one `Split` word, so `'s` after it is not glued to `|>`.
        assert_eq!(
            tok.tokenize("<|ENDOFTEXT|>'s"),
            tok.tokenize("<|ENDOFTEXT|> 's")
        );
    }

    #[test]
    fn very_long_words_tokenize_without_regex_errors() {
        let tok = tokenizer();
        for word in ["x".repeat(20_000), "!?".repeat(10_000), "7".repeat(20_000)] {
            let text = format!("{word} {word}");
            assert!(tok.try_tokenize(&text).is_ok_and(|ids| !ids.is_empty()));
        }
    }

    #[test]
    fn vocabulary_order_follows_simple_tokenizer() {
        let tok = tokenizer();
        // id 0 is "!", the first printable byte; "a</w>" is 256 + position of "a" (64).
        assert_eq!(tok.inner.token_to_id("!"), Some(0));
        assert_eq!(tok.inner.token_to_id("a</w>"), Some(256 + 64));
        assert_eq!(tok.inner.get_vocab_size(true), VOCAB_SIZE);
        assert_eq!(tok.tokenize("a"), [320]);
    }
}
