//! Splits a filter into tokens, each with the line and column where it starts. Strings are
//! unescaped here; numbers keep their kind (integer or not) so the parser can type-check them.

use super::ast::{FilterError, Pos};

/// One token of the filter language.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tok {
    /// A name: a column, a binding key or a keyword (`and`, `or`, `not`, `between`, `in`).
    Ident(String),
    /// A backtick-quoted binding key.
    Quoted(String),
    /// A string literal, unescaped.
    Str(String),
    /// An integer literal.
    Int(i64),
    /// A number literal with a fraction or an exponent.
    Float(f64),
    /// `=`, `!=`, `<`, `<=`, `>`, `>=`, `~`, `!~`.
    Op(&'static str),
    /// `(`.
    LParen,
    /// `)`.
    RParen,
    /// `,`.
    Comma,
    /// End of input.
    End,
}

impl Tok {
    /// How the token reads in an error message.
    pub(super) fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("'{s}'"),
            Tok::Quoted(s) => format!("`{s}`"),
            Tok::Str(s) => format!("the string {s:?}"),
            Tok::Int(n) => format!("the number {n}"),
            Tok::Float(n) => format!("the number {n}"),
            Tok::Op(o) => format!("'{o}'"),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::Comma => "','".into(),
            Tok::End => "the end of the filter".into(),
        }
    }
}

/// A token and where it starts.
#[derive(Clone, Debug)]
pub(super) struct Token {
    pub tok: Tok,
    pub pos: Pos,
}

/// A cursor over the characters of the input that tracks line and column (both from 1,
/// columns counted in characters, not bytes).
struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    pos: Pos,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }
}

/// Whether `c` can start a bare name.
fn ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

/// Whether `c` can continue a bare name (`.` and `-` allow keys like `lora.strength`).
fn ident_continue(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Splits `input` into tokens, ending with [`Tok::End`].
pub(super) fn tokenize(input: &str) -> Result<Vec<Token>, FilterError> {
    let mut cur = Cursor {
        chars: input.chars().peekable(),
        pos: Pos { line: 1, column: 1 },
    };
    let mut out = Vec::new();
    loop {
        while cur.peek().is_some_and(char::is_whitespace) {
            cur.bump();
        }
        let pos = cur.pos;
        let Some(c) = cur.peek() else {
            out.push(Token { tok: Tok::End, pos });
            return Ok(out);
        };
        let tok = match c {
            '(' | ')' | ',' | '=' | '~' => {
                cur.bump();
                match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    ',' => Tok::Comma,
                    '=' => Tok::Op("="),
                    _ => Tok::Op("~"),
                }
            }
            '<' | '>' | '!' => {
                cur.bump();
                let next = cur.peek();
                match (c, next) {
                    ('<', Some('=')) => op2(&mut cur, "<="),
                    ('>', Some('=')) => op2(&mut cur, ">="),
                    ('!', Some('=')) => op2(&mut cur, "!="),
                    ('!', Some('~')) => op2(&mut cur, "!~"),
                    ('<', Some('>')) => op2(&mut cur, "!="),
                    ('<', _) => Tok::Op("<"),
                    ('>', _) => Tok::Op(">"),
                    _ => return Err(FilterError::at(pos, "'!' must be followed by '=' or '~'")),
                }
            }
            '"' | '\'' => Tok::Str(string(&mut cur, c)?),
            '`' => Tok::Quoted(backtick(&mut cur)?),
            '-' | '0'..='9' => number(&mut cur)?,
            c if ident_start(c) => {
                let mut s = String::new();
                while let Some(c) = cur.peek().filter(|c| ident_continue(*c)) {
                    s.push(c);
                    cur.bump();
                }
                Tok::Ident(s)
            }
            other => {
                return Err(FilterError::at(
                    pos,
                    format!("unexpected character {other:?}"),
                ));
            }
        };
        out.push(Token { tok, pos });
    }
}

fn op2(cur: &mut Cursor<'_>, op: &'static str) -> Tok {
    cur.bump();
    Tok::Op(op)
}

/// A quoted string; `quote` is `"` or `'`. Escapes: `\\ \" \' \` \n \r \t \u{…}`. NUL is
/// refused: Postgres text cannot hold it, so it could never match there.
fn string(cur: &mut Cursor<'_>, quote: char) -> Result<String, FilterError> {
    let start = cur.pos;
    cur.bump();
    let mut s = String::new();
    loop {
        let pos = cur.pos;
        match cur.bump() {
            None => {
                return Err(FilterError::at(
                    start,
                    format!("unterminated string: no closing {quote}"),
                ));
            }
            Some(c) if c == quote => return Ok(s),
            Some('\\') => s.push(escape(cur, pos)?),
            Some('\0') => return Err(FilterError::at(pos, "strings cannot contain NUL")),
            Some(c) => s.push(c),
        }
    }
}

