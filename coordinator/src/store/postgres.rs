//! The Postgres backend. A lease marks the cells the dispatcher picked (`queue::dispatch`)
//! with one `UPDATE … WHERE id = ANY(…) AND state = 'available'`, so two leasers can never
//! take one cell; the maintenance pass takes expired leases `FOR UPDATE SKIP LOCKED`, and
//! failure decisions lock the one row they change. Many connections write at once; every write is a short
//! transaction, and the fence in each `UPDATE … WHERE` makes stale writes match nothing.

use std::collections::HashSet;

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres};

use super::filter;
use super::query::{self, CELL_COLUMNS, CellQuery};
use super::rows::{self, AnyRow};
use super::{
    AvailableCell, Caps, CellRow, DecideFn, Fence, HeartbeatStatus, LeasePick, LeasedCell,
    ProgressRow, QueuePos, StateCounts, SweepInsert, SweepInserted, SweepRow, WorkerRegistration,
    WorkerRow, push_error, to_u64,
};
use crate::clock::Millis;
use crate::queue::retry::{Decision, ErrorEntry, FailContext};
use crate::queue::state::{CellState, FailureClass, SweepState};
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

/// Cells per chunk of the COPY stream of a sweep insert.
const COPY_CHUNK: usize = 2_000;
/// Expired leases handled per maintenance pass.
const RESCUE_BATCH: i64 = 500;

