//! The seam between the store's statements and its two databases. A statement is written once,
//! in SQL both SQLite and Postgres accept, with `$n` placeholders (SQLite reads `$n` as
//! parameter n): a [`Stmt`] is that text and its arguments, run on a pool or inside a [`Tx`],
//! and a [`Row`] reads a result row of either. What really differs is named here — the pools
//! ([`Db`]), row locks ([`Db::for_update`]) — or lives in `sqlite.rs` and `postgres.rs` (bulk
//! inserts, leases by id list, batched completes).

use std::borrow::Cow;

use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, ColumnIndex, Postgres, Row as _, Sqlite, Transaction};

use crate::clock::Millis;
use crate::{Error, Result};

/// The connections of one database.
#[derive(Clone, Debug)]
pub(super) enum Db {
    /// SQLite: every write through the one-connection `writer` (SQLite has one writer lock),
    /// reads through `reader`, which WAL lets run beside it.
    Sqlite {
        /// One connection.
        writer: SqlitePool,
        /// A few read-only connections.
        reader: SqlitePool,
    },
    /// Postgres: one pool for everything.
    Postgres(PgPool),
}

impl Db {
    /// Where reads run.
    pub(super) fn reader(&self) -> On<'_> {
        match self {
            Db::Sqlite { reader, .. } => On::SqlitePool(reader),
            Db::Postgres(p) => On::PgPool(p),
        }
    }

    /// Where single-statement writes run.
    pub(super) fn writer(&self) -> On<'_> {
        match self {
            Db::Sqlite { writer, .. } => On::SqlitePool(writer),
            Db::Postgres(p) => On::PgPool(p),
        }
    }

    /// A transaction (on SQLite's writer).
    pub(super) async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite { writer, .. } => Tx::Sqlite(writer.begin().await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// `" FOR UPDATE"` where rows can be locked (Postgres); nothing on SQLite, whose one
    /// writer already excludes every other write.
    pub(super) fn for_update(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "",
            Db::Postgres(_) => " FOR UPDATE",
        }
    }

    /// The table the dispatcher reads available cells from. SQLite is told to scan
    /// `cells_fetch`, the queue-order index, which it may otherwise not choose without
    /// statistics.
    pub(super) fn queue_scan(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "cells INDEXED BY cells_fetch",
            Db::Postgres(_) => "cells",
        }
    }

    /// Closes every connection.
    pub(super) async fn close(&self) {
        match self {
            Db::Sqlite { writer, reader } => {
                reader.close().await;
                writer.close().await;
            }
            Db::Postgres(p) => p.close().await,
        }
    }
}

/// A transaction of either database.
pub(super) enum Tx {
    /// On SQLite's writer.
    Sqlite(Transaction<'static, Sqlite>),
    /// On a Postgres connection.
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    /// Where statements of this transaction run.
    pub(super) fn on(&mut self) -> On<'_> {
        match self {
            Tx::Sqlite(t) => On::Sqlite(t),
            Tx::Postgres(t) => On::Pg(t),
        }
    }

    /// Commits.
    pub(super) async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }

    /// Runs `sql` as given, without arguments (schema changes, `ANALYZE`).
    pub(super) async fn raw(&mut self, sql: &'static str) -> Result<()> {
        match self {
            Tx::Sqlite(t) => sqlx::raw_sql(sql).execute(&mut **t).await.map(|_| ())?,
            Tx::Postgres(t) => sqlx::raw_sql(sql).execute(&mut **t).await.map(|_| ())?,
        }
        Ok(())
    }
}

