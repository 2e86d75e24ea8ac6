//! What the planner reads: a sweep file's text plus the files it references, all sent by the
//! client ([`SweepSource`]) — the coordinator never reads the client's disk. Also the mapping
//! from byte offsets back to `line:col`, so every error can name its place.

use std::collections::BTreeMap;
use std::ops::Range;

use super::error::Place;

/// A sweep file as the client sent it, with every file it references.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepSource {
    /// The sweep file's name as the user gave it (e.g. `examples/foxes.toml`); used in error
    /// places and, by its stem, as the default sweep name.
    pub path: String,
    /// The TOML text.
    pub text: String,
    /// Referenced files (wildcard lists, prompt files), keyed exactly as the sweep file spells
    /// them (`wildcards/animal.txt`); the client resolves them relative to the sweep file.
    pub files: BTreeMap<String, String>,
    /// Referenced pictures (`init_image`), keyed as the sweep file spells them, each the
    /// sha256 (hex) the client uploaded its bytes under: the planner needs only the hash.
    pub images: BTreeMap<String, String>,
    /// Model registry references (`model`, `vae`, `[[loras]]` names, and `sha256:HEX`), keyed
    /// as the sweep file spells them, each the sha256 it was pinned to at submit. Filled by the
    /// coordinator from its registry (never taken from a client) and stored with the sweep; a
    /// reference not in it is a worker-local file name.
    pub models: BTreeMap<String, String>,
}

impl SweepSource {
    /// A source with no referenced files.
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
            files: BTreeMap::new(),
            images: BTreeMap::new(),
            models: BTreeMap::new(),
        }
    }

    /// Adds a referenced file.
    pub fn with_file(mut self, name: impl Into<String>, text: impl Into<String>) -> Self {
        self.files.insert(name.into(), text.into());
        self
    }

    /// Adds a referenced picture by the sha256 it was uploaded under.
    pub fn with_image(mut self, name: impl Into<String>, sha256: impl Into<String>) -> Self {
        self.images.insert(name.into(), sha256.into());
        self
    }

    /// Pins a model reference to the sha256 the registry gave it.
    pub fn with_model(mut self, reference: impl Into<String>, sha256: impl Into<String>) -> Self {
        self.models.insert(reference.into(), sha256.into());
        self
    }

    /// The place of a byte offset in the sweep file.
    pub(crate) fn place_at(&self, offset: usize) -> Place {
        let (line, col) = line_col(&self.text, offset);
        Place::At {
            file: self.path.clone(),
            line,
            col,
        }
    }

    /// The place of the start of a span in the sweep file.
    pub(crate) fn place_of(&self, span: &Range<usize>) -> Place {
        self.place_at(span.start)
    }

    /// Where the characters of a TOML string value start, if its decoded text equals its raw
    /// text (no escapes), so template offsets map one-to-one onto the file. `span` is the span
    /// of the value including its quotes.
    pub(crate) fn string_origin(&self, span: &Range<usize>, value: &str) -> Origin {
        let raw = self.text.get(span.clone()).unwrap_or("");
        for delim in ["\"\"\"", "'''", "\"", "'"] {
            if raw.len() >= 2 * delim.len() && raw.starts_with(delim) && raw.ends_with(delim) {
                let mut start = span.start + delim.len();
                let mut inner = &raw[delim.len()..raw.len() - delim.len()];
                // TOML trims a newline right after a multi-line string's opening delimiter.
                if delim.len() == 3 {
                    for nl in ["\r\n", "\n"] {
                        if let Some(rest) = inner.strip_prefix(nl) {
                            inner = rest;
                            start += nl.len();
                            break;
                        }
                    }
                }
                if inner == value {
                    return Origin::Toml { start };
                }
                break;
            }
        }
        Origin::TomlValue { start: span.start }
    }
}

/// Where a template's text came from, to turn an offset within it into a [`Place`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A TOML string whose raw text equals its value, starting at this byte of the sweep file.
    Toml {
        /// Byte offset of the string's first character.
        start: usize,
    },
    /// A TOML string with escapes: offsets inside it cannot be mapped, so places point at
    /// the value.
    TomlValue {
        /// Byte offset of the value (its opening quote).
        start: usize,
    },
    /// One line of a referenced file.
    Line {
        /// The file's name as referenced.
        file: String,
        /// 1-based line number.
        line: u32,
        /// 1-based column (in characters) of the template's first character.
        col: u32,
    },
}

impl Origin {
    /// The place of byte `offset` within the template text `text`.
    pub(crate) fn place(&self, src: &SweepSource, text: &str, offset: usize) -> Place {
        match self {
            Origin::Toml { start } => src.place_at(start + offset),
            Origin::TomlValue { start } => src.place_at(*start),
            Origin::Line { file, line, col } => Place::At {
                file: file.clone(),
                line: *line,
                col: col + chars_before(text, offset),
            },
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (to_u32(line), to_u32(col))
}

fn chars_before(text: &str, offset: usize) -> u32 {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    to_u32(text[..offset].chars().count())
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One value line of a wildcard or prompts file: its text (trimmed) and its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListLine {
    /// The value, without surrounding whitespace.
    pub text: String,
    /// Where it starts.
    pub origin: Origin,
    /// 1-based line number.
    pub line: u32,
}

/// The values of a list file: one per line; blank lines and lines whose first non-blank
/// character is `#` are skipped; surrounding whitespace (and `\r`) is trimmed.
pub(crate) fn list_lines(file: &str, text: &str) -> Vec<ListLine> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let lead = raw.len() - raw.trim_start().len();
        let line = to_u32(i + 1);
        out.push(ListLine {
            text: trimmed.to_string(),
            origin: Origin::Line {
                file: file.to_string(),
                line,
                col: 1 + chars_before(raw, lead),
            },
            line,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let t = "ab\ncé d\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        // 'd' sits after a two-byte 'é'.
        assert_eq!(line_col(t, t.find('d').unwrap()), (2, 4));
        assert_eq!(line_col(t, 1000), (3, 1));
    }

    #[test]
    fn list_lines_skip_comments_and_blanks() {
        let lines = list_lines(
            "a.txt",
            "# animals\n\n  fox  \r\nowl\n   # indented comment\n",
        );
        let texts: Vec<_> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["fox", "owl"]);
        assert_eq!(lines[0].line, 3);
        assert_eq!(
            lines[0].origin,
            Origin::Line {
                file: "a.txt".into(),
                line: 3,
                col: 3
            }
        );
    }

    #[test]
    fn string_origin_maps_only_unescaped_strings() {
        let text = "prompt = \"a {b|c}\"\nneg = \"x\\ty\"\nm = '''\nraw'''\n";
        let src = SweepSource::new("s.toml", text);
        let start = text.find('"').unwrap();
        let span = start..start + "\"a {b|c}\"".len();
        assert_eq!(
            src.string_origin(&span, "a {b|c}"),
            Origin::Toml { start: start + 1 }
        );
        let start = text.find("\"x").unwrap();
        let span = start..start + "\"x\\ty\"".len();
        assert_eq!(
            src.string_origin(&span, "x\ty"),
            Origin::TomlValue { start }
        );
        let start = text.find("'''").unwrap();
        let span = start..text.len() - 1;
        assert_eq!(
            src.string_origin(&span, "raw"),
            Origin::Toml {
                start: text.find("raw").unwrap()
            }
        );
    }
}
