//! Sweeps: insert (idempotent by key), extend, read with counts per state, and the sweep-wide
//! writes — cancel, pause, resume, retry the discarded. The sweep-wide writes run again when
//! Postgres aborts them as a deadlock victim ([`deadlock`]). Each takes the sweep's row first
//! (locked on Postgres), as an intake move does, so the intake counted here cannot move under
//! the write.

use std::collections::HashSet;

use kiln_proto::SweepId;

use super::db::BulkInsert;
use super::db::{Stmt, Tx};
use super::intake;
use super::rows::{self, to_u64};
use super::{Store, SweepInsert, SweepInserted, deadlock};
use crate::clock::Millis;
use crate::domain::rows::{StateCounts, SweepRow};
use crate::domain::state::{CellState, SweepState};
use crate::sweep::NewCell;
use crate::{Error, Result};

/// The columns of a [`SweepRow`] (without its counts).
const SWEEP_COLUMNS: &str = "SELECT id, name, idempotency_key, priority, max_attempts, state, \
     created_at, owner FROM sweeps";

/// A sweep's state and what its new cells inherit, read (and locked) inside a write.
pub(super) struct SweepHead {
    pub state: SweepState,
    pub priority: i64,
    pub max_attempts: i64,
}

impl Store {
    /// The state, priority and attempts of sweep `id`, its row locked until `tx` ends.
    pub(super) async fn sweep_head(&self, tx: &mut Tx, id: SweepId) -> Result<SweepHead> {
        let sql = format!(
            "SELECT state, priority, max_attempts FROM sweeps WHERE id = $1{}",
            self.db.for_update()
        );
        let row = Stmt::new(sql)
            .bind(id.0)
            .fetch_optional(tx.on())
            .await?
            .ok_or(Error::SweepNotFound(id))?;
        Ok(SweepHead {
            state: row.text("state")?.parse()?,
            priority: row.int("priority")?,
            max_attempts: row.int("max_attempts")?,
        })
    }

