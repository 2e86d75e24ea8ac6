//! Prompt syntax of AUTOMATIC1111's stable-diffusion-webui (A1111), parsed as A1111 parses it.
//!
//! Owns every text-level step A1111 takes before its tokenizer, so that the coordinator can
//! refuse a bad prompt at submit time and the worker encodes what A1111 would:
//!
//! 1. `#` comments are cut (`syntax`, A1111's built-in "Comments" script, on by default).
//! 2. Extra networks (`<lora:name:0.7>`, `<hypernet:…>`) are cut out of a *positive* prompt and
//!    listed (`networks`); A1111 leaves them in a negative prompt, where they are text.
//! 3. `parse_prompt_attention` (`attention`): `(x)` ×1.1, `[x]` ÷1.1, `(x:1.3)`, escapes,
//!    `BREAK`, giving `(text, weight)` parts with equal neighbours merged.
//!
//! It knows nothing of tokens, chunks or tensors (the worker's engine turns parts into
//! embeddings) nor of the files a LoRA name refers to.
//!
//! # Where kiln differs from A1111, on purpose
//! - An unbalanced `(` or `[`, or a `)`/`]` that closes nothing, is an error naming the bracket
//!   and its column. A1111 applies an unclosed bracket to the end of the prompt and keeps a stray
//!   closing one as text.
//! - A weight neither can read (`(x:1.2.3)`, `<lora:x:abc>`) is an error here; A1111 raises.
//! - A1111 features kiln does not compute are refused rather than approximated: prompt editing
//!   and alternation (`[a:b:0.5]`, `[a:5]`, `[a|b]`), and composable diffusion in a positive
//!   prompt (`AND`, and a trailing `:1.2`, which A1111 takes as that prompt's AND weight).

mod attention;
mod networks;
mod syntax;

use std::fmt;

pub use networks::{ExtraNetwork, LoraRef};

/// One piece of a parsed prompt, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptPart {
    /// Text whose tokens all carry `weight` (1.0 is neutral).
    Text {
        /// The text, escapes resolved.
        text: String,
        /// The emphasis multiplier, as A1111 computes it in f64.
        weight: f64,
    },
    /// `BREAK`: the text after it starts a new 75-token chunk.
    Break,
}

impl PromptPart {
    /// The pair A1111's `parse_prompt_attention` returns for this part: `BREAK` is
    /// `("BREAK", -1.0)`.
    pub fn as_a1111_pair(&self) -> (&str, f64) {
        match self {
            Self::Text { text, weight } => (text, *weight),
            Self::Break => ("BREAK", -1.0),
        }
    }
}

/// A prompt parsed as A1111 parses it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedPrompt {
    /// The text A1111 hands to `parse_prompt_attention`: comments and (for a positive prompt)
    /// extra networks cut.
    pub text: String,
    /// The weighted parts of `text`, never empty (an empty prompt is one empty part).
    pub parts: Vec<PromptPart>,
    /// The extra networks cut from a positive prompt, in order of appearance.
    pub networks: Vec<ExtraNetwork>,
}

impl ParsedPrompt {
    /// Parses a positive prompt: comments, extra networks (each `<lora:…>` checked), the
    /// composable-diffusion forms kiln refuses, then emphasis.
    pub fn parse(prompt: &str) -> Result<Self, PromptError> {
        let uncommented = syntax::strip_comments(prompt);
        let (cut, found) = networks::extract(uncommented.text());
        let locate =
            |at: usize| Position::of(prompt, uncommented.source_offset(cut.source_offset(at)));
        let mut networks = Vec::with_capacity(found.len());
        for (network, at) in found {
            if network.is_lora() {
                LoraRef::from_network(&network).map_err(|reason| PromptError::BadNetwork {
                    tag: network.to_string(),
                    at: Position::of(prompt, uncommented.source_offset(at)),
                    reason,
                })?;
            }
            networks.push(network);
        }
        if let Some((feature, at)) = syntax::composable(&cut.text) {
            return Err(PromptError::Unsupported {
                feature,
                at: locate(at),
            });
        }
        Self::finish(cut.text.clone(), networks, &locate)
    }

    /// Parses a negative prompt: comments, then emphasis. Extra networks stay text, as in
    /// A1111, and `AND` is an ordinary word.
    pub fn parse_negative(prompt: &str) -> Result<Self, PromptError> {
        let uncommented = syntax::strip_comments(prompt);
        let locate = |at: usize| Position::of(prompt, uncommented.source_offset(at));
        Self::finish(uncommented.text().to_owned(), Vec::new(), &locate)
    }

    fn finish(
        text: String,
        networks: Vec<ExtraNetwork>,
        locate: &dyn Fn(usize) -> Position,
    ) -> Result<Self, PromptError> {
        if let Some((feature, at)) = syntax::scheduling(&text) {
            return Err(PromptError::Unsupported {
                feature,
                at: locate(at),
            });
        }
        let parts = attention::parse(&text).map_err(|e| e.locate(locate))?;
        Ok(Self {
            text,
            parts,
            networks,
        })
    }

    /// The LoRAs among [`Self::networks`] (`<lora:…>` and its alias `<lyco:…>`), in order.
    pub fn loras(&self) -> Vec<LoraRef> {
        self.networks
            .iter()
            .filter(|n| n.is_lora())
            // `parse` refused a prompt whose LoRA tags do not read, so none is dropped here.
            .filter_map(|n| LoraRef::from_network(n).ok())
            .collect()
    }
}

