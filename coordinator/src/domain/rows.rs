//! What the store returns and the API shows: a sweep with its counts per state, a cell with
//! its outcome, a running attempt's progress, a worker with what it declared, and the chunks
//! of a large submission waiting in the intake (`queue::intake`). Plain data,
//! decoded from rows by `store::rows`.

use kiln_proto::{CellId, SweepId, WorkerId};

use crate::clock::Millis;
use crate::sweep::NewCell;

use crate::domain::state::{CellState, DeviceKind, ModelKind, SweepState};

/// Cells of a sweep per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Available.
    pub available: u64,
    /// Scheduled.
    pub scheduled: u64,
    /// Running.
    pub running: u64,
    /// Retryable.
    pub retryable: u64,
    /// Held (paused).
    pub held: u64,
    /// Completed.
    pub completed: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Discarded.
    pub discarded: u64,
}

impl StateCounts {
    /// Every cell.
    pub fn total(&self) -> u64 {
        self.available
            + self.scheduled
            + self.running
            + self.retryable
            + self.held
            + self.completed
            + self.cancelled
            + self.discarded
    }

    /// True when nothing is queued or running.
    pub fn finished(&self) -> bool {
        self.completed + self.cancelled + self.discarded == self.total()
    }

    pub(crate) fn add(&mut self, state: CellState, n: u64) {
        let slot = match state {
            CellState::Available => &mut self.available,
            CellState::Scheduled => &mut self.scheduled,
            CellState::Running => &mut self.running,
            CellState::Retryable => &mut self.retryable,
            CellState::Held => &mut self.held,
            CellState::Completed => &mut self.completed,
            CellState::Cancelled => &mut self.cancelled,
            CellState::Discarded => &mut self.discarded,
        };
        *slot += n;
    }

    /// The cells in `state`.
    pub fn get(&self, state: CellState) -> u64 {
        match state {
            CellState::Available => self.available,
            CellState::Scheduled => self.scheduled,
            CellState::Running => self.running,
            CellState::Retryable => self.retryable,
            CellState::Held => self.held,
            CellState::Completed => self.completed,
            CellState::Cancelled => self.cancelled,
            CellState::Discarded => self.discarded,
        }
    }
}

/// A sweep with its cell counts.
#[derive(Clone, Debug)]
pub struct SweepRow {
    /// Id.
    pub id: SweepId,
    /// Name.
    pub name: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Priority.
    pub priority: i32,
    /// Attempts per cell.
    pub max_attempts: i32,
    /// State.
    pub state: SweepState,
    /// Created, unix ms.
    pub created_at: i64,
    /// Who submitted it (its token's owner); `None` without tokens.
    pub owner: Option<String>,
    /// Cells per state.
    pub counts: StateCounts,
}

/// The most stars a cell's rating has (`CellRow::rating`; the schema's CHECK says the same).
pub const MAX_RATING: u8 = 5;

/// A cell with its outcome.
#[derive(Clone, Debug)]
pub struct CellRow {
    /// Cell.
    pub id: CellId,
    /// Sweep.
    pub sweep_id: SweepId,
    /// Number within the sweep.
    pub number: i64,
    /// Identity hash.
    pub cell_key: String,
    /// Render parameters (JSON).
    pub spec_json: String,
    /// State.
    pub state: CellState,
    /// Attempts made.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Failed attempts (JSON array of `ErrorEntry`).
    pub errors_json: String,
    /// Result (JSON), when completed.
    pub result_json: Option<String>,
    /// Lease holder (running) or winner (completed).
    pub worker: Option<WorkerId>,
    /// When it reached a terminal state.
    pub finalized_at: Option<i64>,
    /// Marked as a keeper by a user.
    pub starred: bool,
    /// A user's rating, 1 to [`MAX_RATING`] stars; 0 when not rated.
    pub rating: u8,
}

/// Per-step progress of a running attempt.
#[derive(Clone, Debug)]
pub struct ProgressRow {
    /// Cell.
    pub cell: CellId,
    /// Number within the sweep.
    pub number: i64,
    /// Attempt.
    pub attempt: i32,
    /// Lease holder.
    pub worker: WorkerId,
    /// Last reported step.
    pub step: i64,
    /// Steps in all.
    pub total: i64,
    /// What the worker last said it is doing besides sampling ("downloading …"), if anything;
    /// kept in memory by the queue, not stored.
    pub activity: String,
}

