//! The only SQL in kiln. One seam, [`Store`], with two backends that behave the same:
//! SQLite (embedded default: one file, WAL, one writer connection) and Postgres (many
//! connections; row locks, `FOR UPDATE SKIP LOCKED` where several writers may reach for the
//! same rows). Schemas live in `migrations/{sqlite,postgres}/` and are applied
//! at start-up by [`migrate`]. The conformance suite (`tests/it/conformance.rs`) runs every
//! behaviour against both.
//!
//! Every worker write is fenced on `(cell, attempt, worker)` and only applies while the cell is
//! `running` under that lease, so a stale attempt can never complete, fail or overwrite a newer
//! one. Decisions are made in `queue/`: which cells to lease is picked there from a read of the
//! queue (`queue::dispatch`) and the store leases exactly those that are still available; where
//! a failed cell goes is the caller's function, applied inside the failing transaction.

mod deadlock;
mod filter;
mod migrate;
mod postgres;
mod query;
mod rows;
mod sqlite;

use std::fmt;
use std::str::FromStr;

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};

pub use intake::{IntakeChunk, IntakeRow};
pub use query::{CellQuery, CellSort};

use crate::clock::Millis;
use crate::domain::candidate::Candidate;
use crate::domain::failure::{Decision, FailContext};
use crate::domain::state::{CellState, DeviceKind, FailureClass, SweepState};
use crate::sweep::NewCell;
use crate::{Error, Result};

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

    fn add(&mut self, state: CellState, n: u64) {
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
    /// Cells per state.
    pub counts: StateCounts,
}

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
}

