//! The intake on Postgres: chunks stored with their sweep, and the move of one into `cells`.

use kiln_proto::SweepId;

use super::PgStore;
use super::copy;
use crate::clock::Millis;
use crate::domain::state::{CellState, SweepState};
use crate::store::intake::{entry_state, insert_state};
use crate::store::rows::{self, AnyRow};
use crate::store::{IntakeChunk, IntakeRow, to_u64};
use crate::sweep::NewCell;
use crate::{Error, Result};

/// Inserts a submission's intake chunks, all in one statement.
pub(super) async fn insert_chunks(
    conn: &mut sqlx::PgConnection,
    sweep: i64,
    chunks: &[IntakeChunk],
    now: Millis,
) -> Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    let firsts: Vec<i64> = chunks.iter().map(|c| i64::from(c.first_number)).collect();
    let counts: Vec<i64> = chunks.iter().map(|c| i64::from(c.cell_count)).collect();
    let bytes: Vec<&[u8]> = chunks.iter().map(|c| c.cells.as_slice()).collect();
    sqlx::query(
        "INSERT INTO intake (sweep_id, first_number, cell_count, created_at, cells) \
         SELECT $1, f, n, $2, b FROM unnest($3::bigint[], $4::bigint[], $5::bytea[]) AS u(f, n, b)",
    )
    .bind(sweep)
    .bind(now.0)
    .bind(firsts)
    .bind(counts)
    .bind(bytes)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Cells of sweep `id` waiting in the intake.
pub(super) async fn count(conn: &mut sqlx::PgConnection, id: SweepId) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(cell_count), 0)::bigint FROM intake WHERE sweep_id = $1",
    )
    .bind(id.0)
    .fetch_one(&mut *conn)
    .await?;
    Ok(to_u64(n))
}

impl PgStore {
    pub(in crate::store) async fn intake_next(
        &self,
        after: Option<(SweepId, u32)>,
        only: Option<SweepId>,
    ) -> Result<Option<IntakeRow>> {
        let (sweep, first) = after.map_or((-1, -1), |(s, f)| (s.0, i64::from(f)));
        let row = sqlx::query(
            "SELECT sweep_id, first_number, cell_count, created_at, cells FROM intake \
             WHERE (sweep_id, first_number) > ($1, $2) AND ($3::bigint IS NULL OR sweep_id = $3) \
             ORDER BY sweep_id, first_number LIMIT 1",
        )
        .bind(sweep)
        .bind(first)
        .bind(only.map(|s| s.0))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::intake).transpose()
    }

    pub(in crate::store) async fn intake_move(
        &self,
        chunk: &IntakeRow,
        cells: &[NewCell],
        now: Millis,
    ) -> Result<Option<CellState>> {
        let mut tx = self.pool.begin().await?;
        // The sweep's row first, as cancel, pause and resume take it: its state cannot change
        // under the move, and they count the intake knowing no chunk moves meanwhile.
        let row = sqlx::query(
            "SELECT state, priority, max_attempts FROM sweeps WHERE id = $1 FOR UPDATE",
        )
        .bind(chunk.sweep_id.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::SweepNotFound(chunk.sweep_id))?;
        let gone = sqlx::query("DELETE FROM intake WHERE sweep_id = $1 AND first_number = $2")
            .bind(chunk.sweep_id.0)
            .bind(i64::from(chunk.first_number))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Ok(None);
        }
        let state = entry_state(row.text("state")?.parse::<SweepState>()?);
        let insert_as = insert_state(state);
        copy::insert_cells(
            &mut tx,
            chunk.sweep_id.0,
            row.int("priority")?,
            row.int("max_attempts")?,
            insert_as.as_str(),
            cells,
            chunk.created_at,
        )
        .await?;
        if state == CellState::Cancelled {
            sqlx::query(
                "UPDATE cells SET state = 'cancelled', finalized_at = $1 WHERE sweep_id = $2 \
                 AND number >= $3 AND number < $4 AND state = 'held'",
            )
            .bind(now.0)
            .bind(chunk.sweep_id.0)
            .bind(i64::from(chunk.first_number))
            .bind(i64::from(chunk.first_number) + i64::from(chunk.cell_count))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some(state))
    }

    pub(in crate::store) async fn intake_pending(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT coalesce(sum(cell_count), 0)::bigint FROM intake")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(n))
    }
}
