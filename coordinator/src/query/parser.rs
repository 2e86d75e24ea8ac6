//! Recursive descent over the tokens of a filter (grammar in the module docs of
//! [`crate::query`]). Every value is type-checked against its field here, so the SQL side only
//! sees well-typed predicates.

use super::ast::{
    CmpOp, Column, ColumnKind, Field, Filter, FilterError, MAX_FILTER_BYTES, MAX_TESTS, MAX_VALUES,
    Pos, Predicate, Test, Value, state_name,
};
use super::lexer::{Tok, Token, tokenize};
use super::time::parse_utc_ms;

impl Filter {
    /// Parses and type-checks `input`. Blank input is an error: callers pass no filter at all.
    pub fn parse(input: &str) -> Result<Filter, FilterError> {
        parse(input).map(|(f, _)| f)
    }

    /// [`Filter::parse`], and every binding key the filter names with where it is written,
    /// in text order (for [`crate::query::key_refs`]).
    pub fn parse_located(input: &str) -> Result<(Filter, Vec<(String, Pos)>), FilterError> {
        parse(input)
    }
}

/// Deepest nesting of parentheses and `not`.
pub const MAX_DEPTH: usize = 64;

const KEYWORDS: &[&str] = &["and", "or", "not", "between", "in"];

/// Parses and type-checks a whole filter; also returns the binding keys it names and where.
fn parse(input: &str) -> Result<(Filter, Vec<(String, Pos)>), FilterError> {
    let start = Pos { line: 1, column: 1 };
    if input.len() > MAX_FILTER_BYTES {
        return Err(FilterError::at(
            start,
            format!(
                "filter is {} bytes, at most {MAX_FILTER_BYTES}",
                input.len()
            ),
        ));
    }
    let toks = tokenize(input)?;
    if toks[0].tok == Tok::End {
        return Err(FilterError::at(
            start,
            "empty filter: expected a field name, 'not' or '('",
        ));
    }
    let mut p = Parser {
        toks,
        i: 0,
        depth: 0,
        values: 0,
        tests: 0,
        keys: Vec::new(),
    };
    let f = p.or()?;
    let t = p.peek();
    match &t.tok {
        Tok::End => Ok((f, p.keys)),
        Tok::RParen => Err(FilterError::at(t.pos, "unmatched ')'")),
        other => Err(FilterError::at(
            t.pos,
            format!(
                "expected 'and', 'or' or the end of the filter, found {}",
                other.describe()
            ),
        )),
    }
}

/// A literal as written, before it is typed against a field.
enum Lit {
    Str(String),
    Int(i64),
    Float(f64),
    /// `true` or `false`, read only where the field is a [`ColumnKind::Bool`] column.
    Bool(bool),
}

impl Lit {
    fn describe(&self) -> String {
        match self {
            Lit::Str(s) => format!("the string {s:?}"),
            Lit::Int(n) => format!("the number {n}"),
            Lit::Float(n) => format!("the number {n}"),
            Lit::Bool(b) => format!("{b}"),
        }
    }
}

/// Whether `field` is a true-or-false column (`starred`).
fn is_bool(field: &Field) -> bool {
    matches!(field, Field::Column(c) if c.kind() == ColumnKind::Bool)
}

/// What an operator needs of its value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// `=`, `!=`, `in`: equality.
    Equal,
    /// `<`, `<=`, `>`, `>=`, `between`: ordering.
    Order,
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    depth: usize,
    values: usize,
    tests: usize,
    /// Binding keys named so far, with where.
    keys: Vec<(String, Pos)>,
}

impl Parser {
    fn peek(&self) -> &Token {
        // The token list always ends with `End`, and `bump` never moves past it.
        &self.toks[self.i]
    }

    fn bump(&mut self) -> Token {
        let t = self.toks[self.i].clone();
        if t.tok != Tok::End {
            self.i += 1;
        }
        t
    }