/// Where something is in the prompt as the user wrote it; both 1-based, counted in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The line (1 unless the prompt has newlines).
    pub line: usize,
    /// The character within the line.
    pub column: usize,
}

impl Position {
    /// The position of byte offset `at` of `text`.
    fn of(text: &str, at: usize) -> Self {
        let before = &text[..at.min(text.len())];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 1 {
            write!(f, "column {}", self.column)
        } else {
            write!(f, "line {}, column {}", self.line, self.column)
        }
    }
}

/// Why a prompt was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// An opening bracket that is never closed.
    #[error(
        "`{bracket}` at {at} is never closed: close it with `{closer}`, or write `\\{bracket}` for a literal `{bracket}`"
    )]
    Unclosed {
        /// `(` or `[`.
        bracket: char,
        /// Where it is.
        at: Position,
        /// The bracket that would close it.
        closer: char,
    },
    /// A closing bracket with no open bracket of its kind before it.
    #[error(
        "`{bracket}` at {at} closes nothing: no `{opener}` is open there; write `\\{bracket}` for a literal `{bracket}`"
    )]
    Unopened {
        /// `)` or `]`.
        bracket: char,
        /// Where it is.
        at: Position,
        /// The bracket it would close.
        opener: char,
    },
    /// `(text:w)` whose `w` is not a number.
    #[error("weight `{weight}` at {at} is not a number (write e.g. `(text:1.2)`)")]
    BadWeight {
        /// What was written after the colon.
        weight: String,
        /// Where it is.
        at: Position,
    },
    /// An extra network tag that does not read, e.g. `<lora:x:abc>`.
    #[error("`{tag}` at {at}: {reason}")]
    BadNetwork {
        /// The whole tag.
        tag: String,
        /// Where it is.
        at: Position,
        /// What is wrong.
        reason: String,
    },
    /// A1111 syntax kiln does not compute.
    #[error("{feature} at {at} is A1111 syntax kiln does not support")]
    Unsupported {
        /// What it is, in words.
        feature: &'static str,
        /// Where it is.
        at: Position,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &ParsedPrompt) -> Vec<(String, f64)> {
        p.parts
            .iter()
            .map(|part| {
                let (t, w) = part.as_a1111_pair();
                (t.to_owned(), w)
            })
            .collect()
    }

    #[test]
    fn networks_are_cut_then_emphasis_is_parsed() {
        let p = ParsedPrompt::parse("a (cat:1.2) <lora:film grain:0.5:0.8>, photo").unwrap();
        assert_eq!(p.text, "a (cat:1.2) , photo");
        assert_eq!(
            pairs(&p),
            [
                ("a ".into(), 1.0),
                ("cat".into(), 1.2),
                (" , photo".into(), 1.0)
            ]
        );
        assert_eq!(
            p.loras(),
            [LoraRef {
                name: "film grain".into(),
                te: 0.5,
                unet: 0.8
            }]
        );
    }

    #[test]
    fn a_negative_prompt_keeps_its_tags_as_text() {
        let p = ParsedPrompt::parse_negative("blurry <lora:x:abc> AND ugly").unwrap();
        assert!(p.networks.is_empty());
        assert_eq!(pairs(&p), [("blurry <lora:x:abc> AND ugly".into(), 1.0)]);
    }

    #[test]
    fn errors_name_the_column_in_the_prompt_as_written() {
        // The tag before the bracket is cut before emphasis is parsed; the column still
        // counts it, and counts characters, not bytes.
        let err = ParsedPrompt::parse("<lora:é:1> (cat").unwrap_err();
        assert_eq!(
            err,
            PromptError::Unclosed {
                bracket: '(',
                at: Position {
                    line: 1,
                    column: 12
                },
                closer: ')'
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("column 12") && msg.contains("`\\(`"), "{msg}");

        let err = ParsedPrompt::parse("# a comment (\ncat]").unwrap_err();
        assert_eq!(
            err,
            PromptError::Unopened {
                bracket: ']',
                at: Position { line: 2, column: 4 },
                opener: '['
            }
        );
        assert!(err.to_string().contains("line 2, column 4"), "{err}");
    }

    #[test]
    fn a_bad_lora_weight_is_an_error() {
        let err = ParsedPrompt::parse("cat, <lora:x:abc>").unwrap_err();
        assert!(
            matches!(&err, PromptError::BadNetwork { at, .. } if at.column == 6),
            "{err:?}"
        );
        assert!(err.to_string().contains("abc"), "{err}");
        // Other kinds are listed but not interpreted.
        let p = ParsedPrompt::parse("<hypernet:anime:abc>").unwrap();
        assert_eq!(p.networks[0].kind, "hypernet");
        assert!(p.loras().is_empty());
    }

    #[test]
    fn composable_diffusion_and_prompt_editing_are_refused() {
        for (prompt, col) in [
            ("a cat AND a dog", 7),
            ("a cat:1.5", 6),
            ("a [cat:dog:0.5]", 3),
            ("a [cat|dog]", 3),
        ] {
            let err = ParsedPrompt::parse(prompt).unwrap_err();
            assert!(
                matches!(&err, PromptError::Unsupported { at, .. } if at.column == col),
                "{prompt}: {err:?}"
            );
        }
        // In a negative prompt `AND` and a trailing weight are plain text, as in A1111.
        assert!(ParsedPrompt::parse_negative("a cat AND a dog:1.5").is_ok());
        assert!(ParsedPrompt::parse_negative("[cat:dog:3]").is_err());
    }
}
