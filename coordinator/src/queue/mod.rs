//! The cell lifecycle, on top of the store: validation and de-duplication of submitted cells,
//! leases with affinity, heartbeats, fenced completion and failure with retry/backoff/poison,
//! release on drain, and the maintenance pass that rescues expired leases and promotes due
//! retries. [`Queue`] is the one entry point the API adapters call; it takes time from an
//! injected clock.
//!
//! States follow River (available, scheduled, running, retryable, completed, cancelled,
//! discarded) plus `held` for paused sweeps. The attempt number grows at lease; a lease has a
//! deadline renewed by heartbeats; every worker write is fenced on (cell, attempt, worker).

mod activities;
mod activity;
pub mod affinity;
mod auth;
mod control;
pub mod dispatch;
mod group;
mod holdings;
mod images;
mod intake;
mod lease;
pub mod maintenance;
mod models;
mod names;
pub mod pauses;
mod pins;
pub mod retry;
pub mod submit;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};

pub use self::activities::MAX_ACTIVITY_BYTES;
use self::affinity::AffinityState;
use self::dispatch::Dispatch;
use self::group::{Complete, Completes, Group, Leases};
pub use self::holdings::MAX_CACHED_MODELS;
pub use self::intake::Builder;
use self::intake::Mover;
pub use self::pins::{MAX_MODEL_BYTES, MAX_MODELS, MAX_SWEEP_MODEL_REFS, stored_pins};
use self::retry::{Decision, RetryPolicy};
use crate::clock::{Millis, SharedClock};
use crate::domain::lease::{Fence, HeartbeatStatus};
use crate::domain::rows::{CellRow, ProgressRow, SweepRow, WorkerRow};
use crate::domain::state::FailureClass;
use crate::events::Events;
use crate::metrics::counters::Counters;
use crate::store::{CellQuery, Store};
use crate::sweep::{CellSpec, SweepSource};
use crate::{Error, Result};

/// Lifecycle settings.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// How long a lease lasts without a heartbeat, ms.
    pub lease_ttl_ms: i64,
    /// How often workers should heartbeat, ms (told to them at registration).
    pub heartbeat_interval_ms: i64,
    /// Available cells considered for affinity on each lease.
    pub lookahead: usize,
    /// Times in a row one worker may pass over a cold queue head for affinity.
    pub max_affinity_skips: u32,
    /// Attempts per cell when a sweep does not say.
    pub default_max_attempts: i32,
    /// Most cells in one sweep.
    pub max_cells_per_sweep: usize,
    /// Most cells one lease call may take.
    pub max_lease_batch: usize,
    /// Cells per intake chunk: a submission inserts this many with its sweep and stores the
    /// rest as chunks of this size, moved into the queue in the background (`queue::intake`).
    pub intake_chunk: usize,
    /// Whether this queue moves intake chunks in the background. `false` makes an insert-only
    /// queue: chunks wait for [`Queue::take_in`] or for another queue on the same database.
    pub move_intake: bool,
    /// Retry and poison rules.
    pub retry: RetryPolicy,
    /// The pool's model storage (`file:///DIR` or `s3://bucket/prefix`, no credentials) that
    /// `ModelService` tells `kiln model add` to upload to; `None`: not configured.
    pub model_storage: Option<String>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            lease_ttl_ms: 60_000,
            heartbeat_interval_ms: 15_000,
            lookahead: 32,
            max_affinity_skips: 8,
            default_max_attempts: 5,
            max_cells_per_sweep: 1_000_000,
            max_lease_batch: 64,
            intake_chunk: 1_000,
            move_intake: true,
            retry: RetryPolicy::default(),
            model_storage: None,
        }
    }
}

