//! Prompt templates: `{a|b|c}` alternatives (nested), `__name__` wildcards, and their
//! combinatorial expansion into prompt variants with bindings.
//!
//! # Syntax
//! - `{a|b|c}` — one of the options; every option is a template itself, so lists nest
//!   (`{a {red|blue} fox|owl}`). Options are taken verbatim (spaces included).
//! - `{name=a|b}` — the same, with the binding named `name` (an identifier:
//!   `[A-Za-z_][A-Za-z0-9_]*`) instead of the positional `altN`.
//! - `__name__` — each value of the wildcard `name`, declared under `[wildcards]` (an inline
//!   list or a file with one value per line). Values are templates too, so wildcards nest up to
//!   the wildcard depth limit. Names use `[A-Za-z0-9_./-]` and do not start with `_`; a `__`
//!   that does not enclose such a name is plain text (so `^__^` stays as written).
//! - `\{`, `\}`, `\|`, `\_` and `\\` write the character literally; any other backslash is
//!   kept as is (so A1111's `\(` survives).
//!
//! Empty options policy: `{}` — or a list whose options are all empty or blank, like `{|}`
//! or `{ }` — is an error. An empty option next to non-empty ones is allowed and means "nothing", the
//! sd-dynamic-prompts idiom for optional text: `{|very }dark forest`.
//!
//! # Bindings
//! Every choice is recorded as a binding `key = value`:
//! - an unnamed list is `altN`, N counting the unnamed `{` of its template text from 1, in
//!   text order (nested ones included), whichever options are taken; a named list is its name.
//! - a wildcard is its name. Choices made *inside* a wildcard value are prefixed by the
//!   wildcard's key: `animal.alt1`, `scene.animal`.
//! - the value is the text the choice produced, expanded and trimmed: the wildcard line
//!   `{snowy|barn} owl` binds `animal = "barn owl"` (and `animal.alt1 = "barn"`), the option
//!   `x {1|2}` binds `alt1 = "x 2"` (and `alt2 = "2"`). Bindings never count in a cell's
//!   identity, so this is only what queries see.
//! - a key used twice in one template text gets `.2`, `.3`, … in text order
//!   (`__animal__ meets __animal__` binds `animal` and `animal.2`).
//!
//! # Order
//! Variants are enumerated like an odometer in reading order: the leftmost choice changes
//! slowest, options in the order written, wildcard values in file order. Hence
//! `{a|b} {c|d}` gives `a c`, `a d`, `b c`, `b d`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::error::{PlanError, PlanErrorKind};
use super::source::{Origin, SweepSource};

/// Where `__name__` finds its values when a template expands: the sweep's checked
/// `Wildcards` (`sweep::wildcard`), whose values are templates in turn.
pub(crate) trait WildcardValues {
    /// The values of wildcard `name`; none when it is not declared.
    fn values(&self, name: &str) -> &[Template];
}

/// A parsed template and where its text came from.
#[derive(Clone, Debug)]
pub(crate) struct Template {
    /// The template text as written (after TOML decoding).
    pub text: String,
    /// The parsed form.
    nodes: Vec<Node>,
}

#[derive(Clone, Debug)]
enum Node {
    Text(String),
    Alt {
        key: String,
        options: Vec<AltOption>,
    },
    Wildcard {
        key: String,
        name: String,
        /// Byte offset of the `__` in the template text, for error places.
        offset: usize,
    },
}

#[derive(Clone, Debug)]
struct AltOption {
    nodes: Vec<Node>,
}

/// One expansion of a template: the prompt text and the choices that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Variant {
    /// The resolved text.
    pub text: String,
    /// `(key, value)` in text order.
    pub bindings: Vec<(String, String)>,
}

/// What the parser checks against.
pub(crate) struct Grammar<'a> {
    /// Declared wildcard names.
    pub wildcards: &'a BTreeSet<String>,
    /// Most nesting levels of `{…}`.
    pub max_nesting: usize,
}

impl Template {
    /// Parses `text`; errors are placed through `origin`.
    pub(crate) fn parse(
        text: String,
        origin: &Origin,
        src: &SweepSource,
        grammar: &Grammar<'_>,
    ) -> Result<Template, PlanError> {
        let mut p = Parser {
            text: &text,
            pos: 0,
            keys: HashMap::new(),
            unnamed: 0,
            grammar,
        };
        let nodes = p
            .seq(0)
            .map_err(|(offset, kind)| PlanError::new(origin.place(src, &text, offset), kind))?;
        Ok(Template { text, nodes })
    }

    /// Number of variants (saturating), given each wildcard's count.
    pub(crate) fn count(&self, counts: &BTreeMap<String, u128>) -> u128 {
        count_seq(&self.nodes, counts)
    }

