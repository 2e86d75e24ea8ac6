//! A cell's way through a lease: where it stands in the queue ([`QueuePos`]), what a worker
//! can take ([`Caps`]), what the dispatcher picked ([`LeasePick`]), what a worker got
//! ([`LeasedCell`]), and the [`Fence`] every later write of that attempt carries.

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};

use crate::Error;
use crate::clock::Millis;
use crate::domain::candidate::Candidate;

/// Where an available cell stands in queue order: sweep priority, then `scheduled_at` (its
/// age, or when its backoff ended), then id. Ordered as the queue is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueuePos {
    /// Sweep priority, lower first.
    pub priority: i64,
    /// When it became due, unix ms.
    pub scheduled_at: i64,
    /// Cell id.
    pub id: i64,
}

/// What a worker can render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Largest width×height.
    pub max_pixels: i64,
    /// Device memory, MiB.
    pub memory_mib: i64,
    /// The render features it understands (`kiln_proto::sampler::RENDER_LEVEL`).
    pub render_level: i64,
}

impl Caps {
    /// Whether a worker with these capabilities can render `c`.
    pub fn allows(&self, c: &AvailableCell) -> bool {
        c.pixels <= self.max_pixels
            && c.min_memory_mib <= self.memory_mib
            && c.render_level <= self.render_level
    }
}

/// An available cell as the dispatcher (`queue::dispatch`) sees it.
#[derive(Clone, Debug)]
pub struct AvailableCell {
    /// Its place in the queue.
    pub pos: QueuePos,
    /// width×height.
    pub pixels: i64,
    /// Least device memory it needs, MiB.
    pub min_memory_mib: i64,
    /// Least worker render level that renders it.
    pub render_level: i64,
    /// What affinity needs of it.
    pub candidate: Candidate,
}

/// The cells one lease has picked (see `queue::dispatch`), for the store to mark running.
#[derive(Clone, Debug)]
pub struct LeasePick {
    /// The worker.
    pub worker: WorkerId,
    /// Picked cell ids, in the order picked.
    pub ids: Vec<i64>,
    /// The head of the worker's window, if any: a leased cell with this id is `was_head`.
    pub head: Option<i64>,
    /// Lease length, ms.
    pub lease_ttl_ms: i64,
    /// The worker's render level: the store leases no picked cell that needs more.
    pub render_level: i64,
}

impl LeasePick {
    /// `leased` (as the store returned them) in pick order.
    pub(crate) fn in_pick_order(&self, mut leased: Vec<LeasedCell>) -> Vec<LeasedCell> {
        leased.sort_by_key(|c| self.ids.iter().position(|id| *id == c.id.0));
        leased
    }
}

/// A cell leased to a worker.
#[derive(Clone, Debug)]
pub struct LeasedCell {
    /// Cell.
    pub id: CellId,
    /// Its sweep.
    pub sweep_id: SweepId,
    /// Number within the sweep.
    pub number: i64,
    /// The attempt this lease is for.
    pub attempt: Attempt,
    /// Identity hash.
    pub cell_key: String,
    /// Pipeline-reuse hash.
    pub affinity_key: String,
    /// Render parameters (JSON).
    pub spec_json: String,
    /// Lease deadline.
    pub lease_expires_at: Millis,
    /// True when this was the head of the lease window (what FIFO would have handed out).
    pub was_head: bool,
}

/// The fence of every worker write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    /// Cell.
    pub cell: CellId,
    /// Attempt the worker holds.
    pub attempt: Attempt,
    /// The worker.
    pub worker: WorkerId,
}

impl Fence {
    pub(crate) fn lost(self) -> Error {
        Error::LeaseLost {
            cell: self.cell,
            attempt: self.attempt,
            worker: self.worker,
        }
    }
}

/// One fenced complete of a batch (`Store::cell_complete_many`).
#[derive(Clone, Copy, Debug)]
pub struct Completion<'a> {
    /// The attempt that finished.
    pub fence: Fence,
    /// Its result document.
    pub result_json: &'a str,
    /// When it finished.
    pub at: Millis,
}

/// Outcome of a heartbeat for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatStatus {
    /// Lease extended.
    Extended,
    /// Lease extended, but a user cancelled the cell.
    CancelRequested,
    /// The worker does not hold this attempt any more.
    Lost,
}
