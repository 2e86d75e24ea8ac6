//! What exists to be named in a query, for `queue/names.rs`: the sweeps a caller may see, by
//! name or id or newest first, and the binding keys of their cells. Read-only statements on the
//! reader. Whether a key exists stops at the first cell that has it (newest first when no
//! sweep is named); only a key that nothing has reads the whole scope, and then the list of
//! keys reads it again — on the way to an error, never on a query that returns rows.

use kiln_proto::SweepId;

use super::Store;
use super::db::{Arg, Db, Stmt};
use super::query::{KeyScope, sqlite_path};
use crate::Result;

/// `scope` as SQL over a table with a `sweep_id` column (`cells`, `intake`), placeholders from
/// `$first`, and the values to bind for them in order.
fn scope_sql(scope: &KeyScope, table: &str, first: usize) -> (String, Vec<Arg<'static>>) {
    let mut sql = String::from("TRUE");
    let mut args = Vec::new();
    if let Some(ids) = &scope.sweeps {
        let marks: Vec<String> = (0..ids.len()).map(|i| format!("${}", first + i)).collect();
        if marks.is_empty() {
            sql.push_str(" AND FALSE");
        } else {
            sql.push_str(&format!(" AND {table}.sweep_id IN ({})", marks.join(", ")));
        }
        args.extend(ids.iter().map(|id| Arg::Int(id.0)));
    }
    if let Some(owner) = &scope.owner {
        sql.push_str(&format!(
            " AND {table}.sweep_id IN (SELECT id FROM sweeps WHERE owner = ${})",
            first + args.len()
        ));
        args.push(Arg::OwnedText(owner.clone()));
    }
    (sql, args)
}

fn bind_all<'a>(mut stmt: Stmt<'a>, args: Vec<Arg<'a>>) -> Stmt<'a> {
    for a in args {
        stmt = stmt.bind(a);
    }
    stmt
}

impl Db {
    /// SQL true when the cell's `bindings` has the key bound at `$n`, and that key's bound
    /// form (a JSON path on SQLite).
    fn has_binding(&self, n: usize, key: &str) -> (String, String) {
        match self {
            Db::Sqlite { .. } => (
                format!("json_extract(cells.bindings, ${n}) IS NOT NULL"),
                sqlite_path(key),
            ),
            Db::Postgres(_) => (
                format!("(cells.bindings ->> ${n}) IS NOT NULL"),
                key.to_string(),
            ),
        }
    }

    /// `SELECT DISTINCT` of every binding key of the cells, by code point, as `key`; a
    /// `WHERE` on `cells` follows.
    fn binding_keys_of_cells(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => {
                "SELECT DISTINCT j.key AS key FROM cells, json_each(cells.bindings) AS j"
            }
            // "C": by code point, as SQLite's BINARY, whatever the database's locale.
            Db::Postgres(_) => {
                "SELECT DISTINCT j.key COLLATE \"C\" AS key \
                 FROM cells, jsonb_object_keys(cells.bindings) AS j(key)"
            }
        }
    }
}

impl Store {
    /// The sweeps `owner` may see (every sweep when `None`) that have one of `names` or `ids`:
    /// (id, name).
    pub async fn sweeps_named(
        &self,
        names: &[String],
        ids: &[i64],
        owner: Option<&str>,
    ) -> Result<Vec<(SweepId, String)>> {
        let mut tests = Vec::new();
        let mut n = 2;
        for (list, column) in [(names.len(), "name"), (ids.len(), "id")] {
            if list > 0 {
                let marks: Vec<String> = (n..n + list).map(|i| format!("${i}")).collect();
                tests.push(format!("{column} IN ({})", marks.join(", ")));
                n += list;
            }
        }
        if tests.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, name FROM sweeps WHERE ($1 IS NULL OR owner = $1) AND ({}) ORDER BY id",
            tests.join(" OR ")
        );
        let mut stmt = Stmt::new(sql).bind(owner);
        for name in names {
            stmt = stmt.bind(name.as_str());
        }
        for id in ids {
            stmt = stmt.bind(*id);
        }
        let rows = stmt.fetch_all(self.db.reader()).await?;
        rows.iter()
            .map(|r| Ok((SweepId(r.int("id")?), r.text("name")?)))
            .collect()
    }

    /// The newest `limit` sweeps `owner` may see: (id, name), newest first.
    pub async fn sweeps_newest(
        &self,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(SweepId, String)>> {
        let rows = Stmt::new(
            "SELECT id, name FROM sweeps WHERE ($1 IS NULL OR owner = $1) ORDER BY id DESC \
             LIMIT $2",
        )
        .bind(owner)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.db.reader())
        .await?;
        rows.iter()
            .map(|r| Ok((SweepId(r.int("id")?), r.text("name")?)))
            .collect()
    }

    /// Whether some cell in `scope` has binding `key`.
    pub async fn binding_key_exists(&self, scope: &KeyScope, key: &str) -> Result<bool> {
        let (test, bound) = self.db.has_binding(1, key);
        let (within, args) = scope_sql(scope, "cells", 2);
        // Newest first when every sweep is searched: the sweeps people query are recent.
        let order = if scope.sweeps.is_none() {
            " ORDER BY cells.id DESC"
        } else {
            ""
        };
        let sql = format!("SELECT 1 AS one FROM cells WHERE {test} AND {within}{order} LIMIT 1");
        let stmt = bind_all(Stmt::new(sql).bind(bound), args);
        Ok(stmt.fetch_optional(self.db.reader()).await?.is_some())
    }

    /// The binding keys of the cells in `scope`, sorted, at most `limit`.
    pub async fn binding_keys(&self, scope: &KeyScope, limit: usize) -> Result<Vec<String>> {
        let (within, args) = scope_sql(scope, "cells", 2);
        let sql = format!(
            "{} WHERE {within} ORDER BY 1 LIMIT $1",
            self.db.binding_keys_of_cells()
        );
        let stmt = bind_all(
            Stmt::new(sql).bind(i64::try_from(limit).unwrap_or(i64::MAX)),
            args,
        );
        let rows = stmt.fetch_all(self.db.reader()).await?;
        rows.iter().map(|r| r.text("key")).collect()
    }

    /// Whether cells of `scope` still wait in the intake (not yet queryable).
    pub async fn intake_pending_in(&self, scope: &KeyScope) -> Result<bool> {
        let (within, args) = scope_sql(scope, "intake", 1);
        let stmt = bind_all(
            Stmt::new(format!(
                "SELECT 1 AS one FROM intake WHERE {within} LIMIT 1"
            )),
            args,
        );
        Ok(stmt.fetch_optional(self.db.reader()).await?.is_some())
    }
}
