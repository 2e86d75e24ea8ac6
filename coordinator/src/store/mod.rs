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
//! the cell lifecycle in `cells.rs`, workers in `workers.rs`, the intake in `intake.rs`, what a
//! query may name (sweeps, binding keys) in `known.rs`, img2img pictures in `images.rs`, the
//! model registry in `models.rs`.
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
mod failures;
mod farm;
mod filter;
mod images;
mod intake;
mod known;
mod migrate;
mod models;
mod postgres;
mod query;
mod rows;
mod sqlite;
mod sweeps;
mod tokens;
mod workers;

pub use crate::domain::rows::{
    CellFailures, ImageRow, IntakeChunk, IntakeRow, ModelRow, SweepInsert, SweepInserted,
};
pub use query::{CellQuery, CellSort, KeyScope};

pub use crate::config::{DatabaseUrl, StoreOptions};

use crate::domain::failure::{Decision, ErrorEntry, FailContext};
use crate::domain::rows::CellRow;
use crate::{Error, Result};
use db::Db;

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

    /// How many cells match `q`'s filters (its sort, limit and offset play no part): the
    /// number of cells [`Store::cell_query`] pages through.
    pub async fn cell_count(&self, q: &CellQuery) -> Result<u64> {
        match &self.db {
            Db::Sqlite { reader, .. } => sqlite::cell_count(reader, q).await,
            Db::Postgres(pool) => postgres::cell_count(pool, q).await,
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
