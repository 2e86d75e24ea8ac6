//! The cell lifecycle: the dispatcher's read of available cells, leases, heartbeats, progress,
//! the fenced complete and fail, release, the maintenance pass, and reads of one cell or of
//! the running ones. A lease by a list of ids and a batch of completes are written per
//! database (`sqlite.rs`, `postgres.rs`); everything else once.

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};

use super::db::{Db, Row, Stmt};
use super::rows::{self, CELL_COLUMNS};
use super::{DecideFn, Store, push_error};
use crate::clock::Millis;
use crate::domain::failure::{Decision, ErrorEntry, FailContext};
use crate::domain::lease::{
    AvailableCell, Caps, Completion, Fence, HeartbeatStatus, LeasePick, LeasedCell, QueuePos,
};
use crate::domain::rows::{CellRow, MAX_RATING, ProgressRow};
use crate::domain::state::{CellState, FailureClass};
use crate::{Error, Result};

/// Expired leases handled per maintenance pass.
const RESCUE_BATCH: i64 = 500;

/// The fenced complete: cell `$3` completed at `$1` with result `$2`, only while attempt `$4`
/// of worker `$5` holds it.
const COMPLETE_UPDATE: &str = "UPDATE cells SET state = 'completed', \
     finalized_at = $1, result = $2, result_worker = lease_owner, lease_owner = NULL, \
     lease_expires_at = NULL, progress_step = progress_total \
     WHERE id = $3 AND state = 'running' AND attempt = $4 AND lease_owner = $5";

/// The state a cell given back to the queue takes: held while its sweep is paused.
const REQUEUE_STATE: &str = "CASE WHEN (SELECT state FROM sweeps WHERE sweeps.id = cells.sweep_id) \
     = 'paused' THEN 'held' ELSE 'available' END";

/// The fenced complete of `d`.
pub(super) fn complete<'a>(d: &Completion<'a>) -> Stmt<'a> {
    Stmt::new(COMPLETE_UPDATE)
        .bind(d.at.0)
        .bind(d.result_json)
        .bind(d.fence.cell.0)
        .bind(i64::from(d.fence.attempt.0))
        .bind(d.fence.worker.0)
}