/// A sweep as submitted: its header and resolved cells.
#[derive(Debug)]
pub struct Submission {
    /// Human name.
    pub name: String,
    /// Client-chosen idempotency key.
    pub idempotency_key: String,
    /// 0..=9, lower first.
    pub priority: i32,
    /// Attempts per cell; `None` = the configured default.
    pub max_attempts: Option<i32>,
    /// The sweep file verbatim.
    pub spec: String,
    /// Cells in order.
    pub cells: SubmittedCells,
    /// Who submits it (its token's owner); `None` without tokens.
    pub owner: Option<String>,
    /// Refuse it ([`crate::Error::NameTaken`]) when a sweep of this name and owner exists
    /// under another idempotency key.
    pub unique_name: bool,
}

/// The cells of a submission.
#[derive(Debug)]
pub enum SubmittedCells {
    /// Sent as cells: each is checked and keyed at submit, and repeats are dropped.
    Sent(Vec<CellSpec>),
    /// Sent as cells and taken in as they arrived ([`Queue::take_cells`]).
    Taken(Builder),
    /// A sweep file, planned here and taken in cell by cell as it is planned, so the whole
    /// sweep is never held (its name names the sweep when the submission has none).
    File(SweepSource),
}

impl FromIterator<CellSpec> for SubmittedCells {
    fn from_iter<I: IntoIterator<Item = CellSpec>>(cells: I) -> Self {
        SubmittedCells::Sent(cells.into_iter().collect())
    }
}

impl From<Vec<CellSpec>> for SubmittedCells {
    fn from(cells: Vec<CellSpec>) -> Self {
        SubmittedCells::Sent(cells)
    }
}

/// Outcome of one maintenance pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Expired leases handled.
    pub rescued: u64,
    /// Due cells made available.
    pub promoted: u64,
}

/// Plans, submits and extends that may run at once; more wait their turn (`submit`).
const HEAVY_AT_ONCE: usize = 2;

/// What a lease needs to know about a worker, kept between leases so that a lease does not
/// have to write the worker's `last_seen_at` every time (heartbeats keep it fresh).
#[derive(Clone, Debug)]
struct KnownWorker {
    max_pixels: i64,
    memory_mib: i64,
    render_level: i64,
    loaded: HashSet<String>,
    written_at: Millis,
}

/// What authenticates a worker's calls and checks its results, kept from its registration.
#[derive(Clone, Debug)]
struct WorkerCredentials {
    /// sha256 of its session credential; `None` for a worker registered before sessions.
    session_hash: Option<String>,
    /// The storage it registered with.
    storage: String,
}

/// The render queue.
#[derive(Clone)]
pub struct Queue {
    store: Store,
    clock: SharedClock,
    cfg: QueueConfig,
    affinity: Arc<AffinityState>,
    dispatch: Arc<Dispatch>,
    known: Arc<Mutex<HashMap<WorkerId, KnownWorker>>>,
    /// Turns of the heavy work: plans, submits, extends (`submit`).
    heavy: Arc<tokio::sync::Semaphore>,
    /// Token owners with a plan, submit or extend running (`Queue::owner_turn`).
    owners_running: Arc<Mutex<HashSet<String>>>,
    credentials: Arc<Mutex<HashMap<WorkerId, WorkerCredentials>>>,
    /// Group commit of completes, started on the first complete (it needs a runtime).
    completes: Arc<OnceLock<Group<Completes>>>,
    /// Group commit of leases, started on the first lease.
    leases: Arc<OnceLock<Group<Leases>>>,
    /// The intake's mover, started on the first wake-up.
    mover: Arc<OnceLock<Mover>>,
    /// Taken by each intake chunk's move, so overlapping passes take turns.
    moving: Arc<tokio::sync::Mutex<()>>,
    events: Events,
    /// The last failures workers reported, newest last (for the web overview).
    recent_failures: Arc<Mutex<std::collections::VecDeque<RecentFailure>>>,
    /// Events counted for `/metrics`.
    counters: Counters,
    /// The registry models workers hold and pipelines need (lease preference).
    holdings: Arc<holdings::Holdings>,
    /// Running attempts' activities (`ReportProgress.activity`).
    activities: Arc<activities::Activities>,
    /// Why workers yield to their owners, and the admin's orders.
    pauses: Arc<pauses::Pauses>,
}

