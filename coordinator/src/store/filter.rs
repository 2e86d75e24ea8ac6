//! Turns a parsed [`Filter`] (and [`SortKey`]s) into a SQL `WHERE` fragment (and `ORDER BY`
//! terms) through sqlx's `QueryBuilder`, for either backend via [`Dialect`]. Every value and
//! every binding key is a bound parameter; the only SQL text written here is fixed per column
//! or operator, so no input can become SQL.
//!
//! Semantics (see [`crate::query`] for the language):
//! - `not x` is `NOT COALESCE((x), FALSE)`: a test of a missing value (SQL `NULL`) counts as
//!   false before it is negated, so logic is two-valued. `and`/`or` need no such wrapping:
//!   `NULL` and `FALSE` behave alike under them and in `WHERE`.
//! - A binding compared with a string compares its text. Compared with a number, it compares
//!   the value as a number when the value is written as a JSON number (optionally surrounded
//!   by JSON whitespace), and is missing (false) otherwise. SQLite checks this with
//!   `json_valid`/`json_type` and compares 64-bit floats; Postgres checks the same grammar with
//!   a regular expression and compares `numeric`. They agree up to 15 significant digits.
//! - `sweep`/`worker` with a string test the name through a sub-select on `sweeps`/`workers`;
//!   sweep-name equalities are first resolved to ids by the store ([`sweep_lookup`],
//!   [`with_sweep_ids`]), so an index on `(sweep_id, …)` serves the sort.

use sqlx::{Database, QueryBuilder};

use super::query::{CellQuery, CellSort, Dialect};
use super::rows::CELL_COLUMNS;
use crate::query::{CmpOp, Column, ColumnKind, Field, Filter, Predicate, SortKey, Test, Value};

/// What a test is applied to.
enum Expr<'a> {
    /// Fixed SQL for a column.
    Sql(&'static str),
    /// A binding's text.
    BindingText(&'a str),
    /// A binding's value as a number, or `NULL` when it is not one.
    BindingNumber(&'a str),
}

/// Appends `f` as one parenthesised boolean SQL expression.
pub(super) fn push_filter<DB: Dialect>(qb: &mut QueryBuilder<DB>, f: &Filter) {
    match f {
        Filter::And(parts) => push_joined(qb, parts, " AND "),
        Filter::Or(parts) => push_joined(qb, parts, " OR "),
        Filter::Not(inner) => {
            qb.push("(NOT COALESCE(");
            push_filter(qb, inner);
            qb.push(", FALSE))");
        }
        Filter::Pred(p) => {
            qb.push("(");
            push_predicate(qb, p);
            qb.push(")");
        }
    }
}

fn push_joined<DB: Dialect>(qb: &mut QueryBuilder<DB>, parts: &[Filter], sep: &str) {
    qb.push("(");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            qb.push(sep);
        }
        push_filter(qb, p);
    }
    qb.push(")");
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
    push_where(&mut qb, q);
    qb.push(" ORDER BY ");
    if q.sorts.is_empty() {
        let dir = if q.descending { "DESC" } else { "ASC" };
        qb.push(match q.sort {
            CellSort::Number => format!("sweep_id {dir}, number {dir}"),
            CellSort::Seed => format!("seed {dir}, id {dir}"),
            CellSort::Cfg => format!("cfg {dir}, id {dir}"),
            CellSort::FinishedAt => format!("finalized_at {dir}, id {dir}"),
        });
    } else {
        push_order(&mut qb, &q.sorts);
    }
    qb.push(" LIMIT ")
        .push_bind(q.limit)
        .push(" OFFSET ")
        .push_bind(q.offset);
    qb
}

/// Builds `SELECT COUNT(*) AS n FROM cells WHERE …`: how many cells [`build`] pages through
/// (its sort, limit and offset play no part).
pub(super) fn build_count<DB>(q: &CellQuery) -> QueryBuilder<DB>
where
    DB: Dialect,
    <DB as Database>::Arguments: Default,
    i64: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    f64: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    String: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::<DB>::new("SELECT COUNT(*) AS n FROM cells WHERE TRUE");
    push_where(&mut qb, q);
    qb
}

