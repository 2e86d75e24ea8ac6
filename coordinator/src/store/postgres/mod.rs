//! The Postgres backend. A lease marks the cells the dispatcher picked (`queue::dispatch`)
//! with one `UPDATE … WHERE id = ANY(…) AND state = 'available'`, so two leasers can never
//! take one cell; the maintenance pass takes expired leases `FOR UPDATE SKIP LOCKED`, and
//! failure decisions lock the one row they change. Many connections write at once; every write
//! is a short transaction, and the fence in each `UPDATE … WHERE` makes stale writes match
//! nothing. Sweeps and workers are here; the cell lifecycle is in `cells`, the `COPY` encoder
//! of sweep inserts in `copy`.

mod cells;
mod copy;
mod intake;

use std::collections::HashSet;

use kiln_proto::{SweepId, WorkerId};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::rows::{self, AnyRow};
use super::{
    StateCounts, SweepInsert, SweepInserted, SweepRow, WorkerRegistration, WorkerRow, to_u64,
};
use crate::clock::Millis;
use crate::domain::state::SweepState;
use crate::{Error, Result};

/// Postgres store handle.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        // The queue's statements (lease, complete, heartbeat, the dispatcher's read) have one
        // good plan whatever their parameters, and re-planning them on every execution took
        // about a tenth of the server's time under lease load (9.6 % in `perf`), and generic
        // plans took lease(1)+complete from 869 to 1,193 cycles/s.
        // So prepared statements keep their generic plan; result queries, whose best plan
        // depends on their values, ask for custom plans again (`cell_query`).
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .options([("plan_cache_mode", "force_generic_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
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
            let n: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM cells WHERE sweep_id = $1) \
                 + (SELECT coalesce(sum(cell_count), 0)::bigint FROM intake WHERE sweep_id = $1)",
            )
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
        copy::insert_cells(
            &mut tx,
            id,
            i64::from(p.priority),
            i64::from(p.max_attempts),
            "available",
            p.cells,
            now,
        )
        .await?;
        intake::insert_chunks(&mut tx, id, p.intake, now).await?;
        tx.commit().await?;
        Ok(SweepInserted {
            id: SweepId(id),
            cell_count: super::cell_count(p),
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
        let waiting = intake::count(&mut tx, id).await?;
        if waiting > 0 {
            return Err(Error::Conflict(format!(
                "sweep {id} still has {waiting} cells in its intake"
            )));
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
        copy::insert_cells(
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
        // One statement, so one snapshot: a chunk moved from the intake into `cells` meanwhile
        // is counted once. Intake cells count as the state they will enter (`entry_state`).
        let rows = sqlx::query(
            "SELECT state, count(*) AS n FROM cells WHERE sweep_id = $1 GROUP BY state \
             UNION ALL \
             SELECT CASE s.state WHEN 'active' THEN 'available' WHEN 'paused' THEN 'held' \
             ELSE 'cancelled' END AS state, sum(i.cell_count)::bigint AS n \
             FROM intake i JOIN sweeps s ON s.id = i.sweep_id WHERE i.sweep_id = $1 \
             GROUP BY s.state",
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
        // The intake's cells enter cancelled when they are moved (the sweep's row is held here).
        let cancelled = cancelled + intake::count(&mut tx, id).await?;
        tx.commit().await?;
        Ok((cancelled, requested))
    }

    async fn set_sweep_state(
        tx: &mut sqlx::PgConnection,
        id: SweepId,
        from: SweepState,
        to: SweepState,
    ) -> Result<bool> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM sweeps WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let state: SweepState = state.ok_or(Error::SweepNotFound(id))?.parse()?;
        if state == to {
            return Ok(false);
        }
        if state != from {
            return Err(Error::Conflict(format!("sweep {id} is {state}")));
        }
        sqlx::query("UPDATE sweeps SET state = $1 WHERE id = $2")
            .bind(to.as_str())
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        Ok(true)
    }

    pub(super) async fn sweep_pause(&self, id: SweepId) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let changed =
            Self::set_sweep_state(&mut tx, id, SweepState::Active, SweepState::Paused).await?;
        let n = sqlx::query(
            "UPDATE cells SET state = 'held' WHERE sweep_id = $1 \
             AND state IN ('available', 'scheduled', 'retryable')",
        )
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // The intake's cells enter in the new state when they are moved.
        let n = n + if changed {
            intake::count(&mut tx, id).await?
        } else {
            0
        };
        tx.commit().await?;
        Ok(n)
    }

    pub(super) async fn sweep_resume(&self, id: SweepId, now: Millis) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let changed =
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
        // The intake's cells enter in the new state when they are moved.
        let n = n + if changed {
            intake::count(&mut tx, id).await?
        } else {
            0
        };
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