/// A failed attempt as a worker reported it, kept in memory for the farm overview.
#[derive(Clone, Debug, PartialEq)]
pub struct RecentFailure {
    /// The worker.
    pub worker: WorkerId,
    /// The cell and attempt.
    pub cell: CellId,
    /// Which attempt.
    pub attempt: Attempt,
    /// How the worker classed it.
    pub class: FailureClass,
    /// Its message (at most 4096 characters).
    pub message: String,
    /// When, unix ms.
    pub at: i64,
}

/// How many failures [`Queue::recent_failures`] remembers.
pub const RECENT_FAILURES: usize = 200;

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("store", &self.store.backend())
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Queue {
    /// A queue over `store`, on `clock`.
    pub fn new(store: Store, clock: SharedClock, cfg: QueueConfig) -> Self {
        Self {
            store,
            clock,
            cfg,
            affinity: Default::default(),
            dispatch: Default::default(),
            known: Default::default(),
            heavy: Arc::new(tokio::sync::Semaphore::new(HEAVY_AT_ONCE)),
            owners_running: Default::default(),
            credentials: Default::default(),
            completes: Default::default(),
            leases: Default::default(),
            mover: Default::default(),
            moving: Default::default(),
            events: Events::default(),
            recent_failures: Default::default(),
            counters: Counters::default(),
            holdings: Default::default(),
            activities: Default::default(),
            pauses: Default::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Change notifications.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The event counters of `/metrics`.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The last [`RECENT_FAILURES`] failures workers reported to this process, oldest first.
    pub fn recent_failures(&self) -> Vec<RecentFailure> {
        let recent = self
            .recent_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// Now, by the injected clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// Asks the intake's mover for a pass, starting it first if need be (on the current Tokio
    /// runtime; there is always one where this is called). The maintenance loop calls this on
    /// every tick, so chunks left by a stopped coordinator are moved after a restart.
    pub fn wake_intake(&self) {
        if !self.cfg.move_intake {
            return;
        }
        self.mover
            .get_or_init(|| {
                let dispatch = Arc::clone(&self.dispatch);
                let events = self.events.clone();
                Mover::start(
                    self.store.clone(),
                    Arc::clone(&self.clock),
                    Arc::clone(&self.moving),
                    Box::new(move || {
                        dispatch.invalidate();
                        events.changed();
                    }),
                )
            })
            .wake();
    }

    /// Moves the intake chunks of sweep `only` (of every sweep when `None`) into the queue
    /// now, as the background mover does, and returns the cells moved. For an extend, which
    /// needs the whole sweep, and for tests and benchmarks.
    pub async fn take_in(&self, only: Option<SweepId>) -> Result<u64> {
        intake::move_all(&self.store, &self.clock, &self.moving, only, &|| {
            self.requeued()
        })
        .await
    }

    /// A sweep with counts.
    pub async fn sweep(&self, id: SweepId) -> Result<SweepRow> {
        self.store.sweep_get(id).await
    }

    /// Sweeps newest first, of `owner` only when given.
    pub async fn sweeps(
        &self,
        limit: i64,
        before: Option<SweepId>,
        owner: Option<&str>,
    ) -> Result<Vec<SweepRow>> {
        self.store.sweep_list(limit, before, owner).await
    }

    /// Cells finished per second over the last minute ([`RATE_WINDOW_MS`]), or over the
    /// sweep's life (`created_at` on) when that is shorter.
    pub async fn sweep_rate(&self, id: SweepId, created_at: Millis) -> Result<f64> {
        // Over the last minute, or over the sweep's life when it is younger: a sweep that ends
        // in 3 s shows its real rate, not a sixtieth of it.
        let now = self.now();
        let window_ms = (now.0 - created_at.0).clamp(1_000, RATE_WINDOW_MS);
        let n = self
            .store
            .sweep_finished_since(id, now.plus(-window_ms))
            .await?;
        Ok(n as f64 * 1000.0 / window_ms as f64)
    }

    /// Cancels a sweep: queued cells at once, running ones via heartbeat.
    pub async fn cancel(&self, id: SweepId) -> Result<(u64, u64)> {
        let out = self.store.sweep_cancel(id, self.now()).await?;
        self.requeued();
        Ok(out)
    }

    /// Pauses a sweep.
    pub async fn pause(&self, id: SweepId) -> Result<u64> {
        let out = self.store.sweep_pause(id).await?;
        self.requeued();
        Ok(out)
    }

    /// Resumes a paused sweep.
    pub async fn resume(&self, id: SweepId) -> Result<u64> {
        let out = self.store.sweep_resume(id, self.now()).await?;
        self.requeued();
        Ok(out)
    }

    /// Re-queues a sweep's discarded cells with a fresh set of attempts.
    pub async fn retry_failed(&self, id: SweepId) -> Result<u64> {
        let out = self.store.sweep_retry_failed(id, self.now()).await?;
        self.requeued();
        Ok(out)
    }

    /// Cells may have become available, or stopped being: the dispatcher reads the queue
    /// again, and watchers are told.
    fn requeued(&self) {
        self.dispatch.invalidate();
        self.events.changed();
    }

    /// Extends a worker's leases. Returns each attempt's status and the new deadline.
    pub async fn heartbeat(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        loaded: Option<&[String]>,
    ) -> Result<(Vec<HeartbeatStatus>, Millis)> {
        let now = self.now();
        let row = self.store.worker_seen(worker, loaded, now).await?;
        self.known_lock().insert(
            worker,
            KnownWorker {
                max_pixels: row.info.max_pixels,
                memory_mib: row.info.memory_mib,
                render_level: i64::from(row.info.render_level),
                loaded: row.info.loaded.into_iter().collect(),
                written_at: now,
            },
        );
        let expires = now.plus(self.cfg.lease_ttl_ms);
        let statuses = self
            .store
            .lease_heartbeat(worker, attempts, expires, now)
            .await?;
        Ok((statuses, expires))
    }

    /// Records per-step progress; returns whether the user cancelled the cell.
    pub async fn progress(&self, f: Fence, step: u32, total: u32) -> Result<bool> {
        if step > total {
            return Err(Error::invalid(format!("step {step} is past total {total}")));
        }
        let now = self.now();
        let cancel = self
            .store
            .cell_progress(
                f,
                i64::from(step),
                i64::from(total),
                now.plus(self.cfg.lease_ttl_ms),
                now,
            )
            .await?;
        self.events.changed();
        Ok(cancel)
    }

    /// Records the result of the fenced attempt. Concurrent completes share one write
    /// ([`group`]).
    pub async fn complete(&self, f: Fence, result_json: &str) -> Result<()> {
        let complete = Complete {
            fence: f,
            result_json: result_json.to_owned(),
            at: self.now(),
        };
        self.completes
            .get_or_init(|| Group::start(self.store.clone()))
            .call(complete)
            .await?;
        self.counters.completed();
        self.events.changed();
        Ok(())
    }

    /// Records a failed attempt; returns where the cell went.
    pub async fn fail(&self, f: Fence, class: FailureClass, message: &str) -> Result<Decision> {
        if class == FailureClass::LeaseExpired {
            return Err(Error::invalid(
                "class: LEASE_EXPIRED is set by the coordinator only",
            ));
        }
        // A worker's own words are kept, not refused: NUL (which Postgres cannot store) becomes
        // U+FFFD on both backends.
        let message: String = message
            .chars()
            .take(4096)
            .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
            .collect();
        let policy = &self.cfg.retry;
        let decide = |cx: &retry::FailContext<'_>| policy.decide(cx);
        let d = self
            .store
            .cell_fail(f, class, &message, self.now(), &decide)
            .await?;
        self.counters.failed(class, 1);
        self.requeued();
        let mut recent = self
            .recent_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_FAILURES {
            recent.pop_front();
        }
        recent.push_back(RecentFailure {
            worker: f.worker,
            cell: f.cell,
            attempt: f.attempt,
            class,
            message,
            at: self.now().0,
        });
        Ok(d)
    }

    /// Gives leased attempts back uncounted; `draining` marks the worker drained.
    pub async fn release(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        draining: bool,
    ) -> Result<u64> {
        let now = self.now();
        self.store.worker_seen(worker, None, now).await?;
        let n = self.store.cell_release(worker, attempts, now).await?;
        if draining {
            self.store.worker_drain(worker, now).await?;
            self.affinity.forget(worker.0);
            self.holdings.forget(worker.0);
            self.known_lock().remove(&worker);
        }
        self.requeued();
        Ok(n)
    }

    /// One maintenance pass: rescue expired leases, then promote due cells.
    pub async fn maintain(&self) -> Result<MaintenanceReport> {
        let now = self.now();
        let policy = &self.cfg.retry;
        let decide = |cx: &retry::FailContext<'_>| policy.decide(cx);
        let mut report = MaintenanceReport::default();
        loop {
            let n = self.store.cell_rescue_expired(now, &decide).await?;
            report.rescued += n;
            if n == 0 {
                break;
            }
        }
        self.counters
            .failed(FailureClass::LeaseExpired, report.rescued);
        report.promoted = self.store.cell_promote_due(now).await?;
        if report != MaintenanceReport::default() {
            self.requeued();
        }
        Ok(report)
    }

    /// Puts every running attempt back in the queue uncounted. Only for an embedded
    /// coordinator with no other workers (`kiln run` after an interrupted run): with remote
    /// workers it would hand out cells that are still rendering.
    pub async fn requeue_running(&self) -> Result<u64> {
        let n = self.store.cell_requeue_running().await?;
        self.requeued();
        Ok(n)
    }

    /// One cell.
    pub async fn cell(&self, id: CellId) -> Result<CellRow> {
        self.store.cell_get(id).await
    }

    /// Marks a cell as a keeper or not and rates it (0 to 5 stars, 0: not rated); `None`
    /// leaves that one as it is (`Store::cell_set_keeper`).
    pub async fn set_keeper(
        &self,
        id: CellId,
        starred: Option<bool>,
        rating: Option<u8>,
    ) -> Result<CellRow> {
        self.store.cell_set_keeper(id, starred, rating).await
    }

    /// Cells matching structured filters.
    pub async fn query(&self, q: &CellQuery) -> Result<Vec<CellRow>> {
        self.store.cell_query(q).await
    }

    /// How many cells match `q`'s filters, ignoring its sort and page.
    pub async fn count(&self, q: &CellQuery) -> Result<u64> {
        self.store.cell_count(q).await
    }

    /// Progress of running cells of a sweep or a worker.
    pub async fn running(
        &self,
        sweep: Option<SweepId>,
        worker: Option<WorkerId>,
    ) -> Result<Vec<ProgressRow>> {
        let rows = self.store.cell_running(sweep, worker).await?;
        Ok(self.with_activity(rows))
    }

    /// Every worker, with completions over the last minute.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>> {
        self.store.worker_list(self.now().plus(-60_000)).await
    }
}

/// The longest window [`Queue::sweep_rate`] averages over.
pub const RATE_WINDOW_MS: i64 = 60_000;

/// The seed for a sweep's `random = N` seeds: the first 8 bytes of sha256(idempotency key).
pub fn random_seed_for(key: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// How a sweep file is stored in `sweeps.spec`: JSON with the file, its name, every file it
/// references, the hashes of the pictures it names and of the registry models it was pinned
/// to, so its plan can be re-derived and audited later.
pub fn stored_source(src: &SweepSource) -> String {
    let mut json = serde_json::json!({ "path": src.path, "text": src.text, "files": src.files });
    if !src.images.is_empty() {
        json["images"] = serde_json::json!(src.images);
    }
    if !src.models.is_empty() {
        json["models"] = serde_json::json!(src.models);
    }
    json.to_string()
}
