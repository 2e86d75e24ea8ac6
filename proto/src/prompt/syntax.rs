//! The A1111 prompt forms around emphasis: `#` comments (cut, as A1111's built-in "Comments"
//! script does by default), and the forms kiln refuses because it does not compute them
//! (prompt editing, alternation, composable diffusion). Also Python's `\s`/`\w`, which A1111's
//! regular expressions use, and [`Rewritten`], which keeps error columns pointing into the
//! prompt as written.

/// Text after cutting pieces out of an input, with where each of its runs came from.
#[derive(Debug)]
pub(super) struct Rewritten {
    /// The rewritten text.
    pub(super) text: String,
    /// `(start in text, start in the input)` of each run, ascending; runs are copied text or a
    /// replacement (which maps to where the cut started).
    runs: Vec<(usize, usize)>,
}

impl Rewritten {
    pub(super) fn new() -> Self {
        Self {
            text: String::new(),
            runs: vec![(0, 0)],
        }
    }

    /// Appends `piece`, which starts at byte `from` of the input.
    pub(super) fn push(&mut self, from: usize, piece: &str) {
        if piece.is_empty() {
            return;
        }
        self.runs.push((self.text.len(), from));
        self.text.push_str(piece);
    }

    /// The input offset of byte `at` of [`Self::text`].
    pub(super) fn source_offset(&self, at: usize) -> usize {
        let i = self.runs.partition_point(|&(start, _)| start <= at) - 1;
        let (start, from) = self.runs[i];
        from + (at - start)
    }
}

/// Python's `\s` (`str.isspace`): Unicode whitespace plus the four ASCII separators.
pub(super) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` on `str`: letters, digits and `_`.
pub(super) fn is_py_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `\b` holds at byte `at` of `text` (a word character on exactly one side).
pub(super) fn word_boundary(text: &str, at: usize) -> bool {
    let before = text[..at].chars().next_back().is_some_and(is_py_word);
    let after = text[at..].chars().next().is_some_and(is_py_word);
    before != after
}

/// A prompt with its comments cut, as A1111's "Comments" script cuts them
/// (`enable_prompt_comments`, on by default): first every line that starts with `#`, with the
/// newline before it and the one after it, becomes one newline; then from any other `#` to the
/// end of its line, newline included, becomes one newline.
#[derive(Debug)]
pub(super) struct Uncommented {
    whole_lines: Rewritten,
    inline: Rewritten,
}

impl Uncommented {
    /// The prompt without comments.
    pub(super) fn text(&self) -> &str {
        &self.inline.text
    }

    /// The offset in the prompt as written of byte `at` of [`Self::text`].
    pub(super) fn source_offset(&self, at: usize) -> usize {
        self.whole_lines
            .source_offset(self.inline.source_offset(at))
    }
}

/// Cuts `prompt`'s comments (see [`Uncommented`]).
pub(super) fn strip_comments(prompt: &str) -> Uncommented {
    let whole_lines = replace_comments(prompt, true);
    let inline = replace_comments(&whole_lines.text, false);
    Uncommented {
        whole_lines,
        inline,
    }
}

/// One pass of comment replacement: `whole_line` is A1111's `(^|\n)#[^\n]*(\n|$)`, otherwise
/// `#[^\n]*(\n|$)`; each match becomes `"\n"`.
fn replace_comments(text: &str, whole_line: bool) -> Rewritten {
    let mut out = Rewritten::new();
    // End of the last match: text before it is handled.
    let mut copied = 0;
    let mut search = 0;
    while let Some(i) = text[search..].find('#') {
        let hash = search + i;
        // A whole-line comment starts the text or follows a newline that no earlier match
        // took, and takes that newline with it.
        let cut_from = if !whole_line || hash == 0 {
            hash
        } else if hash > copied && text[..hash].ends_with('\n') {
            hash - 1
        } else {
            search = hash + 1;
            continue;
        };
        let end = text[hash..].find('\n').map_or(text.len(), |j| hash + j + 1);
        out.push(copied, &text[copied..cut_from]);
        out.push(cut_from, "\n");
        copied = end;
        search = end;
    }
    out.push(copied, &text[copied..]);
    out
}

/// The first form of composable diffusion in a positive prompt, which kiln refuses: `AND`
/// (A1111 splits the prompt there) or, with no `AND`, a trailing `:weight` (A1111's
/// `re_weight` takes it as the prompt's AND weight). Returns what it is and its byte offset.
pub(super) fn composable(text: &str) -> Option<(&'static str, usize)> {
    let mut from = 0;
    while let Some(i) = text[from..].find("AND") {
        let at = from + i;
        if word_boundary(text, at) && word_boundary(text, at + 3) {
            return Some(("`AND` (composable diffusion; write `and` for the word)", at));
        }
        from = at + 3;
    }
    trailing_weight(text).map(|at| ("a trailing `:weight` (an AND weight in A1111)", at))
}

