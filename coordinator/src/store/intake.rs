//! The intake seam of the store (migration 0003): chunks of a large submission, committed with
//! their sweep but not yet rows of `cells`, and the move of one chunk into `cells`. What a chunk
//! holds is `queue::intake`'s business; the store keeps its bytes.

use kiln_proto::SweepId;

use super::Store;
use crate::Result;
use crate::clock::Millis;
use crate::domain::state::CellState;
use crate::sweep::NewCell;

/// One chunk of a submission, to insert with its sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntakeChunk {
    /// Number of its first cell; the rest follow in order.
    pub first_number: u32,
    /// Cells in it.
    pub cell_count: u32,
    /// The encoded cells.
    pub cells: Vec<u8>,
}

/// A stored chunk waiting to be moved into `cells`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntakeRow {
    /// Its sweep.
    pub sweep_id: SweepId,
    /// Number of its first cell.
    pub first_number: u32,
    /// Cells in it.
    pub cell_count: u32,
    /// The submit's time, which its cells keep as `created_at` and `scheduled_at`.
    pub created_at: Millis,
    /// The encoded cells.
    pub cells: Vec<u8>,
}

impl IntakeRow {
    /// Its key: (sweep, first number).
    pub fn key(&self) -> (SweepId, u32) {
        (self.sweep_id, self.first_number)
    }
}

/// The state cells entering a sweep in `sweep_state` take: what an extend or an intake move
/// inserts, and how a sweep's counts show its intake (the SQL of both backends' counts says the
/// same in a `CASE`).
pub(super) fn entry_state(sweep_state: crate::domain::state::SweepState) -> CellState {
    use crate::domain::state::SweepState;
    match sweep_state {
        SweepState::Active => CellState::Available,
        SweepState::Paused => CellState::Held,
        SweepState::Cancelled => CellState::Cancelled,
    }
}

/// The state a moved chunk's cells are inserted in. Cancelled cells must carry their finish
/// time, which the bulk inserts do not write: they go in held and a second statement finalizes
/// them (a cancelled sweep's intake is rare).
pub(super) fn insert_state(entry: CellState) -> CellState {
    match entry {
        CellState::Cancelled => CellState::Held,
        other => other,
    }
}

impl Store {
    /// The first chunk waiting, in (sweep, number) order, after `after` when given, of sweep
    /// `only` when given.
    pub async fn intake_next(
        &self,
        after: Option<(SweepId, u32)>,
        only: Option<SweepId>,
    ) -> Result<Option<IntakeRow>> {
        delegate!(self, intake_next(after, only))
    }

    /// Moves `chunk` into `cells`, given its cells decoded (numbered from its first number), and
    /// deletes it, in one transaction that holds the sweep's row: the cells enter in the state
    /// the sweep gives now ([`entry_state`]; cancelled ones finalized at `now`). Returns that
    /// state, or `None` when the chunk is no longer there (another mover took it).
    pub async fn intake_move(
        &self,
        chunk: &IntakeRow,
        cells: &[NewCell],
        now: Millis,
    ) -> Result<Option<CellState>> {
        delegate!(self, intake_move(chunk, cells, now))
    }

    /// Cells waiting in the intake, over every sweep.
    pub async fn intake_pending(&self) -> Result<u64> {
        delegate!(self, intake_pending())
    }
}
