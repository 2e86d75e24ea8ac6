//! Cell queries (the `QueryResults` RPC and `kiln query`): structured filters, a parsed
//! filter-language [`Filter`], sort and paging turned into SQL with bound parameters only —
//! every user value is data, never SQL. One builder serves both backends through sqlx's
//! `QueryBuilder`, which writes each dialect's placeholders.

use kiln_proto::{SweepId, WorkerId};
use sqlx::{Database, QueryBuilder};

use crate::domain::state::CellState;
use crate::query::{Filter, SortKey};

/// Sort keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CellSort {
    /// Sweep, then cell number.
    #[default]
    Number,
    /// Seed.
    Seed,
    /// Guidance scale.
    Cfg,
    /// Time finished.
    FinishedAt,
}

/// Filters (ANDed), sort and page of a cell query.
#[derive(Clone, Debug, Default)]
pub struct CellQuery {
    /// Only this sweep.
    pub sweep: Option<SweepId>,
    /// Only sweeps of this owner (a non-admin token's caller).
    pub owner: Option<String>,
    /// Only these states (empty: all).
    pub states: Vec<CellState>,
    /// Literal substring of the prompt.
    pub prompt_contains: Option<String>,
    /// Exact model reference.
    pub model: Option<String>,
    /// Seed lower bound (inclusive).
    pub seed_min: Option<i64>,
    /// Seed upper bound (inclusive).
    pub seed_max: Option<i64>,
    /// CFG lower bound (inclusive).
    pub cfg_min: Option<f64>,
    /// CFG upper bound (inclusive).
    pub cfg_max: Option<f64>,
    /// Completed by, or running on, this worker.
    pub worker: Option<WorkerId>,
    /// Bindings that must be present with exactly these values.
    pub bindings: Vec<(String, String)>,
    /// A filter-language filter, ANDed with the structured filters above.
    pub filter: Option<Filter>,
    /// Sort key (used when `sorts` is empty).
    pub sort: CellSort,
    /// Descending order (for `sort`).
    pub descending: bool,
    /// Sort keys from `--sort`; when non-empty they replace `sort` and `descending`.
    pub sorts: Vec<SortKey>,
    /// Only cells finished before this position in newest-first order (`finalized_at`, then
    /// id): paging by the last row seen, for `CellSort::FinishedAt` descending. Unlike an
    /// offset it stays on the index however deep the page.
    pub finished_before: Option<(i64, i64)>,
    /// Page size.
    pub limit: i64,
    /// Rows to skip.
    pub offset: i64,
}

/// The cells a binding key is looked for in (`Store::binding_key_exists`,
/// `Store::binding_keys`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyScope {
    /// Only cells of these sweeps; `None`: of every sweep.
    pub sweeps: Option<Vec<SweepId>>,
    /// Only cells of this owner's sweeps.
    pub owner: Option<String>,
}

/// How each backend spells the parts that differ. Values go through the `push_*` binders, so
/// callers need no per-type bounds; every `push_*` writes a placeholder, never the value.
pub(super) trait Dialect: Database {
    /// Substring function `(haystack, needle) -> position from 1, 0 when absent`.
    const CONTAINS_FN: &'static str;
    /// Suffix that makes text sort by code point.
    const TEXT_ORDER: &'static str;
    /// `result.device` (NULL without a result).
    const RESULT_DEVICE: &'static str;
    /// `result.sha256`.
    const RESULT_SHA256: &'static str;
    /// `result.object_key`.
    const RESULT_OBJECT_KEY: &'static str;

    /// Binds an integer.
    fn push_int(qb: &mut QueryBuilder<Self>, v: i64);
    /// Binds a float, compared with a REAL / DOUBLE PRECISION column.
    fn push_float(qb: &mut QueryBuilder<Self>, v: f64);
    /// Binds text.
    fn push_text(qb: &mut QueryBuilder<Self>, v: String);
    /// Binds a number comparable with [`Dialect::push_binding_number`].
    fn push_number(qb: &mut QueryBuilder<Self>, v: f64);
    /// The text of binding `key` (NULL when the cell lacks it); the key is bound.
    fn push_binding_text(qb: &mut QueryBuilder<Self>, key: &str);
    /// Binding `key` as a number, NULL when it is missing or not written as a JSON number.
    fn push_binding_number(qb: &mut QueryBuilder<Self>, key: &str);