    /// Every variant, in order. Wildcards must be acyclic (`Wildcards::check`). Holds them all:
    /// a sweep plans through [`Template::each_variant`].
    #[cfg(test)]
    pub(crate) fn expand(&self, wildcards: &impl WildcardValues) -> Vec<Variant> {
        let mut out = Vec::new();
        let _ = self.each_variant(wildcards, &mut |v| {
            out.push(v.clone());
            Ok(())
        });
        out
    }

    /// Calls `visit` with every variant, in order, one at a time (a template of a million
    /// variants is never held); stops at `visit`'s first error.
    pub(crate) fn each_variant(
        &self,
        wildcards: &impl WildcardValues,
        visit: Visit<'_>,
    ) -> Result<(), PlanError> {
        let mut cur = Variant {
            text: String::new(),
            bindings: Vec::new(),
        };
        walk(&self.nodes, "", &mut Vec::new(), wildcards, &mut cur, visit)
    }

    /// Wildcard references anywhere in the template: `(name, byte offset)`.
    pub(super) fn references(&self) -> Vec<(&str, usize)> {
        let mut out = Vec::new();
        collect_refs(&self.nodes, &mut out);
        out
    }
}

type ParseResult<T> = Result<T, (usize, PlanErrorKind)>;

struct Parser<'t, 'g> {
    text: &'t str,
    pos: usize,
    keys: HashMap<String, u32>,
    unnamed: u32,
    grammar: &'g Grammar<'g>,
}

impl Parser<'_, '_> {
    /// Parses until the end, or (inside a list, `depth > 0`) until `|` or `}`.
    fn seq(&mut self, depth: usize) -> ParseResult<Vec<Node>> {
        let mut nodes = Vec::new();
        let mut buf = String::new();
        while let Some(c) = self.peek() {
            match c {
                '\\' => {
                    self.pos += 1;
                    match self.peek() {
                        Some(e @ ('{' | '}' | '|' | '_' | '\\')) => {
                            buf.push(e);
                            self.pos += 1;
                        }
                        _ => buf.push('\\'),
                    }
                }
                '{' => {
                    flush(&mut buf, &mut nodes);
                    nodes.push(self.alternatives(depth + 1)?);
                }
                '}' | '|' if depth > 0 => break,
                '}' => return Err((self.pos, PlanErrorKind::UnmatchedBrace)),
                '_' if self.text[self.pos..].starts_with("__") => match self.wildcard()? {
                    Some(node) => {
                        flush(&mut buf, &mut nodes);
                        nodes.push(node);
                    }
                    None => {
                        buf.push('_');
                        self.pos += 1;
                    }
                },
                c => {
                    buf.push(c);
                    self.pos += c.len_utf8();
                }
            }
        }
        flush(&mut buf, &mut nodes);
        Ok(nodes)
    }

    /// At a `{`: parses the list through its `}`.
    fn alternatives(&mut self, depth: usize) -> ParseResult<Node> {
        let open = self.pos;
        if depth > self.grammar.max_nesting {
            return Err((
                open,
                PlanErrorKind::NestingTooDeep {
                    limit: self.grammar.max_nesting,
                },
            ));
        }
        self.pos += 1;
        let key = match self.list_name() {
            Some(name) => self.key(name),
            None => {
                self.unnamed += 1;
                self.key(format!("alt{}", self.unnamed))
            }
        };
        let mut options = Vec::new();
        let mut all_blank = true;
        loop {
            let start = self.pos;
            let nodes = self.seq(depth)?;
            all_blank &= self.text[start..self.pos].trim().is_empty();
            options.push(AltOption { nodes });
            match self.peek() {
                Some('|') => self.pos += 1,
                Some('}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err((open, PlanErrorKind::UnclosedBrace)),
            }
        }
        if all_blank {
            return Err((open, PlanErrorKind::EmptyAlternatives));
        }
        Ok(Node::Alt { key, options })
    }

    /// After a `{`: a `name=` prefix, consumed if present.
    fn list_name(&mut self) -> Option<String> {
        let rest = &self.text[self.pos..];
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        let name = &rest[..end];
        let first = name.chars().next()?;
        if rest[end..].starts_with('=') && !first.is_ascii_digit() {
            self.pos += end + 1;
            Some(name.to_string())
        } else {
            None
        }
    }

    /// At a `__`: a wildcard reference, or `None` if the `__` is plain text.
    fn wildcard(&mut self) -> ParseResult<Option<Node>> {
        let open = self.pos;
        let rest = &self.text[open + 2..];
        let Some(end) = rest.find("__") else {
            return Ok(None);
        };
        let name = &rest[..end];
        if !is_wildcard_name(name) {
            return Ok(None);
        }
        if !self.grammar.wildcards.contains(name) {
            return Err((
                open,
                PlanErrorKind::UnknownWildcard {
                    name: name.to_string(),
                    known: known_list(self.grammar.wildcards),
                },
            ));
        }
        self.pos = open + 2 + end + 2;
        Ok(Some(Node::Wildcard {
            key: self.key(name.to_string()),
            name: name.to_string(),
            offset: open,
        }))
    }

    /// Allocates a binding key unique within this template text.
    fn key(&mut self, base: String) -> String {
        let n = self.keys.entry(base.clone()).or_insert(0);
        *n += 1;
        if *n == 1 { base } else { format!("{base}.{n}") }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }
}

fn flush(buf: &mut String, nodes: &mut Vec<Node>) {
    if !buf.is_empty() {
        nodes.push(Node::Text(std::mem::take(buf)));
    }
}

/// Whether `name` is a valid wildcard name: `[A-Za-z0-9_./-]+`, not starting with `_`.
pub(crate) fn is_wildcard_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
}