/// The character an escape stands for; the backslash at `pos` was just read.
fn escape(cur: &mut Cursor<'_>, pos: Pos) -> Result<char, FilterError> {
    let c = cur
        .bump()
        .ok_or_else(|| FilterError::at(pos, "unterminated escape at the end of the filter"))?;
    Ok(match c {
        '\\' | '"' | '\'' | '`' => c,
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        'u' => {
            let bad = || FilterError::at(pos, "expected \\u{HEX} with 1 to 6 hex digits");
            if cur.bump() != Some('{') {
                return Err(bad());
            }
            let mut hex = String::new();
            loop {
                match cur.bump() {
                    Some('}') => break,
                    Some(h) if h.is_ascii_hexdigit() && hex.len() < 6 => hex.push(h),
                    _ => return Err(bad()),
                }
            }
            let code = u32::from_str_radix(&hex, 16).map_err(|_| bad())?;
            match char::from_u32(code) {
                Some('\0') => return Err(FilterError::at(pos, "strings cannot contain NUL")),
                Some(c) => c,
                None => {
                    return Err(FilterError::at(
                        pos,
                        format!("\\u{{{hex}}} is not a unicode scalar value"),
                    ));
                }
            }
        }
        other => {
            return Err(FilterError::at(
                pos,
                format!("unknown escape '\\{other}' (use \\\\ for a backslash)"),
            ));
        }
    })
}

/// A backtick-quoted binding key; a doubled backtick or `` \` `` stands for one backtick.
fn backtick(cur: &mut Cursor<'_>) -> Result<String, FilterError> {
    let start = cur.pos;
    cur.bump();
    let mut s = String::new();
    loop {
        let pos = cur.pos;
        match cur.bump() {
            None => {
                return Err(FilterError::at(
                    start,
                    "unterminated `key`: no closing backtick",
                ));
            }
            Some('`') if cur.peek() == Some('`') => {
                cur.bump();
                s.push('`');
            }
            Some('`') => {
                if s.is_empty() {
                    return Err(FilterError::at(start, "empty binding key ``"));
                }
                return Ok(s);
            }
            Some('\\') => s.push(escape(cur, pos)?),
            Some('\0') => return Err(FilterError::at(pos, "keys cannot contain NUL")),
            Some(c) => s.push(c),
        }
    }
}

/// `-?digits(.digits)?([eE][+-]?digits)?`.
fn number(cur: &mut Cursor<'_>) -> Result<Tok, FilterError> {
    let start = cur.pos;
    let mut s = String::new();
    if cur.peek() == Some('-') {
        s.push('-');
        cur.bump();
    }
    let digits = |cur: &mut Cursor<'_>, s: &mut String| {
        let mut n = 0;
        while let Some(d) = cur.peek().filter(char::is_ascii_digit) {
            s.push(d);
            cur.bump();
            n += 1;
        }
        n
    };
    if digits(cur, &mut s) == 0 {
        return Err(FilterError::at(start, "expected a digit after '-'"));
    }
    let mut float = false;
    if cur.peek() == Some('.') {
        float = true;
        s.push('.');
        cur.bump();
        if digits(cur, &mut s) == 0 {
            return Err(FilterError::at(start, "expected a digit after '.'"));
        }
    }
    if matches!(cur.peek(), Some('e' | 'E')) {
        float = true;
        s.push('e');
        cur.bump();
        if let Some(sign) = cur.peek().filter(|c| matches!(c, '+' | '-')) {
            s.push(sign);
            cur.bump();
        }
        if digits(cur, &mut s) == 0 {
            return Err(FilterError::at(start, "expected a digit in the exponent"));
        }
    }
    if cur.peek().is_some_and(ident_start) {
        return Err(FilterError::at(
            start,
            format!(
                "a number cannot run into a name: {s}{}…",
                cur.peek().unwrap_or(' ')
            ),
        ));
    }
    if !float && let Ok(n) = s.parse::<i64>() {
        return Ok(Tok::Int(n));
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Tok::Float(f)),
        _ => Err(FilterError::at(
            start,
            format!("number {s} is out of range"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{Tok, tokenize};

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn keeper_fields_and_truth_values_are_names() {
        let name = |s: &str| Tok::Ident(s.into());
        assert_eq!(
            toks("not starred and rating>=4"),
            [
                name("not"),
                name("starred"),
                name("and"),
                name("rating"),
                Tok::Op(">="),
                Tok::Int(4),
                Tok::End
            ]
        );
        assert_eq!(
            toks("starred=TRUE"),
            [name("starred"), Tok::Op("="), name("TRUE"), Tok::End]
        );
        assert_eq!(toks("`starred`"), [Tok::Quoted("starred".into()), Tok::End]);
    }
}
