//! Cell lifecycle statements of the Postgres backend: the dispatcher's read of available
//! cells, leases, heartbeats, progress, the fenced complete and fail, release, and the
//! maintenance pass.

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Postgres};

use super::PgStore;
use crate::clock::Millis;
use crate::queue::retry::{Decision, ErrorEntry, FailContext};
use crate::queue::state::{CellState, FailureClass};
use crate::store::filter;
use crate::store::query::{self, CELL_COLUMNS, CellQuery};
use crate::store::rows::{self, AnyRow};
use crate::store::{
    AvailableCell, Caps, CellRow, DecideFn, Fence, HeartbeatStatus, LeasePick, LeasedCell,
    ProgressRow, QueuePos, push_error,
};
use crate::{Error, Result};

/// The fenced complete: `UPDATE` of the cell `$cell` to completed at `$now` with `$result`,
/// only while attempt `$attempt` of worker `$worker` holds it (placeholders are the caller's).
macro_rules! complete_update {
    ($now:literal, $result:literal, $cell:literal, $attempt:literal, $worker:literal) => {
        concat!(
            "UPDATE cells SET state = 'completed', finalized_at = ",
            $now,
            ", result = ",
            $result,
            ", result_worker = lease_owner, lease_owner = NULL, lease_expires_at = NULL, \
             progress_step = progress_total WHERE id = ",
            $cell,
            " AND state = 'running' AND attempt = ",
            $attempt,
            " AND lease_owner = ",
            $worker
        )
    };
}

/// Marks the picked cells `$1` that are still available running under a new attempt for worker
/// `$3` at `$2` until `$4`, and returns them. `$gate` adds a condition (the combined complete's
/// fence).
macro_rules! lease_update {
    ($gate:literal) => {
        concat!(
            "UPDATE cells SET state = 'running', attempt = attempt + 1, attempted_at = $2, \
                 lease_owner = $3, lease_expires_at = $4, heartbeat_at = $2, \
                 progress_step = NULL, progress_total = NULL \
             WHERE id = ANY($1) AND state = 'available' ",
            $gate,
            "RETURNING id, sweep_id, number, attempt, cell_key, affinity_key, spec"
        )
    };
}

/// The columns of an [`AvailableCell`], for `cell_available`.
const AVAILABLE_COLUMNS: &str =
    "id, priority, scheduled_at, pixels, min_memory_mib, affinity_key, last_failed_worker";
/// Expired leases handled per maintenance pass.
const RESCUE_BATCH: i64 = 500;

impl PgStore {
    pub(in crate::store) async fn cell_available(
        &self,
        after: Option<QueuePos>,
        limit: usize,
        caps: Caps,
    ) -> Result<Vec<AvailableCell>> {
        // Two statements rather than one with `$n IS NULL OR …`, so that a generic plan still
        // starts the `cells_fetch` scan at `after`.
        let query = match after {
            None => sqlx::query(AssertSqlSafe(format!(
                "SELECT {AVAILABLE_COLUMNS} FROM cells WHERE state = 'available' \
                 AND pixels <= $1 AND min_memory_mib <= $2 \
                 ORDER BY priority, scheduled_at, id LIMIT $3"
            ))),
            Some(_) => sqlx::query(AssertSqlSafe(format!(
                "SELECT {AVAILABLE_COLUMNS} FROM cells WHERE state = 'available' \
                 AND pixels <= $1 AND min_memory_mib <= $2 \
                 AND (priority, scheduled_at, id) > ($4, $5, $6) \
                 ORDER BY priority, scheduled_at, id LIMIT $3"
            ))),
        };
        let mut query = query
            .bind(caps.max_pixels)
            .bind(caps.memory_mib)
            .bind(limit as i64);
        if let Some(pos) = after {
            query = query.bind(pos.priority).bind(pos.scheduled_at).bind(pos.id);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(rows::available).collect()
    }

    pub(in crate::store) async fn cell_lease(
        &self,
        p: &LeasePick,
        now: Millis,
    ) -> Result<Vec<LeasedCell>> {
        let expires = now.plus(p.lease_ttl_ms);
        let rows = bind_lease(sqlx::query(lease_update!("")), p, now, expires)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| rows::leased(r, expires, p.head == Some(r.int("id")?)))
            .collect()
    }

