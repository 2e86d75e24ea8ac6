//! Cell lifecycle statements of the Postgres backend: the dispatcher's read of available
//! cells, leases, heartbeats, progress, the fenced complete and fail, release, and the
//! maintenance pass.

use std::collections::HashSet;

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Postgres};

use super::PgStore;
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

/// The fenced complete: `UPDATE` of the cell `$3` to completed at `$1` with `$2`, only while
/// attempt `$4` of worker `$5` holds it.
const COMPLETE_UPDATE: &str = "UPDATE cells SET state = 'completed', finalized_at = $1, \
     result = $2, result_worker = lease_owner, lease_owner = NULL, lease_expires_at = NULL, \
     progress_step = progress_total \
     WHERE id = $3 AND state = 'running' AND attempt = $4 AND lease_owner = $5";

/// Marks the picked cells `$1` that are still available running under a new attempt for worker
/// `$3` at `$2` until `$4`, and returns them.
///
/// Leases lock their cells in ascending id order: `$1` is bound sorted and read through the
/// primary key, and the batch statement of `cell_lease_many` joins its ids sorted the same
/// way. Two leases that want some of the same cells (two coordinators on one database) then
/// wait for each other in one order and cannot deadlock; in pick order they could, and did in
/// the two-coordinator test. (`FOR UPDATE SKIP LOCKED` would avoid the wait as well, but its
/// extra row lock cost about a fifth of the lease rate: 2,914–3,322 lease(1)+complete cycles/s
/// against 3,304–4,079 without it.)
const LEASE_UPDATE: &str = "UPDATE cells SET state = 'running', attempt = attempt + 1, \
     attempted_at = $2, lease_owner = $3, lease_expires_at = $4, heartbeat_at = $2, \
     progress_step = NULL, progress_total = NULL \
     WHERE id = ANY($1) AND state = 'available' \
     RETURNING id, sweep_id, number, attempt, cell_key, affinity_key, spec";

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
        let rows = bind_lease(sqlx::query(LEASE_UPDATE), p, now, expires)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| rows::leased(r, expires, p.head == Some(r.int("id")?)))
            .collect()
    }

    pub(in crate::store) async fn cell_lease_many(
        &self,
        picks: &[(LeasePick, Millis)],
    ) -> Result<Vec<Vec<LeasedCell>>> {
        // One `UPDATE … FROM unnest(…)` with a row per picked cell: `LEASE_UPDATE` for every
        // pick at once; `d.pick` says which pick a leased cell answers. The rows go in id
        // order, so the join locks the cells in that order (see `LEASE_UPDATE`).
        let mut rows: Vec<(i64, i64, i64, i64, i64)> = Vec::new();
        for (i, (p, at)) in picks.iter().enumerate() {
            for id in &p.ids {
                rows.push((*id, i as i64, p.worker.0, at.0, at.plus(p.lease_ttl_ms).0));
            }
        }
        rows.sort_unstable();
        let mut ids = Vec::with_capacity(rows.len());
        let mut pick_of = Vec::with_capacity(rows.len());
        let mut workers = Vec::with_capacity(rows.len());
        let mut ats = Vec::with_capacity(rows.len());
        let mut expires = Vec::with_capacity(rows.len());
        for (id, pick, worker, at, until) in rows {
            ids.push(id);
            pick_of.push(pick);
            workers.push(worker);
            ats.push(at);
            expires.push(until);
        }
        let rows = sqlx::query(
            "UPDATE cells SET state = 'running', attempt = attempt + 1, attempted_at = d.at, \
             lease_owner = d.worker, lease_expires_at = d.expires, heartbeat_at = d.at, \
             progress_step = NULL, progress_total = NULL \
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
                 AS d(id, pick, worker, at, expires) \
             WHERE cells.id = d.id AND cells.state = 'available' \
             RETURNING cells.id, cells.sweep_id, cells.number, cells.attempt, cells.cell_key, \
                 cells.affinity_key, cells.spec, d.pick, d.expires",
        )
        .bind(ids)
        .bind(pick_of)
        .bind(workers)
        .bind(ats)
        .bind(expires)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<Vec<LeasedCell>> = picks.iter().map(|_| Vec::new()).collect();
        for r in &rows {
            let i = usize::try_from(r.int("pick")?)
                .ok()
                .filter(|i| *i < picks.len())
                .ok_or_else(|| Error::Corrupt("lease batch: pick index out of range".into()))?;
            let head = picks[i].0.head;
            out[i].push(rows::leased(
                r,
                Millis(r.int("expires")?),
                head == Some(r.int("id")?),
            )?);
        }
        Ok(out)
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
        let n = sqlx::query(COMPLETE_UPDATE)
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

    pub(in crate::store) async fn cell_complete_many(
        &self,
        done: &[Completion<'_>],
    ) -> Result<Vec<Result<()>>> {
        // One `UPDATE … FROM unnest(…)`: each row is the fenced complete of `COMPLETE_UPDATE`
        // for one attempt.
        let matched: Vec<i64> = sqlx::query_scalar(
            "UPDATE cells SET state = 'completed', finalized_at = d.at, result = d.result, \
             result_worker = lease_owner, lease_owner = NULL, lease_expires_at = NULL, \
             progress_step = progress_total \
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[]) \
                 AS d(id, attempt, worker, result, at) \
             WHERE cells.id = d.id AND cells.state = 'running' AND cells.attempt = d.attempt \
                 AND cells.lease_owner = d.worker \
             RETURNING cells.id",
        )
        .bind(done.iter().map(|d| d.fence.cell.0).collect::<Vec<_>>())
        .bind(
            done.iter()
                .map(|d| i64::from(d.fence.attempt.0))
                .collect::<Vec<_>>(),
        )
        .bind(done.iter().map(|d| d.fence.worker.0).collect::<Vec<_>>())
        .bind(done.iter().map(|d| d.result_json).collect::<Vec<_>>())
        .bind(done.iter().map(|d| d.at.0).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        let matched: HashSet<i64> = matched.into_iter().collect();
        let mut out = Vec::with_capacity(done.len());
        for d in done {
            out.push(if matched.contains(&d.fence.cell.0) {
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
                 max_attempts = max_attempts + 1, lease_owner = NULL, lease_expires_at = NULL, \
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
        // A result query's best plan depends on its values (how much of the table a sweep or
        // a seed range is): plan each execution, not once per connection (see `connect`).
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL plan_cache_mode = auto")
            .execute(&mut *tx)
            .await?;
        let resolved;
        let q = match filter::sweep_lookup::<Postgres>(q) {
            Some(mut lookup) => {
                let rows = lookup.build().fetch_all(&mut *tx).await?;
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
        let rows = qb.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
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

/// Binds `$1`–`$4` of `LEASE_UPDATE`.
fn bind_lease<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    p: &'q LeasePick,
    now: Millis,
    expires: Millis,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let mut ids = p.ids.clone();
    ids.sort_unstable();
    query.bind(ids).bind(now.0).bind(p.worker.0).bind(expires.0)
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
