//! img2img pictures (`images`): stored once per content by `PutImage`, read whole by a
//! worker's `GetImage`, and looked up at submit so a sweep never names a picture the
//! coordinator lacks.

use super::Store;
use super::db::{Row, Stmt};
use crate::Result;
use crate::clock::Millis;
use crate::domain::rows::ImageRow;

fn image(r: &Row) -> Result<ImageRow> {
    let count = |col: &str| -> Result<i64> { r.int(col) };
    Ok(ImageRow {
        sha256: r.text("sha256")?,
        format: r.text("format")?,
        width: u32::try_from(count("width")?).unwrap_or(0),
        height: u32::try_from(count("height")?).unwrap_or(0),
        bytes: u64::try_from(count("bytes")?).unwrap_or(0),
    })
}

impl Store {
    /// Stores a picture unless one with its hash is stored already (the same bytes). Returns
    /// the stored row, which for the same hash is the same picture.
    pub async fn image_put(&self, row: &ImageRow, data: &[u8], now: Millis) -> Result<ImageRow> {
        Stmt::new(
            "INSERT INTO images (sha256, format, width, height, bytes, data, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(&row.sha256)
        .bind(&row.format)
        .bind(i64::from(row.width))
        .bind(i64::from(row.height))
        .bind(row.bytes as i64)
        .bind(data)
        .bind(now.0)
        .execute(self.db.writer())
        .await?;
        let stored =
            Stmt::new("SELECT sha256, format, width, height, bytes FROM images WHERE sha256 = $1")
                .bind(&row.sha256)
                .fetch_one(self.db.writer())
                .await?;
        image(&stored)
    }

    /// A picture's bytes, if stored.
    pub async fn image_data(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let row = Stmt::new("SELECT data FROM images WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(self.db.reader())
            .await?;
        row.map(|r| r.bytes("data")).transpose()
    }

    /// Which of `sha256s` no stored picture has, in the order given.
    pub async fn images_missing(&self, sha256s: &[&str]) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        for sha in sha256s {
            let found = Stmt::new("SELECT 1 FROM images WHERE sha256 = $1")
                .bind(*sha)
                .fetch_optional(self.db.reader())
                .await?;
            if found.is_none() {
                missing.push((*sha).to_string());
            }
        }
        Ok(missing)
    }
}
