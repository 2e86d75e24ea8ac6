//! The model registry (`model_blobs`, `models`): a blob row per uploaded content, a name per
//! registry entry pointing at one. Names are re-pointed, never their blobs; `model_remove`
//! drops the name only. Looked up at submit, where sweeps pin names to hashes.

use super::Store;
use super::db::{Row, Stmt};
use crate::clock::Millis;
use crate::domain::rows::ModelRow;
use crate::domain::state::ModelKind;
use crate::{Error, Result};

const MODEL_COLUMNS: &str = "m.name, m.sha256, b.bytes, m.kind, m.created_at, m.updated_at \
                             FROM models m JOIN model_blobs b ON b.sha256 = m.sha256";

fn model(r: &Row) -> Result<ModelRow> {
    Ok(ModelRow {
        name: r.text("name")?,
        sha256: r.text("sha256")?,
        bytes: u64::try_from(r.int("bytes")?).unwrap_or(0),
        kind: r.text("kind")?.parse()?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
    })
}

impl Store {
    /// Records blob `sha256` of `bytes` (once per content) and points `name` at it, as `kind`.
    /// Returns the entry and the hash the name pointed at before, if it existed. A blob stored
    /// with another size is a conflict: one of the two uploads did not send what it hashed.
    pub async fn model_put(
        &self,
        name: &str,
        sha256: &str,
        bytes: u64,
        kind: ModelKind,
        now: Millis,
    ) -> Result<(ModelRow, Option<String>)> {
        let mut tx = self.db.begin().await?;
        Stmt::new(
            "INSERT INTO model_blobs (sha256, bytes, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(sha256)
        .bind(bytes as i64)
        .bind(now.0)
        .execute(tx.on())
        .await?;
        let stored = Stmt::new("SELECT bytes FROM model_blobs WHERE sha256 = $1")
            .bind(sha256)
            .fetch_one(tx.on())
            .await?
            .int("bytes")?;
        if stored != bytes as i64 {
            return Err(Error::Conflict(format!(
                "sha256 {sha256} is registered with {stored} bytes, not {bytes}"
            )));
        }
        let previous = Stmt::new("SELECT sha256 FROM models WHERE name = $1")
            .bind(name)
            .fetch_optional(tx.on())
            .await?
            .map(|r| r.text("sha256"))
            .transpose()?;
        Stmt::new(
            "INSERT INTO models (name, sha256, kind, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (name) DO UPDATE SET \
             sha256 = excluded.sha256, kind = excluded.kind, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(sha256)
        .bind(kind.as_str())
        .bind(now.0)
        .execute(tx.on())
        .await?;
        let row = Stmt::new(format!("SELECT {MODEL_COLUMNS} WHERE m.name = $1"))
            .bind(name)
            .fetch_one(tx.on())
            .await?;
        let row = model(&row)?;
        tx.commit().await?;
        Ok((row, previous))
    }

    /// Registry entries by name, at most `limit`.
    pub async fn models_list(&self, limit: usize) -> Result<Vec<ModelRow>> {
        Stmt::new(format!("SELECT {MODEL_COLUMNS} ORDER BY m.name LIMIT $1"))
            .bind(limit as i64)
            .fetch_all(self.db.reader())
            .await?
            .iter()
            .map(model)
            .collect()
    }

    /// How many names the registry has.
    pub async fn model_count(&self) -> Result<u64> {
        let n = Stmt::new("SELECT COUNT(*) AS n FROM models")
            .fetch_one(self.db.reader())
            .await?
            .int("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The entry named `name`, if any.
    pub async fn model_get(&self, name: &str) -> Result<Option<ModelRow>> {
        Stmt::new(format!("SELECT {MODEL_COLUMNS} WHERE m.name = $1"))
            .bind(name)
            .fetch_optional(self.db.reader())
            .await?
            .as_ref()
            .map(model)
            .transpose()
    }

    /// The size of blob `sha256`, if registered (named or not).
    pub async fn model_blob(&self, sha256: &str) -> Result<Option<u64>> {
        Stmt::new("SELECT bytes FROM model_blobs WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(self.db.reader())
            .await?
            .map(|r| Ok(u64::try_from(r.int("bytes")?).unwrap_or(0)))
            .transpose()
    }

    /// Removes name `name`; returns the hash it pointed at, `None` when there was no such name.
    /// The blob row stays.
    pub async fn model_remove(&self, name: &str) -> Result<Option<String>> {
        Stmt::new("DELETE FROM models WHERE name = $1 RETURNING sha256")
            .bind(name)
            .fetch_optional(self.db.writer())
            .await?
            .map(|r| r.text("sha256"))
            .transpose()
    }
}
