//! The intake seam of the store (migration 0003): chunks of a large submission, committed with
//! their sweep but not yet rows of `cells`, and the move of one chunk into `cells`. What a chunk
//! holds is `queue::intake`'s business; the store keeps its bytes.

use kiln_proto::SweepId;

use super::Store;
use super::db::{Stmt, Tx};
use super::rows::{self, to_u64};
use crate::Result;
use crate::clock::Millis;
use crate::domain::rows::{IntakeChunk, IntakeRow};
use crate::domain::state::CellState;
use crate::sweep::NewCell;

/// The state a moved chunk's cells are inserted in. Cancelled cells must carry their finish
/// time, which the bulk inserts do not write: they go in held and a second statement finalizes
/// them (a cancelled sweep's intake is rare).
fn insert_state(entry: CellState) -> CellState {
    match entry {
        CellState::Cancelled => CellState::Held,
        other => other,
    }
}

/// Inserts a submission's intake chunks.
pub(super) async fn insert_chunks(
    tx: &mut Tx,
    sweep: i64,
    chunks: &[IntakeChunk],
    now: Millis,
) -> Result<()> {
    for c in chunks {
        Stmt::new(
            "INSERT INTO intake (sweep_id, first_number, cell_count, created_at, cells) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(sweep)
        .bind(i64::from(c.first_number))
        .bind(i64::from(c.cell_count))
        .bind(now.0)
        .bind(c.cells.as_slice())
        .execute(tx.on())
        .await?;
    }
    Ok(())
}

/// Cells of sweep `id` waiting in the intake.
pub(super) async fn count(tx: &mut Tx, id: SweepId) -> Result<u64> {
    let n = Stmt::new(
        "SELECT CAST(coalesce(sum(cell_count), 0) AS BIGINT) FROM intake WHERE sweep_id = $1",
    )
    .bind(id.0)
    .fetch_one(tx.on())
    .await?
    .int(0)?;
    Ok(to_u64(n))
}

impl Store {
    /// The first chunk waiting, in (sweep, number) order, after `after` when given, of sweep
    /// `only` when given.
    pub async fn intake_next(
        &self,
        after: Option<(SweepId, u32)>,
        only: Option<SweepId>,
    ) -> Result<Option<IntakeRow>> {
        let (sweep, first) = after.map_or((-1, -1), |(s, f)| (s.0, i64::from(f)));
        let row = Stmt::new(
            "SELECT sweep_id, first_number, cell_count, created_at, cells FROM intake \
             WHERE (sweep_id, first_number) > ($1, $2) AND ($3 IS NULL OR sweep_id = $3) \
             ORDER BY sweep_id, first_number LIMIT 1",
        )
        .bind(sweep)
        .bind(first)
        .bind(only.map(|s| s.0))
        .fetch_optional(self.db.reader())
        .await?;
        row.as_ref().map(rows::intake).transpose()
    }

    /// Moves `chunk` into `cells`, given its cells decoded (numbered from its first number), and
    /// deletes it, in one transaction that holds the sweep's row: the cells enter in the state
    /// the sweep gives now (`SweepState::entry_state`; cancelled ones finalized at `now`). Returns that
    /// state, or `None` when the chunk is no longer there (another mover took it).
    pub async fn intake_move(
        &self,
        chunk: &IntakeRow,
        cells: &[NewCell],
        now: Millis,
    ) -> Result<Option<CellState>> {
        let mut tx = self.db.begin().await?;
        // The sweep's row first, as cancel, pause and resume take it: its state cannot change
        // under the move, and they count the intake knowing no chunk moves meanwhile.
        let head = self.sweep_head(&mut tx, chunk.sweep_id).await?;
        let gone = Stmt::new("DELETE FROM intake WHERE sweep_id = $1 AND first_number = $2")
            .bind(chunk.sweep_id.0)
            .bind(i64::from(chunk.first_number))
            .execute(tx.on())
            .await?;
        if gone == 0 {
            return Ok(None);
        }
        let state = head.state.entry_state();
        let (sweep, created) = (chunk.sweep_id.0, chunk.created_at);
        self.insert_cells(&mut tx, sweep, &head, insert_state(state), cells, created)
            .await?;
        if state == CellState::Cancelled {
            let first = i64::from(chunk.first_number);
            Stmt::new(
                "UPDATE cells SET state = 'cancelled', finalized_at = $1 WHERE sweep_id = $2 \
                 AND number >= $3 AND number < $4 AND state = 'held'",
            )
            .bind(now.0)
            .bind(sweep)
            .bind(first)
            .bind(first + i64::from(chunk.cell_count))
            .execute(tx.on())
            .await?;
        }
        tx.commit().await?;
        Ok(Some(state))
    }

    /// Cells waiting in the intake, over every sweep.
    pub async fn intake_pending(&self) -> Result<u64> {
        let n = Stmt::new("SELECT CAST(coalesce(sum(cell_count), 0) AS BIGINT) FROM intake")
            .fetch_one(self.db.reader())
            .await?
            .int(0)?;
        Ok(to_u64(n))
    }
}
