//! Taking sweeps in: a submit (cells sent, or a sweep file planned here), a plan's preview and
//! an extend. The CPU work (planning, checking, hashing, JSON, compression) runs on blocking
//! threads, at most `HEAVY_AT_ONCE` requests at a time, and a submission is taken in as it is
//! planned or received ([`Builder`]): held as compressed intake chunks, never as a whole list of
//! cells, so a million-cell request needs tens of megabytes, not gigabytes.

use kiln_proto::SweepId;

use super::intake::Builder;
use super::{Queue, Submission, SubmittedCells, random_seed_for, stored_pins, stored_source};
use crate::store::{SweepInsert, SweepInserted};
use crate::sweep::cell::check_text;
use crate::sweep::{
    CellSpec, NewCell, Place, PlanError, PlanErrorKind, PlanLimits, PlanSummary, PlannedCell,
    SweepSource,
};
use crate::{Error, Result};

/// A token owner's turn of the heavy work, held for a whole request ([`Queue::owner_turn`]).
#[derive(Debug)]
pub struct OwnerTurn {
    owner: String,
    running: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Drop for OwnerTurn {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.owner);
    }
}

/// A plan's preview: what planning says, and its first cells.
#[derive(Debug)]
pub struct Preview {
    /// Name, count, seeds, axes, duplicates.
    pub summary: PlanSummary,
    /// The first cells, as many as asked.
    pub cells: Vec<PlannedCell>,
}