    pub(in crate::store) async fn cell_complete_lease(
        &self,
        f: Fence,
        result_json: &str,
        p: &LeasePick,
        now: Millis,
    ) -> Result<Vec<LeasedCell>> {
        // One statement, so one transaction and one commit: the fenced complete (`done`), then
        // the lease of `cell_lease`, gated on `done` having matched. The outer join always
        // yields a row, so a complete that leased nothing is told apart from a stale one by
        // `done`.
        let expires = now.plus(p.lease_ttl_ms);
        let query = sqlx::query(concat!(
            "WITH done AS (",
            complete_update!("$2", "$5", "$6", "$7", "$3"),
            " RETURNING id), leased AS (",
            lease_update!("AND EXISTS (SELECT 1 FROM done) "),
            ") SELECT (SELECT count(*) FROM done) AS done, leased.* \
             FROM (VALUES (1)) AS one LEFT JOIN leased ON true",
        ));
        let rows = bind_lease(query, p, now, expires)
            .bind(result_json)
            .bind(f.cell.0)
            .bind(i64::from(f.attempt.0))
            .fetch_all(&self.pool)
            .await?;
        let done = match rows.first() {
            Some(r) => r.int("done")?,
            None => 0,
        };
        if done == 0 {
            return Err(self.fence_error(f).await);
        }
        rows.iter()
            .filter(|r| matches!(r.opt_int("id"), Ok(Some(_))))
            .map(|r| rows::leased(r, expires, p.head == Some(r.int("id")?)))
            .collect()
    }