/// Appends ` AND …` for every filter of `q`: the `WHERE` of [`build`] and [`build_count`].
fn push_where<DB>(qb: &mut QueryBuilder<DB>, q: &CellQuery)
where
    DB: Dialect,
    i64: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    f64: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
    String: for<'e> sqlx::Encode<'e, DB> + sqlx::Type<DB>,
{
    if let Some(s) = q.sweep {
        qb.push(" AND sweep_id = ").push_bind(s.0);
    }
    if let Some((at, id)) = q.finished_before {
        qb.push(" AND (finalized_at < ")
            .push_bind(at)
            .push(" OR (finalized_at = ")
            .push_bind(at)
            .push(" AND id < ")
            .push_bind(id)
            .push("))");
    }
    if let Some(o) = &q.owner {
        qb.push(" AND sweep_id IN (SELECT id FROM sweeps WHERE owner = ")
            .push_bind(o.clone())
            .push(")");
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
        DB::push_contains(qb, p.clone());
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
        DB::push_binding_eq(qb, k.clone(), v.clone());
    }
    if let Some(f) = &q.filter {
        qb.push(" AND ");
        push_filter(qb, f);
    }
}

/// True when the test's values are text (lists are of one kind; see `Test`).
fn text_test(t: &Test) -> bool {
    match t {
        Test::Cmp(_, v) | Test::Between(v, _) => matches!(v, Value::Text(_)),
        Test::In(vs) => vs.iter().any(|v| matches!(v, Value::Text(_))),
        Test::Contains(_) => true,
    }
}

fn push_predicate<DB: Dialect>(qb: &mut QueryBuilder<DB>, p: &Predicate) {
    match &p.field {
        Field::Binding(key) => {
            let expr = if text_test(&p.test) {
                Expr::BindingText(key)
            } else {
                Expr::BindingNumber(key)
            };
            push_test(qb, &expr, &p.test);
        }
        Field::Column(c @ (Column::Sweep | Column::Worker)) if text_test(&p.test) => {
            // By name: the ids of every sweep (worker) whose name passes the test.
            let (col, table) = if *c == Column::Sweep {
                ("sweep_id", "sweeps")
            } else {
                ("COALESCE(lease_owner, result_worker)", "workers")
            };
            qb.push(format!("{col} IN (SELECT id FROM {table} WHERE "));
            push_test(qb, &Expr::Sql("name"), &p.test);
            qb.push(")");
        }
        // Literal, not bound: the planner can then match `cells_starred`, the partial index
        // `WHERE starred = 1` (a parameter could be any value). Fixed text, never input.
        Field::Column(Column::Starred) if matches!(p.test, Test::Cmp(CmpOp::Eq, Value::Int(_))) => {
            let on = p.test == Test::Cmp(CmpOp::Eq, Value::Int(1));
            qb.push(if on { "starred = 1" } else { "starred = 0" });
        }
        Field::Column(c) => push_test(qb, &Expr::Sql(column_sql::<DB>(*c)), &p.test),
    }
}

/// The SQL of a column (fixed text, never input).
fn column_sql<DB: Dialect>(c: Column) -> &'static str {
    match c {
        Column::Sweep => "sweep_id",
        Column::Id => "id",
        Column::Number => "number",
        Column::State => "state",
        Column::Model => "model",
        Column::Prompt => "prompt",
        Column::Negative => "negative_prompt",
        Column::Seed => "seed",
        Column::Steps => "steps",
        Column::Cfg => "cfg",
        Column::Sampler => "sampler",
        Column::Width => "width",
        Column::Height => "height",
        Column::Worker => "COALESCE(lease_owner, result_worker)",
        Column::Attempt => "attempt",
        Column::Finished => "finalized_at",
        Column::Device => DB::RESULT_DEVICE,
        Column::Sha256 => DB::RESULT_SHA256,
        Column::ObjectKey => DB::RESULT_OBJECT_KEY,
        Column::Starred => "starred",
        Column::Rating => "rating",
        Column::HiresScale => "hires_scale",
        Column::HiresWidth => "hires_width",
        Column::HiresHeight => "hires_height",
        Column::HiresUpscaler => "hires_upscaler",
        Column::HiresSteps => "hires_steps",
        Column::HiresDenoise => "hires_denoise",
    }
}