/// Runs `work` on a blocking thread; a panic there is re-raised here.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Queue {
    /// Validates, de-duplicates (by cell key, first wins) and stores a sweep atomically. The
    /// same idempotency key twice returns the first sweep.
    pub async fn submit(&self, s: Submission) -> Result<SweepInserted> {
        let key = s.idempotency_key.trim();
        if key.is_empty() || key.len() > 200 {
            return Err(Error::invalid("idempotency_key: must be 1..=200 bytes"));
        }
        if s.name.len() > 200 {
            return Err(Error::invalid("name: longer than 200 bytes"));
        }
        check_text("name", &s.name)?;
        check_text("idempotency_key", key)?;
        check_text("spec", &s.spec)?;
        if !(0..=9).contains(&s.priority) {
            return Err(Error::invalid(format!(
                "priority: {} is outside 0..=9",
                s.priority
            )));
        }
        let max_attempts = s.max_attempts.unwrap_or(self.cfg.default_max_attempts);
        if !(1..=100).contains(&max_attempts) {
            return Err(Error::invalid(format!(
                "max_attempts: {max_attempts} is outside 1..=100"
            )));
        }
        if let SubmittedCells::Sent(c) = &s.cells {
            self.check_count(c.len())?;
        }
        let (planned_name, builder) = match s.cells {
            SubmittedCells::Taken(b) => (None, b),
            SubmittedCells::Sent(specs) => {
                let b = self.take_cells(self.intake_builder(), specs, 0).await?;
                (None, b)
            }
            SubmittedCells::File(src) => {
                let (name, b) = self.take_file(src, key).await?;
                (Some(name), b)
            }
        };
        if builder.is_empty() {
            return Err(Error::invalid("cells: a sweep needs at least one cell"));
        }
        self.check_count(builder.len())?;
        let name = match planned_name {
            Some(n) if s.name.is_empty() => n,
            _ => s.name,
        };
        let mut builder = builder;
        let pins = builder.take_pins();
        let (cells, chunks) = blocking(move || Ok(builder.finish())).await?;
        let insert = SweepInsert {
            name: &name,
            idempotency_key: key,
            priority: s.priority,
            max_attempts,
            spec: &s.spec,
            owner: s.owner.as_deref(),
            unique_name: s.unique_name,
            cells: &cells,
            intake: &chunks,
        };
        let out = self.store.sweep_insert(&insert, self.now()).await?;
        self.holdings.need(pins);
        self.requeued();
        if !out.duplicate && !chunks.is_empty() {
            self.wake_intake();
        }
        Ok(out)
    }

    /// A builder for the cells of one submission, sent as cells.
    pub fn intake_builder(&self) -> Builder {
        Builder::new(self.cfg.intake_chunk, true)
    }

    /// Checks, keys and takes `specs` into `builder`: the next cells sent, the first of them
    /// the submission's cell number `first` (errors name cells by it). On as many threads as
    /// there are cores.
    pub async fn take_cells(
        &self,
        builder: Builder,
        specs: Vec<CellSpec>,
        first: usize,
    ) -> Result<Builder> {
        self.check_count(builder.len().saturating_add(specs.len()))?;
        let _turn = self.heavy_turn().await?;
        blocking(move || {
            let mut builder = builder;
            for part in in_parallel(specs, |i, spec| NewCell::new(cell_number(first + i)?, spec))? {
                for cell in part {
                    builder.push(cell)?;
                }
            }
            Ok(builder)
        })
        .await
    }

    /// Plans sweep file `src` and takes its cells in as they are planned. Returns the plan's
    /// name with them.
    async fn take_file(&self, src: SweepSource, key: &str) -> Result<(String, Builder)> {
        let limits = self.plan_limits();
        let seed = random_seed_for(key);
        let mut builder = Builder::new(self.cfg.intake_chunk, false);
        let _turn = self.heavy_turn().await?;
        blocking(move || {
            let summary = crate::sweep::plan_into(&src, &limits, seed, &mut |c| {
                let number = builder.len() as u64;
                NewCell::planned(builder.len() as u32, c)
                    .and_then(|cell| builder.push(cell))
                    .map_err(|e| {
                        PlanError::new(
                            Place::Cell { number },
                            PlanErrorKind::InvalidCell(e.to_string()),
                        )
                    })
            })?;
            Ok((summary.name, builder))
        })
        .await
    }

    /// Plans a sweep file and keeps its first `preview` cells (on a blocking thread: a million
    /// cells take seconds, and only a digest of each is held). `key` is the idempotency key it
    /// is (or would be) submitted with; it seeds `random = N` seeds, so the same key always
    /// draws the same seeds and extending a sweep keeps them.
    pub async fn plan(&self, src: SweepSource, key: &str, preview: usize) -> Result<Preview> {
        let limits = self.plan_limits();
        let seed = random_seed_for(key);
        let _turn = self.heavy_turn().await?;
        blocking(move || {
            let mut cells = Vec::new();
            let summary = crate::sweep::plan_into(&src, &limits, seed, &mut |c| {
                if cells.len() < preview {
                    cells.push(c);
                }
                Ok(())
            })?;
            Ok(Preview { summary, cells })
        })
        .await
    }

    /// Adds the cells of a grown sweep file that the sweep lacks. Returns (added, cells now).
    pub async fn extend(&self, id: SweepId, mut src: SweepSource) -> Result<(u64, u64)> {
        let sweep = self.store.sweep_get(id).await?;
        // Names the sweep was planned with keep their pins, even if re-pointed since.
        let kept = stored_pins(&self.store.sweep_spec(id).await?);
        self.pin_models(&mut src, &kept).await?;
        // The new cells are told from the old by their keys: every old cell must be in `cells`.
        self.take_in(Some(id)).await?;
        let stored = stored_source(&src);
        let seed = random_seed_for(&sweep.idempotency_key);
        let limits = self.plan_limits();
        let _turn = self.heavy_turn().await?;
        let cells = blocking(move || {
            let plan = crate::sweep::plan(&src, &limits, seed)?;
            plan.cells
                .into_iter()
                .enumerate()
                .map(|(i, c)| NewCell::planned(cell_number(i)?, c))
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let pins = cells
            .iter()
            .map(|c| (c.affinity_key.clone(), c.spec.pinned_models()))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let out = self
            .store
            .sweep_extend(id, &cells, &stored, self.now())
            .await?;
        self.holdings.need(pins);
        self.requeued();
        Ok(out)
    }

    /// One plan, submit or extend at a time per token owner: a second one while the first
    /// runs is refused (RESOURCE_EXHAUSTED), so no token can hold every turn of the heavy
    /// work. No limit without tokens (`owner` is `None`).
    pub fn owner_turn(&self, owner: Option<&str>) -> Result<Option<OwnerTurn>> {
        let Some(owner) = owner else {
            return Ok(None);
        };
        let mut running = self
            .owners_running
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !running.insert(owner.to_string()) {
            return Err(Error::Busy(format!(
                "{owner} already has a plan, submit or extend running; try again when it ends"
            )));
        }
        Ok(Some(OwnerTurn {
            owner: owner.to_string(),
            running: self.owners_running.clone(),
        }))
    }

    fn plan_limits(&self) -> PlanLimits {
        PlanLimits {
            max_cells: self.cfg.max_cells_per_sweep as u64,
            ..PlanLimits::default()
        }
    }

    fn check_count(&self, n: usize) -> Result<()> {
        if n > self.cfg.max_cells_per_sweep {
            return Err(Error::TooLarge(format!(
                "sweep has {n} cells, at most {}",
                self.cfg.max_cells_per_sweep
            )));
        }
        Ok(())
    }

    /// A turn of the heavy work (`HEAVY_AT_ONCE` at a time).
    pub(super) async fn heavy_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.heavy
            .acquire()
            .await
            .map_err(|_| Error::Config("the coordinator is stopping".into()))
    }
}

/// `f(i, items[i])` for every item, on up to 8 threads; the results in item order, in parts.
fn in_parallel<T: Send>(
    items: Vec<T>,
    f: impl Fn(usize, T) -> Result<NewCell> + Sync,
) -> Result<Vec<Vec<NewCell>>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = items.len().div_ceil(threads).max(1_000);
    let mut items = items.into_iter().enumerate();
    let parts: Vec<Vec<(usize, T)>> = std::iter::from_fn(|| {
        let part: Vec<_> = items.by_ref().take(chunk).collect();
        (!part.is_empty()).then_some(part)
    })
    .collect();
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || part.into_iter().map(|(i, t)| f(i, t)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

pub(super) fn cell_number(i: usize) -> Result<u32> {
    u32::try_from(i).map_err(|_| Error::TooLarge("cells".into()))
}
