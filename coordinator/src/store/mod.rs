//! The only SQL in kiln. One seam, [`Store`], over two databases that behave the same:
//! SQLite (embedded default: one file, WAL, one writer connection) and Postgres (many
//! connections; row locks where several writers may reach for the same rows). Schemas live in
//! `migrations/{sqlite,postgres}/` and are applied at start-up by [`migrate`]. The conformance
//! suite (`tests/it/conformance.rs`) runs every behaviour against both.
//!
//! Every decision and nearly every statement is written once: statements in the SQL both
//! databases accept, run through the seam in [`db`]; what really differs between them (bulk
//! inserts, leases by a list of ids, batched completes, the filter language's JSON functions)
//! lives in `sqlite.rs`, `postgres.rs` and `query.rs`'s `Dialect`. Sweeps are in `sweeps.rs`,
//! the cell lifecycle in `cells.rs`, workers in `workers.rs`, the intake in `intake.rs`.
//!
//! Every worker write is fenced on `(cell, attempt, worker)` and only applies while the cell is
//! `running` under that lease, so a stale attempt can never complete, fail or overwrite a newer
//! one. Decisions about the queue are made in `queue/`: which cells to lease is picked there
//! from a read of the queue (`queue::dispatch`) and the store leases exactly those that are
//! still available; where a failed cell goes is the caller's function, applied inside the
//! failing transaction.

mod cells;
mod db;
mod deadlock;
mod filter;
mod intake;
mod migrate;
mod postgres;
mod query;
mod rows;
mod sqlite;
mod sweeps;
mod tokens;
mod workers;

use std::fmt;
use std::str::FromStr;

use kiln_proto::SweepId;

pub use crate::domain::rows::{IntakeChunk, IntakeRow};
pub use query::{CellQuery, CellSort};

use crate::domain::failure::{Decision, ErrorEntry, FailContext};
use crate::domain::rows::CellRow;
use crate::sweep::NewCell;
use crate::{Error, Result};
use db::Db;

/// Where the database is.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://path` (created if missing).
    Sqlite(String),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl FromStr for DatabaseUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(s.to_string()))
        } else if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(Error::Config("database url: sqlite:// needs a path".into()));
            }
            Ok(DatabaseUrl::Sqlite(s.to_string()))
        } else if s.starts_with("sqlite:") {
            Ok(DatabaseUrl::Sqlite(s.to_string()))
        } else {
            Err(Error::Config(format!(
                "database url {s:?}: expected sqlite://PATH or postgres://…"
            )))
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    // Never print a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(s) => write!(f, "{s}"),
            DatabaseUrl::Postgres(s) => {
                let redacted = match (s.find("://"), s.rfind('@')) {
                    (Some(a), Some(b)) if b > a => format!("{}://…@{}", &s[..a], &s[b + 1..]),
                    _ => s.clone(),
                };
                write!(f, "{redacted}")
            }
        }
    }
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most Postgres connections (SQLite always has one writer and a few readers).
    pub max_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
        }
    }
}

/// A sweep to insert.
#[derive(Clone, Debug)]
pub struct SweepInsert<'a> {
    /// Human name.
    pub name: &'a str,
    /// Client-chosen idempotency key.
    pub idempotency_key: &'a str,
    /// 0..=9, lower first.
    pub priority: i32,
    /// Attempts per cell.
    pub max_attempts: i32,
    /// Sweep file verbatim.
    pub spec: &'a str,
    /// Who submits it (its token's owner); `None` without tokens.
    pub owner: Option<&'a str>,
    /// Validated cells, numbered, inserted into `cells` with the sweep.
    pub cells: &'a [NewCell],
    /// The rest of the submission, numbered after `cells`, stored as intake chunks with the
    /// sweep and moved into `cells` later ([`Store::intake_move`]).
    pub intake: &'a [IntakeChunk],
}

/// Outcome of [`Store::sweep_insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepInserted {
    /// The sweep (new or existing).
    pub id: SweepId,
    /// Cells it has.
    pub cell_count: u64,
    /// True when the key named an existing sweep and nothing was inserted.
    pub duplicate: bool,
}

/// The decision callback for failed attempts.
pub type DecideFn<'a> = &'a (dyn Fn(&FailContext<'_>) -> Decision + Sync);

/// A database holding sweeps, cells and workers.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Connects and applies pending migrations.
    pub async fn connect(url: &DatabaseUrl, opts: &StoreOptions) -> Result<Store> {
        let db = match url {
            DatabaseUrl::Sqlite(u) => sqlite::connect(u).await?,
            DatabaseUrl::Postgres(u) => postgres::connect(u, opts.max_connections).await?,
        };
        Ok(Store { db })
    }

    /// Which backend this is, for logs.
    pub fn backend(&self) -> &'static str {
        match self.db {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.db.close().await;
    }

    /// Cells matching structured filters.
    pub async fn cell_query(&self, q: &CellQuery) -> Result<Vec<CellRow>> {
        match &self.db {
            Db::Sqlite { reader, .. } => sqlite::cell_query(reader, q).await,
            Db::Postgres(pool) => postgres::cell_query(pool, q).await,
        }
    }

    /// Refreshes the query planner's statistics (`ANALYZE`). The query indexes
    /// (`migrations/*/0002_query_indexes.sql`) are only chosen over older ones with statistics;
    /// SQLite never gathers them by itself, Postgres's autovacuum does but lags bulk inserts.
    /// About a second per million cells on SQLite, which holds the write lock meanwhile.
    pub async fn analyze(&self) -> Result<()> {
        let sql = match self.db {
            Db::Sqlite { .. } => "ANALYZE",
            Db::Postgres(_) => "ANALYZE cells, sweeps",
        };
        let mut tx = self.db.begin().await?;
        tx.raw(sql).await?;
        tx.commit().await
    }
}

/// Appends a failure to a stored error history.
fn push_error(errors_json: &str, entry: ErrorEntry) -> Result<Vec<ErrorEntry>> {
    let mut history: Vec<ErrorEntry> = serde_json::from_str(errors_json)
        .map_err(|e| Error::Corrupt(format!("cells.errors: {e}")))?;
    history.push(entry);
    Ok(history)
}

/// Cells a sweep insert adds: its cells and its intake's.
fn cell_count(p: &SweepInsert<'_>) -> u64 {
    p.cells.len() as u64
        + p.intake
            .iter()
            .map(|c| u64::from(c.cell_count))
            .sum::<u64>()
}
