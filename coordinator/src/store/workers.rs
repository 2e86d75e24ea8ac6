//! Workers: registration, being seen (with the pipelines they have loaded), drain, and the list
//! with what each completed lately.

use kiln_proto::WorkerId;

use super::db::Stmt;
use super::{Store, rows};
use crate::clock::Millis;
use crate::domain::rows::{WorkerRegistration, WorkerRow};
use crate::{Error, Result};

/// The columns of a [`WorkerRow`] but its recent completions.
const WORKER_COLUMNS: &str = "id, name, device_kind, device_model, memory_mib, max_pixels, \
     loaded, version, storage, state, registered_at, last_seen_at, render_level";

fn to_json(loaded: &[String]) -> Result<String> {
    serde_json::to_string(loaded).map_err(|e| Error::Corrupt(e.to_string()))
}

impl Store {
    /// Registers a worker, with the hash of the session credential it was given.
    pub async fn worker_register(
        &self,
        r: &WorkerRegistration,
        session_hash: &str,
        now: Millis,
    ) -> Result<WorkerId> {
        let id = Stmt::new(
            "INSERT INTO workers (name, device_kind, device_model, memory_mib, max_pixels, \
             loaded, version, storage, session_hash, state, registered_at, last_seen_at, \
             render_level) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $10, 'active', $8, $8, $11) RETURNING id",
        )
        .bind(&r.name)
        .bind(r.device_kind.as_str())
        .bind(&r.device_model)
        .bind(r.memory_mib)
        .bind(r.max_pixels)
        .bind(to_json(&r.loaded)?)
        .bind(&r.version)
        .bind(now.0)
        .bind(&r.storage)
        .bind(session_hash)
        .bind(i64::from(r.render_level))
        .fetch_one(self.db.writer())
        .await?
        .int(0)?;
        Ok(WorkerId(id))
    }

    /// Marks a worker seen (and active), replacing its loaded set when given.
    pub async fn worker_seen(
        &self,
        id: WorkerId,
        loaded: Option<&[String]>,
        now: Millis,
    ) -> Result<WorkerRow> {
        let loaded = loaded.map(to_json).transpose()?;
        let row = Stmt::new(format!(
            "UPDATE workers SET last_seen_at = $1, loaded = COALESCE($2, loaded), \
             state = 'active' WHERE id = $3 \
             RETURNING {WORKER_COLUMNS}, CAST(0 AS BIGINT) AS recent"
        ))
        .bind(now.0)
        .bind(loaded.as_deref())
        .bind(id.0)
        .fetch_optional(self.db.writer())
        .await?
        .ok_or(Error::WorkerNotFound(id))?;
        rows::worker(&row)
    }

    /// The hash of a worker's session credential (`None` for one registered before sessions)
    /// and the storage it registered with.
    pub async fn worker_credentials(&self, id: WorkerId) -> Result<(Option<String>, String)> {
        let row = Stmt::new("SELECT session_hash, storage FROM workers WHERE id = $1")
            .bind(id.0)
            .fetch_optional(self.db.reader())
            .await?
            .ok_or(Error::WorkerNotFound(id))?;
        Ok((row.opt_text("session_hash")?, row.text("storage")?))
    }

    /// Marks a worker drained.
    pub async fn worker_drain(&self, id: WorkerId, now: Millis) -> Result<()> {
        let n = Stmt::new("UPDATE workers SET state = 'drained', last_seen_at = $1 WHERE id = $2")
            .bind(now.0)
            .bind(id.0)
            .execute(self.db.writer())
            .await?;
        if n == 0 {
            return Err(Error::WorkerNotFound(id));
        }
        Ok(())
    }

    /// Every worker, with completions since `since`.
    pub async fn worker_list(&self, since: Millis) -> Result<Vec<WorkerRow>> {
        let rows = Stmt::new(format!(
            "SELECT {WORKER_COLUMNS}, \
             (SELECT count(*) FROM cells c WHERE c.result_worker = w.id \
              AND c.state = 'completed' AND c.finalized_at >= $1) AS recent \
             FROM workers w ORDER BY w.id"
        ))
        .bind(since.0)
        .fetch_all(self.db.reader())
        .await?;
        rows.iter().map(rows::worker).collect()
    }
}
