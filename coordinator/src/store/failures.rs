//! What the web UI's sweep page reads besides counts: the sweep file as stored, and the
//! failed attempts of its cells (failures grouped by reason): the cells whose error history is
//! not empty, with that history.

use kiln_proto::{CellId, SweepId};

use super::Store;
use super::db::Stmt;
use crate::Result;
use crate::domain::rows::CellFailures;

impl Store {
    /// The stored sweep file (`sweeps.spec`: JSON of the file and what it referenced).
    pub async fn sweep_spec(&self, sweep: SweepId) -> Result<String> {
        Stmt::new("SELECT spec FROM sweeps WHERE id = $1")
            .bind(sweep.0)
            .fetch_optional(self.db.reader())
            .await?
            .ok_or(crate::Error::SweepNotFound(sweep))?
            .text("spec")
    }

    /// Up to `limit` cells of `sweep` with failed attempts, by number.
    pub async fn sweep_failures(&self, sweep: SweepId, limit: i64) -> Result<Vec<CellFailures>> {
        let rows = Stmt::new(
            "SELECT id, number, state, errors FROM cells \
             WHERE sweep_id = $1 AND errors <> '[]' ORDER BY number LIMIT $2",
        )
        .bind(sweep.0)
        .bind(limit)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CellFailures {
                    cell: CellId(r.int("id")?),
                    number: r.int("number")?,
                    state: r
                        .text("state")?
                        .parse()
                        .map_err(|_| crate::Error::Corrupt("cells.state: unknown state".into()))?,
                    errors: serde_json::from_str(&r.text("errors")?)
                        .map_err(|e| crate::Error::Corrupt(format!("cells.errors: {e}")))?,
                })
            })
            .collect()
    }
}
