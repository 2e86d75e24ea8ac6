//! Decoding of result rows into the store's row types, shared by both backends. Every integer
//! column is read as `i64` (Postgres `BIGINT`, SQLite `INTEGER`) and narrowed here.

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{
    AvailableCell, CellRow, IntakeRow, LeasedCell, ProgressRow, QueuePos, StateCounts, SweepRow,
    WorkerRegistration, WorkerRow, parse_loaded, to_u64,
};
use crate::clock::Millis;
use crate::domain::candidate::Candidate;
use crate::domain::state::DeviceKind;
use crate::{Error, Result};

/// A row type both backends' rows satisfy.
pub(super) trait AnyRow: Row
where
    for<'a> &'a str: ColumnIndex<Self>,
{
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>>;
}

impl<R> AnyRow for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    i64: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    String: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: for<'r> Decode<'r, R::Database> + Type<R::Database>,
{
    fn int(&self, col: &str) -> Result<i64> {
        Ok(self.try_get::<i64, _>(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.try_get::<Option<i64>, _>(col)?)
    }
    fn text(&self, col: &str) -> Result<String> {
        Ok(self.try_get::<String, _>(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.try_get::<Option<String>, _>(col)?)
    }
    fn bytes(&self, col: &str) -> Result<Vec<u8>> {
        Ok(self.try_get::<Vec<u8>, _>(col)?)
    }
}

pub(super) fn narrow(col: &str, v: i64) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Corrupt(format!("{col}: {v} out of range")))
}

/// A stored intake chunk.
pub(super) fn intake<R: AnyRow>(r: &R) -> Result<IntakeRow>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    let number = |col: &str| {
        let v = r.int(col)?;
        u32::try_from(v).map_err(|_| Error::Corrupt(format!("intake {col}: {v} out of range")))
    };
    Ok(IntakeRow {
        sweep_id: SweepId(r.int("sweep_id")?),
        first_number: number("first_number")?,
        cell_count: number("cell_count")?,
        created_at: Millis(r.int("created_at")?),
        cells: r.bytes("cells")?,
    })
}

pub(super) fn sweep<R: AnyRow>(r: &R) -> Result<SweepRow>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(SweepRow {
        id: SweepId(r.int("id")?),
        name: r.text("name")?,
        idempotency_key: r.text("idempotency_key")?,
        priority: narrow("priority", r.int("priority")?)?,
        max_attempts: narrow("max_attempts", r.int("max_attempts")?)?,
        state: r.text("state")?.parse()?,
        created_at: r.int("created_at")?,
        counts: StateCounts::default(),
    })
}

pub(super) fn counts<R: AnyRow>(rows: &[R]) -> Result<StateCounts>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    let mut counts = StateCounts::default();
    for r in rows {
        counts.add(r.text("state")?.parse()?, to_u64(r.int("n")?));
    }
    Ok(counts)
}

pub(super) fn leased<R: AnyRow>(r: &R, expires: Millis, was_head: bool) -> Result<LeasedCell>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(LeasedCell {
        id: CellId(r.int("id")?),
        sweep_id: SweepId(r.int("sweep_id")?),
        number: r.int("number")?,
        attempt: Attempt(narrow("attempt", r.int("attempt")?)?),
        cell_key: r.text("cell_key")?,
        affinity_key: r.text("affinity_key")?,
        spec_json: r.text("spec")?,
        lease_expires_at: expires,
        was_head,
    })
}

pub(super) fn available<R: AnyRow>(r: &R) -> Result<AvailableCell>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    let id = r.int("id")?;
    Ok(AvailableCell {
        pos: QueuePos {
            priority: r.int("priority")?,
            scheduled_at: r.int("scheduled_at")?,
            id,
        },
        pixels: r.int("pixels")?,
        min_memory_mib: r.int("min_memory_mib")?,
        candidate: Candidate {
            id,
            affinity_key: r.text("affinity_key")?,
            last_failed_worker: r.opt_int("last_failed_worker")?,
        },
    })
}

pub(super) fn cell<R: AnyRow>(r: &R) -> Result<CellRow>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(CellRow {
        id: CellId(r.int("id")?),
        sweep_id: SweepId(r.int("sweep_id")?),
        number: r.int("number")?,
        cell_key: r.text("cell_key")?,
        spec_json: r.text("spec")?,
        state: r.text("state")?.parse()?,
        attempt: narrow("attempt", r.int("attempt")?)?,
        max_attempts: narrow("max_attempts", r.int("max_attempts")?)?,
        errors_json: r.text("errors")?,
        result_json: r.opt_text("result")?,
        worker: r.opt_int("worker")?.map(WorkerId),
        finalized_at: r.opt_int("finalized_at")?,
    })
}

pub(super) fn progress<R: AnyRow>(r: &R) -> Result<ProgressRow>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(ProgressRow {
        cell: CellId(r.int("id")?),
        number: r.int("number")?,
        attempt: narrow("attempt", r.int("attempt")?)?,
        worker: WorkerId(r.int("lease_owner")?),
        step: r.opt_int("progress_step")?.unwrap_or(0),
        total: r.opt_int("progress_total")?.unwrap_or(0),
    })
}

pub(super) fn worker<R: AnyRow>(r: &R) -> Result<WorkerRow>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(WorkerRow {
        id: WorkerId(r.int("id")?),
        info: WorkerRegistration {
            name: r.text("name")?,
            device_kind: r.text("device_kind")?.parse::<DeviceKind>()?,
            device_model: r.text("device_model")?,
            memory_mib: r.int("memory_mib")?,
            max_pixels: r.int("max_pixels")?,
            loaded: parse_loaded(&r.text("loaded")?)?,
            version: r.text("version")?,
        },
        drained: r.text("state")? == "drained",
        registered_at: r.int("registered_at")?,
        last_seen_at: r.int("last_seen_at")?,
        completed_recently: to_u64(r.int("recent")?),
    })
}

/// The columns of a cell a failure decision needs.
pub(super) struct FailRow {
    pub attempt: i32,
    pub max_attempts: i32,
    pub errors: String,
    pub cancel_requested: bool,
}

pub(super) fn fail<R: AnyRow>(r: &R) -> Result<FailRow>
where
    for<'a> &'a str: ColumnIndex<R>,
{
    Ok(FailRow {
        attempt: narrow("attempt", r.int("attempt")?)?,
        max_attempts: narrow("max_attempts", r.int("max_attempts")?)?,
        errors: r.text("errors")?,
        cancel_requested: r.opt_int("cancel_requested_at")?.is_some(),
    })
}