fn push_expr<DB: Dialect>(qb: &mut QueryBuilder<DB>, e: &Expr<'_>) {
    match e {
        Expr::Sql(s) => {
            qb.push(*s);
        }
        Expr::BindingText(k) => DB::push_binding_text(qb, k),
        Expr::BindingNumber(k) => DB::push_binding_number(qb, k),
    }
}

fn push_value<DB: Dialect>(qb: &mut QueryBuilder<DB>, e: &Expr<'_>, v: &Value) {
    match v {
        Value::Int(n) => DB::push_int(qb, *n),
        Value::Number(f) if matches!(e, Expr::BindingNumber(_)) => DB::push_number(qb, *f),
        Value::Number(f) => DB::push_float(qb, *f),
        Value::Text(s) => DB::push_text(qb, s.clone()),
    }
}

fn push_test<DB: Dialect>(qb: &mut QueryBuilder<DB>, e: &Expr<'_>, t: &Test) {
    match t {
        Test::Cmp(op, v) => {
            push_expr(qb, e);
            qb.push(format!(" {} ", op.as_sql()));
            push_value(qb, e, v);
        }
        Test::Between(lo, hi) => {
            push_expr(qb, e);
            qb.push(" BETWEEN ");
            push_value(qb, e, lo);
            qb.push(" AND ");
            push_value(qb, e, hi);
        }
        // A sweep name that names no sweep (see `with_sweep_ids`).
        Test::In(vs) if vs.is_empty() => {
            qb.push("1 = 0");
        }
        Test::In(vs) => {
            push_expr(qb, e);
            qb.push(" IN (");
            for (i, v) in vs.iter().enumerate() {
                if i > 0 {
                    qb.push(", ");
                }
                push_value(qb, e, v);
            }
            qb.push(")");
        }
        Test::Contains(needle) => {
            // instr/strpos are literal: '%' and '_' are plain characters.
            qb.push(format!("{}(", DB::CONTAINS_FN));
            push_expr(qb, e);
            qb.push(", ");
            DB::push_text(qb, needle.clone());
            qb.push(") > 0");
        }
    }
}

/// Appends `ORDER BY` terms (without the keyword) for `keys`, then the cell id as the
/// tie-breaker in the last key's direction.
pub(super) fn push_order<DB: Dialect>(qb: &mut QueryBuilder<DB>, keys: &[SortKey]) {
    let mut last = "ASC";
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        let dir = if k.descending { "DESC" } else { "ASC" };
        last = dir;
        match &k.field {
            Field::Column(c) => {
                qb.push(column_sql::<DB>(*c));
                let text = matches!(c.kind(), ColumnKind::Text | ColumnKind::State);
                if text {
                    qb.push(DB::TEXT_ORDER);
                }
                qb.push(format!(" {dir}"));
                if c.nullable() {
                    qb.push(" NULLS LAST");
                }
            }
            Field::Binding(key) => {
                // Numbers first by value, then other text, then cells without the binding.
                DB::push_binding_number(qb, key);
                qb.push(format!(" {dir} NULLS LAST, "));
                DB::push_binding_text(qb, key);
                qb.push(DB::TEXT_ORDER);
                qb.push(format!(" {dir} NULLS LAST"));
            }
        }
    }
    qb.push(format!(", id {last}"));
}

/// Names of sweeps tested for equality (`sweep = "…"`, `sweep in ("…")`) anywhere in `f`.
fn sweep_names<'a>(f: &'a Filter, out: &mut Vec<&'a str>) {
    match f {
        Filter::And(parts) | Filter::Or(parts) => parts.iter().for_each(|p| sweep_names(p, out)),
        Filter::Not(inner) => sweep_names(inner, out),
        Filter::Pred(Predicate {
            field: Field::Column(Column::Sweep),
            test,
        }) => match test {
            Test::Cmp(CmpOp::Eq, Value::Text(n)) => out.push(n),
            Test::In(vs) => out.extend(vs.iter().filter_map(|v| match v {
                Value::Text(n) => Some(n.as_str()),
                _ => None,
            })),
            _ => {}
        },
        Filter::Pred(_) => {}
    }
}

