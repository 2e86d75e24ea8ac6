//! The CLIP BPE tokenizer for SD1.5's text encoder (openai/clip-vit-large-patch14).
//!
//! Owns turning a prompt into the 77 token ids the text encoder reads, identical to
//! `CLIPTokenizer(prompt, padding="max_length", max_length=77, truncation=True)` in
//! transformers 5, which is what diffusers' SD1.5 pipeline calls. It does not parse prompt
//! syntax (weights, `BREAK`, LoRA tags) and does not chunk long prompts: text past 75 tokens is
//! cut.
//!
//! # The pipeline (transformers 5 `models/clip/tokenization_clip.py`, a `tokenizers` backend)
//!
//! 1. The special tokens `<|startoftext|>` and `<|endoftext|>` are cut out of the raw text
//!    first and become their ids; the text between them is handled piece by piece.
//! 2. Normalizer: Unicode NFC, then every run of `\s+` becomes one space, then each character is
//!    lower-cased on its own (the `tokenizers` `Lowercase` normalizer maps chars one by one, so
//!    there is no final-sigma rule). There is no ftfy and no HTML unescaping: transformers 4's
//!    slow tokenizer used ftfy (or a BERT `BasicTokenizer` without it), transformers 5 does not.
//! 3. Pre-tokenizer: the matches of CLIP's pattern (see [`PRE_TOKEN_PATTERN`]) are the words;
//!    everything between them (spaces) is dropped. Digits come out one per word. The
//!    `ByteLevel` pre-tokenizer that follows splits each word again with GPT-2's pattern
//!    ([`BYTE_LEVEL_PATTERN`]); that only changes words mixing letters and punctuation, which
//!    CLIP's pattern yields only for a literal `<|startoftext|>`/`<|endoftext|>` that was not
//!    cut out in step 1 (e.g. typed in capitals): it becomes `<|`, `startoftext`, `|>`.
//! 4. Each word's UTF-8 bytes are mapped to printable characters with GPT-2's byte-to-unicode
//!    table, `</w>` is glued to the last character, and BPE merges are applied lowest rank
//!    first.
//! 5. `[BOS] + ids[..75] + [EOS]`, padded to 77 with EOS (the `pad_token` of CLIP's tokenizer).
//!
//! # The vocabulary
//!
//! `assets/bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP, MIT; see `assets/LICENSE-CLIP-BPE`)
//! holds the merges; the vocabulary is derived from them exactly as OpenAI's
//! `simple_tokenizer.py` does: the 256 byte characters, the same with `</w>`, one entry per
//! merge, then the two specials. That gives 49,408 ids, BOS 49406 and EOS 49407.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

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
/// CLIP's pre-token pattern, as transformers and OpenAI write it (without case folding).
pub const PRE_TOKEN_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's pre-token pattern as `tokenizers`' `ByteLevel` uses it, minus its whitespace
/// alternatives (CLIP words never contain whitespace).
pub const BYTE_LEVEL_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+";
/// Words kept in the BPE cache before it is cleared; prompts of a sweep repeat a lot of words.
const CACHE_CAPACITY: usize = 16_384;

/// Why the tokenizer could not be built. Every variant means the embedded vocabulary is broken.
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
    /// A built-in regular expression failed to compile.
    #[error("tokenizer pattern failed to compile: {0}")]
    Pattern(#[from] regex::Error),
}

