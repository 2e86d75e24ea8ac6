//! Decoding of result rows into the store's row types, for both databases ([`Row`] reads
//! either; every integer column as `i64` and narrowed here).

use kiln_proto::{Attempt, CellId, SweepId, WorkerId};

use super::db::Row;
use crate::clock::Millis;
use crate::domain::candidate::Candidate;
use crate::domain::lease::{AvailableCell, LeasedCell, QueuePos};
use crate::domain::rows::{
    CellRow, IntakeRow, ProgressRow, StateCounts, SweepRow, WorkerRegistration, WorkerRow,
};
use crate::domain::state::DeviceKind;
use crate::{Error, Result};

/// The columns a lease returns, for [`leased`].
pub(super) const LEASED_COLUMNS: &str =
    "id, sweep_id, number, attempt, cell_key, affinity_key, spec";

/// The columns every cell read returns, in `CellRow` order.
pub(super) const CELL_COLUMNS: &str = "id, sweep_id, number, cell_key, spec, state, attempt, \
    max_attempts, errors, result, COALESCE(lease_owner, result_worker) AS worker, finalized_at, \
    starred, rating";

pub(super) fn narrow(col: &str, v: i64) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Corrupt(format!("{col}: {v} out of range")))
}

/// A stored intake chunk.
pub(super) fn intake(r: &Row) -> Result<IntakeRow> {
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

pub(super) fn sweep(r: &Row) -> Result<SweepRow> {
    Ok(SweepRow {
        id: SweepId(r.int("id")?),
        name: r.text("name")?,
        idempotency_key: r.text("idempotency_key")?,
        priority: narrow("priority", r.int("priority")?)?,
        max_attempts: narrow("max_attempts", r.int("max_attempts")?)?,
        state: r.text("state")?.parse()?,
        created_at: r.int("created_at")?,
        owner: r.opt_text("owner")?,
        counts: StateCounts::default(),
    })
}

pub(super) fn counts(rows: &[Row]) -> Result<StateCounts> {
    let mut counts = StateCounts::default();
    for r in rows {
        counts.add(r.text("state")?.parse()?, to_u64(r.int("n")?));
    }
    Ok(counts)
}

pub(super) fn leased(r: &Row, expires: Millis, was_head: bool) -> Result<LeasedCell> {
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

pub(super) fn available(r: &Row) -> Result<AvailableCell> {
    let id = r.int("id")?;
    Ok(AvailableCell {
        pos: QueuePos {
            priority: r.int("priority")?,
            scheduled_at: r.int("scheduled_at")?,
            id,
        },
        pixels: r.int("pixels")?,
        min_memory_mib: r.int("min_memory_mib")?,
        render_level: r.int("render_level")?,
        candidate: Candidate {
            id,
            affinity_key: r.text("affinity_key")?,
            last_failed_worker: r.opt_int("last_failed_worker")?,
        },
    })
}

pub(super) fn cell(r: &Row) -> Result<CellRow> {
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
        starred: r.int("starred")? != 0,
        rating: u8::try_from(r.int("rating")?)
            .map_err(|_| Error::Corrupt("cells.rating out of range".into()))?,
    })
}

pub(super) fn progress(r: &Row) -> Result<ProgressRow> {
    Ok(ProgressRow {
        cell: CellId(r.int("id")?),
        number: r.int("number")?,
        attempt: narrow("attempt", r.int("attempt")?)?,
        worker: WorkerId(r.int("lease_owner")?),
        step: r.opt_int("progress_step")?.unwrap_or(0),
        total: r.opt_int("progress_total")?.unwrap_or(0),
        activity: String::new(),
    })
}

pub(super) fn worker(r: &Row) -> Result<WorkerRow> {
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
            storage: r.text("storage")?,
            render_level: u32::try_from(r.int("render_level")?)
                .map_err(|_| Error::Corrupt("workers.render_level out of range".into()))?,
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

pub(super) fn fail(r: &Row) -> Result<FailRow> {
    Ok(FailRow {
        attempt: narrow("attempt", r.int("attempt")?)?,
        max_attempts: narrow("max_attempts", r.int("max_attempts")?)?,
        errors: r.text("errors")?,
        cancel_requested: r.opt_int("cancel_requested_at")?.is_some(),
    })
}

/// `(id, name)` of each sweep a name lookup found (`filter::sweep_lookup`).
pub(super) fn sweep_names(found: &[Row]) -> Result<Vec<(i64, String)>> {
    found
        .iter()
        .map(|r| Ok((r.int("id")?, r.text("name")?)))
        .collect()
}

/// Parses a stored JSON array of loaded affinity keys.
fn parse_loaded(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("workers.loaded: {e}")))
}

pub(super) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
