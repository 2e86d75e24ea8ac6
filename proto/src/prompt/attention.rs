//! Emphasis as A1111's `parse_prompt_attention` (`modules/prompt_parser.py`) computes it, with
//! unbalanced brackets made errors.
//!
//! The prompt is read left to right as a sequence of tokens, the first that fits winning at
//! each position: `\(` `\)` `\[` `\]` `\\` (the character), a lone `\` (nothing), `(`, `[`,
//! `:NUMBER)` (closes a `(` with that weight), `)`, `]`, a run of anything else, or a lone `:`.
//! An opening bracket remembers how many parts existed; its closer multiplies every part since
//! then (×1.1 for `()`, ×1/1.1 for `[]`, ×NUMBER for `(…:NUMBER)`), so nesting multiplies.
//! Round and square brackets are counted separately, as in A1111 (`[a (b] c)` is balanced).
//! Each text run is split on `\s*\bBREAK\b\s*`, a `("BREAK", -1)` part between the pieces.
//! Finally neighbours of equal weight (f64 `==`) are merged. A `BREAK` part inside brackets is
//! multiplied too and then no longer reads as `BREAK` — A1111 behaves the same.

use super::syntax::{is_py_space, word_boundary};
use super::{Position, PromptError, PromptPart};

/// What `( … )` multiplies by.
const ROUND: f64 = 1.1;
/// What `[ … ]` multiplies by (computed as A1111 does, `1 / 1.1` in f64).
const SQUARE: f64 = 1.0 / 1.1;
/// The weight A1111 gives its `BREAK` marker part.
const BREAK_WEIGHT: f64 = -1.0;

/// A parse error at a byte offset of the parsed text.
#[derive(Debug)]
pub(super) enum AttentionError {
    Unclosed { bracket: char, at: usize },
    Unopened { bracket: char, at: usize },
    BadWeight { weight: String, at: usize },
}

impl AttentionError {
    /// The public error, with `locate` turning offsets into positions in the prompt.
    pub(super) fn locate(self, locate: &dyn Fn(usize) -> Position) -> PromptError {
        let pair = |b: char| match b {
            '(' => ')',
            '[' => ']',
            ')' => '(',
            _ => '[',
        };
        match self {
            Self::Unclosed { bracket, at } => PromptError::Unclosed {
                bracket,
                at: locate(at),
                closer: pair(bracket),
            },
            Self::Unopened { bracket, at } => PromptError::Unopened {
                bracket,
                at: locate(at),
                opener: pair(bracket),
            },
            Self::BadWeight { weight, at } => PromptError::BadWeight {
                weight,
                at: locate(at),
            },
        }
    }
}

