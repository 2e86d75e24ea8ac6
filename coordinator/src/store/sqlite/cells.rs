//! Cell lifecycle statements of the SQLite backend: the dispatcher's read of available cells,
//! leases, heartbeats, progress, the fenced complete and fail, release, and the maintenance
//! pass. Writes go through the one writer connection.

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Sqlite};

use super::SqliteStore;
use crate::clock::Millis;
use crate::domain::failure::{Decision, ErrorEntry, FailContext};
use crate::domain::state::{CellState, FailureClass};
use crate::store::filter;
use crate::store::query::{self, CELL_COLUMNS, CellQuery};
use crate::store::rows::{self, AnyRow};
use crate::store::{
    AvailableCell, Caps, CellRow, Completion, DecideFn, Fence, HeartbeatStatus, LeasePick,
    LeasedCell, ProgressRow, QueuePos, push_error,
};
use crate::{Error, Result};

/// Expired leases handled per maintenance pass.
const RESCUE_BATCH: i64 = 500;

impl SqliteStore {
    pub(in crate::store) async fn cell_available(
        &self,
        after: Option<QueuePos>,
        limit: usize,
        caps: Caps,
    ) -> Result<Vec<AvailableCell>> {
        // The row-value bound starts the `cells_fetch` scan at `after`.
        let (after_sql, pos) = match after {
            None => (
                "",
                QueuePos {
                    priority: 0,
                    scheduled_at: 0,
                    id: 0,
                },
            ),
            Some(pos) => ("AND (priority, scheduled_at, id) > (?, ?, ?) ", pos),
        };
        let sql = format!(
            "SELECT id, priority, scheduled_at, pixels, min_memory_mib, affinity_key, \
             last_failed_worker FROM cells INDEXED BY cells_fetch \
             WHERE state = 'available' AND pixels <= ? AND min_memory_mib <= ? {after_sql}\
             ORDER BY priority, scheduled_at, id LIMIT ?"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(caps.max_pixels)
            .bind(caps.memory_mib);
        if after.is_some() {
            query = query.bind(pos.priority).bind(pos.scheduled_at).bind(pos.id);
        }
        let rows = query.bind(limit as i64).fetch_all(&self.reader).await?;
        rows.iter().map(rows::available).collect()
    }

    pub(in crate::store) async fn cell_lease(
        &self,
        p: &LeasePick,
        now: Millis,
    ) -> Result<Vec<LeasedCell>> {
        let mut conn = self.writer.acquire().await?;
        lease_on(&mut conn, p, now).await
    }

    pub(in crate::store) async fn cell_lease_many(
        &self,
        picks: &[(LeasePick, Millis)],
    ) -> Result<Vec<Vec<LeasedCell>>> {
        // One transaction on the writer: one commit for the batch.
        let mut tx = self.writer.begin().await?;
        let mut out = Vec::with_capacity(picks.len());
        for (p, at) in picks {
            out.push(lease_on(&mut tx, p, *at).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(in crate::store) async fn lease_heartbeat(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        expires_at: Millis,
        now: Millis,
    ) -> Result<Vec<HeartbeatStatus>> {
        let mut tx = self.writer.begin().await?;
        let mut out = Vec::with_capacity(attempts.len());
        for (cell, attempt) in attempts {
            let row: Option<Option<i64>> = sqlx::query_scalar(
                "UPDATE cells SET lease_expires_at = ?, heartbeat_at = ? WHERE id = ? \
                 AND state = 'running' AND attempt = ? AND lease_owner = ? \
                 RETURNING cancel_requested_at",
            )
            .bind(expires_at.0)
            .bind(now.0)
            .bind(cell.0)
            .bind(attempt.0)
            .bind(worker.0)
            .fetch_optional(&mut *tx)
            .await?;
            out.push(match row {
                None => HeartbeatStatus::Lost,
                Some(None) => HeartbeatStatus::Extended,
                Some(Some(_)) => HeartbeatStatus::CancelRequested,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(in crate::store) async fn cell_progress(
        &self,
        f: Fence,
        step: i64,
        total: i64,
        expires_at: Millis,
        now: Millis,
    ) -> Result<bool> {
        let row: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE cells SET progress_step = ?, progress_total = ?, lease_expires_at = ?, \
             heartbeat_at = ? WHERE id = ? AND state = 'running' AND attempt = ? \
             AND lease_owner = ? RETURNING cancel_requested_at",
        )
        .bind(step)
        .bind(total)
        .bind(expires_at.0)
        .bind(now.0)
        .bind(f.cell.0)
        .bind(f.attempt.0)
        .bind(f.worker.0)
        .fetch_optional(&self.writer)
        .await?;
        match row {
            Some(cancel) => Ok(cancel.is_some()),
            None => Err(self.fence_error(f).await),
        }
    }

    /// Why a fenced write matched nothing: the cell is unknown, or the lease is lost.
    async fn fence_error(&self, f: Fence) -> Error {
        match sqlx::query_scalar::<_, i64>("SELECT id FROM cells WHERE id = ?")
            .bind(f.cell.0)
            .fetch_optional(&self.writer)
            .await
        {
            Ok(Some(_)) => f.lost(),
            Ok(None) => Error::CellNotFound(f.cell),
            Err(e) => e.into(),
        }
    }

    pub(in crate::store) async fn cell_complete(
        &self,
        f: Fence,
        result_json: &str,
        now: Millis,
    ) -> Result<()> {
        let n = complete_query(f, result_json, now)
            .execute(&self.writer)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(self.fence_error(f).await);
        }
        Ok(())
    }

    pub(in crate::store) async fn cell_complete_many(
        &self,
        done: &[Completion<'_>],
    ) -> Result<Vec<Result<()>>> {
        // One transaction on the writer: one commit for the batch.
        let mut tx = self.writer.begin().await?;
        let mut matched = Vec::with_capacity(done.len());
        for d in done {
            let n = complete_query(d.fence, d.result_json, d.at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            matched.push(n > 0);
        }
        tx.commit().await?;
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

    pub(in crate::store) async fn cell_fail(
        &self,
        f: Fence,
        class: FailureClass,
        message: &str,
        now: Millis,
        decide: DecideFn<'_>,
    ) -> Result<Decision> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT attempt, max_attempts, errors, cancel_requested_at FROM cells \
             WHERE id = ? AND state = 'running' AND attempt = ? AND lease_owner = ?",
        )
        .bind(f.cell.0)
        .bind(f.attempt.0)
        .bind(f.worker.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.fence_error(f).await);
        };
        let decision = fail_in_tx(&mut tx, &row, f, class, message, now, decide).await?;
        tx.commit().await?;
        Ok(decision)
    }

    pub(in crate::store) async fn cell_release(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        _now: Millis,
    ) -> Result<u64> {
        let mut tx = self.writer.begin().await?;
        let mut n = 0;
        for (cell, attempt) in attempts {
            n += sqlx::query(
                "UPDATE cells SET state = CASE WHEN (SELECT state FROM sweeps \
                 WHERE sweeps.id = cells.sweep_id) = 'paused' THEN 'held' ELSE 'available' END, \
                 max_attempts = max_attempts + 1, lease_owner = NULL, lease_expires_at = NULL, \
                 progress_step = NULL, progress_total = NULL \
                 WHERE id = ? AND state = 'running' AND attempt = ? AND lease_owner = ?",
            )
            .bind(cell.0)
            .bind(attempt.0)
            .bind(worker.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    pub(in crate::store) async fn cell_rescue_expired(
        &self,
        now: Millis,
        decide: DecideFn<'_>,
    ) -> Result<u64> {
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(
            "SELECT id, attempt, max_attempts, errors, cancel_requested_at, lease_owner \
             FROM cells WHERE state = 'running' AND lease_expires_at < ? LIMIT ?",
        )
        .bind(now.0)
        .bind(RESCUE_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let f = Fence {
                cell: CellId(row.int("id")?),
                attempt: Attempt(rows::narrow("attempt", row.int("attempt")?)?),
                worker: WorkerId(row.int("lease_owner")?),
            };
            fail_in_tx(
                &mut tx,
                row,
                f,
                FailureClass::LeaseExpired,
                "lease expired without a heartbeat",
                now,
                decide,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    pub(in crate::store) async fn cell_promote_due(&self, now: Millis) -> Result<u64> {
        let n = sqlx::query(
            "UPDATE cells SET state = CASE WHEN (SELECT state FROM sweeps \
             WHERE sweeps.id = cells.sweep_id) = 'paused' THEN 'held' ELSE 'available' END \
             WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= ?",
        )
        .bind(now.0)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(n)
    }

    pub(in crate::store) async fn cell_requeue_running(&self) -> Result<u64> {
        let n = sqlx::query(
            "UPDATE cells SET state = CASE WHEN (SELECT state FROM sweeps \
             WHERE sweeps.id = cells.sweep_id) = 'paused' THEN 'held' ELSE 'available' END, \
             attempt = attempt - 1, lease_owner = NULL, lease_expires_at = NULL, \
             progress_step = NULL, progress_total = NULL WHERE state = 'running'",
        )
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(n)
    }

    pub(in crate::store) async fn cell_get(&self, id: CellId) -> Result<CellRow> {
        let sql = format!("SELECT {CELL_COLUMNS} FROM cells WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?
            .ok_or(Error::CellNotFound(id))?;
        rows::cell(&row)
    }

    pub(in crate::store) async fn cell_query(&self, q: &CellQuery) -> Result<Vec<CellRow>> {
        let resolved;
        let q = match filter::sweep_lookup::<Sqlite>(q) {
            Some(mut lookup) => {
                let rows = lookup.build().fetch_all(&self.reader).await?;
                let ids = rows
                    .iter()
                    .map(|r| Ok((r.int("id")?, r.text("name")?)))
                    .collect::<Result<Vec<_>>>()?;
                resolved = filter::with_sweep_ids(q, &ids);
                &resolved
            }
            None => q,
        };
        let mut qb = query::build::<Sqlite>(q);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(rows::cell).collect()
    }

    pub(in crate::store) async fn analyze(&self) -> Result<()> {
        sqlx::raw_sql("ANALYZE").execute(&self.writer).await?;
        Ok(())
    }

    pub(in crate::store) async fn sweep_complete_all_unfenced(
        &self,
        id: SweepId,
        result_json: &str,
        now: Millis,
    ) -> Result<u64> {
        let n = sqlx::query(
            "UPDATE cells SET state = 'completed', attempt = 1, finalized_at = ?, \
             result = ? WHERE sweep_id = ? AND state = 'available'",
        )
        .bind(now.0)
        .bind(result_json)
        .bind(id.0)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(n)
    }

    pub(in crate::store) async fn cell_running(
        &self,
        sweep: Option<SweepId>,
        worker: Option<WorkerId>,
    ) -> Result<Vec<ProgressRow>> {
        let rows = sqlx::query(
            "SELECT id, number, attempt, lease_owner, progress_step, progress_total FROM cells \
             WHERE state = 'running' AND (? IS NULL OR sweep_id = ?) \
             AND (? IS NULL OR lease_owner = ?) ORDER BY id",
        )
        .bind(sweep.map(|s| s.0))
        .bind(sweep.map(|s| s.0))
        .bind(worker.map(|w| w.0))
        .bind(worker.map(|w| w.0))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::progress).collect()
    }
}

/// Marks the picked cells that are still available running for `p.worker`, on the writer
/// connection `conn`.
async fn lease_on(
    conn: &mut sqlx::SqliteConnection,
    p: &LeasePick,
    now: Millis,
) -> Result<Vec<LeasedCell>> {
    let expires = now.plus(p.lease_ttl_ms);
    let ids_json = serde_json::to_string(&p.ids).map_err(|e| Error::Corrupt(e.to_string()))?;
    // `+state`: the state test must not use an index. Without statistics SQLite otherwise
    // walks every available cell through `cells_state_finished` (state = ?) and tests each id
    // against the list, instead of looking the few ids up by rowid: O(queue) per lease.
    let rows = sqlx::query(
        "UPDATE cells SET state = 'running', attempt = attempt + 1, attempted_at = ?, \
         lease_owner = ?, lease_expires_at = ?, heartbeat_at = ?, progress_step = NULL, \
         progress_total = NULL \
         WHERE id IN (SELECT value FROM json_each(?)) AND +state = 'available' \
         RETURNING id, sweep_id, number, attempt, cell_key, affinity_key, spec",
    )
    .bind(now.0)
    .bind(p.worker.0)
    .bind(expires.0)
    .bind(now.0)
    .bind(ids_json)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| rows::leased(r, expires, p.head == Some(r.int("id")?)))
        .collect()
}

/// The fenced complete of attempt `f` with `result_json` at `now`.
fn complete_query<'q>(
    f: Fence,
    result_json: &'q str,
    now: Millis,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments> {
    sqlx::query(
        "UPDATE cells SET state = 'completed', finalized_at = ?, result = ?, \
         result_worker = lease_owner, lease_owner = NULL, lease_expires_at = NULL, \
         progress_step = progress_total \
         WHERE id = ? AND state = 'running' AND attempt = ? AND lease_owner = ?",
    )
    .bind(now.0)
    .bind(result_json)
    .bind(f.cell.0)
    .bind(f.attempt.0)
    .bind(f.worker.0)
}

/// Applies a failure to the cell in `row` (already matched by its fence) inside `tx`.
async fn fail_in_tx(
    tx: &mut sqlx::SqliteConnection,
    row: &SqliteRow,
    f: Fence,
    class: FailureClass,
    message: &str,
    now: Millis,
    decide: DecideFn<'_>,
) -> Result<Decision> {
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
    sqlx::query(
        "UPDATE cells SET state = ?, scheduled_at = COALESCE(?, scheduled_at), finalized_at = ?, \
         errors = ?, last_failed_worker = lease_owner, lease_owner = NULL, \
         lease_expires_at = NULL WHERE id = ? AND state = 'running' AND attempt = ? \
         AND lease_owner = ?",
    )
    .bind(state.as_str())
    .bind(scheduled_at)
    .bind(finalized_at)
    .bind(errors)
    .bind(f.cell.0)
    .bind(f.attempt.0)
    .bind(f.worker.0)
    .execute(&mut *tx)
    .await?;
    Ok(decision)
}