fn known_list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn count_seq(nodes: &[Node], counts: &BTreeMap<String, u128>) -> u128 {
    nodes.iter().fold(1u128, |acc, n| {
        let c = match n {
            Node::Text(_) => 1,
            Node::Alt { options, .. } => options
                .iter()
                .fold(0u128, |s, o| s.saturating_add(count_seq(&o.nodes, counts))),
            Node::Wildcard { name, .. } => counts.get(name).copied().unwrap_or(0),
        };
        acc.saturating_mul(c)
    })
}

/// What [`walk`] calls with each finished variant; an error stops the walk.
type Visit<'v> = &'v mut dyn FnMut(&Variant) -> Result<(), PlanError>;

/// An outer sequence still to come: where [`walk`] carries on when the sequence it is in ends.
struct Frame<'a> {
    /// The nodes after the choice whose option or value is being walked.
    nodes: &'a [Node],
    /// The binding-key prefix of those nodes.
    prefix: String,
    /// That choice's binding (its index in `Variant::bindings`) and where its text starts in
    /// `Variant::text`: when the frame resumes, the choice's text is complete and becomes the
    /// binding's value.
    choice: (usize, usize),
}

/// Walks every variant of `nodes` followed by `rest` (outer sequences still to come, innermost
/// last), in order: the last choice turns fastest. `cur` holds the text and bindings so far
/// and is restored before returning, so one buffer serves every variant.
fn walk<'a>(
    nodes: &'a [Node],
    prefix: &str,
    rest: &mut Vec<Frame<'a>>,
    w: &'a dyn WildcardValues,
    cur: &mut Variant,
    visit: Visit<'_>,
) -> Result<(), PlanError> {
    let Some((node, tail)) = nodes.split_first() else {
        // This sequence is done: the choice it was an option of has its text; carry on with
        // the sequence it is nested in, if any.
        let Some(frame) = rest.pop() else {
            return visit(cur);
        };
        let (binding, start) = frame.choice;
        cur.bindings[binding].1 = cur.text[start..].trim().to_string();
        let out = walk(frame.nodes, &frame.prefix, rest, w, cur, visit);
        rest.push(frame);
        return out;
    };
    let (text_len, bindings_len) = (cur.text.len(), cur.bindings.len());
    let frame = |prefix: &str| Frame {
        nodes: tail,
        prefix: prefix.to_string(),
        choice: (bindings_len, text_len),
    };
    let out = match node {
        Node::Text(s) => {
            cur.text.push_str(s);
            walk(tail, prefix, rest, w, cur, visit)
        }
        Node::Alt { key, options } => {
            let key = format!("{prefix}{key}");
            rest.push(frame(prefix));
            let mut out = Ok(());
            for o in options {
                // The value is filled in when the option's text is complete (see `Frame`).
                cur.bindings.push((key.clone(), String::new()));
                out = walk(&o.nodes, prefix, rest, w, cur, visit);
                cur.bindings.truncate(bindings_len);
                if out.is_err() {
                    break;
                }
            }
            rest.pop();
            out
        }
        Node::Wildcard { key, name, .. } => {
            let key = format!("{prefix}{key}");
            let inner = format!("{key}.");
            rest.push(frame(prefix));
            let mut out = Ok(());
            for t in w.values(name) {
                cur.bindings.push((key.clone(), String::new()));
                out = walk(&t.nodes, &inner, rest, w, cur, visit);
                cur.bindings.truncate(bindings_len);
                if out.is_err() {
                    break;
                }
            }
            rest.pop();
            out
        }
    };
    cur.text.truncate(text_len);
    cur.bindings.truncate(bindings_len);
    out
}