    /// Consumes the keyword `kw` (case-insensitive) if it is next.
    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(&self.peek().tok, Tok::Ident(s) if s.eq_ignore_ascii_case(kw)) {
            self.bump();
            true
        } else {
            false
        }
    }

    /// Whether the next token ends a test: `and`, `or`, `)` or the end of the filter.
    fn at_term_end(&self) -> bool {
        match &self.peek().tok {
            Tok::End | Tok::RParen => true,
            Tok::Ident(s) => s.eq_ignore_ascii_case("and") || s.eq_ignore_ascii_case("or"),
            _ => false,
        }
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut parts = vec![self.and()?];
        while self.keyword("or") {
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::Or(parts)
        })
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut parts = vec![self.unary()?];
        while self.keyword("and") {
            parts.push(self.unary()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::And(parts)
        })
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        let pos = self.peek().pos;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(FilterError::at(
                pos,
                format!("filter nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        let f = if self.keyword("not") {
            Filter::Not(Box::new(self.unary()?))
        } else if self.peek().tok == Tok::LParen {
            self.bump();
            let inner = self.or()?;
            let t = self.bump();
            if t.tok != Tok::RParen {
                return Err(FilterError::at(
                    t.pos,
                    format!(
                        "expected ')' to close the '(' at {pos}, found {}",
                        t.tok.describe()
                    ),
                ));
            }
            inner
        } else {
            self.predicate()?
        };
        self.depth -= 1;
        Ok(f)
    }

    /// `field`: a column or binding name, a backtick key, or `binding("key")`.
    fn field(&mut self) -> Result<(Field, String), FilterError> {
        let pos = self.peek().pos;
        let found = self.field_at()?;
        if let Field::Binding(k) = &found.0 {
            self.keys.push((k.clone(), pos));
        }
        Ok(found)
    }

    fn field_at(&mut self) -> Result<(Field, String), FilterError> {
        let t = self.bump();
        match t.tok {
            Tok::Ident(name) if name == "binding" && self.peek().tok == Tok::LParen => {
                self.bump();
                let k = self.bump();
                let Tok::Str(key) = k.tok else {
                    return Err(FilterError::at(
                        k.pos,
                        format!(
                            "expected a quoted key in binding(\"…\"), found {}",
                            k.tok.describe()
                        ),
                    ));
                };
                let r = self.bump();
                if r.tok != Tok::RParen {
                    return Err(FilterError::at(
                        r.pos,
                        format!("expected ')' after binding(\"{key}\""),
                    ));
                }
                empty_key(&key, k.pos)?;
                Ok((Field::Binding(key.clone()), format!("binding {key:?}")))
            }
            Tok::Ident(name) if KEYWORDS.iter().any(|k| name.eq_ignore_ascii_case(k)) => {
                Err(FilterError::at(
                    t.pos,
                    format!(
                        "expected a field name, found the keyword '{name}' \
                         (write `{name}` for a binding of that name)"
                    ),
                ))
            }
            Tok::Ident(name) => Ok(match Column::from_name(&name) {
                Some(c) => (Field::Column(c), c.name().to_string()),
                None => (Field::Binding(name.clone()), format!("binding {name:?}")),
            }),
            Tok::Quoted(key) => Ok((Field::Binding(key.clone()), format!("binding {key:?}"))),
            Tok::Str(s) => Err(FilterError::at(
                t.pos,
                format!(
                    "expected a field name, found the string {s:?} \
                     (for a binding whose key is not a name, write `key` or binding(\"key\"))"
                ),
            )),
            other => Err(FilterError::at(
                t.pos,
                format!(
                    "expected a field name, 'not' or '(', found {}",
                    other.describe()
                ),
            )),
        }
    }

    fn predicate(&mut self) -> Result<Filter, FilterError> {
        let field_pos = self.peek().pos;
        self.tests += 1;
        if self.tests > MAX_TESTS {
            return Err(FilterError::at(
                field_pos,
                format!("more than {MAX_TESTS} comparisons in one filter (use 'in (…)' for lists)"),
            ));
        }
        let (field, label) = self.field()?;
        if is_bool(&field) && self.at_term_end() {
            // `starred` alone: `starred = true`.
            return Ok(Filter::Pred(Predicate {
                field,
                test: Test::Cmp(CmpOp::Eq, Value::Int(1)),
            }));
        }
        let op = self.peek().clone();
        let negated = match &op.tok {
            Tok::Ident(s) if s.eq_ignore_ascii_case("not") => {
                self.bump();
                true
            }
            _ => false,
        };
        let op = self.bump();
        let pred = |test| {
            Filter::Pred(Predicate {
                field: field.clone(),
                test,
            })
        };
        let filter = match &op.tok {
            Tok::Ident(s) if s.eq_ignore_ascii_case("between") => {
                let low = self.value(&field, &label, Use::Order, "'between'")?;
                if !self.keyword("and") {
                    let t = self.peek();
                    return Err(FilterError::at(
                        t.pos,
                        format!(
                            "expected 'and' in 'between … and …', found {}",
                            t.tok.describe()
                        ),
                    ));
                }
                let high = self.value(&field, &label, Use::Order, "'and'")?;
                pred(Test::Between(low, high))
            }
            Tok::Ident(s) if s.eq_ignore_ascii_case("in") => self.in_list(&field, &label)?,
            _ if negated => {
                return Err(FilterError::at(
                    op.pos,
                    format!(
                        "expected 'between' or 'in' after 'not', found {}",
                        op.tok.describe()
                    ),
                ));
            }
            Tok::Op(o @ ("~" | "!~")) => {
                let text_field = match &field {
                    Field::Binding(_) => true,
                    Field::Column(c) => matches!(
                        c.kind(),
                        ColumnKind::Text | ColumnKind::State | ColumnKind::IdOrName
                    ),
                };
                if !text_field {
                    let is = if is_bool(&field) {
                        "true or false"
                    } else {
                        "a number"
                    };
                    return Err(FilterError::at(
                        op.pos,
                        format!("'{o}' tests text, but {label} is {is}"),
                    ));
                }
                let t = self.bump();
                let needle = match t.tok {
                    Tok::Str(s) => s,
                    Tok::Int(_) | Tok::Float(_) => {
                        return Err(FilterError::at(
                            t.pos,
                            format!(
                                "'{o}' needs a string, found {} (write it in quotes)",
                                t.tok.describe()
                            ),
                        ));
                    }
                    _ => {
                        return Err(FilterError::at(
                            t.pos,
                            format!("expected a string after '{o}'"),
                        ));
                    }
                };
                self.count_value(t.pos)?;
                let f = pred(Test::Contains(needle));
                if *o == "!~" {
                    Filter::Not(Box::new(f))
                } else {
                    f
                }
            }
            Tok::Op(o) => {
                let (cmp, negate, used) = match *o {
                    "=" => (CmpOp::Eq, false, Use::Equal),
                    "!=" => (CmpOp::Eq, true, Use::Equal),
                    "<" => (CmpOp::Lt, false, Use::Order),
                    "<=" => (CmpOp::Le, false, Use::Order),
                    ">" => (CmpOp::Gt, false, Use::Order),
                    _ => (CmpOp::Ge, false, Use::Order),
                };
                let v = self.value(&field, &label, used, &format!("'{o}'"))?;
                let f = pred(Test::Cmp(cmp, v));
                if negate { Filter::Not(Box::new(f)) } else { f }
            }
            other => {
                return Err(FilterError::at(
                    op.pos,
                    format!(
                        "expected an operator (=, !=, <, <=, >, >=, ~, !~, between, in) \
                         after {label} at {field_pos}, found {}",
                        other.describe()
                    ),
                ));
            }
        };
        Ok(if negated {
            Filter::Not(Box::new(filter))
        } else {
            filter
        })
    }

    /// `( value, … )` after `in`. A list mixing strings and numbers becomes an `or` of one
    /// list per kind, so each SQL `IN` compares one type.
    fn in_list(&mut self, field: &Field, label: &str) -> Result<Filter, FilterError> {
        let open = self.bump();
        if open.tok != Tok::LParen {
            return Err(FilterError::at(
                open.pos,
                format!("expected '(' after 'in', found {}", open.tok.describe()),
            ));
        }
        let mut texts = Vec::new();
        let mut others = Vec::new();
        let mut after = "'('".to_string();
        loop {
            match self.value(field, label, Use::Equal, &after)? {
                v @ Value::Text(_) => texts.push(v),
                v => others.push(v),
            }
            let t = self.bump();
            match t.tok {
                Tok::Comma => after = "','".into(),
                Tok::RParen => break,
                other => {
                    return Err(FilterError::at(
                        t.pos,
                        format!(
                            "expected ',' or ')' in the 'in' list opened at {}, found {}",
                            open.pos,
                            other.describe()
                        ),
                    ));
                }
            }
        }
        let pred = |values| {
            Filter::Pred(Predicate {
                field: field.clone(),
                test: Test::In(values),
            })
        };
        Ok(match (texts.is_empty(), others.is_empty()) {
            (false, true) => pred(texts),
            (true, false) => pred(others),
            _ => Filter::Or(vec![pred(texts), pred(others)]),
        })
    }

    fn count_value(&mut self, pos: Pos) -> Result<(), FilterError> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(FilterError::at(
                pos,
                format!("more than {MAX_VALUES} values in one filter"),
            ));
        }
        Ok(())
    }

    /// A literal, typed for `field` under an operator of kind `used`; `after` names what
    /// precedes it, for the error when it is missing.
    fn value(
        &mut self,
        field: &Field,
        label: &str,
        used: Use,
        after: &str,
    ) -> Result<Value, FilterError> {
        let t = self.bump();
        let lit = match t.tok {
            Tok::Str(s) => Lit::Str(s),
            Tok::Int(n) => Lit::Int(n),
            Tok::Float(f) => Lit::Float(f),
            Tok::Ident(s) if is_bool(field) && s.eq_ignore_ascii_case("true") => Lit::Bool(true),
            Tok::Ident(s) if is_bool(field) && s.eq_ignore_ascii_case("false") => Lit::Bool(false),
            _ => {
                return Err(FilterError::at(
                    t.pos,
                    format!("expected a value after {after}"),
                ));
            }
        };
        self.count_value(t.pos)?;
        typed(field, label, used, lit).map_err(|m| FilterError::at(t.pos, m))
    }
}

