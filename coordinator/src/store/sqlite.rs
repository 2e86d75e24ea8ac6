//! The SQLite backend: one file in WAL mode. All writes go through a single-connection pool,
//! so transactions never race for SQLite's one writer lock (no `SQLITE_BUSY` upgrades); reads
//! use a separate pool that WAL lets run beside the writer. `synchronous = NORMAL`: a committed
//! transaction survives the process being killed (it is in the WAL); a power cut may lose the
//! last few.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder, Sqlite};

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

/// Rows per multi-row INSERT (24 columns each stays far below SQLite's variable limit).
const INSERT_BATCH: usize = 400;
/// Expired leases handled per maintenance pass.
const RESCUE_BATCH: i64 = 500;

/// SQLite store handle.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    pub(super) async fn connect(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // 64 MiB page cache per connection: a 100,000-cell insert touches five B-trees.
            .pragma("cache_size", "-65536");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        super::migrate::sqlite(
            &writer,
            crate::clock::Clock::now(&crate::clock::SystemClock).0,
        )
        .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }

    pub(super) async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    pub(super) async fn sweep_insert(
        &self,
        p: &SweepInsert<'_>,
        now: Millis,
    ) -> Result<SweepInserted> {
        let mut tx = self.writer.begin().await?;
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT id FROM sweeps WHERE idempotency_key = ?")
                .bind(p.idempotency_key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(id) = existing {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cells WHERE sweep_id = ?")
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
             created_at) VALUES (?, ?, ?, ?, 'active', ?, ?) RETURNING id",
        )
        .bind(p.name)
        .bind(p.idempotency_key)
        .bind(p.priority)
        .bind(p.max_attempts)
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
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query("SELECT state, priority, max_attempts FROM sweeps WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::SweepNotFound(id))?;
        let state: SweepState = row.text("state")?.parse()?;
        if state == SweepState::Cancelled {
            return Err(Error::Conflict(format!("sweep {id} is cancelled")));
        }
        let existing: Vec<String> =
            sqlx::query_scalar("SELECT cell_key FROM cells WHERE sweep_id = ?")
                .bind(id.0)
                .fetch_all(&mut *tx)
                .await?;
        let next: i64 = existing.len() as i64;
        let max_number: Option<i64> =
            sqlx::query_scalar("SELECT max(number) FROM cells WHERE sweep_id = ?")
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
        sqlx::query("UPDATE sweeps SET spec = ? WHERE id = ?")
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
             FROM sweeps WHERE id = ?",
        )
        .bind(id.0)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(Error::SweepNotFound(id))?;
        let mut sweep = rows::sweep(&row)?;
        sweep.counts = self.counts(id).await?;
        Ok(sweep)
    }

    async fn counts(&self, id: SweepId) -> Result<StateCounts> {
        let rows =
            sqlx::query("SELECT state, count(*) AS n FROM cells WHERE sweep_id = ? GROUP BY state")
                .bind(id.0)
                .fetch_all(&self.reader)
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
             FROM sweeps WHERE id < ? ORDER BY id DESC LIMIT ?",
        )
        .bind(before.map_or(i64::MAX, |b| b.0))
        .bind(limit)
        .fetch_all(&self.reader)
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
        let mut tx = self.writer.begin().await?;
        let n = sqlx::query("UPDATE sweeps SET state = 'cancelled' WHERE id = ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(Error::SweepNotFound(id));
        }
        let cancelled = sqlx::query(
            "UPDATE cells SET state = 'cancelled', finalized_at = ? WHERE sweep_id = ? \
             AND state IN ('available', 'scheduled', 'retryable', 'held')",
        )
        .bind(now.0)
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let requested = sqlx::query(
            "UPDATE cells SET cancel_requested_at = ? WHERE sweep_id = ? AND state = 'running' \
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
        tx: &mut sqlx::SqliteConnection,
        id: SweepId,
        from: SweepState,
        to: SweepState,
    ) -> Result<()> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM sweeps WHERE id = ?")
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
        sqlx::query("UPDATE sweeps SET state = ? WHERE id = ?")
            .bind(to.as_str())
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    pub(super) async fn sweep_pause(&self, id: SweepId) -> Result<u64> {
        let mut tx = self.writer.begin().await?;
        Self::set_sweep_state(&mut tx, id, SweepState::Active, SweepState::Paused).await?;
        let n = sqlx::query(
            "UPDATE cells SET state = 'held' WHERE sweep_id = ? \
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
        let mut tx = self.writer.begin().await?;
        Self::set_sweep_state(&mut tx, id, SweepState::Paused, SweepState::Active).await?;
        let n = sqlx::query(
            "UPDATE cells SET state = CASE WHEN scheduled_at <= ? THEN 'available' \
             WHEN attempt > 0 THEN 'retryable' ELSE 'scheduled' END \
             WHERE sweep_id = ? AND state = 'held'",
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
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query("SELECT state, max_attempts FROM sweeps WHERE id = ?")
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
            "UPDATE cells SET state = ?, finalized_at = NULL, scheduled_at = ?, \
             max_attempts = attempt + ? WHERE sweep_id = ? AND state = 'discarded'",
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
            "SELECT count(*) FROM cells WHERE sweep_id = ? AND state IN ('completed', 'discarded') \
             AND finalized_at >= ?",
        )
        .bind(id.0)
        .bind(since.0)
        .fetch_one(&self.reader)
        .await?;
        Ok(to_u64(n))
    }

    pub(super) async fn cell_available(
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

    pub(super) async fn cell_lease(&self, p: &LeasePick, now: Millis) -> Result<Vec<LeasedCell>> {
        let mut conn = self.writer.acquire().await?;
        lease_on(&mut conn, p, now).await
    }

    pub(super) async fn cell_complete_lease(
        &self,
        f: Fence,
        result_json: &str,
        p: &LeasePick,
        now: Millis,
    ) -> Result<Vec<LeasedCell>> {
        // One transaction on the one writer connection: the fenced complete, then the lease of
        // `cell_lease` only if the complete matched.
        let mut tx = self.writer.begin().await?;
        let n = complete_query(f, result_json, now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            drop(tx);
            return Err(self.fence_error(f).await);
        }
        let leased = lease_on(&mut tx, p, now).await?;
        tx.commit().await?;
        Ok(leased)
    }

    pub(super) async fn lease_heartbeat(
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

    pub(super) async fn cell_progress(
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

    pub(super) async fn cell_complete(
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

    pub(super) async fn cell_fail(
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

    pub(super) async fn cell_release(
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
                 attempt = attempt - 1, lease_owner = NULL, lease_expires_at = NULL, \
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

    pub(super) async fn cell_rescue_expired(
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

    pub(super) async fn cell_promote_due(&self, now: Millis) -> Result<u64> {
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

    pub(super) async fn cell_requeue_running(&self) -> Result<u64> {
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

    pub(super) async fn cell_get(&self, id: CellId) -> Result<CellRow> {
        let sql = format!("SELECT {CELL_COLUMNS} FROM cells WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?
            .ok_or(Error::CellNotFound(id))?;
        rows::cell(&row)
    }

    pub(super) async fn cell_query(&self, q: &CellQuery) -> Result<Vec<CellRow>> {
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

    pub(super) async fn analyze(&self) -> Result<()> {
        sqlx::raw_sql("ANALYZE").execute(&self.writer).await?;
        Ok(())
    }

    pub(super) async fn sweep_complete_all_unfenced(
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

    pub(super) async fn cell_running(
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

    pub(super) async fn worker_register(
        &self,
        r: &WorkerRegistration,
        now: Millis,
    ) -> Result<WorkerId> {
        let loaded = serde_json::to_string(&r.loaded).map_err(|e| Error::Corrupt(e.to_string()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO workers (name, device_kind, device_model, memory_mib, max_pixels, \
             loaded, version, state, registered_at, last_seen_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?) RETURNING id",
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
        .fetch_one(&self.writer)
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
            "UPDATE workers SET last_seen_at = ?, loaded = COALESCE(?, loaded), state = 'active' \
             WHERE id = ? RETURNING id, name, device_kind, device_model, memory_mib, max_pixels, \
             loaded, version, state, registered_at, last_seen_at, 0 AS recent",
        )
        .bind(now.0)
        .bind(loaded)
        .bind(id.0)
        .fetch_optional(&self.writer)
        .await?
        .ok_or(Error::WorkerNotFound(id))?;
        rows::worker(&row)
    }

    pub(super) async fn worker_drain(&self, id: WorkerId, now: Millis) -> Result<()> {
        let n = sqlx::query("UPDATE workers SET state = 'drained', last_seen_at = ? WHERE id = ?")
            .bind(now.0)
            .bind(id.0)
            .execute(&self.writer)
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
              AND c.state = 'completed' AND c.finalized_at >= ?) AS recent \
             FROM workers w ORDER BY w.id",
        )
        .bind(since.0)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::worker).collect()
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

/// Inserts `cells` of sweep `id` in `state`, in batches.
async fn insert_cells(
    conn: &mut sqlx::SqliteConnection,
    id: i64,
    priority: i64,
    max_attempts: i64,
    state: &str,
    cells: &[crate::sweep::NewCell],
    now: Millis,
) -> Result<()> {
    for chunk in cells.chunks(INSERT_BATCH) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO cells (sweep_id, number, cell_key, spec, affinity_key, priority, \
             pixels, min_memory_mib, model, prompt, negative_prompt, seed, steps, cfg, \
             sampler, width, height, bindings, state, attempt, max_attempts, errors, \
             scheduled_at, created_at) ",
        );
        qb.push_values(chunk, |mut b, c| {
            let s = &c.spec;
            b.push_bind(id)
                .push_bind(i64::from(c.number))
                .push_bind(c.cell_key.clone())
                .push_bind(c.spec_json.clone())
                .push_bind(c.affinity_key.clone())
                .push_bind(priority)
                .push_bind(s.pixels() as i64)
                .push_bind(s.min_memory_mib as i64)
                .push_bind(s.model.clone())
                .push_bind(s.prompt.clone())
                .push_bind(s.negative_prompt.clone())
                .push_bind(s.seed as i64)
                .push_bind(i64::from(s.steps))
                .push_bind(s.cfg_decimal())
                .push_bind(s.sampler.as_str())
                .push_bind(i64::from(s.width))
                .push_bind(i64::from(s.height))
                .push_bind(c.bindings_json.clone())
                .push_bind(state)
                .push_bind(0i64)
                .push_bind(max_attempts)
                .push_bind("[]")
                .push_bind(now.0)
                .push_bind(now.0);
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}