/// Postgres store handle.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect(url)
            .await?;
        super::migrate::postgres(
            &pool,
            crate::clock::Clock::now(&crate::clock::SystemClock).0,
        )
        .await?;
        Ok(Self { pool })
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    pub(super) async fn sweep_insert(
        &self,
        p: &SweepInsert<'_>,
        now: Millis,
    ) -> Result<SweepInserted> {
        let mut tx = self.pool.begin().await?;
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT id FROM sweeps WHERE idempotency_key = $1")
                .bind(p.idempotency_key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(id) = existing {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cells WHERE sweep_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            return Ok(SweepInserted {
                id: SweepId(id),
                cell_count: to_u64(n),
                duplicate: true,
            });
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO sweeps (name, idempotency_key, priority, max_attempts, state, spec, \
             created_at) VALUES ($1, $2, $3, $4, 'active', $5, $6) RETURNING id",
        )
        .bind(p.name)
        .bind(p.idempotency_key)
        .bind(i64::from(p.priority))
        .bind(i64::from(p.max_attempts))
        .bind(p.spec)
        .bind(now.0)
        .fetch_one(&mut *tx)
        .await?;
        insert_cells(
            &mut tx,
            id,
            i64::from(p.priority),
            i64::from(p.max_attempts),
            "available",
            p.cells,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(SweepInserted {
            id: SweepId(id),
            cell_count: p.cells.len() as u64,
            duplicate: false,
        })
    }

    pub(super) async fn sweep_extend(
        &self,
        id: SweepId,
        cells: &[crate::sweep::NewCell],
        spec: &str,
        now: Millis,
    ) -> Result<(u64, u64)> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT state, priority, max_attempts FROM sweeps WHERE id = $1 FOR UPDATE",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::SweepNotFound(id))?;
        let state: SweepState = row.text("state")?.parse()?;
        if state == SweepState::Cancelled {
            return Err(Error::Conflict(format!("sweep {id} is cancelled")));
        }
        let existing: Vec<String> =
            sqlx::query_scalar("SELECT cell_key FROM cells WHERE sweep_id = $1")
                .bind(id.0)
                .fetch_all(&mut *tx)
                .await?;
        let next: i64 = existing.len() as i64;
        let max_number: Option<i64> =
            sqlx::query_scalar("SELECT max(number) FROM cells WHERE sweep_id = $1")
                .bind(id.0)
                .fetch_one(&mut *tx)
                .await?;
        let start = max_number.map_or(0, |m| m + 1).max(next);
        let existing: HashSet<String> = existing.into_iter().collect();
        let fresh: Vec<crate::sweep::NewCell> = cells
            .iter()
            .filter(|c| !existing.contains(&c.cell_key))
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                c.number = u32::try_from(start + i as i64).unwrap_or(u32::MAX);
                c
            })
            .collect();
        let cell_state = if state == SweepState::Paused {
            "held"
        } else {
            "available"
        };
        insert_cells(
            &mut tx,
            id.0,
            row.int("priority")?,
            row.int("max_attempts")?,
            cell_state,
            &fresh,
            now,
        )
        .await?;
        sqlx::query("UPDATE sweeps SET spec = $1 WHERE id = $2")
            .bind(spec)
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((
            fresh.len() as u64,
            existing.len() as u64 + fresh.len() as u64,
        ))
    }

    pub(super) async fn sweep_get(&self, id: SweepId) -> Result<SweepRow> {
        let row = sqlx::query(
            "SELECT id, name, idempotency_key, priority, max_attempts, state, created_at \
             FROM sweeps WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::SweepNotFound(id))?;
        let mut sweep = rows::sweep(&row)?;
        sweep.counts = self.counts(id).await?;
        Ok(sweep)
    }

    async fn counts(&self, id: SweepId) -> Result<StateCounts> {
        let rows = sqlx::query(
            "SELECT state, count(*) AS n FROM cells WHERE sweep_id = $1 GROUP BY state",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows::counts(&rows)
    }

    pub(super) async fn sweep_list(
        &self,
        limit: i64,
        before: Option<SweepId>,
    ) -> Result<Vec<SweepRow>> {
        let rows = sqlx::query(
            "SELECT id, name, idempotency_key, priority, max_attempts, state, created_at \
             FROM sweeps WHERE id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(before.map_or(i64::MAX, |b| b.0))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut s = rows::sweep(&r)?;
            s.counts = self.counts(s.id).await?;
            out.push(s);
        }
        Ok(out)
    }

    pub(super) async fn sweep_cancel(&self, id: SweepId, now: Millis) -> Result<(u64, u64)> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("UPDATE sweeps SET state = 'cancelled' WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(Error::SweepNotFound(id));
        }
        let cancelled = sqlx::query(
            "UPDATE cells SET state = 'cancelled', finalized_at = $1 WHERE sweep_id = $2 \
             AND state IN ('available', 'scheduled', 'retryable', 'held')",
        )
        .bind(now.0)
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let requested = sqlx::query(
            "UPDATE cells SET cancel_requested_at = $1 WHERE sweep_id = $2 AND state = 'running' \
             AND cancel_requested_at IS NULL",
        )
        .bind(now.0)
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((cancelled, requested))
    }

    async fn set_sweep_state(
        tx: &mut sqlx::PgConnection,
        id: SweepId,
        from: SweepState,
        to: SweepState,
    ) -> Result<()> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM sweeps WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
        let state: SweepState = state.ok_or(Error::SweepNotFound(id))?.parse()?;
        if state == to {
            return Ok(());
        }
        if state != from {
            return Err(Error::Conflict(format!("sweep {id} is {state}")));
        }
        sqlx::query("UPDATE sweeps SET state = $1 WHERE id = $2")
            .bind(to.as_str())
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    pub(super) async fn sweep_pause(&self, id: SweepId) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        Self::set_sweep_state(&mut tx, id, SweepState::Active, SweepState::Paused).await?;
        let n = sqlx::query(
            "UPDATE cells SET state = 'held' WHERE sweep_id = $1 \
             AND state IN ('available', 'scheduled', 'retryable')",
        )
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn sweep_resume(&self, id: SweepId, now: Millis) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        Self::set_sweep_state(&mut tx, id, SweepState::Paused, SweepState::Active).await?;
        let n = sqlx::query(
            "UPDATE cells SET state = CASE WHEN scheduled_at <= $1 THEN 'available' \
             WHEN attempt > 0 THEN 'retryable' ELSE 'scheduled' END \
             WHERE sweep_id = $2 AND state = 'held'",
        )
        .bind(now.0)
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn sweep_retry_failed(&self, id: SweepId, now: Millis) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT state, max_attempts FROM sweeps WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::SweepNotFound(id))?;
        let state: SweepState = row.text("state")?.parse()?;
        if state == SweepState::Cancelled {
            return Err(Error::Conflict(format!("sweep {id} is cancelled")));
        }
        let max: i64 = row.int("max_attempts")?;
        let to = if state == SweepState::Paused {
            "held"
        } else {
            "available"
        };
        let n = sqlx::query(
            "UPDATE cells SET state = $1, finalized_at = NULL, scheduled_at = $2, \
             max_attempts = attempt + $3 WHERE sweep_id = $4 AND state = 'discarded'",
        )
        .bind(to)
        .bind(now.0)
        .bind(max)
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn sweep_finished_since(&self, id: SweepId, since: Millis) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM cells WHERE sweep_id = $1 AND state IN ('completed', 'discarded') \
             AND finalized_at >= $2",
        )
        .bind(id.0)
        .bind(since.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(to_u64(n))
    }

    pub(super) async fn cell_available(
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

    pub(super) async fn cell_lease(&self, p: &LeasePick, now: Millis) -> Result<Vec<LeasedCell>> {
        let expires = now.plus(p.lease_ttl_ms);
        let rows = bind_lease(sqlx::query(lease_update!("")), p, now, expires)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| rows::leased(r, expires, p.head == Some(r.int("id")?)))
            .collect()
    }

    pub(super) async fn cell_complete_lease(
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

    pub(super) async fn lease_heartbeat(
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

    pub(super) async fn cell_progress(
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

    pub(super) async fn cell_complete(
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

    pub(super) async fn cell_fail(
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

    pub(super) async fn cell_release(
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

    pub(super) async fn cell_rescue_expired(
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

    pub(super) async fn cell_promote_due(&self, now: Millis) -> Result<u64> {
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

    pub(super) async fn cell_requeue_running(&self) -> Result<u64> {
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

    pub(super) async fn cell_get(&self, id: CellId) -> Result<CellRow> {
        let sql = format!("SELECT {CELL_COLUMNS} FROM cells WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::CellNotFound(id))?;
        rows::cell(&row)
    }

    pub(super) async fn cell_query(&self, q: &CellQuery) -> Result<Vec<CellRow>> {
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

    pub(super) async fn analyze(&self) -> Result<()> {
        sqlx::raw_sql("ANALYZE cells, sweeps")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn sweep_complete_all_unfenced(
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

    pub(super) async fn cell_running(
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

    pub(super) async fn worker_register(
        &self,
        r: &WorkerRegistration,
        now: Millis,
    ) -> Result<WorkerId> {
        let loaded = serde_json::to_string(&r.loaded).map_err(|e| Error::Corrupt(e.to_string()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO workers (name, device_kind, device_model, memory_mib, max_pixels, \
             loaded, version, state, registered_at, last_seen_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9) RETURNING id",
        )
        .bind(&r.name)
        .bind(r.device_kind.as_str())
        .bind(&r.device_model)
        .bind(r.memory_mib)
        .bind(r.max_pixels)
        .bind(loaded)
        .bind(&r.version)
        .bind(now.0)
        .bind(now.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(WorkerId(id))
    }

    pub(super) async fn worker_seen(
        &self,
        id: WorkerId,
        loaded: Option<&[String]>,
        now: Millis,
    ) -> Result<WorkerRow> {
        let loaded = loaded
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let row = sqlx::query(
            "UPDATE workers SET last_seen_at = $1, loaded = COALESCE($2::text, loaded), state = 'active' \
             WHERE id = $3 RETURNING id, name, device_kind, device_model, memory_mib, max_pixels, \
             loaded, version, state, registered_at, last_seen_at, 0::bigint AS recent",
        )
        .bind(now.0)
        .bind(loaded)
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::WorkerNotFound(id))?;
        rows::worker(&row)
    }

    pub(super) async fn worker_drain(&self, id: WorkerId, now: Millis) -> Result<()> {
        let n =
            sqlx::query("UPDATE workers SET state = 'drained', last_seen_at = $1 WHERE id = $2")
                .bind(now.0)
                .bind(id.0)
                .execute(&self.pool)
                .await?
                .rows_affected();
        if n == 0 {
            return Err(Error::WorkerNotFound(id));
        }
        Ok(())
    }

    pub(super) async fn worker_list(&self, since: Millis) -> Result<Vec<WorkerRow>> {
        let rows = sqlx::query(
            "SELECT w.id, w.name, w.device_kind, w.device_model, w.memory_mib, w.max_pixels, \
             w.loaded, w.version, w.state, w.registered_at, w.last_seen_at, \
             (SELECT count(*) FROM cells c WHERE c.result_worker = w.id \
              AND c.state = 'completed' AND c.finalized_at >= $1) AS recent \
             FROM workers w ORDER BY w.id",
        )
        .bind(since.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::worker).collect()
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

/// Inserts `cells` of sweep `id` in `state` with one `COPY … FROM STDIN` (text format), sent in
/// chunks so that encoding the next chunk overlaps the server's work on the last. COPY inserts
/// heap rows in batches (one WAL record per page, not per row) and skips the executor; against
/// the former `INSERT … SELECT FROM UNNEST` it cut about 15 % of the server's time
/// (BENCHMARKS.md, "Coordinator queue").
async fn insert_cells(
    conn: &mut sqlx::PgConnection,
    id: i64,
    priority: i64,
    max_attempts: i64,
    state: &str,
    cells: &[crate::sweep::NewCell],
    now: Millis,
) -> Result<()> {
    if cells.is_empty() {
        return Ok(());
    }
    let mut copy = conn
        .copy_in_raw(
            "COPY cells (sweep_id, number, cell_key, spec, affinity_key, priority, pixels, \
             min_memory_mib, model, prompt, negative_prompt, seed, steps, cfg, sampler, width, \
             height, bindings, state, attempt, max_attempts, errors, scheduled_at, created_at) \
             FROM STDIN",
        )
        .await?;
    // The columns every row shares, encoded once.
    let mut tail = String::new();
    for v in [
        state,
        "0",
        &max_attempts.to_string(),
        "[]",
        &now.0.to_string(),
    ] {
        tail.push('\t');
        copy_text(&mut tail, v);
    }
    tail.push('\t');
    tail.push_str(&now.0.to_string());
    tail.push('\n');
    let mut buf = String::with_capacity(COPY_CHUNK * 1024);
    for chunk in cells.chunks(COPY_CHUNK) {
        buf.clear();
        for c in chunk {
            copy_row(&mut buf, id, priority, c);
            buf.push_str(&tail);
        }
        if let Err(e) = copy.send(buf.as_bytes()).await {
            // Leave the connection usable for the rollback.
            let _ = copy.abort("kiln: insert failed").await;
            return Err(e.into());
        }
    }
    copy.finish().await?;
    Ok(())
}

/// Appends the per-cell columns of one COPY row (up to and excluding `state`).
fn copy_row(buf: &mut String, sweep: i64, priority: i64, c: &crate::sweep::NewCell) {
    use std::fmt::Write;
    let s = &c.spec;
    // Writing to a String cannot fail.
    let _ = write!(buf, "{sweep}\t{}\t", c.number);
    copy_text(buf, &c.cell_key);
    buf.push('\t');
    copy_text(buf, &c.spec_json);
    buf.push('\t');
    copy_text(buf, &c.affinity_key);
    let _ = write!(buf, "\t{priority}\t{}\t{}\t", s.pixels(), s.min_memory_mib);
    copy_text(buf, &s.model);
    buf.push('\t');
    copy_text(buf, &s.prompt);
    buf.push('\t');
    copy_text(buf, &s.negative_prompt);
    // `{}` of an f64 is its shortest round-trip decimal, which float8 parses back exactly.
    let _ = write!(
        buf,
        "\t{}\t{}\t{}\t",
        s.seed as i64,
        s.steps,
        s.cfg_decimal()
    );
    copy_text(buf, s.sampler.as_str());
    let _ = write!(buf, "\t{}\t{}\t", s.width, s.height);
    copy_text(buf, &c.bindings_json);
}

/// Appends `v` as one field of COPY's text format: backslash, tab, newline and carriage return
/// are escaped (no field is NULL, so `\N` never arises).
fn copy_text(buf: &mut String, v: &str) {
    if !v.contains(['\\', '\t', '\n', '\r']) {
        buf.push_str(v);
        return;
    }
    for ch in v.chars() {
        match ch {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            other => buf.push(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::copy_text;

    #[test]
    fn copy_text_escapes_separators_and_backslashes() {
        let mut b = String::new();
        copy_text(&mut b, "a\tb\nc\rd\\e ✨");
        assert_eq!(b, "a\\tb\\nc\\rd\\\\e ✨");
        let mut b = String::new();
        copy_text(&mut b, "plain");
        assert_eq!(b, "plain");
    }
}