fn collect_refs<'a>(nodes: &'a [Node], out: &mut Vec<(&'a str, usize)>) {
    for n in nodes {
        match n {
            Node::Text(_) => {}
            Node::Alt { options, .. } => {
                for o in options {
                    collect_refs(&o.nodes, out);
                }
            }
            Node::Wildcard { name, offset, .. } => out.push((name, *offset)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::error::Place;
    use crate::sweep::wildcard::Wildcards;

    fn src() -> SweepSource {
        SweepSource::new("t.toml", "")
    }

    fn origin() -> Origin {
        Origin::Line {
            file: "p.txt".into(),
            line: 1,
            col: 1,
        }
    }

    fn parse_with(text: &str, names: &[&str], nesting: usize) -> Result<Template, PlanError> {
        let names: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        let g = Grammar {
            wildcards: &names,
            max_nesting: nesting,
        };
        Template::parse(text.to_string(), &origin(), &src(), &g)
    }

    fn texts(t: &Template, w: &Wildcards) -> Vec<String> {
        t.expand(w).into_iter().map(|v| v.text).collect()
    }

    fn err_at(text: &str, names: &[&str]) -> (u32, PlanErrorKind) {
        let e = parse_with(text, names, 4).unwrap_err();
        match e.place {
            Place::At { col, .. } => (col, e.kind),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn alternatives_expand_in_reading_order() {
        let t = parse_with("{a|b} {c|d}", &[], 4).unwrap();
        let w = Wildcards::default();
        assert_eq!(texts(&t, &w), ["a c", "a d", "b c", "b d"]);
        assert_eq!(t.count(w.counts()), 4);
        let v = t.expand(&w);
        assert_eq!(
            v[2].bindings,
            [("alt1".into(), "b".into()), ("alt2".into(), "c".into())]
        );
    }

    #[test]
    fn nested_alternatives_and_names() {
        let t = parse_with("{x {1|2}|y} {tone=day|night}", &[], 4).unwrap();
        let w = Wildcards::default();
        assert_eq!(
            texts(&t, &w),
            [
                "x 1 day",
                "x 1 night",
                "x 2 day",
                "x 2 night",
                "y day",
                "y night"
            ]
        );
        assert_eq!(t.count(w.counts()), 6);
        let v = t.expand(&w);
        assert_eq!(
            v[3].bindings,
            vec![
                // An option's binding is the text it produced.
                ("alt1".to_string(), "x 2".to_string()),
                ("alt2".into(), "2".into()),
                ("tone".into(), "night".into())
            ]
        );
        // The inner list keeps its number when the outer option without it is taken.
        assert_eq!(
            v[4].bindings,
            vec![
                ("alt1".to_string(), "y".to_string()),
                ("tone".into(), "day".into())
            ]
        );
    }

    #[test]
    fn empty_options_policy() {
        let t = parse_with("{|very }dark", &[], 4).unwrap();
        assert_eq!(texts(&t, &Wildcards::default()), ["dark", "very dark"]);
        assert_eq!(err_at("a {} b", &[]), (3, PlanErrorKind::EmptyAlternatives));
        assert_eq!(
            err_at("a {|} b", &[]),
            (3, PlanErrorKind::EmptyAlternatives)
        );
        assert_eq!(
            err_at("a {x=} b", &[]),
            (3, PlanErrorKind::EmptyAlternatives)
        );
    }

    #[test]
    fn malformed_braces_are_placed() {
        assert_eq!(err_at("a {b|c", &[]), (3, PlanErrorKind::UnclosedBrace));
        assert_eq!(err_at("a {b|{c} d", &[]), (3, PlanErrorKind::UnclosedBrace));
        assert_eq!(err_at("ab}c", &[]), (3, PlanErrorKind::UnmatchedBrace));
        assert_eq!(
            err_at("é{{{{{x}}}}}", &[]),
            (6, PlanErrorKind::NestingTooDeep { limit: 4 })
        );
        assert!(parse_with("{{{{x}}}}", &[], 4).is_ok());
    }

    #[test]
    fn escapes_and_plain_underscores() {
        let t = parse_with(r"\{a\|b\} \__x__ ^__^ snake_case \(1.2\)", &["x"], 4).unwrap();
        assert_eq!(
            texts(&t, &Wildcards::default()),
            [r"{a|b} __x__ ^__^ snake_case \(1.2\)"]
        );
    }

    #[test]
    fn unknown_wildcard_is_placed() {
        let (col, kind) = err_at("a __anmial__", &["animal", "place"]);
        assert_eq!(col, 3);
        assert_eq!(
            kind,
            PlanErrorKind::UnknownWildcard {
                name: "anmial".into(),
                known: "animal, place".into()
            }
        );
    }
}