/// The weighted parts of `text` (never empty), or the first bracket error.
pub(super) fn parse(text: &str) -> Result<Vec<PromptPart>, AttentionError> {
    let mut parts: Vec<(String, f64)> = Vec::new();
    // For each open bracket: how many parts existed at it, and its offset.
    let mut round: Vec<(usize, usize)> = Vec::new();
    let mut square: Vec<(usize, usize)> = Vec::new();
    let multiply = |parts: &mut Vec<(String, f64)>, from: usize, by: f64| {
        for part in &mut parts[from..] {
            part.1 *= by;
        }
    };
    let mut at = 0;
    while let Some(c) = text[at..].chars().next() {
        match c {
            '\\' => {
                // `\(` `\)` `\[` `\]` `\\` give the character; a lone `\` gives nothing.
                let next = text[at + 1..].chars().next();
                match next {
                    Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                        parts.push((n.to_string(), 1.0));
                        at += 2;
                    }
                    _ => {
                        parts.push((String::new(), 1.0));
                        at += 1;
                    }
                }
            }
            '(' => {
                round.push((parts.len(), at));
                at += 1;
            }
            '[' => {
                square.push((parts.len(), at));
                at += 1;
            }
            ':' => match weight_close(text, at) {
                Some((weight, close)) => {
                    let (from, _) = round.pop().ok_or(AttentionError::Unopened {
                        bracket: ')',
                        at: close,
                    })?;
                    let by = weight
                        .parse::<f64>()
                        .map_err(|_| AttentionError::BadWeight {
                            weight: weight.to_owned(),
                            at: at + 1,
                        })?;
                    multiply(&mut parts, from, by);
                    at = close + 1;
                }
                None => {
                    parts.push((":".to_owned(), 1.0));
                    at += 1;
                }
            },
            ')' | ']' => {
                let (stack, by) = if c == ')' {
                    (&mut round, ROUND)
                } else {
                    (&mut square, SQUARE)
                };
                let (from, _) = stack
                    .pop()
                    .ok_or(AttentionError::Unopened { bracket: c, at })?;
                multiply(&mut parts, from, by);
                at += 1;
            }
            _ => {
                let run_len = text[at..]
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(text.len() - at);
                push_splitting_breaks(&mut parts, &text[at..at + run_len]);
                at += run_len;
            }
        }
    }
    // The first bracket left open, whichever kind.
    let unclosed = round
        .first()
        .map(|&(_, at)| ('(', at))
        .into_iter()
        .chain(square.first().map(|&(_, at)| ('[', at)))
        .min_by_key(|&(_, at)| at);
    if let Some((bracket, at)) = unclosed {
        return Err(AttentionError::Unclosed { bracket, at });
    }
    if parts.is_empty() {
        parts.push((String::new(), 1.0));
    }
    Ok(merge(parts)
        .into_iter()
        .map(|(text, weight)| {
            // The test `sd_hijack_clip` applies to tell a BREAK from text.
            if text == "BREAK" && weight == BREAK_WEIGHT {
                PromptPart::Break
            } else {
                PromptPart::Text { text, weight }
            }
        })
        .collect())
}

/// At a `:` at byte `at`: the weight text and the offset of the `)` when `:[+-]?[.\d]+\)`
/// starts there.
fn weight_close(text: &str, at: usize) -> Option<(&str, usize)> {
    let rest = &text[at + 1..];
    let sign = usize::from(rest.starts_with(['+', '-']));
    let digits = rest[sign..]
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len() - sign);
    (digits > 0 && rest[sign + digits..].starts_with(')'))
        .then(|| (&rest[..sign + digits], at + 1 + sign + digits))
}

/// Appends `run` split as `re.split(r"\s*\bBREAK\b\s*", run)` splits it, a BREAK part between
/// the pieces.
fn push_splitting_breaks(parts: &mut Vec<(String, f64)>, run: &str) {
    let mut piece_start = 0;
    let mut search = 0;
    while let Some(i) = run[search..].find("BREAK") {
        let word = search + i;
        let end = word + "BREAK".len();
        if !(word_boundary(run, word) && word_boundary(run, end)) {
            search = word + 1;
            continue;
        }
        // The match takes the whitespace on both sides (but not text an earlier match took).
        let lead = run[piece_start..word].trim_end_matches(is_py_space).len();
        let trail = run[end..].len() - run[end..].trim_start_matches(is_py_space).len();
        parts.push((run[piece_start..piece_start + lead].to_owned(), 1.0));
        parts.push(("BREAK".to_owned(), BREAK_WEIGHT));
        piece_start = end + trail;
        search = piece_start;
    }
    parts.push((run[piece_start..].to_owned(), 1.0));
}