    pub(in crate::store) async fn lease_heartbeat(
        &self,
        worker: WorkerId,
        attempts: &[(CellId, Attempt)],
        expires_at: Millis,
        now: Millis,
    ) -> Result<Vec<HeartbeatStatus>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(attempts.len());
        for (cell, attempt) in attempts {
            let row: Option<Option<i64>> = sqlx::query_scalar(
                "UPDATE cells SET lease_expires_at = $1, heartbeat_at = $2 WHERE id = $3 \
                 AND state = 'running' AND attempt = $4 AND lease_owner = $5 \
                 RETURNING cancel_requested_at",
            )
            .bind(expires_at.0)
            .bind(now.0)
            .bind(cell.0)
            .bind(i64::from(attempt.0))
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
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(cancel) => Ok(cancel.is_some()),
            None => Err(self.fence_error(f).await),
        }
    }

    /// Why a fenced write matched nothing: the cell is unknown, or the lease is lost.
    async fn fence_error(&self, f: Fence) -> Error {
        match sqlx::query_scalar::<_, i64>("SELECT id FROM cells WHERE id = $1")
            .bind(f.cell.0)
            .fetch_optional(&self.pool)
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
        let n = sqlx::query(complete_update!("$1", "$2", "$3", "$4", "$5"))
            .bind(now.0)
            .bind(result_json)
            .bind(f.cell.0)
            .bind(i64::from(f.attempt.0))
            .bind(f.worker.0)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(self.fence_error(f).await);
        }
        Ok(())
    }

    pub(in crate::store) async fn cell_fail(
        &self,
        f: Fence,
        class: FailureClass,
        message: &str,
        now: Millis,
        decide: DecideFn<'_>,
    ) -> Result<Decision> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT attempt, max_attempts, errors, cancel_requested_at FROM cells \
             WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3 \
             FOR UPDATE",
        )
        .bind(f.cell.0)
        .bind(i64::from(f.attempt.0))
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
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for (cell, attempt) in attempts {
            n += sqlx::query(
                "UPDATE cells SET state = CASE WHEN (SELECT state FROM sweeps \
                 WHERE sweeps.id = cells.sweep_id) = 'paused' THEN 'held' ELSE 'available' END, \
                 attempt = attempt - 1, lease_owner = NULL, lease_expires_at = NULL, \
                 progress_step = NULL, progress_total = NULL \
                 WHERE id = $1 AND state = 'running' AND attempt = $2 AND lease_owner = $3",
            )
            .bind(cell.0)
            .bind(i64::from(attempt.0))
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
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, attempt, max_attempts, errors, cancel_requested_at, lease_owner \
             FROM cells WHERE state = 'running' AND lease_expires_at < $1 LIMIT $2 \
             FOR UPDATE SKIP LOCKED",
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
             WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= $1",
        )
        .bind(now.0)
        .execute(&self.pool)
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
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    pub(in crate::store) async fn cell_get(&self, id: CellId) -> Result<CellRow> {
        let sql = format!("SELECT {CELL_COLUMNS} FROM cells WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::CellNotFound(id))?;
        rows::cell(&row)
    }

    pub(in crate::store) async fn cell_query(&self, q: &CellQuery) -> Result<Vec<CellRow>> {
        let resolved;
        let q = match filter::sweep_lookup::<Postgres>(q) {
            Some(mut lookup) => {
                let rows = lookup.build().fetch_all(&self.pool).await?;
                let ids = rows
                    .iter()
                    .map(|r| Ok((r.int("id")?, r.text("name")?)))
                    .collect::<Result<Vec<_>>>()?;
                resolved = filter::with_sweep_ids(q, &ids);
                &resolved
            }
            None => q,
        };
        let mut qb = query::build::<Postgres>(q);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(rows::cell).collect()
    }

    pub(in crate::store) async fn analyze(&self) -> Result<()> {
        sqlx::raw_sql("ANALYZE cells, sweeps")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(in crate::store) async fn sweep_complete_all_unfenced(
        &self,
        id: SweepId,
        result_json: &str,
        now: Millis,
    ) -> Result<u64> {
        let n = sqlx::query(
            "UPDATE cells SET state = 'completed', attempt = 1, finalized_at = $1, \
             result = $2 WHERE sweep_id = $3 AND state = 'available'",
        )
        .bind(now.0)
        .bind(result_json)
        .bind(id.0)
        .execute(&self.pool)
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
             WHERE state = 'running' AND ($1::bigint IS NULL OR sweep_id = $2) \
             AND ($3::bigint IS NULL OR lease_owner = $4) ORDER BY id",
        )
        .bind(sweep.map(|s| s.0))
        .bind(sweep.map(|s| s.0))
        .bind(worker.map(|w| w.0))
        .bind(worker.map(|w| w.0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::progress).collect()
    }
}

/// Binds `$1`–`$4` of `lease_update!`.
fn bind_lease<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    p: &'q LeasePick,
    now: Millis,
    expires: Millis,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(&p.ids)
        .bind(now.0)
        .bind(p.worker.0)
        .bind(expires.0)
}

/// Applies a failure to the cell in `row` (already matched by its fence) inside `tx`.
async fn fail_in_tx(
    tx: &mut sqlx::PgConnection,
    row: &PgRow,
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
        "UPDATE cells SET state = $1, scheduled_at = COALESCE($2::bigint, scheduled_at), finalized_at = $3, \
         errors = $4, last_failed_worker = lease_owner, lease_owner = NULL, \
         lease_expires_at = NULL WHERE id = $5 AND state = 'running' AND attempt = $6 \
         AND lease_owner = $7",
    )
    .bind(state.as_str())
    .bind(scheduled_at)
    .bind(finalized_at)
    .bind(errors)
    .bind(f.cell.0)
    .bind(i64::from(f.attempt.0))
    .bind(f.worker.0)
    .execute(&mut *tx)
    .await?;
    Ok(decision)
}
