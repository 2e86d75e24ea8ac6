//! The filter language of `kiln query [FILTER]` and `--sort`: a hand-written lexer and
//! recursive-descent parser that turn text into a typed [`Filter`] (and [`SortKey`]s). This
//! module knows no SQL; `store/filter.rs` turns the tree into bound-parameter SQL for each
//! backend, so whatever a user types stays data.
//!
//! # Grammar
//! ```text
//! filter     = or
//! or         = and ("or" and)*
//! and        = unary ("and" unary)*
//! unary      = "not" unary | "(" filter ")" | predicate
//! predicate  = field "=" value | field "!=" value | field "<>" value
//!            | field ("<" | "<=" | ">" | ">=") value
//!            | field "~" string | field "!~" string          (literal substring, case-sensitive)
//!            | field ["not"] "between" value "and" value     (inclusive)
//!            | field ["not"] "in" "(" value ("," value)* ")"
//!            | bool_field                                   (alone: `starred` is `starred = true`)
//! field      = name | `backtick key` | "binding" "(" string ")"
//! bool_field = "starred"
//! value      = string | number | "true" | "false"          (true/false: for `starred` only)
//! string     = "…" | '…'   with escapes \\ \" \' \` \n \r \t \u{1F98A} (no NUL)
//! number     = -?digits(.digits)?([eE][+-]?digits)?
//! ```
//! Keywords (`and`, `or`, `not`, `between`, `in`) are case-insensitive; names are not.
//! `not` binds tighter than `and`, which binds tighter than `or`.
//!
//! # Fields
//! A name that is one of the [`Column`]s below means that column; any other name is a
//! **binding** key (which alternative, wildcard or axis value made the cell). A binding whose
//! key is also a column name, or is not a bare name, is written `` `key` `` or
//! `binding("key")` — so is one named `starred` or `rating` (columns since issue 17; an
//! older sweep's binding of that name is written in backticks now). Bare names are letters,
//! digits, `_`, `.` and `-`, starting with a letter or `_`.
//!
//! # Types
//! - `starred` takes `true` or `false` (`=`, `!=`, `in`), or stands alone as a test;
//!   `rating` (0 to 5, 0: not rated) is an integer column like `seed`.
//! - Integer columns take integers; `cfg` takes any number; text columns take strings;
//!   `state` takes one of the cell states; `finished` takes unix milliseconds or a UTC date
//!   (`"2026-11-26"`, `"2026-11-26T10:30:00Z"`).
//! - `sweep` and `worker` take an id (number) or a name (string; `=`, `!=`, `~`, `!~`, `in`).
//! - `<`, `<=`, `>`, `>=` and `between` need numbers (or dates for `finished`); `~` needs a
//!   string and a text field.
//! - Bindings are stored as strings. A string literal compares text; a number literal compares
//!   numerically with values that are written as a JSON number (`3`, `-1.5`, `2e3`); values that
//!   are not numbers never match a numeric comparison.
//!
//! # Missing values
//! A test of a value the cell does not have (a binding it lacks, `finished` of an unfinished
//! cell, `device` of a cell without a result) is false. The negative forms `!=`, `!~`,
//! `not in` and `not between` are exactly `not` of the positive test, so they are true there:
//! `animal != "fox"` (like `not animal = "fox"`) includes cells without an `animal` binding.
//! Two-valued logic throughout: no SQL `NULL` surprises.
//!
//! # Names that must exist
//! A filter is parsed without knowing what is stored, so any name that is not a column parses
//! as a binding. Before the first page is read, a query checks that every sweep it names by
//! `=`/`in` exists and that some cell of the sweeps in question has every binding it names
//! (in the filter or `--sort`); otherwise it is an error listing the columns and the binding
//! keys there are (`names.rs`), not an empty table. The user's guide to the whole
//! language is `docs/query.md`.

mod ast;
mod lexer;
mod names;
mod parser;
mod sort;
mod time;

pub use ast::{
    CmpOp, Column, ColumnKind, Field, Filter, FilterError, MAX_FILTER_BYTES, MAX_TESTS, MAX_VALUES,
    Pos, Predicate, Test, Value,
};
pub use names::{
    KeyRef, MAX_LISTED, SweepRefs, key_refs, sweep_refs, sweep_scope, unknown_binding,
    unknown_sweep,
};
pub use parser::MAX_DEPTH;
pub use sort::{SortKey, parse_sort};