    /// Inserts a sweep with all its cells and intake chunks atomically, or returns the sweep
    /// that already has this idempotency key (its cell count includes its intake). A key
    /// another owner used is refused (PERMISSION_DENIED), revealing nothing of that sweep.
    pub async fn sweep_insert(&self, p: &SweepInsert<'_>, now: Millis) -> Result<SweepInserted> {
        match self.sweep_insert_once(p, now).await {
            // Two inserts of one key raced and the other won: ours now finds its sweep.
            Err(Error::Database(e))
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation()) =>
            {
                self.sweep_insert_once(p, now).await
            }
            other => other,
        }
    }

    async fn sweep_insert_once(&self, p: &SweepInsert<'_>, now: Millis) -> Result<SweepInserted> {
        let mut tx = self.db.begin().await?;
        let existing = Stmt::new("SELECT id, owner FROM sweeps WHERE idempotency_key = $1")
            .bind(p.idempotency_key)
            .fetch_optional(tx.on())
            .await?;
        if let Some(row) = existing {
            if row.opt_text("owner")?.as_deref() != p.owner {
                return Err(Error::PermissionDenied(
                    "this idempotency key belongs to another owner's sweep".into(),
                ));
            }
            let id = row.int("id")?;
            let n = Stmt::new(
                "SELECT (SELECT count(*) FROM cells WHERE sweep_id = $1) \
                 + (SELECT CAST(coalesce(sum(cell_count), 0) AS BIGINT) FROM intake \
                 WHERE sweep_id = $1)",
            )
            .bind(id)
            .fetch_one(tx.on())
            .await?
            .int(0)?;
            return Ok(SweepInserted {
                id: SweepId(id),
                cell_count: to_u64(n),
                duplicate: true,
            });
        }
        if p.unique_name {
            let taken = Stmt::new(
                "SELECT id FROM sweeps WHERE name = $1 AND owner IS NOT DISTINCT FROM $2 \
                 ORDER BY id DESC LIMIT 1",
            )
            .bind(p.name)
            .bind(p.owner)
            .fetch_optional(tx.on())
            .await?;
            if let Some(row) = taken {
                return Err(Error::NameTaken {
                    name: p.name.to_owned(),
                    id: SweepId(row.int("id")?),
                });
            }
        }
        let id = Stmt::new(
            "INSERT INTO sweeps (name, idempotency_key, priority, max_attempts, state, spec, \
             created_at, owner) VALUES ($1, $2, $3, $4, 'active', $5, $6, $7) RETURNING id",
        )
        .bind(p.name)
        .bind(p.idempotency_key)
        .bind(i64::from(p.priority))
        .bind(i64::from(p.max_attempts))
        .bind(p.spec)
        .bind(now.0)
        .bind(p.owner)
        .fetch_one(tx.on())
        .await?
        .int(0)?;
        let head = SweepHead {
            state: SweepState::Active,
            priority: i64::from(p.priority),
            max_attempts: i64::from(p.max_attempts),
        };
        self.insert_cells(&mut tx, id, &head, CellState::Available, p.cells, now)
            .await?;
        intake::insert_chunks(&mut tx, id, p.intake, now).await?;
        tx.commit().await?;
        Ok(SweepInserted {
            id: SweepId(id),
            cell_count: super::cell_count(p),
            duplicate: false,
        })
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
        let mut tx = self.db.begin().await?;
        let head = self.sweep_head(&mut tx, id).await?;
        if head.state == SweepState::Cancelled {
            return Err(Error::Conflict(format!("sweep {id} is cancelled")));
        }
        let waiting = intake::count(&mut tx, id).await?;
        if waiting > 0 {
            return Err(Error::Conflict(format!(
                "sweep {id} still has {waiting} cells in its intake"
            )));
        }
        let existing = Stmt::new("SELECT cell_key, number FROM cells WHERE sweep_id = $1")
            .bind(id.0)
            .fetch_all(tx.on())
            .await?;
        let mut start = existing.len() as i64;
        let mut keys = HashSet::with_capacity(existing.len());
        for r in &existing {
            keys.insert(r.text("cell_key")?);
            start = start.max(r.int("number")? + 1);
        }
        let fresh: Vec<NewCell> = cells
            .iter()
            .filter(|c| !keys.contains(&c.cell_key))
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                c.number = u32::try_from(start + i as i64).unwrap_or(u32::MAX);
                c
            })
            .collect();
        let state = head.state.entry_state();
        self.insert_cells(&mut tx, id.0, &head, state, &fresh, now)
            .await?;
        Stmt::new("UPDATE sweeps SET spec = $1 WHERE id = $2")
            .bind(spec)
            .bind(id.0)
            .execute(tx.on())
            .await?;
        tx.commit().await?;
        Ok((fresh.len() as u64, (keys.len() + fresh.len()) as u64))
    }

    /// A sweep with its counts.
    pub async fn sweep_get(&self, id: SweepId) -> Result<SweepRow> {
        let row = Stmt::new(format!("{SWEEP_COLUMNS} WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(self.db.reader())
            .await?
            .ok_or(Error::SweepNotFound(id))?;
        let mut sweep = rows::sweep(&row)?;
        sweep.counts = self.counts(id).await?;
        Ok(sweep)
    }

    async fn counts(&self, id: SweepId) -> Result<StateCounts> {
        // One statement, so one snapshot: a chunk moved from the intake into `cells` meanwhile
        // is counted once. Intake cells count as the state they will enter (`SweepState::entry_state`).
        let rows = Stmt::new(
            "SELECT state, count(*) AS n FROM cells WHERE sweep_id = $1 GROUP BY state \
             UNION ALL \
             SELECT CASE s.state WHEN 'active' THEN 'available' WHEN 'paused' THEN 'held' \
             ELSE 'cancelled' END AS state, CAST(sum(i.cell_count) AS BIGINT) AS n \
             FROM intake i JOIN sweeps s ON s.id = i.sweep_id WHERE i.sweep_id = $1 \
             GROUP BY s.state",
        )
        .bind(id.0)
        .fetch_all(self.db.reader())
        .await?;
        rows::counts(&rows)
    }

    /// Sweeps newest first, with ids below `before` when given, of `owner` only when given.
    pub async fn sweep_list(
        &self,
        limit: i64,
        before: Option<SweepId>,
        owner: Option<&str>,
    ) -> Result<Vec<SweepRow>> {
        let rows = Stmt::new(format!(
            "{SWEEP_COLUMNS} WHERE id < $1 AND ($3 IS NULL OR owner = $3) \
             ORDER BY id DESC LIMIT $2"
        ))
        .bind(before.map_or(i64::MAX, |b| b.0))
        .bind(limit)
        .bind(owner)
        .fetch_all(self.db.reader())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut s = rows::sweep(&r)?;
            s.counts = self.counts(s.id).await?;
            out.push(s);
        }
        Ok(out)
    }

    /// Cancels queued cells now, asks running ones to stop. Returns (cancelled, requested).
    pub async fn sweep_cancel(&self, id: SweepId, now: Millis) -> Result<(u64, u64)> {
        deadlock::retried(|| async {
            let mut tx = self.db.begin().await?;
            let n = Stmt::new("UPDATE sweeps SET state = 'cancelled' WHERE id = $1")
                .bind(id.0)
                .execute(tx.on())
                .await?;
            if n == 0 {
                return Err(Error::SweepNotFound(id));
            }
            let cancelled = Stmt::new(
                "UPDATE cells SET state = 'cancelled', finalized_at = $1 WHERE sweep_id = $2 \
                 AND state IN ('available', 'scheduled', 'retryable', 'held')",
            )
            .bind(now.0)
            .bind(id.0)
            .execute(tx.on())
            .await?;
            let requested = Stmt::new(
                "UPDATE cells SET cancel_requested_at = $1 WHERE sweep_id = $2 \
                 AND state = 'running' AND cancel_requested_at IS NULL",
            )
            .bind(now.0)
            .bind(id.0)
            .execute(tx.on())
            .await?;
            // The intake's cells enter cancelled when they are moved.
            let cancelled = cancelled + intake::count(&mut tx, id).await?;
            tx.commit().await?;
            Ok::<_, Error>((cancelled, requested))
        })
        .await
    }

    /// Moves sweep `id` from `from` to `to`, and its cells with `cells_sql` (an
    /// `UPDATE cells SET …` whose `$1` is the sweep, `$2` `now` if given). Returns cells changed,
    /// counting the intake's, which enter in the new state when they are moved. Nothing
    /// changes in the sweep's row when it is already `to`.
    async fn sweep_transition(
        &self,
        id: SweepId,
        (from, to): (SweepState, SweepState),
        cells_sql: &'static str,
        now: Option<Millis>,
    ) -> Result<u64> {
        deadlock::retried(|| async {
            let mut tx = self.db.begin().await?;
            let state = self.sweep_head(&mut tx, id).await?.state;
            let changed = state != to;
            if changed && state != from {
                return Err(Error::Conflict(format!("sweep {id} is {state}")));
            }
            if changed {
                Stmt::new("UPDATE sweeps SET state = $1 WHERE id = $2")
                    .bind(to.as_str())
                    .bind(id.0)
                    .execute(tx.on())
                    .await?;
            }
            let mut cells = Stmt::new(cells_sql).bind(id.0);
            if let Some(now) = now {
                cells = cells.bind(now.0);
            }
            let n = cells.execute(tx.on()).await?;
            let n = n + if changed {
                intake::count(&mut tx, id).await?
            } else {
                0
            };
            tx.commit().await?;
            Ok::<_, Error>(n)
        })
        .await
    }

    /// Holds the sweep's queued cells. Returns cells held.
    pub async fn sweep_pause(&self, id: SweepId) -> Result<u64> {
        let sql = "UPDATE cells SET state = 'held' WHERE sweep_id = $1 \
                   AND state IN ('available', 'scheduled', 'retryable')";
        let states = (SweepState::Active, SweepState::Paused);
        self.sweep_transition(id, states, sql, None).await
    }

    /// Releases held cells. Returns cells released.
    pub async fn sweep_resume(&self, id: SweepId, now: Millis) -> Result<u64> {
        let sql = "UPDATE cells SET state = CASE WHEN scheduled_at <= $2 THEN 'available' \
                   WHEN attempt > 0 THEN 'retryable' ELSE 'scheduled' END \
                   WHERE sweep_id = $1 AND state = 'held'";
        let states = (SweepState::Paused, SweepState::Active);
        self.sweep_transition(id, states, sql, Some(now)).await
    }

    /// Gives discarded cells a fresh set of attempts. Returns cells re-queued.
    pub async fn sweep_retry_failed(&self, id: SweepId, now: Millis) -> Result<u64> {
        deadlock::retried(|| async {
            let mut tx = self.db.begin().await?;
            let head = self.sweep_head(&mut tx, id).await?;
            if head.state == SweepState::Cancelled {
                return Err(Error::Conflict(format!("sweep {id} is cancelled")));
            }
            let n = Stmt::new(
                "UPDATE cells SET state = $1, finalized_at = NULL, scheduled_at = $2, \
                 max_attempts = attempt + $3 WHERE sweep_id = $4 AND state = 'discarded'",
            )
            .bind(head.state.entry_state().as_str())
            .bind(now.0)
            .bind(head.max_attempts)
            .bind(id.0)
            .execute(tx.on())
            .await?;
            tx.commit().await?;
            Ok::<_, Error>(n)
        })
        .await
    }

    /// Cells finished (completed, discarded) since `since`.
    pub async fn sweep_finished_since(&self, id: SweepId, since: Millis) -> Result<u64> {
        let n = Stmt::new(
            "SELECT count(*) FROM cells WHERE sweep_id = $1 \
             AND state IN ('completed', 'discarded') AND finalized_at >= $2",
        )
        .bind(id.0)
        .bind(since.0)
        .fetch_one(self.db.reader())
        .await?
        .int(0)?;
        Ok(to_u64(n))
    }

    /// Inserts `cells` of sweep `sweep` in `state`, the sweep's priority and attempts taken
    /// from `head`: by the backend's bulk insert.
    pub(super) async fn insert_cells(
        &self,
        tx: &mut Tx,
        sweep: i64,
        head: &SweepHead,
        state: CellState,
        cells: &[NewCell],
        now: Millis,
    ) -> Result<()> {
        let bulk = BulkInsert {
            sweep,
            priority: head.priority,
            max_attempts: head.max_attempts,
            state: state.as_str(),
            now,
        };
        match tx {
            Tx::Sqlite(t) => super::sqlite::insert_cells(t, &bulk, cells).await,
            Tx::Postgres(t) => super::postgres::copy::insert_cells(t, &bulk, cells).await,
        }
    }
}