/// Merges runs of neighbours with equal weights, concatenating their text.
fn merge(parts: Vec<(String, f64)>) -> Vec<(String, f64)> {
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(parts.len());
    for (text, weight) in parts {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, f64)> {
        parse(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e:?}"))
            .iter()
            .map(|p| {
                let (t, w) = p.as_a1111_pair();
                (t.to_owned(), w)
            })
            .collect()
    }

    fn owned(want: &[(&str, f64)]) -> Vec<(String, f64)> {
        want.iter().map(|&(t, w)| (t.to_owned(), w)).collect()
    }

    #[test]
    fn a1111_doctest_examples() {
        // The examples in `parse_prompt_attention`'s docstring (A1111's own expectations).
        assert_eq!(pairs("normal text"), owned(&[("normal text", 1.0)]));
        assert_eq!(
            pairs("an (important) word"),
            owned(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(pairs("\\(literal\\]"), owned(&[("(literal]", 1.0)]));
        assert_eq!(
            pairs("(unnecessary)(parens)"),
            owned(&[("unnecessaryparens", 1.1)])
        );
        // The docstring's last example leaves its first `(` open (A1111 applies it to the end
        // of the prompt); kiln needs it closed, here after the `.`, for the same result.
        assert_eq!(
            pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)"),
            owned(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn square_brackets_divide_and_nesting_multiplies() {
        assert_eq!(pairs("[a]"), owned(&[("a", 1.0 / 1.1)]));
        assert_eq!(pairs("[[a]]"), owned(&[("a", (1.0 / 1.1) * (1.0 / 1.1))]));
        assert_eq!(
            pairs("((a) [b]:1.5)"),
            owned(&[("a", 1.1 * 1.5), (" ", 1.5), ("b", (1.0 / 1.1) * 1.5)])
        );
        // Round and square brackets are counted separately, as in A1111.
        assert_eq!(
            pairs("[a (b] c)"),
            owned(&[("a ", 1.0 / 1.1), ("b", (1.0 / 1.1) * 1.1), (" c", 1.1)])
        );
    }

    #[test]
    fn colons_escapes_and_backslashes() {
        // A colon that is no weight is text; so is a weight with a space before `)`.
        assert_eq!(pairs("(a:b)"), owned(&[("a:b", 1.1)]));
        assert_eq!(pairs("(a: 1.2)"), owned(&[("a: 1.2", 1.1)]));
        assert_eq!(pairs("(a:+.5)"), owned(&[("a", 0.5)]));
        assert_eq!(pairs("(a:-1)"), owned(&[("a", -1.0)]));
        // A lone backslash vanishes; `\\` is one backslash.
        assert_eq!(pairs("a\\b \\\\"), owned(&[("ab \\", 1.0)]));
        assert_eq!(pairs(""), owned(&[("", 1.0)]));
    }

    #[test]
    fn break_splits_on_its_own_word_only() {
        assert_eq!(
            pairs("a BREAK b"),
            owned(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(
            pairs("a,BREAK\n\nb BREAKfast"),
            owned(&[("a,", 1.0), ("BREAK", -1.0), ("b BREAKfast", 1.0)])
        );
        assert_eq!(
            pairs("BREAK BREAK"),
            owned(&[
                ("", 1.0),
                ("BREAK", -1.0),
                ("", 1.0),
                ("BREAK", -1.0),
                ("", 1.0)
            ])
        );
        // Inside brackets the marker is multiplied and reads as text, as in A1111.
        assert_eq!(
            pairs("(a BREAK b)"),
            owned(&[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])
        );
        assert!(matches!(parse("a BREAK b").unwrap()[1], PromptPart::Break));
        assert!(matches!(
            parse("(a BREAK b)").unwrap()[1],
            PromptPart::Text { .. }
        ));
    }

    #[test]
    fn unbalanced_brackets_are_errors_at_the_bracket() {
        assert!(matches!(
            parse("a (b [c] d"),
            Err(AttentionError::Unclosed {
                bracket: '(',
                at: 2
            })
        ));
        assert!(matches!(
            parse("a [b (c) d"),
            Err(AttentionError::Unclosed {
                bracket: '[',
                at: 2
            })
        ));
        assert!(matches!(
            parse("a) b"),
            Err(AttentionError::Unopened {
                bracket: ')',
                at: 1
            })
        ));
        assert!(matches!(
            parse("(a) b]"),
            Err(AttentionError::Unopened {
                bracket: ']',
                at: 5
            })
        ));
        assert!(matches!(
            parse("a:1.2) b"),
            Err(AttentionError::Unopened {
                bracket: ')',
                at: 5
            })
        ));
        assert!(matches!(
            parse("(a:1.2.3)"),
            Err(AttentionError::BadWeight { at: 3, .. })
        ));
        assert!(matches!(
            parse("(a:.)"),
            Err(AttentionError::BadWeight { .. })
        ));
    }
}