/// SD1.5's CLIP tokenizer. Cheap to share: `encode` takes `&self` and is thread-safe.
pub struct ClipTokenizer {
    /// Byte value → id of its single-character token (`</w>`-less).
    byte_ids: [u32; 256],
    /// Byte value → id of its single-character token with `</w>`.
    byte_end_ids: [u32; 256],
    /// `(left id, right id)` → `(merge rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    pre_token: Regex,
    byte_level: Regex,
    whitespace: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipTokenizer {
    /// The process-wide tokenizer: built once (parsing the vocabulary takes tens of
    /// milliseconds) and shared by every model, so rebuilding a model for a new LoRA strength
    /// does not pay for it again.
    pub fn shared() -> Result<std::sync::Arc<Self>, TokenizerError> {
        static SHARED: std::sync::OnceLock<std::sync::Arc<ClipTokenizer>> =
            std::sync::OnceLock::new();
        if let Some(t) = SHARED.get() {
            return Ok(t.clone());
        }
        let built = std::sync::Arc::new(Self::new()?);
        Ok(SHARED.get_or_init(|| built).clone())
    }

    /// Builds the tokenizer from the embedded CLIP merges file.
    pub fn new() -> Result<Self, TokenizerError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(VOCAB_GZ).read_to_string(&mut text)?;
        let merge_pairs = parse_merges(&text)?;

        let byte_chars = bytes_to_unicode();
        // Vocabulary order of `simple_tokenizer.py`: bytes, bytes + `</w>`, merges, specials.
        let mut vocab: Vec<String> = byte_chars.iter().map(|(_, c)| c.to_string()).collect();
        vocab.extend(byte_chars.iter().map(|(_, c)| format!("{c}{END_OF_WORD}")));
        vocab.extend(merge_pairs.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(BOS_TEXT.to_owned());
        vocab.push(EOS_TEXT.to_owned());

        let mut ids: HashMap<&str, u32> = HashMap::with_capacity(vocab.len());
        for (id, token) in vocab.iter().enumerate() {
            // A later duplicate wins, as in Python's `dict(zip(vocab, range(len(vocab))))`;
            // ids stay below VOCAB_SIZE, checked just after.
            ids.insert(token, id as u32);
        }
        if ids.len() != VOCAB_SIZE || vocab.len() != VOCAB_SIZE {
            return Err(TokenizerError::VocabSize { found: ids.len() });
        }

        let mut merges = HashMap::with_capacity(merge_pairs.len());
        for (rank, (a, b)) in merge_pairs.iter().enumerate() {
            let merged = format!("{a}{b}");
            // Every merge's parts are earlier vocabulary entries; a file where they are not is
            // not CLIP's.
            let (Some(&left), Some(&right), Some(&joined)) =
                (ids.get(*a), ids.get(*b), ids.get(merged.as_str()))
            else {
                return Err(TokenizerError::Merges {
                    line: rank + 2,
                    reason: "merge refers to a token that is not in the vocabulary",
                });
            };
            // The first (lowest) rank wins if a pair repeats, as in `min(pairs, key=rank)`.
            merges.entry((left, right)).or_insert((rank as u32, joined));
        }

        let mut byte_ids = [0u32; 256];
        let mut byte_end_ids = [0u32; 256];
        for (position, &(byte, _)) in byte_chars.iter().enumerate() {
            // Positions 0..256 and 256..512 of the vocabulary are the byte tokens, in table
            // order; a later duplicate cannot displace them because the size check passed.
            byte_ids[usize::from(byte)] = position as u32;
            byte_end_ids[usize::from(byte)] = (position + 256) as u32;
        }

        Ok(Self {
            byte_ids,
            byte_end_ids,
            merges,
            pre_token: Regex::new(PRE_TOKEN_PATTERN)?,
            byte_level: Regex::new(BYTE_LEVEL_PATTERN)?,
            whitespace: Regex::new(r"\s+")?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The 77 ids for `text`: BOS, at most 75 prompt tokens, EOS, then EOS padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(BOS_ID);
        let body = self.tokenize(text);
        ids.extend(body.iter().take(MAX_LENGTH - 2));
        ids.resize(MAX_LENGTH, EOS_ID);
        ids
    }

    /// The prompt's token ids without BOS, EOS, truncation or padding.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while let Some((before, special, after)) = split_special(rest) {
            self.tokenize_plain(before, &mut ids);
            ids.push(special);
            rest = after;
        }
        self.tokenize_plain(rest, &mut ids);
        ids
    }

    /// Normalizes, pre-tokenizes and BPE-encodes text that holds no special token.
    fn tokenize_plain(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let composed: String = text.nfc().collect();
        let spaced = self.whitespace.replace_all(&composed, " ");
        let lowered: String = spaced.chars().flat_map(char::to_lowercase).collect();
        for word in self.pre_token.find_iter(&lowered) {
            for piece in self.byte_level.find_iter(word.as_str()) {
                self.encode_word(piece.as_str(), ids);
            }
        }
    }

    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        if let Ok(cache) = self.cache.lock()
            && let Some(hit) = cache.get(word)
        {
            ids.extend_from_slice(hit);
            return;
        }
        let encoded = self.bpe(word.as_bytes());
        ids.extend_from_slice(&encoded);
        // A poisoned cache only costs speed, so it is skipped rather than propagated.
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(word.to_owned(), encoded);
        }
    }

    /// Byte-pair encoding of one word: start from byte tokens (the last one with `</w>`) and
    /// repeatedly merge every occurrence of the lowest-ranked adjacent pair, left to right.
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        let Some((&last, init)) = bytes.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<u32> = init
            .iter()
            .map(|&b| self.byte_ids[usize::from(b)])
            .collect();
        word.push(self.byte_end_ids[usize::from(last)]);

        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|pair| self.merges.get(&(pair[0], pair[1])).map(|m| (m, pair)))
                .min_by_key(|((rank, _), _)| *rank);
            let Some((&(_, joined), pair)) = best else {
                break;
            };
            let (left, right) = (pair[0], pair[1]);
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == left && word[i + 1] == right {
                    merged.push(joined);
                    i += 2;
                } else {
                    merged.push(word[i]);
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }
}

impl std::fmt::Debug for ClipTokenizer {
    // The derived form would print all 48,894 merges.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.cache.lock().map(|cache| cache.len()).unwrap_or(0);
        f.debug_struct("ClipTokenizer")
            .field("merges", &self.merges.len())
            .field("cached_words", &cached)
            .finish_non_exhaustive()
    }
}

/// Splits off the first special token: `(text before, its id, text after)`.
fn split_special(text: &str) -> Option<(&str, u32, &str)> {
    let bos = text.find(BOS_TEXT).map(|at| (at, BOS_ID, BOS_TEXT.len()));
    let eos = text.find(EOS_TEXT).map(|at| (at, EOS_ID, EOS_TEXT.len()));
    let (at, id, len) = match (bos, eos) {
        (Some(b), Some(e)) => {
            if b.0 < e.0 {
                b
            } else {
                e
            }
        }
        (found, None) | (None, found) => found?,
    };
    Some((&text[..at], id, &text[at + len..]))
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
        assert_eq!(
            &ids[1..MAX_LENGTH - 1],
            &tok.tokenize(&"hello world ".repeat(60))[..75]
        );
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
        let ids = tokenizer().tokenize("<|ENDOFTEXT|> <|StartOfText|>");
        assert_eq!(
            ids,
            [
                27, 347, 40786, 4160, 91, 285, 27, 347, 993, 6659, 4160, 91, 285
            ]
        );
    }

    #[test]
    fn vocabulary_order_follows_simple_tokenizer() {
        let tok = tokenizer();
        // id 0 is "!", the first printable byte; "a</w>" is 256 + position of "a" (64).
        assert_eq!(tok.byte_ids[usize::from(b'!')], 0);
        assert_eq!(tok.byte_end_ids[usize::from(b'a')], 256 + 64);
        assert_eq!(tok.tokenize("a"), [320]);
    }
}
