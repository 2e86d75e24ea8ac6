//! Structured cell queries (the `QueryResults` RPC): filters, sort and paging turned into SQL
//! with bound parameters only — every user value is data, never SQL. One builder serves both
//! backends through sqlx's `QueryBuilder`, which writes each dialect's placeholders.

use kiln_proto::{SweepId, WorkerId};
use sqlx::{Database, QueryBuilder};

use crate::queue::state::CellState;

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
    /// Sort key.
    pub sort: CellSort,
    /// Descending order.
    pub descending: bool,
    /// Page size.
    pub limit: i64,
    /// Rows to skip.
    pub offset: i64,
}

/// The columns every cell read returns, in `CellRow` order.
pub(super) const CELL_COLUMNS: &str = "id, sweep_id, number, cell_key, spec, state, attempt, \
    max_attempts, errors, result, COALESCE(lease_owner, result_worker) AS worker, finalized_at";

/// How each backend spells the parts that differ.
pub(super) trait Dialect: Database {
    /// `bindings` value at a key bound next, compared with a value bound after it.
    fn push_binding_eq(qb: &mut QueryBuilder<Self>, key: String, value: String);
    /// `prompt` contains the literal bound next.
    fn push_contains(qb: &mut QueryBuilder<Self>, needle: String);
}

impl Dialect for sqlx::Sqlite {
    fn push_binding_eq(qb: &mut QueryBuilder<Self>, key: String, value: String) {
        // The key travels as a bound JSON path, quoted so any character is a literal.
        let path = format!("$.\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
        qb.push("json_extract(bindings, ")
            .push_bind(path)
            .push(") = ")
            .push_bind(value);
    }
    fn push_contains(qb: &mut QueryBuilder<Self>, needle: String) {
        // instr() is literal: no LIKE wildcards to escape.
        qb.push("instr(prompt, ").push_bind(needle).push(") > 0");
    }
}

impl Dialect for sqlx::Postgres {
    fn push_binding_eq(qb: &mut QueryBuilder<Self>, key: String, value: String) {
        qb.push("bindings ->> ")
            .push_bind(key)
            .push(" = ")
            .push_bind(value);
    }
    fn push_contains(qb: &mut QueryBuilder<Self>, needle: String) {
        qb.push("strpos(prompt, ").push_bind(needle).push(") > 0");
    }
}

/// Builds `SELECT … FROM cells WHERE … ORDER BY … LIMIT … OFFSET …`.
pub(super) fn build<DB>(q: &CellQuery) -> QueryBuilder<DB>
where
    DB: Dialect,
    <DB as Database>::Arguments: Default,
    i64: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    f64: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    String: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::<DB>::new(format!("SELECT {CELL_COLUMNS} FROM cells WHERE TRUE"));
    if let Some(s) = q.sweep {
        qb.push(" AND sweep_id = ").push_bind(s.0);
    }
    if !q.states.is_empty() {
        qb.push(" AND state IN (");
        let mut sep = qb.separated(", ");
        for s in &q.states {
            sep.push_bind(s.as_str().to_string());
        }
        qb.push(")");
    }
    if let Some(p) = &q.prompt_contains {
        qb.push(" AND ");
        DB::push_contains(&mut qb, p.clone());
    }
    if let Some(m) = &q.model {
        qb.push(" AND model = ").push_bind(m.clone());
    }
    if let Some(v) = q.seed_min {
        qb.push(" AND seed >= ").push_bind(v);
    }
    if let Some(v) = q.seed_max {
        qb.push(" AND seed <= ").push_bind(v);
    }
    if let Some(v) = q.cfg_min {
        qb.push(" AND cfg >= ").push_bind(v);
    }
    if let Some(v) = q.cfg_max {
        qb.push(" AND cfg <= ").push_bind(v);
    }
    if let Some(w) = q.worker {
        qb.push(" AND (result_worker = ")
            .push_bind(w.0)
            .push(" OR lease_owner = ")
            .push_bind(w.0)
            .push(")");
    }
    for (k, v) in &q.bindings {
        qb.push(" AND ");
        DB::push_binding_eq(&mut qb, k.clone(), v.clone());
    }
    let dir = if q.descending { "DESC" } else { "ASC" };
    let order = match q.sort {
        CellSort::Number => format!("sweep_id {dir}, number {dir}"),
        CellSort::Seed => format!("seed {dir}, id {dir}"),
        CellSort::Cfg => format!("cfg {dir}, id {dir}"),
        CellSort::FinishedAt => format!("finalized_at {dir}, id {dir}"),
    };
    qb.push(format!(" ORDER BY {order} LIMIT "))
        .push_bind(q.limit)
        .push(" OFFSET ")
        .push_bind(q.offset);
    qb
}