impl Caps {
    /// Whether a worker with these capabilities can render `c`.
    pub fn allows(&self, c: &AvailableCell) -> bool {
        c.pixels <= self.max_pixels && c.min_memory_mib <= self.memory_mib
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
}

impl LeasePick {
    /// `leased` (as the store returned them) in pick order.
    fn in_pick_order(&self, mut leased: Vec<LeasedCell>) -> Vec<LeasedCell> {
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
    fn lost(self) -> Error {
        Error::LeaseLost {
            cell: self.cell,
            attempt: self.attempt,
            worker: self.worker,
        }
    }
}

/// One fenced complete of a batch ([`Store::cell_complete_many`]).
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
    /// Cells completed since the `since` given to [`Store::worker_list`].
    pub completed_recently: u64,
}

/// The decision callback for failed attempts.
pub type DecideFn<'a> = &'a (dyn Fn(&FailContext<'_>) -> Decision + Sync);

/// A database holding sweeps, cells and workers.
#[derive(Clone, Debug)]
pub enum Store {
    /// Embedded SQLite file.
    Sqlite(sqlite::SqliteStore),
    /// Postgres server.
    Postgres(postgres::PgStore),
}

macro_rules! delegate {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self {
            Store::Sqlite(s) => s.$method($($arg),*).await,
            Store::Postgres(s) => s.$method($($arg),*).await,
        }
    };
}

// After `delegate!`, which it uses.
mod intake;

impl Store {
    /// Connects and applies pending migrations.
    pub async fn connect(url: &DatabaseUrl, opts: &StoreOptions) -> Result<Store> {
        let store = match url {
            DatabaseUrl::Sqlite(u) => Store::Sqlite(sqlite::SqliteStore::connect(u).await?),
            DatabaseUrl::Postgres(u) => {
                Store::Postgres(postgres::PgStore::connect(u, opts.max_connections).await?)
            }
        };
        Ok(store)
    }

    /// Which backend this is, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        delegate!(self, close())
    }

    /// Inserts a sweep with all its cells and intake chunks atomically, or returns the sweep
    /// that already has this idempotency key (its cell count includes its intake).
    pub async fn sweep_insert(&self, p: &SweepInsert<'_>, now: Millis) -> Result<SweepInserted> {
        delegate!(self, sweep_insert(p, now))
    }

    /// Adds the cells of `cells` whose key the sweep lacks, numbered after its last cell, and
    /// stores the new sweep file. Returns (added, cells now).
    pub async fn sweep_extend(
        &self,
        id: SweepId,
        cells: &[NewCell],
        spec: &str,
        now: Millis,
    ) -> Result<(u64, u64)> {
        delegate!(self, sweep_extend(id, cells, spec, now))
    }

    /// A sweep with its counts.
    pub async fn sweep_get(&self, id: SweepId) -> Result<SweepRow> {
        delegate!(self, sweep_get(id))
    }

    /// Sweeps newest first, with ids below `before` when given.
    pub async fn sweep_list(&self, limit: i64, before: Option<SweepId>) -> Result<Vec<SweepRow>> {
        delegate!(self, sweep_list(limit, before))
    }

    /// Cancels queued cells now, asks running ones to stop. Returns (cancelled, requested).
    /// This and the other sweep-wide writes below run again if Postgres aborts them as a
    /// deadlock victim ([`deadlock`]).
    pub async fn sweep_cancel(&self, id: SweepId, now: Millis) -> Result<(u64, u64)> {
        deadlock::retried(|| async { delegate!(self, sweep_cancel(id, now)) }).await
    }

    /// Holds the sweep's queued cells. Returns cells held.
    pub async fn sweep_pause(&self, id: SweepId) -> Result<u64> {
        deadlock::retried(|| async { delegate!(self, sweep_pause(id)) }).await
    }

    /// Releases held cells. Returns cells released.
    pub async fn sweep_resume(&self, id: SweepId, now: Millis) -> Result<u64> {
        deadlock::retried(|| async { delegate!(self, sweep_resume(id, now)) }).await
    }

    /// Gives discarded cells a fresh set of attempts. Returns cells re-queued.
    pub async fn sweep_retry_failed(&self, id: SweepId, now: Millis) -> Result<u64> {
        deadlock::retried(|| async { delegate!(self, sweep_retry_failed(id, now)) }).await
    }

    /// Cells finished (completed, discarded) since `since`.
    pub async fn sweep_finished_since(&self, id: SweepId, since: Millis) -> Result<u64> {
        delegate!(self, sweep_finished_since(id, since))
    }

    /// Up to `limit` available cells in queue order, after `after` (from the head if `None`),
    /// and only those `caps` allows (all if `None`). Reads only: the dispatcher's read-ahead.
    pub async fn cell_available(
        &self,
        after: Option<QueuePos>,
        limit: usize,
        caps: Option<Caps>,
    ) -> Result<Vec<AvailableCell>> {
        let caps = caps.unwrap_or(Caps {
            max_pixels: i64::MAX,
            memory_mib: i64::MAX,
        });
        delegate!(self, cell_available(after, limit, caps))
    }

    /// Leases the picked cells that are still available to `pick.worker`: they become
    /// `running` under a new attempt. Returned in pick order; a picked cell that is no longer
    /// available (leased, cancelled, paused meanwhile) is left out.
    pub async fn cell_lease(&self, pick: &LeasePick, now: Millis) -> Result<Vec<LeasedCell>> {
        if pick.ids.is_empty() {
            return Ok(Vec::new());
        }
        // A lease waits for a cell another transaction holds; if that one is a sweep-wide
        // write locking in another order, Postgres may abort either ([`deadlock`]).
        let leased = deadlock::retried(|| async { delegate!(self, cell_lease(pick, now)) }).await?;
        Ok(pick.in_pick_order(leased))
    }

    /// Several [`Store::cell_lease`]s, each at its own time, in one statement and one commit
    /// (the queue's group commit). `out[i]` answers `picks[i]`. The picks must not share a
    /// cell. An `Err` means nothing was leased (the transaction rolled back).
    pub async fn cell_lease_many(
        &self,
        picks: &[(LeasePick, Millis)],
    ) -> Result<Vec<Vec<LeasedCell>>> {
        let leased = delegate!(self, cell_lease_many(picks))?;
        Ok(picks
            .iter()
            .zip(leased)
            .map(|((p, _), l)| p.in_pick_order(l))
            .collect())
    }

    /// Extends the leases a worker still holds; reports lost and cancelled ones.
    pub async fn lease_heartbeat(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        expires_at: Millis,
        now: Millis,
    ) -> Result<Vec<HeartbeatStatus>> {
        delegate!(self, lease_heartbeat(worker, attempts, expires_at, now))
    }

    /// Records per-step progress (and extends the lease). Returns whether a cancel was
    /// requested.
    pub async fn cell_progress(
        &self,
        f: Fence,
        step: i64,
        total: i64,
        expires_at: Millis,
        now: Millis,
    ) -> Result<bool> {
        delegate!(self, cell_progress(f, step, total, expires_at, now))
    }

    /// Records the result of the fenced attempt.
    pub async fn cell_complete(&self, f: Fence, result_json: &str, now: Millis) -> Result<()> {
        delegate!(self, cell_complete(f, result_json, now))
    }

    /// Records the results of several fenced attempts in one statement and one commit (the
    /// queue's group commit). `out[i]` is what [`Store::cell_complete`] would have answered
    /// for `done[i]`: a stale attempt gets `LeaseLost`, an unknown cell `CellNotFound`, and
    /// neither stops the others. The cells must be distinct. An `Err` means nothing was
    /// written (the transaction rolled back).
    pub async fn cell_complete_many(&self, done: &[Completion<'_>]) -> Result<Vec<Result<()>>> {
        delegate!(self, cell_complete_many(done))
    }

    /// Records a failed attempt and applies `decide`'s verdict.
    pub async fn cell_fail(
        &self,
        f: Fence,
        class: FailureClass,
        message: &str,
        now: Millis,
        decide: DecideFn<'_>,
    ) -> Result<Decision> {
        delegate!(self, cell_fail(f, class, message, now, decide))
    }

    /// Gives leased attempts back uncounted. Returns how many were released.
    pub async fn cell_release(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        now: Millis,
    ) -> Result<u64> {
        delegate!(self, cell_release(worker, attempts, now))
    }

    /// Fails every attempt whose lease expired (class `lease_expired`) through `decide`.
    pub async fn cell_rescue_expired(&self, now: Millis, decide: DecideFn<'_>) -> Result<u64> {
        delegate!(self, cell_rescue_expired(now, decide))
    }

    /// Makes scheduled and retryable cells whose time has come available (or held, when their
    /// sweep is paused).
    pub async fn cell_promote_due(&self, now: Millis) -> Result<u64> {
        delegate!(self, cell_promote_due(now))
    }

    /// Every running attempt back to available, uncounted (embedded mode only; see
    /// `Queue::requeue_running`).
    pub async fn cell_requeue_running(&self) -> Result<u64> {
        delegate!(self, cell_requeue_running())
    }

    /// One cell.
    pub async fn cell_get(&self, id: CellId) -> Result<CellRow> {
        delegate!(self, cell_get(id))
    }

    /// Cells matching structured filters.
    pub async fn cell_query(&self, q: &CellQuery) -> Result<Vec<CellRow>> {
        delegate!(self, cell_query(q))
    }

    /// Refreshes the query planner's statistics (`ANALYZE`). The query indexes
    /// (`migrations/*/0002_query_indexes.sql`) are only chosen over older ones with statistics;
    /// SQLite never gathers them by itself, Postgres's autovacuum does but lags bulk inserts.
    /// About a second per million cells on SQLite, which holds the write lock meanwhile.
    pub async fn analyze(&self) -> Result<()> {
        delegate!(self, analyze())
    }

    /// **For benchmarks and tests only; the coordinator never calls it.** Marks every
    /// available cell of a sweep completed with `result_json` in one statement, skipping
    /// leases, fences and attempts history, so a benchmark can have a million finished cells in
    /// seconds. Returns cells changed.
    pub async fn sweep_complete_all_unfenced(
        &self,
        id: SweepId,
        result_json: &str,
        now: Millis,
    ) -> Result<u64> {
        delegate!(self, sweep_complete_all_unfenced(id, result_json, now))
    }

    /// Progress of running cells of a sweep or a worker.
    pub async fn cell_running(
        &self,
        sweep: Option<SweepId>,
        worker: Option<WorkerId>,
    ) -> Result<Vec<ProgressRow>> {
        delegate!(self, cell_running(sweep, worker))
    }

    /// Registers a worker.
    pub async fn worker_register(&self, r: &WorkerRegistration, now: Millis) -> Result<WorkerId> {
        delegate!(self, worker_register(r, now))
    }

    /// Marks a worker seen (and active), replacing its loaded set when given.
    pub async fn worker_seen(
        &self,
        id: WorkerId,
        loaded: Option<&[String]>,
        now: Millis,
    ) -> Result<WorkerRow> {
        delegate!(self, worker_seen(id, loaded, now))
    }

    /// Marks a worker drained.
    pub async fn worker_drain(&self, id: WorkerId, now: Millis) -> Result<()> {
        delegate!(self, worker_drain(id, now))
    }

    /// Every worker, with completions since `since`.
    pub async fn worker_list(&self, since: Millis) -> Result<Vec<WorkerRow>> {
        delegate!(self, worker_list(since))
    }
}

/// Parses a stored JSON array of loaded affinity keys.
fn parse_loaded(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("workers.loaded: {e}")))
}

/// Appends a failure to a stored error history.
fn push_error(
    errors_json: &str,
    entry: crate::domain::failure::ErrorEntry,
) -> Result<Vec<crate::domain::failure::ErrorEntry>> {
    let mut history: Vec<crate::domain::failure::ErrorEntry> = serde_json::from_str(errors_json)
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

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