/// `SELECT id, name FROM sweeps` for the sweep names `q`'s filter tests for equality, or
/// `None` when it tests none. Its rows go to [`with_sweep_ids`].
pub(super) fn sweep_lookup<DB: Dialect>(q: &CellQuery) -> Option<QueryBuilder<DB>> {
    let mut names = Vec::new();
    sweep_names(q.filter.as_ref()?, &mut names);
    if names.is_empty() {
        return None;
    }
    names.sort_unstable();
    names.dedup();
    let mut qb = QueryBuilder::new("SELECT id, name FROM sweeps WHERE name IN (");
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        DB::push_text(&mut qb, n.to_string());
    }
    qb.push(")");
    Some(qb)
}

/// `q` with every sweep-name equality replaced by the ids those names have now (`ids`: id,
/// name). The planner then sees `sweep_id = 3`, an index prefix it can read in sort order,
/// instead of a sub-select whose result it must join and then sort.
pub(super) fn with_sweep_ids(q: &CellQuery, ids: &[(i64, String)]) -> CellQuery {
    let mut q = q.clone();
    q.filter = q.filter.map(|f| resolve(f, ids));
    q
}

fn resolve(f: Filter, ids: &[(i64, String)]) -> Filter {
    let ids_of = |names: &[&str]| -> Vec<Value> {
        ids.iter()
            .filter(|(_, n)| names.contains(&n.as_str()))
            .map(|(id, _)| Value::Int(*id))
            .collect()
    };
    let by_id = |mut vs: Vec<Value>| {
        let test = if vs.len() == 1 {
            Test::Cmp(CmpOp::Eq, vs.remove(0))
        } else {
            Test::In(vs)
        };
        Filter::Pred(Predicate {
            field: Field::Column(Column::Sweep),
            test,
        })
    };
    match f {
        Filter::And(parts) => Filter::And(parts.into_iter().map(|p| resolve(p, ids)).collect()),
        Filter::Or(parts) => Filter::Or(parts.into_iter().map(|p| resolve(p, ids)).collect()),
        Filter::Not(inner) => Filter::Not(Box::new(resolve(*inner, ids))),
        Filter::Pred(Predicate {
            field: Field::Column(Column::Sweep),
            test: Test::Cmp(CmpOp::Eq, Value::Text(n)),
        }) => by_id(ids_of(&[n.as_str()])),
        Filter::Pred(Predicate {
            field: Field::Column(Column::Sweep),
            test: Test::In(vs),
        }) if vs.iter().all(|v| matches!(v, Value::Text(_))) => {
            let names: Vec<&str> = vs
                .iter()
                .filter_map(|v| match v {
                    Value::Text(n) => Some(n.as_str()),
                    _ => None,
                })
                .collect();
            by_id(ids_of(&names))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{Postgres, Sqlite};

    use super::build;
    use crate::query::{Filter, parse_sort};
    use crate::store::CellQuery;

    /// Every literal and key travels as a parameter: none of these strings reach the SQL text.
    #[test]
    fn values_and_keys_never_reach_the_sql_text() {
        let evil = ["DROP", "1=1", "--", "狐", "%_", "weird"];
        let filter = r#"prompt ~ "'; DROP TABLE cells; --" and `we'ird"; DROP` = '" OR 1=1 --'
            and binding("狐 --") > 1.5 and sweep in ("a'--", 3) and worker ~ "%_"
            and not model in ("x", "DROP") and finished < "2026-11-26""#;
        let q = CellQuery {
            filter: Some(Filter::parse(filter).unwrap()),
            sorts: parse_sort("`weird DROP`, -prompt").unwrap(),
            limit: 10,
            ..Default::default()
        };
        for sql in [
            build::<Sqlite>(&q).into_string(),
            build::<Postgres>(&q).into_string(),
        ] {
            for e in evil {
                assert!(!sql.contains(e), "{e:?} in {sql}");
            }
        }
    }
}