impl Store {
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
            render_level: i64::MAX,
        });
        // Two statements rather than one with `$n IS NULL OR …`, so that the row-value bound
        // starts the `cells_fetch` scan at `after` (and Postgres's generic plan does too).
        let after_sql = match after {
            None => "",
            Some(_) => "AND (priority, scheduled_at, id) > ($5, $6, $7) ",
        };
        // The caps are a filter on the rows `cells_fetch` walks in queue order.
        let mut stmt = Stmt::new(format!(
            "SELECT id, priority, scheduled_at, pixels, min_memory_mib, render_level, \
             affinity_key, last_failed_worker FROM {} WHERE state = 'available' \
             AND pixels <= $1 AND min_memory_mib <= $2 AND render_level <= $4 \
             {after_sql}ORDER BY priority, scheduled_at, id LIMIT $3",
            self.db.queue_scan()
        ))
        .bind(caps.max_pixels)
        .bind(caps.memory_mib)
        .bind(limit as i64)
        .bind(caps.render_level);
        if let Some(pos) = after {
            stmt = stmt.bind(pos.priority).bind(pos.scheduled_at).bind(pos.id);
        }
        let rows = stmt.fetch_all(self.db.reader()).await?;
        rows.iter().map(rows::available).collect()
    }

    /// Leases the picked cells that are still available to `pick.worker`: they become
    /// `running` under a new attempt. Returned in pick order; a picked cell that is no longer
    /// available (leased, cancelled, paused meanwhile) is left out.
    pub async fn cell_lease(&self, pick: &LeasePick, now: Millis) -> Result<Vec<LeasedCell>> {
        if pick.ids.is_empty() {
            return Ok(Vec::new());
        }
        // A lease waits for a cell another transaction holds; if that one is a sweep-wide
        // write locking in another order, Postgres may abort either (`deadlock`).
        let leased = super::deadlock::retried(|| async {
            match &self.db {
                Db::Sqlite { writer, .. } => {
                    super::sqlite::lease(&mut *writer.acquire().await?, pick, now).await
                }
                Db::Postgres(pool) => super::postgres::lease(pool, pick, now).await,
            }
        })
        .await?;
        Ok(pick.in_pick_order(leased))
    }

    /// Several [`Store::cell_lease`]s, each at its own time, in one statement and one commit
    /// (the queue's group commit). `out[i]` answers `picks[i]`. The picks must not share a
    /// cell. An `Err` means nothing was leased (the transaction rolled back).
    pub async fn cell_lease_many(
        &self,
        picks: &[(LeasePick, Millis)],
    ) -> Result<Vec<Vec<LeasedCell>>> {
        let leased = match &self.db {
            Db::Sqlite { writer, .. } => super::sqlite::lease_many(writer, picks).await?,
            Db::Postgres(pool) => super::postgres::lease_many(pool, picks).await?,
        };
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
        let mut tx = self.db.begin().await?;
        let mut out = Vec::with_capacity(attempts.len());
        for (cell, attempt) in attempts {
            let row = Stmt::new(
                "UPDATE cells SET lease_expires_at = $1, heartbeat_at = $2 WHERE id = $3 \
                 AND state = 'running' AND attempt = $4 AND lease_owner = $5 \
                 RETURNING cancel_requested_at",
            )
            .bind(expires_at.0)
            .bind(now.0)
            .bind(cell.0)
            .bind(i64::from(attempt.0))
            .bind(worker.0)
            .fetch_optional(tx.on())
            .await?;
            out.push(match row {
                None => HeartbeatStatus::Lost,
                Some(r) if r.opt_int(0)?.is_some() => HeartbeatStatus::CancelRequested,
                Some(_) => HeartbeatStatus::Extended,
            });
        }
        tx.commit().await?;
        Ok(out)
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
        let row = Stmt::new(
            "UPDATE cells SET progress_step = $1, progress_total = $2, lease_expires_at = $3, \
             heartbeat_at = $4 WHERE id = $5 AND state = 'running' AND attempt = $6 \
             AND lease_owner = $7 RETURNING cancel_requested_at",
        )
        .bind(step)
        .bind(total)
        .bind(expires_at.0)
        .bind(now.0)
        .bind(f.cell.0)
        .bind(i64::from(f.attempt.0))
        .bind(f.worker.0)
        .fetch_optional(self.db.writer())
        .await?;
        match row {
            Some(r) => Ok(r.opt_int(0)?.is_some()),
            None => Err(self.fence_error(f).await),
        }
    }

    /// Why a fenced write matched nothing: the cell is unknown, or the lease is lost.
    async fn fence_error(&self, f: Fence) -> Error {
        match Stmt::new("SELECT id FROM cells WHERE id = $1")
            .bind(f.cell.0)
            .fetch_optional(self.db.writer())
            .await
        {
            Ok(Some(_)) => f.lost(),
            Ok(None) => Error::CellNotFound(f.cell),
            Err(e) => e,
        }
    }

    /// Records the result of the fenced attempt.
    pub async fn cell_complete(&self, f: Fence, result_json: &str, now: Millis) -> Result<()> {
        let done = Completion {
            fence: f,
            result_json,
            at: now,
        };
        if complete(&done).execute(self.db.writer()).await? == 0 {
            return Err(self.fence_error(f).await);
        }
        Ok(())
    }

    /// Records the results of several fenced attempts in one statement and one commit (the
    /// queue's group commit). `out[i]` is what [`Store::cell_complete`] would have answered
    /// for `done[i]`: a stale attempt gets `LeaseLost`, an unknown cell `CellNotFound`, and
    /// neither stops the others. The cells must be distinct. An `Err` means nothing was
    /// written (the transaction rolled back).
    pub async fn cell_complete_many(&self, done: &[Completion<'_>]) -> Result<Vec<Result<()>>> {
        let matched = match &self.db {
            Db::Sqlite { .. } => {
                // One transaction on the writer: one commit for the batch.
                let mut tx = self.db.begin().await?;
                let mut matched = Vec::with_capacity(done.len());
                for d in done {
                    matched.push(complete(d).execute(tx.on()).await? > 0);
                }
                tx.commit().await?;
                matched
            }
            Db::Postgres(pool) => super::postgres::complete_many(pool, done).await?,
        };
        let mut out = Vec::with_capacity(done.len());
        for (d, ok) in done.iter().zip(matched) {
            out.push(if ok {
                Ok(())
            } else {
                Err(self.fence_error(d.fence).await)
            });
        }
        Ok(out)
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
        let mut tx = self.db.begin().await?;
        let row = Stmt::new(format!(
            "SELECT attempt, max_attempts, errors, cancel_requested_at FROM cells \
             WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3{}",
            self.db.for_update()
        ))
        .bind(f.cell.0)
        .bind(i64::from(f.attempt.0))
        .bind(f.worker.0)
        .fetch_optional(tx.on())
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.fence_error(f).await);
        };
        let (decision, update) = fail_update(&row, f, class, message, now, decide)?;
        update.execute(tx.on()).await?;
        tx.commit().await?;
        Ok(decision)
    }

    /// Gives leased attempts back uncounted. Returns how many were released.
    pub async fn cell_release(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        _now: Millis,
    ) -> Result<u64> {
        let mut tx = self.db.begin().await?;
        let mut n = 0;
        for (cell, attempt) in attempts {
            n += Stmt::new(format!(
                "UPDATE cells SET state = {REQUEUE_STATE}, max_attempts = max_attempts + 1, \
                 lease_owner = NULL, lease_expires_at = NULL, progress_step = NULL, \
                 progress_total = NULL \
                 WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3"
            ))
            .bind(cell.0)
            .bind(i64::from(attempt.0))
            .bind(worker.0)
            .execute(tx.on())
            .await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Fails every attempt whose lease expired (class `lease_expired`) through `decide`.
    pub async fn cell_rescue_expired(&self, now: Millis, decide: DecideFn<'_>) -> Result<u64> {
        // Postgres: rows another maintenance pass (another coordinator) holds are its own.
        let lock = match self.db {
            Db::Sqlite { .. } => "",
            Db::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        };
        let mut tx = self.db.begin().await?;
        let rows = Stmt::new(format!(
            "SELECT id, attempt, max_attempts, errors, cancel_requested_at, lease_owner \
             FROM cells WHERE state = 'running' AND lease_expires_at < $1 LIMIT $2{lock}"
        ))
        .bind(now.0)
        .bind(RESCUE_BATCH)
        .fetch_all(tx.on())
        .await?;
        for row in &rows {
            let f = Fence {
                cell: CellId(row.int("id")?),
                attempt: Attempt(rows::narrow("attempt", row.int("attempt")?)?),
                worker: WorkerId(row.int("lease_owner")?),
            };
            let message = "lease expired without a heartbeat";
            let (_, update) =
                fail_update(row, f, FailureClass::LeaseExpired, message, now, decide)?;
            update.execute(tx.on()).await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    /// Makes scheduled and retryable cells whose time has come available (or held, when their
    /// sweep is paused).
    pub async fn cell_promote_due(&self, now: Millis) -> Result<u64> {
        Stmt::new(format!(
            "UPDATE cells SET state = {REQUEUE_STATE} \
             WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= $1"
        ))
        .bind(now.0)
        .execute(self.db.writer())
        .await
    }

    /// Every running attempt back to available, uncounted (embedded mode only; see
    /// `Queue::requeue_running`).
    pub async fn cell_requeue_running(&self) -> Result<u64> {
        Stmt::new(format!(
            "UPDATE cells SET state = {REQUEUE_STATE}, attempt = attempt - 1, \
             lease_owner = NULL, lease_expires_at = NULL, progress_step = NULL, \
             progress_total = NULL WHERE state = 'running'"
        ))
        .execute(self.db.writer())
        .await
    }

    /// One cell.
    pub async fn cell_get(&self, id: CellId) -> Result<CellRow> {
        let row = Stmt::new(format!("SELECT {CELL_COLUMNS} FROM cells WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(self.db.reader())
            .await?
            .ok_or(Error::CellNotFound(id))?;
        rows::cell(&row)
    }

    /// Marks cell `id` as a keeper or not (`starred`) and rates it (`rating`: 1 to 5 stars, 0
    /// to clear); `None` leaves that one as it is. Any state: a user may star a cell before it
    /// renders. Returns the cell as it is now.
    pub async fn cell_set_keeper(
        &self,
        id: CellId,
        starred: Option<bool>,
        rating: Option<u8>,
    ) -> Result<CellRow> {
        if let Some(r) = rating.filter(|r| *r > MAX_RATING) {
            return Err(Error::invalid(format!(
                "rating {r}: 0 (not rated) to {MAX_RATING}"
            )));
        }
        let row = Stmt::new(format!(
            "UPDATE cells SET starred = COALESCE($1, starred), rating = COALESCE($2, rating) \
             WHERE id = $3 RETURNING {CELL_COLUMNS}"
        ))
        .bind(starred.map(i64::from))
        .bind(rating.map(i64::from))
        .bind(id.0)
        .fetch_optional(self.db.writer())
        .await?
        .ok_or(Error::CellNotFound(id))?;
        rows::cell(&row)
    }

    /// Progress of running cells of a sweep or a worker.
    pub async fn cell_running(
        &self,
        sweep: Option<SweepId>,
        worker: Option<WorkerId>,
    ) -> Result<Vec<ProgressRow>> {
        let rows = Stmt::new(
            "SELECT id, number, attempt, lease_owner, progress_step, progress_total FROM cells \
             WHERE state = 'running' AND ($1 IS NULL OR sweep_id = $1) \
             AND ($2 IS NULL OR lease_owner = $2) ORDER BY id",
        )
        .bind(sweep.map(|s| s.0))
        .bind(worker.map(|w| w.0))
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(rows::progress).collect()
    }

    /// **For benchmarks and tests only; the coordinator never calls it.** Marks every
    /// available cell of a sweep completed with `result_json` in one statement, skipping
    /// leases, fences and attempts history, so a benchmark can have a million finished cells in
    /// seconds. Returns cells changed.
    #[cfg(feature = "testing")]
    pub async fn sweep_complete_all_unfenced(
        &self,
        id: SweepId,
        result_json: &str,
        now: Millis,
    ) -> Result<u64> {
        Stmt::new(
            "UPDATE cells SET state = 'completed', attempt = 1, finalized_at = $1, \
             result = $2 WHERE sweep_id = $3 AND state = 'available'",
        )
        .bind(now.0)
        .bind(result_json)
        .bind(id.0)
        .execute(self.db.writer())
        .await
    }
}

/// Applies a failure to the cell in `row` (already matched, and on Postgres locked, by its
/// fence): the decision, and the statement that records it.
fn fail_update<'a>(
    row: &Row,
    f: Fence,
    class: FailureClass,
    message: &str,
    now: Millis,
    decide: DecideFn<'_>,
) -> Result<(Decision, Stmt<'a>)> {
    let rows::FailRow {
        attempt,
        max_attempts,
        errors,
        cancel_requested,
    } = rows::fail(row)?;
    let history = push_error(
        &errors,
        ErrorEntry {
            attempt,
            worker: f.worker.0,
            class,
            message: message.to_string(),
            at: now.0,
        },
    )?;
    let decision = decide(&FailContext {
        cell: f.cell.0,
        attempt,
        max_attempts,
        cancel_requested,
        history: &history,
        now,
    });
    let errors = serde_json::to_string(&history).map_err(|e| Error::Corrupt(e.to_string()))?;
    let (state, scheduled_at, finalized_at) = match &decision {
        Decision::Retry { at } => (CellState::Retryable, Some(at.0), None),
        Decision::Discard { .. } => (CellState::Discarded, None, Some(now.0)),
        Decision::Cancel => (CellState::Cancelled, None, Some(now.0)),
    };
    let update = Stmt::new(
        "UPDATE cells SET state = $1, scheduled_at = COALESCE($2, scheduled_at), \
         finalized_at = $3, errors = $4, last_failed_worker = lease_owner, lease_owner = NULL, \
         lease_expires_at = NULL WHERE id = $5 AND state = 'running' AND attempt = $6 \
         AND lease_owner = $7",
    )
    .bind(state.as_str())
    .bind(scheduled_at)
    .bind(finalized_at)
    .bind(errors)
    .bind(f.cell.0)
    .bind(i64::from(f.attempt.0))
    .bind(f.worker.0);
    Ok((decision, update))
}