    /// `bindings` value at a key bound next, compared with a value bound after it.
    fn push_binding_eq(qb: &mut QueryBuilder<Self>, key: String, value: String) {
        Self::push_binding_text(qb, &key);
        qb.push(" = ");
        Self::push_text(qb, value);
    }
    /// `prompt` contains the literal bound next.
    fn push_contains(qb: &mut QueryBuilder<Self>, needle: String) {
        qb.push(format!("{}(prompt, ", Self::CONTAINS_FN));
        Self::push_text(qb, needle);
        qb.push(") > 0");
    }
}

/// The binders that are the same for both: the value as it is.
macro_rules! plain_binders {
    () => {
        fn push_int(qb: &mut QueryBuilder<Self>, v: i64) {
            qb.push_bind(v);
        }
        fn push_float(qb: &mut QueryBuilder<Self>, v: f64) {
            qb.push_bind(v);
        }
        fn push_text(qb: &mut QueryBuilder<Self>, v: String) {
            qb.push_bind(v);
        }
    };
}

/// The JSON path of a binding key for SQLite: quoted, so any character is a literal.
pub(super) fn sqlite_path(key: &str) -> String {
    format!("$.\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Dialect for sqlx::Sqlite {
    // instr() is literal: no LIKE wildcards to escape.
    const CONTAINS_FN: &'static str = "instr";
    // SQLite's default BINARY collation compares UTF-8 bytes, i.e. code points.
    const TEXT_ORDER: &'static str = "";
    const RESULT_DEVICE: &'static str = "json_extract(result, '$.device')";
    const RESULT_SHA256: &'static str = "json_extract(result, '$.sha256')";
    const RESULT_OBJECT_KEY: &'static str = "json_extract(result, '$.object_key')";

    plain_binders!();
    fn push_number(qb: &mut QueryBuilder<Self>, v: f64) {
        qb.push_bind(v);
    }
    fn push_binding_text(qb: &mut QueryBuilder<Self>, key: &str) {
        qb.push("json_extract(bindings, ")
            .push_bind(sqlite_path(key))
            .push(")");
    }
    fn push_binding_number(qb: &mut QueryBuilder<Self>, key: &str) {
        // json_valid (strict RFC 8259) guards json_type, which raises on malformed JSON;
        // CASE evaluates lazily, so the cast only sees JSON numbers.
        qb.push("(CASE WHEN json_valid(");
        Self::push_binding_text(qb, key);
        qb.push(") THEN CASE WHEN json_type(");
        Self::push_binding_text(qb, key);
        qb.push(") IN ('integer', 'real') THEN CAST(");
        Self::push_binding_text(qb, key);
        qb.push(" AS REAL) END END)");
    }
}

/// JSON's number grammar with surrounding JSON whitespace: what SQLite's `json_valid` +
/// `json_type` accept as a number, so both backends agree on which values are numbers.
const PG_JSON_NUMBER: &str =
    r"'^[ \t\n\r]*-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?[ \t\n\r]*$'";

impl Dialect for sqlx::Postgres {
    const CONTAINS_FN: &'static str = "strpos";
    // The database's collation may be locale-aware; "C" sorts by code point, like SQLite.
    const TEXT_ORDER: &'static str = " COLLATE \"C\"";
    const RESULT_DEVICE: &'static str = "(result::jsonb ->> 'device')";
    const RESULT_SHA256: &'static str = "(result::jsonb ->> 'sha256')";
    const RESULT_OBJECT_KEY: &'static str = "(result::jsonb ->> 'object_key')";

    plain_binders!();
    fn push_number(qb: &mut QueryBuilder<Self>, v: f64) {
        // numeric, not float8: a binding like "1e400" is a valid number that float8 rejects
        // with an error. Rust prints finite f64s without exponents, which numeric reads.
        qb.push_bind(v.to_string()).push("::numeric");
    }
    fn push_binding_text(qb: &mut QueryBuilder<Self>, key: &str) {
        qb.push("(bindings ->> ")
            .push_bind(key.to_string())
            .push(")");
    }
    fn push_binding_number(qb: &mut QueryBuilder<Self>, key: &str) {
        qb.push("(CASE WHEN ");
        Self::push_binding_text(qb, key);
        qb.push(format!(" ~ {PG_JSON_NUMBER} THEN "));
        Self::push_binding_text(qb, key);
        qb.push("::numeric END)");
    }
}