/// Where the `:` of a trailing `\s*:\s*NUMBER\s*` is, when A1111's
/// `^(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$` would take it as a weight.
fn trailing_weight(text: &str) -> Option<usize> {
    let core = text.trim_end_matches(is_py_space);
    let number_start = core
        .char_indices()
        .rev()
        .take_while(|&(_, c)| c.is_ascii_digit() || c == '.')
        .last()
        .map(|(i, _)| i)?;
    let digits = &core[number_start..];
    let dots = digits.matches('.').count();
    let ok = dots == 0 || (dots == 1 && (digits.len() > 1));
    if !ok {
        return None;
    }
    let signed = core[..number_start]
        .strip_suffix(['+', '-'])
        .unwrap_or(&core[..number_start]);
    let colon = signed.trim_end_matches(is_py_space).strip_suffix(':')?;
    let colon_at = colon.len();
    // The lazy `.*?` must reach the whitespace before the colon without crossing a newline,
    // after the leading `\s*`.
    let lead = text.len() - text.trim_start_matches(is_py_space).len();
    let ws_start = colon.trim_end_matches(is_py_space).len();
    let reach = ws_start.max(lead);
    (!text[lead..reach].contains('\n')).then_some(colon_at)
}

/// The first `[`…`]` that A1111's prompt-schedule grammar reads as prompt editing
/// (`[a:b:N]`, `[a:N]`) or alternation (`[a|b]`), which kiln refuses. Returns what it is and
/// the byte offset of its `[`.
pub(super) fn scheduling(text: &str) -> Option<(&'static str, usize)> {
    // Each open bracket: (its char, its offset, colons and pipes directly inside it).
    let mut open: Vec<(char, usize, Vec<usize>, bool)> = Vec::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '(' | '[' => open.push((c, i, Vec::new(), false)),
            ':' => {
                if let Some(top) = open.last_mut() {
                    top.2.push(i);
                }
            }
            '|' => {
                if let Some(top) = open.last_mut() {
                    top.3 = true;
                }
            }
            ')' | ']' => {
                let want = if c == ')' { '(' } else { '[' };
                if open.last().is_some_and(|top| top.0 == want) {
                    let (_, start, colons, pipe) = open.pop().expect("checked non-empty");
                    if c == ']' && pipe && colons.is_empty() {
                        return Some(("alternation `[a|b]`", start));
                    }
                    if c == ']' && !pipe && (1..=2).contains(&colons.len()) {
                        let last = colons[colons.len() - 1];
                        let when = text[last + 1..i].trim_start_matches(is_py_space);
                        if is_lark_number(when) {
                            return Some(("prompt editing `[from:to:when]`", start));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// lark's `SIGNED_NUMBER`: `[+-]` then an integer, a decimal (`1.`, `.5`, `1.5`) or either with
/// an exponent.
fn is_lark_number(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            (digits(int) && (frac.is_empty() || digits(frac))) || (int.is_empty() && digits(frac))
        }
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_cut_line_by_line() {
        let cases = [
            ("# quality\nmasterpiece", "\nmasterpiece"),
            ("a\n#b\n#c\nd", "a\n\nd"),
            ("a cat # fluffy\nsmall", "a cat \nsmall"),
            ("a cat #", "a cat \n"),
            ("no comment", "no comment"),
        ];
        for (prompt, want) in cases {
            assert_eq!(strip_comments(prompt).text(), want, "{prompt:?}");
        }
    }

    #[test]
    fn offsets_map_back_through_both_comment_passes() {
        let prompt = "#x\na #y\nbc";
        let r = strip_comments(prompt);
        assert_eq!(r.text(), "\na \nbc");
        let b = r.text().find('b').unwrap();
        assert_eq!(&prompt[r.source_offset(b)..], "bc");
        assert_eq!(&prompt[r.source_offset(1)..], "a #y\nbc");
    }

    #[test]
    fn a_trailing_weight_is_found_as_re_weight_finds_it() {
        assert_eq!(trailing_weight("a cat:1.5"), Some(5));
        assert_eq!(trailing_weight("a cat : -.5  "), Some(6));
        assert_eq!(trailing_weight("a cat:1."), Some(5));
        assert_eq!(trailing_weight("a\n:2"), Some(2));
        // `.*?` cannot cross a newline, `1.5.2` is no number, `(x:1.2)` ends in a bracket.
        assert_eq!(trailing_weight("a\nb:2"), None);
        assert_eq!(trailing_weight("a:1.5.2"), None);
        assert_eq!(trailing_weight("(x:1.2)"), None);
        assert_eq!(trailing_weight("a:."), None);
    }

    #[test]
    fn schedules_and_alternations_are_found() {
        assert!(scheduling("[a:b:0.5]").is_some());
        assert!(scheduling("x [a: 5]").is_some());
        assert!(scheduling("[a::1e2]").is_some());
        assert!(scheduling("[(a:1.2)|b]").is_some());
        // Emphasis, literal colons and a number followed by a space are not schedules.
        assert!(scheduling("[a] (b:1.2) [c:d]").is_none());
        assert!(scheduling("[a:b:0.5 ]").is_none());
        assert!(scheduling("[a:b:c:1]").is_none());
        assert!(scheduling("\\[a:1]").is_none());
    }
}