/// What a worker declares at registration.
#[derive(Clone, Debug)]
pub struct WorkerRegistration {
    /// Name.
    pub name: String,
    /// Device kind.
    pub device_kind: DeviceKind,
    /// Device model.
    pub device_model: String,
    /// Memory, MiB.
    pub memory_mib: i64,
    /// Largest width×height.
    pub max_pixels: i64,
    /// Affinity keys loaded.
    pub loaded: Vec<String>,
    /// kiln version.
    pub version: String,
    /// Where it stores images: the only storage its results may name.
    pub storage: String,
    /// The render features it understands (`kiln_proto::sampler::RENDER_LEVEL`; 0 from
    /// workers older than levels).
    pub render_level: u32,
}

/// A registered worker.
#[derive(Clone, Debug)]
pub struct WorkerRow {
    /// Id.
    pub id: WorkerId,
    /// What it declared (with its latest loaded set).
    pub info: WorkerRegistration,
    /// True after a graceful drain.
    pub drained: bool,
    /// Registered, unix ms.
    pub registered_at: i64,
    /// Last request, unix ms.
    pub last_seen_at: i64,
    /// Cells completed since the `since` given to `Store::worker_list`.
    pub completed_recently: u64,
}

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
    /// Refuse the insert when a sweep of this name and owner exists (another key).
    pub unique_name: bool,
    /// Validated cells, numbered, inserted into `cells` with the sweep.
    pub cells: &'a [NewCell],
    /// The rest of the submission, numbered after `cells`, stored as intake chunks with the
    /// sweep and moved into `cells` later (`Store::intake_move`).
    pub intake: &'a [IntakeChunk],
}

/// Outcome of `Store::sweep_insert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepInserted {
    /// The sweep (new or existing).
    pub id: SweepId,
    /// Cells it has.
    pub cell_count: u64,
    /// True when the key named an existing sweep and nothing was inserted.
    pub duplicate: bool,
}

/// A cell of a sweep with failed attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct CellFailures {
    /// The cell.
    pub cell: CellId,
    /// Its number in the sweep.
    pub number: i64,
    /// Where it is now (completed after a retry, discarded, waiting to retry, …).
    pub state: CellState,
    /// Its failed attempts, oldest first.
    pub errors: Vec<crate::domain::failure::ErrorEntry>,
}

/// An img2img picture as stored (`images`), without its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRow {
    /// sha256 of the bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// `png`, `jpeg` or `webp`.
    pub format: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// File size.
    pub bytes: u64,
}

/// A model registry entry (`models` joined with its `model_blobs` row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRow {
    /// The registry name (`kiln model add --name`).
    pub name: String,
    /// sha256 of the file, 64 lowercase hex digits: its key in the pool's model storage.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
    /// What it is.
    pub kind: ModelKind,
    /// When the name was first added, ms.
    pub created_at: i64,
    /// When the name was last (re-)pointed, ms.
    pub updated_at: i64,
}

/// A sweep's cells per state, for the metrics scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepCounts {
    /// The sweep.
    pub id: SweepId,
    /// Its name.
    pub name: String,
    /// Its cells per state (intake included, as the state it will enter).
    pub counts: StateCounts,
}

/// Workers per state: online (seen within a lease time-to-live), offline (not seen since),
/// drained (stopped taking work). As the web overview shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    /// Seen lately, taking work.
    pub online: u64,
    /// Not drained, but not seen within a lease time-to-live.
    pub offline: u64,
    /// Drained.
    pub drained: u64,
}

/// What a metrics scrape reads from the store ([`crate::store::Store::farm_snapshot`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FarmSnapshot {
    /// The newest sweeps' counts, oldest first.
    pub sweeps: Vec<SweepCounts>,
    /// Workers per state.
    pub workers: WorkerCounts,
    /// When the oldest available cell became available (its `scheduled_at`); `None` when no
    /// cell is available.
    pub oldest_available_at: Option<Millis>,
}