/// Where a statement runs: a pool, or a connection inside a transaction.
pub(super) enum On<'c> {
    SqlitePool(&'c SqlitePool),
    Sqlite(&'c mut SqliteConnection),
    PgPool(&'c PgPool),
    Pg(&'c mut PgConnection),
}

/// One bound value.
#[derive(Clone, Debug)]
pub(super) enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OwnedText(String),
    OptText(Option<&'a str>),
    Bytes(&'a [u8]),
}

/// `Arg::$variant` from a `$t`.
macro_rules! arg_from {
    ($($t:ty => $variant:ident),+ $(,)?) => {
        $(impl<'a> From<$t> for Arg<'a> {
            fn from(v: $t) -> Self {
                Arg::$variant(v as _)
            }
        })+
    };
}

arg_from!(
    i64 => Int,
    Option<i64> => OptInt,
    &'a str => Text,
    &'a String => Text,
    String => OwnedText,
    Option<&'a str> => OptText,
    &'a [u8] => Bytes,
);

/// A statement and its arguments, `$1` the first.
pub(super) struct Stmt<'a> {
    sql: Cow<'static, str>,
    args: Vec<Arg<'a>>,
}

/// Runs `$query` (a function of the statement for one backend) on `$on` with `$method`, and
/// hands what it returns to `$wrap` with the backend's row constructor.
macro_rules! run {
    ($self:ident, $on:ident, $method:ident, |$r:ident, $row:ident| $wrap:expr) => {
        match $on {
            On::SqlitePool(p) => {
                let ($r, $row) = ($self.sqlite().$method(p).await?, Row::Sqlite);
                $wrap
            }
            On::Sqlite(c) => {
                let ($r, $row) = ($self.sqlite().$method(c).await?, Row::Sqlite);
                $wrap
            }
            On::PgPool(p) => {
                let ($r, $row) = ($self.postgres().$method(p).await?, Row::Postgres);
                $wrap
            }
            On::Pg(c) => {
                let ($r, $row) = ($self.postgres().$method(c).await?, Row::Postgres);
                $wrap
            }
        }
    };
}

/// The sqlx query of a [`Stmt`] for the backend the caller's return type names.
macro_rules! bound {
    ($stmt:ident) => {{
        let mut q = sqlx::query(AssertSqlSafe($stmt.sql));
        for a in $stmt.args {
            q = match a {
                Arg::Int(v) => q.bind(v),
                Arg::OptInt(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::OwnedText(v) => q.bind(v),
                Arg::OptText(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
            };
        }
        q
    }};
}

impl<'a> Stmt<'a> {
    /// `sql` with no arguments yet.
    pub(super) fn new(sql: impl Into<Cow<'static, str>>) -> Self {
        Stmt {
            sql: sql.into(),
            args: Vec::new(),
        }
    }

    /// Binds the next placeholder.
    pub(super) fn bind(mut self, v: impl Into<Arg<'a>>) -> Self {
        self.args.push(v.into());
        self
    }

    fn sqlite(self) -> Query<'static, Sqlite, SqliteArguments> {
        bound!(self)
    }

    fn postgres(self) -> Query<'static, Postgres, PgArguments> {
        bound!(self)
    }

    /// Every row.
    pub(super) async fn fetch_all(self, on: On<'_>) -> Result<Vec<Row>> {
        run!(self, on, fetch_all, |r, row| Ok(r
            .into_iter()
            .map(row)
            .collect()))
    }

    /// The first row, if any.
    pub(super) async fn fetch_optional(self, on: On<'_>) -> Result<Option<Row>> {
        run!(self, on, fetch_optional, |r, row| Ok(r.map(row)))
    }

    /// The one row.
    pub(super) async fn fetch_one(self, on: On<'_>) -> Result<Row> {
        run!(self, on, fetch_one, |r, row| Ok(row(r)))
    }

    /// Runs it; returns rows changed.
    pub(super) async fn execute(self, on: On<'_>) -> Result<u64> {
        run!(self, on, execute, |r, _row| Ok(r.rows_affected()))
    }
}

/// A result row of either database. Every integer column is read as `i64` (Postgres `BIGINT`,
/// SQLite `INTEGER`).
pub(super) enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

/// A column, by name or position.
pub(super) trait Col: ColumnIndex<SqliteRow> + ColumnIndex<PgRow> + std::fmt::Debug {}
impl<T: ColumnIndex<SqliteRow> + ColumnIndex<PgRow> + std::fmt::Debug> Col for T {}

macro_rules! get {
    ($self:ident, $col:ident, $t:ty) => {
        match $self {
            Row::Sqlite(r) => r.try_get::<$t, _>($col).map_err(Error::from),
            Row::Postgres(r) => r.try_get::<$t, _>($col).map_err(Error::from),
        }
    };
}

impl Row {
    pub(super) fn int(&self, col: impl Col) -> Result<i64> {
        get!(self, col, i64)
    }
    pub(super) fn opt_int(&self, col: impl Col) -> Result<Option<i64>> {
        get!(self, col, Option<i64>)
    }
    pub(super) fn text(&self, col: impl Col) -> Result<String> {
        get!(self, col, String)
    }
    pub(super) fn opt_text(&self, col: impl Col) -> Result<Option<String>> {
        get!(self, col, Option<String>)
    }
    pub(super) fn bytes(&self, col: impl Col) -> Result<Vec<u8>> {
        get!(self, col, Vec<u8>)
    }
}

/// A cell's `hires_*` columns (migration 0007), all `None` without a hires fix: what both
/// bulk inserts write.
pub(super) struct HiresColumns {
    /// The scale asked for (4 decimals); `None` when a size was.
    pub scale: Option<f64>,
    /// The final width in pixels.
    pub width: Option<i64>,
    /// The final height in pixels.
    pub height: Option<i64>,
    /// The upscaler's kiln name.
    pub upscaler: Option<&'static str>,
    /// Second-pass steps as written (0: the first pass's).
    pub steps: Option<i64>,
    /// Denoising strength (4 decimals).
    pub denoise: Option<f64>,
}

impl HiresColumns {
    /// The columns of `s`.
    pub(super) fn of(s: &crate::sweep::CellSpec) -> Self {
        let on = s.hires.as_ref();
        let (w, h) = s.final_size();
        Self {
            scale: s.hires_scale_decimal(),
            width: on.map(|_| i64::from(w)),
            height: on.map(|_| i64::from(h)),
            upscaler: on.map(|h| h.upscaler.as_str()),
            steps: on.map(|h| i64::from(h.steps)),
            denoise: s.hires_denoise_decimal(),
        }
    }
}

/// What every cell of one bulk insert shares (`sqlite::insert_cells`, `postgres::copy`).
pub(super) struct BulkInsert<'a> {
    /// The sweep.
    pub sweep: i64,
    /// Its priority.
    pub priority: i64,
    /// Attempts per cell.
    pub max_attempts: i64,
    /// The state the cells enter.
    pub state: &'a str,
    /// Their `created_at` and `scheduled_at`.
    pub now: Millis,
}
