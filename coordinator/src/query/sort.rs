//! Sort keys for `--sort`: a comma-separated list of fields, each optionally prefixed with `-`
//! (descending) or `+`, or followed by `asc`/`desc`: `cfg,-seed`, `animal desc, number`.
//! Fields are named as in filters: columns, binding keys, `` `key` `` or `binding("key")`.
//!
//! Text sorts by code point (the same on both backends). Bindings sort numbers first, by
//! value, then other text, then cells without the binding. Missing values (`finished` of an
//! unfinished cell, …) sort last in either direction. Ties are broken by cell id.

use super::ast::{Column, Field, FilterError, MAX_FILTER_BYTES, Pos};
use super::lexer::{Tok, tokenize};

/// Most sort keys.
pub const MAX_SORT_KEYS: usize = 8;

/// One sort key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortKey {
    /// What to sort by.
    pub field: Field,
    /// Largest first.
    pub descending: bool,
}

/// Parses `--sort`. Blank input means no keys (the default order).
pub fn parse_sort(input: &str) -> Result<Vec<SortKey>, FilterError> {
    let start = Pos { line: 1, column: 1 };
    if input.len() > MAX_FILTER_BYTES {
        return Err(FilterError::at(start, "sort is too long"));
    }
    // A leading '-' is a direction here, not a negative number: split it off before the lexer
    // sees it, keeping columns right by padding with a space.
    let mut keys = Vec::new();
    let mut offset = 0usize;
    for part in split_top_level(input) {
        let trimmed = part.trim_start();
        let lead = part.len() - trimmed.len();
        let (descending, rest, sign) = match trimmed.chars().next() {
            Some('-') => (true, &trimmed[1..], 1),
            Some('+') => (false, &trimmed[1..], 1),
            _ => (false, trimmed, 0),
        };
        let column_base = input[..offset + lead + sign].chars().count() as u32;
        let shift = |p: Pos| Pos {
            line: p.line,
            column: p.column + column_base,
        };
        let toks = tokenize(rest).map_err(|e| FilterError::at(shift(e.pos), e.message))?;
        let mut it = toks.into_iter();
        let first = it.next().map(|t| (t.tok, shift(t.pos)));
        let field = match first {
            Some((Tok::Ident(name), pos)) if name == "binding" => {
                let key = match (it.next(), it.next(), it.next()) {
                    (
                        Some(super::lexer::Token {
                            tok: Tok::LParen, ..
                        }),
                        Some(super::lexer::Token {
                            tok: Tok::Str(k), ..
                        }),
                        Some(super::lexer::Token {
                            tok: Tok::RParen, ..
                        }),
                    ) if !k.is_empty() => k,
                    _ => {
                        return Err(FilterError::at(pos, "expected binding(\"key\")"));
                    }
                };
                Field::Binding(key)
            }
            Some((Tok::Ident(name), _)) => match Column::from_name(&name) {
                Some(c) => Field::Column(c),
                None => Field::Binding(name),
            },
            Some((Tok::Quoted(key), _)) => Field::Binding(key),
            Some((other, pos)) => {
                return Err(FilterError::at(
                    pos,
                    format!("expected a sort key, found {}", other.describe()),
                ));
            }
            None => unreachable!("tokenize always ends with End"),
        };
        let mut descending = descending;
        let next = it.next().map(|t| (t.tok, shift(t.pos)));
        match next {
            Some((Tok::End, _)) | None => {}
            Some((Tok::Ident(d), pos)) if sign == 0 => {
                descending = match d.to_ascii_lowercase().as_str() {
                    "desc" => true,
                    "asc" => false,
                    _ => {
                        return Err(FilterError::at(
                            pos,
                            format!("expected 'asc', 'desc' or ',', found '{d}'"),
                        ));
                    }
                };
                if let Some(t) = it.next().filter(|t| t.tok != Tok::End) {
                    return Err(FilterError::at(
                        shift(t.pos),
                        format!("expected ',', found {}", t.tok.describe()),
                    ));
                }
            }
            Some((other, pos)) => {
                return Err(FilterError::at(
                    pos,
                    format!("expected ',', found {}", other.describe()),
                ));
            }
        }
        keys.push(SortKey { field, descending });
        if keys.len() > MAX_SORT_KEYS {
            return Err(FilterError::at(
                start,
                format!("at most {MAX_SORT_KEYS} sort keys"),
            ));
        }
        offset += part.len() + 1;
    }
    Ok(keys)
}

/// Splits at commas outside quotes and backticks. A blank input gives no parts; a blank part
/// (`a,,b`) is kept so the lexer reports it.
fn split_top_level(input: &str) -> Vec<&str> {
    if input.trim().is_empty() {
        return Vec::new();
    }
    let mut parts = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut from = 0;
    for (i, c) in input.char_indices() {
        match (quote, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, ',') => {
                parts.push(&input[from..i]);
                from = i + 1;
            }
            (None, _) => {}
        }
    }
    parts.push(&input[from..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::{SortKey, parse_sort};
    use crate::query::{Column, Field};

    fn key(field: Field, descending: bool) -> SortKey {
        SortKey { field, descending }
    }

    #[test]
    fn keys_and_directions() {
        assert_eq!(
            parse_sort("cfg,-seed").unwrap(),
            vec![
                key(Field::Column(Column::Cfg), false),
                key(Field::Column(Column::Seed), true)
            ]
        );
        assert_eq!(
            parse_sort(" animal desc , +number, `seed` asc, binding(\"a,b\")").unwrap(),
            vec![
                key(Field::Binding("animal".into()), true),
                key(Field::Column(Column::Number), false),
                key(Field::Binding("seed".into()), false),
                key(Field::Binding("a,b".into()), false),
            ]
        );
        assert_eq!(
            parse_sort("-rating, starred desc, `rating`").unwrap(),
            vec![
                key(Field::Column(Column::Rating), true),
                key(Field::Column(Column::Starred), true),
                key(Field::Binding("rating".into()), false),
            ]
        );
        assert_eq!(parse_sort("  ").unwrap(), vec![]);
        assert_eq!(
            parse_sort("-狐").unwrap(),
            vec![key(Field::Binding("狐".into()), true)]
        );
    }

    #[test]
    fn errors_name_the_position() {
        assert_eq!(
            parse_sort("cfg, seed sideways").unwrap_err().to_string(),
            "1:11: expected 'asc', 'desc' or ',', found 'sideways'"
        );
        assert_eq!(
            parse_sort("cfg,,seed").unwrap_err().to_string(),
            "1:5: expected a sort key, found the end of the filter"
        );
        assert_eq!(
            parse_sort("cfg, -5").unwrap_err().to_string(),
            "1:7: expected a sort key, found the number 5"
        );
        assert_eq!(
            parse_sort("-seed desc").unwrap_err().to_string(),
            "1:7: expected ',', found 'desc'"
        );
    }
}