fn empty_key(key: &str, pos: Pos) -> Result<(), FilterError> {
    if key.is_empty() {
        return Err(FilterError::at(pos, "empty binding key"));
    }
    Ok(())
}

/// Checks `lit` against the type of `field`; the error message has no position yet.
fn typed(field: &Field, label: &str, used: Use, lit: Lit) -> Result<Value, String> {
    let order_text = |s: &str| {
        format!(
            "{label} compares with '<', '>' and 'between' only as a number, \
             found the string {s:?}"
        )
    };
    let kind = match field {
        Field::Binding(_) => {
            return match lit {
                Lit::Int(n) => Ok(Value::Number(n as f64)),
                Lit::Float(f) => Ok(Value::Number(f)),
                Lit::Str(s) if used == Use::Order => Err(order_text(&s)),
                Lit::Str(s) => Ok(Value::Text(s)),
                Lit::Bool(b) => Err(format!("{label} is not true or false, found {b}")),
            };
        }
        Field::Column(c) => c.kind(),
    };
    match (kind, lit) {
        (ColumnKind::Bool, Lit::Bool(b)) if used == Use::Equal => Ok(Value::Int(i64::from(b))),
        (ColumnKind::Bool, lit) if used == Use::Equal => Err(format!(
            "{label} is true or false, found {}",
            lit.describe()
        )),
        (ColumnKind::Bool, _) => Err(format!(
            "{label} is true or false: write it alone, or compare it with =, != or in"
        )),
        (_, Lit::Bool(b)) => Err(format!("{label} is not true or false, found {b}")),
        (ColumnKind::Int | ColumnKind::IdOrName | ColumnKind::Time, Lit::Int(n)) => {
            Ok(Value::Int(n))
        }
        (ColumnKind::Int | ColumnKind::IdOrName | ColumnKind::Time, Lit::Float(f)) => Err(format!(
            "{label} is a whole number, found {f} (or the number is out of range)"
        )),
        (ColumnKind::Int | ColumnKind::Float, Lit::Str(s)) => Err(format!(
            "{label} is a number, found the string {s:?} (numbers are written without quotes)"
        )),
        (ColumnKind::Float, Lit::Int(n)) => Ok(Value::Number(n as f64)),
        (ColumnKind::Float, Lit::Float(f)) => Ok(Value::Number(f)),
        (ColumnKind::Time, Lit::Str(s)) => parse_utc_ms(&s).map(Value::Int).ok_or_else(|| {
            format!(
                "{label} takes unix milliseconds or a UTC date like \"2026-11-26\" or \
                 \"2026-11-26T10:30:00Z\", found {s:?}"
            )
        }),
        (ColumnKind::IdOrName, Lit::Str(s)) if used == Use::Order => Err(format!(
            "{label} names compare only with =, !=, ~, !~ and in; found '<', '>' or 'between' \
             with the string {s:?}"
        )),
        (ColumnKind::IdOrName, Lit::Str(s)) => Ok(Value::Text(s)),
        (ColumnKind::Text | ColumnKind::State, Lit::Str(s)) if used == Use::Order => Err(format!(
            "{label} is text: compare it with =, !=, ~, !~ or in, found an ordering \
                 comparison with {s:?}"
        )),
        (ColumnKind::State, Lit::Str(s)) => match state_name(&s) {
            Some(_) => Ok(Value::Text(s)),
            None => Err(format!(
                "unknown state {s:?}; states are {}",
                crate::domain::state::CellState::ALL
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
        (ColumnKind::Text, Lit::Str(s)) => Ok(Value::Text(s)),
        (ColumnKind::Text | ColumnKind::State, lit) => Err(format!(
            "{label} is text, found {} (write it in quotes to compare text)",
            lit.describe()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CmpOp, Column, Field, Filter, Predicate, Test, Value};

    fn p(s: &str) -> Filter {
        Filter::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match Filter::parse(s) {
            Ok(f) => panic!("{s}: parsed as {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn col(c: Column, test: Test) -> Filter {
        Filter::Pred(Predicate {
            field: Field::Column(c),
            test,
        })
    }

    fn bind(k: &str, test: Test) -> Filter {
        Filter::Pred(Predicate {
            field: Field::Binding(k.into()),
            test,
        })
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn the_issue_example() {
        let f = p(
            r#"sweep = "foxes" and animal = "fox" and cfg >= 1.5 and seed between 1000 and 1100 and prompt ~ "forest""#,
        );
        assert_eq!(
            f,
            Filter::And(vec![
                col(Column::Sweep, Test::Cmp(CmpOp::Eq, text("foxes"))),
                bind("animal", Test::Cmp(CmpOp::Eq, text("fox"))),
                col(Column::Cfg, Test::Cmp(CmpOp::Ge, Value::Number(1.5))),
                col(
                    Column::Seed,
                    Test::Between(Value::Int(1000), Value::Int(1100))
                ),
                col(Column::Prompt, Test::Contains("forest".into())),
            ])
        );
    }

    #[test]
    fn precedence_not_over_and_over_or() {
        let a = || col(Column::Seed, Test::Cmp(CmpOp::Eq, Value::Int(1)));
        let b = || col(Column::Seed, Test::Cmp(CmpOp::Eq, Value::Int(2)));
        let c = || col(Column::Seed, Test::Cmp(CmpOp::Eq, Value::Int(3)));
        assert_eq!(
            p("seed = 1 or seed = 2 and seed = 3"),
            Filter::Or(vec![a(), Filter::And(vec![b(), c()])])
        );
        assert_eq!(
            p("(seed = 1 or seed = 2) and seed = 3"),
            Filter::And(vec![Filter::Or(vec![a(), b()]), c()])
        );
        assert_eq!(
            p("not seed = 1 and seed = 2"),
            Filter::And(vec![Filter::Not(Box::new(a())), b()])
        );
        assert_eq!(
            p("NOT (seed = 1 OR seed = 2)"),
            Filter::Not(Box::new(Filter::Or(vec![a(), b()])))
        );
        assert_eq!(p("((seed = 1))"), a());
    }

    #[test]
    fn negative_forms_are_not_of_the_positive() {
        let not = |f| Filter::Not(Box::new(f));
        assert_eq!(
            p("animal != 'fox'"),
            not(bind("animal", Test::Cmp(CmpOp::Eq, text("fox"))))
        );
        assert_eq!(p("animal <> 'fox'"), p("animal != 'fox'"));
        assert_eq!(
            p("prompt !~ 'x'"),
            not(col(Column::Prompt, Test::Contains("x".into())))
        );
        assert_eq!(
            p("seed not between 1 and 2"),
            not(col(
                Column::Seed,
                Test::Between(Value::Int(1), Value::Int(2))
            ))
        );
        assert_eq!(
            p("seed NOT IN (1, 2)"),
            not(col(
                Column::Seed,
                Test::In(vec![Value::Int(1), Value::Int(2)])
            ))
        );
    }

    #[test]
    fn fields_columns_aliases_and_bindings() {
        assert_eq!(p("negative ~ 'blur'"), p("negative_prompt ~ 'blur'"));
        assert_eq!(p("cell = 3"), p("id = 3"));
        // Bindings: bare names that are not columns, backticks, binding("…").
        assert_eq!(
            p("`seed` = 5"),
            bind("seed", Test::Cmp(CmpOp::Eq, Value::Number(5.0)))
        );
        assert_eq!(p(r#"binding("seed") = 5"#), p("`seed` = 5"));
        assert_eq!(
            p(r#"binding("my key!") = 'x'"#),
            bind("my key!", Test::Cmp(CmpOp::Eq, text("x")))
        );
        assert_eq!(
            p("`we``ird` = 'x'"),
            bind("we`ird", Test::Cmp(CmpOp::Eq, text("x")))
        );
        assert_eq!(
            p("lora.strength >= 0.5"),
            bind("lora.strength", Test::Cmp(CmpOp::Ge, Value::Number(0.5)))
        );
        // A binding named like a keyword needs backticks.
        assert_eq!(
            p("`and` = 'x'"),
            bind("and", Test::Cmp(CmpOp::Eq, text("x")))
        );
        // Column names are case-sensitive: `Seed` is a binding.
        assert_eq!(
            p("Seed = 1"),
            bind("Seed", Test::Cmp(CmpOp::Eq, Value::Number(1.0)))
        );
        // A binding called "binding" still works without parentheses.
        assert_eq!(
            p("binding = 'x'"),
            bind("binding", Test::Cmp(CmpOp::Eq, text("x")))
        );
    }

    #[test]
    fn unicode_everywhere() {
        assert_eq!(
            p("动物 = \"狐狸\" and prompt ~ '✨🦊'"),
            Filter::And(vec![
                bind("动物", Test::Cmp(CmpOp::Eq, text("狐狸"))),
                col(Column::Prompt, Test::Contains("✨🦊".into())),
            ])
        );
        // Columns count characters, not bytes.
        assert_eq!(err("动物 = "), "1:6: expected a value after '='");
    }

    #[test]
    fn escapes_and_quotes() {
        assert_eq!(
            p(r#"prompt = "say \"hi\" it's \\ \n\t\u{1F98A}""#),
            col(
                Column::Prompt,
                Test::Cmp(CmpOp::Eq, text("say \"hi\" it's \\ \n\t🦊"))
            )
        );
        assert_eq!(
            p(r"prompt = 'it\'s'"),
            col(Column::Prompt, Test::Cmp(CmpOp::Eq, text("it's")))
        );
        assert_eq!(
            p(r#"prompt = '"; DROP TABLE cells; --'"#),
            col(
                Column::Prompt,
                Test::Cmp(CmpOp::Eq, text("\"; DROP TABLE cells; --"))
            )
        );
        assert_eq!(
            err(r#"prompt = "a\qb""#),
            "1:12: unknown escape '\\q' (use \\\\ for a backslash)"
        );
        assert_eq!(
            err("prompt = \"open"),
            "1:10: unterminated string: no closing \""
        );
        assert_eq!(
            err(r"prompt = 'a\u{0}'"),
            "1:12: strings cannot contain NUL"
        );
        assert_eq!(
            err(r"prompt = 'a\0'"),
            "1:12: unknown escape '\\0' (use \\\\ for a backslash)"
        );
        assert_eq!(err("prompt = 'a\0'"), "1:12: strings cannot contain NUL");
        assert_eq!(
            err(r"prompt = '\u{D800}'"),
            "1:11: \\u{D800} is not a unicode scalar value"
        );
    }

    #[test]
    fn values_are_typed() {
        assert_eq!(
            p("cfg = 2"),
            col(Column::Cfg, Test::Cmp(CmpOp::Eq, Value::Number(2.0)))
        );
        assert_eq!(
            p("seed >= -1"),
            col(Column::Seed, Test::Cmp(CmpOp::Ge, Value::Int(-1)))
        );
        assert_eq!(
            p("sweep in ('foxes', 3)"),
            Filter::Or(vec![
                col(Column::Sweep, Test::In(vec![text("foxes")])),
                col(Column::Sweep, Test::In(vec![Value::Int(3)])),
            ])
        );
        assert_eq!(
            p("finished >= '2023-11-14T22:13:20Z'"),
            col(
                Column::Finished,
                Test::Cmp(CmpOp::Ge, Value::Int(1_700_000_000_000))
            )
        );
        assert_eq!(
            p("state = 'completed'"),
            col(Column::State, Test::Cmp(CmpOp::Eq, text("completed")))
        );
        assert_eq!(
            p("strength between 0.5 and 1e0"),
            bind(
                "strength",
                Test::Between(Value::Number(0.5), Value::Number(1.0))
            )
        );
    }

    #[test]
    fn type_errors_name_the_position() {
        assert_eq!(err("seed ~ 5"), "1:6: '~' tests text, but seed is a number");
        assert_eq!(
            err("prompt ~ 5"),
            "1:10: '~' needs a string, found the number 5 (write it in quotes)"
        );
        assert_eq!(
            err("cfg = \"abc\""),
            "1:7: cfg is a number, found the string \"abc\" (numbers are written without quotes)"
        );
        assert_eq!(
            err("seed = 1.5"),
            "1:8: seed is a whole number, found 1.5 (or the number is out of range)"
        );
        assert_eq!(
            err("model = 5"),
            "1:9: model is text, found the number 5 (write it in quotes to compare text)"
        );
        assert!(err("prompt < 'b'").starts_with("1:10: prompt is text"));
        assert!(err("animal > 'b'").starts_with("1:10: binding \"animal\" compares"));
        assert!(err("state = 'done'").starts_with("1:9: unknown state \"done\"; states are"));
        assert!(err("finished > 'yesterday'").starts_with("1:12: finished takes unix"));
        assert!(err("sweep < 'a'").starts_with("1:9: sweep names compare only"));
    }

    #[test]
    fn syntax_errors_name_the_position() {
        assert_eq!(
            err("seed >= 5 and cfg >= "),
            "1:22: expected a value after '>='"
        );
        assert_eq!(
            err("seed >= 1000 and cfg >="),
            "1:24: expected a value after '>='"
        );
        assert_eq!(
            err(""),
            "1:1: empty filter: expected a field name, 'not' or '('"
        );
        assert_eq!(
            err("   "),
            "1:1: empty filter: expected a field name, 'not' or '('"
        );
        assert_eq!(
            err("(seed = 1"),
            "1:10: expected ')' to close the '(' at 1:1, found the end of the filter"
        );
        assert_eq!(err("seed = 1)"), "1:9: unmatched ')'");
        assert_eq!(
            err("seed = 1 seed = 2"),
            "1:10: expected 'and', 'or' or the end of the filter, found 'seed'"
        );
        assert_eq!(
            err("seed 5"),
            "1:6: expected an operator (=, !=, <, <=, >, >=, ~, !~, between, in) after seed \
             at 1:1, found the number 5"
        );
        assert_eq!(err("seed == 5"), "1:7: expected a value after '='");
        assert_eq!(err("seed = 5 #"), "1:10: unexpected character '#'");
        assert_eq!(err("seed ! 5"), "1:6: '!' must be followed by '=' or '~'");
        assert_eq!(
            err("seed between 1 or 2"),
            "1:16: expected 'and' in 'between … and …', found 'or'"
        );
        assert_eq!(err("seed in ()"), "1:10: expected a value after '('");
        assert_eq!(
            err("seed in (1 2)"),
            "1:12: expected ',' or ')' in the 'in' list opened at 1:9, found the number 2"
        );
        assert_eq!(
            err("seed in 1"),
            "1:9: expected '(' after 'in', found the number 1"
        );
        assert_eq!(
            err("and = 1"),
            "1:1: expected a field name, found the keyword 'and' (write `and` for a binding \
             of that name)"
        );
        assert!(err("'animal' = 1").starts_with("1:1: expected a field name, found the string"));
        assert_eq!(
            err("seed not = 1"),
            "1:10: expected 'between' or 'in' after 'not', found '='"
        );
        assert_eq!(
            err("seed = 1 and\n  cfg >"),
            "2:8: expected a value after '>'"
        );
        assert_eq!(
            err("seed = 12abc"),
            "1:8: a number cannot run into a name: 12a…"
        );
        assert_eq!(err("seed = -"), "1:8: expected a digit after '-'");
        assert_eq!(err("cfg = 1e999"), "1:7: number 1e999 is out of range");
        assert_eq!(err("`` = 1"), "1:1: empty binding key ``");
        assert_eq!(err("binding('') = 1"), "1:9: empty binding key");
    }

    #[test]
    fn starred_alone_is_a_test_and_rating_a_number() {
        let starred = |v| col(Column::Starred, Test::Cmp(CmpOp::Eq, Value::Int(v)));
        let not = |f| Filter::Not(Box::new(f));
        assert_eq!(p("starred"), starred(1));
        assert_eq!(p("(starred)"), starred(1));
        assert_eq!(p("not starred"), not(starred(1)));
        assert_eq!(p("starred = true"), starred(1));
        assert_eq!(p("starred = FALSE"), starred(0));
        assert_eq!(p("starred != false"), not(starred(0)));
        assert_eq!(
            p("starred in (true, false)"),
            col(
                Column::Starred,
                Test::In(vec![Value::Int(1), Value::Int(0)])
            )
        );
        let rating = |op, v| col(Column::Rating, Test::Cmp(op, Value::Int(v)));
        assert_eq!(
            p("sweep = 'foxes' and starred and rating >= 4"),
            Filter::And(vec![
                col(Column::Sweep, Test::Cmp(CmpOp::Eq, text("foxes"))),
                starred(1),
                rating(CmpOp::Ge, 4),
            ])
        );
        assert_eq!(
            p("starred or rating = 0"),
            Filter::Or(vec![starred(1), rating(CmpOp::Eq, 0)])
        );
        assert_eq!(
            p("rating between 1 and 3"),
            col(Column::Rating, Test::Between(Value::Int(1), Value::Int(3)))
        );
        // Bindings of those names are written in backticks; `true` is a value only for
        // `starred`.
        assert_eq!(
            p("`starred` = 'yes'"),
            bind("starred", Test::Cmp(CmpOp::Eq, text("yes")))
        );
        assert_eq!(
            p("`rating` >= 4"),
            bind("rating", Test::Cmp(CmpOp::Ge, Value::Number(4.0)))
        );
        assert_eq!(
            p("true = 'x'"),
            bind("true", Test::Cmp(CmpOp::Eq, text("x")))
        );
    }

    #[test]
    fn starred_and_rating_type_errors() {
        assert_eq!(
            err("starred = 1"),
            "1:11: starred is true or false, found the number 1"
        );
        assert_eq!(
            err("starred = 'yes'"),
            "1:11: starred is true or false, found the string \"yes\""
        );
        assert_eq!(
            err("starred > false"),
            "1:11: starred is true or false: write it alone, or compare it with =, != or in"
        );
        assert_eq!(
            err("starred ~ 'x'"),
            "1:9: '~' tests text, but starred is true or false"
        );
        assert_eq!(
            err("starred seed = 1"),
            "1:9: expected an operator (=, !=, <, <=, >, >=, ~, !~, between, in) after starred \
             at 1:1, found 'seed'"
        );
        assert_eq!(err("seed = true"), "1:8: expected a value after '='");
        assert_eq!(err("animal = true"), "1:10: expected a value after '='");
        assert_eq!(
            err("rating = 4.5"),
            "1:10: rating is a whole number, found 4.5 (or the number is out of range)"
        );
        assert_eq!(
            err("rating ~ '5'"),
            "1:8: '~' tests text, but rating is a number"
        );
        assert_eq!(
            err("rating"),
            "1:7: expected an operator (=, !=, <, <=, >, >=, ~, !~, between, in) after rating \
             at 1:1, found the end of the filter"
        );
    }

    #[test]
    fn limits() {
        let deep = format!("{}seed = 1{}", "(".repeat(100), ")".repeat(100));
        assert!(err(&deep).contains("nests deeper than 64"));
        let nots = format!("{}seed = 1", "not ".repeat(100));
        assert!(err(&nots).contains("nests deeper than 64"));
        let many = format!(
            "seed in ({})",
            (0..1001)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(err(&many).contains("more than 1000 values"));
        let ors = (0..257)
            .map(|i| format!("seed = {i}"))
            .collect::<Vec<_>>()
            .join(" or ");
        assert!(err(&ors).contains(": more than 256 comparisons"));
        assert!(err(&"x".repeat(20_000)).contains("at most 16384"));
    }
}
