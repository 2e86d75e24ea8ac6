//! The worker's textual-inversion embeddings: the database is read once when the render thread
//! starts, from each models folder's `embeddings/` and every `--embeddings` folder, and read
//! again before a job when a file there was added, removed or rewritten (checked at most every
//! [`RECHECK`]; the check looks only at sizes and modification times). It lives on the render
//! thread, so no file is read on Tokio's threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::InversionDb;

/// How often the folders are looked at again, at most.
pub const RECHECK: Duration = Duration::from_secs(2);

/// The embedding database the render thread hands to each job's pipeline.
pub(crate) struct Inversions {
    db: Arc<InversionDb>,
    checked: Instant,
}

impl Inversions {
    /// Reads the embeddings under `dirs` (folders that do not exist yet hold nothing until they
    /// do).
    pub(crate) fn load(dirs: Vec<PathBuf>) -> Self {
        Self {
            db: read(&dirs),
            checked: Instant::now(),
        }
    }

    /// The database, read again first if its folders changed since it was read.
    pub(crate) fn current(&mut self) -> Arc<InversionDb> {
        if self.checked.elapsed() >= RECHECK {
            self.checked = Instant::now();
            if self.db.changed() {
                tracing::info!("embeddings folder changed: reading it again");
                self.db = read(self.db.dirs());
            }
        }
        self.db.clone()
    }
}

fn read(dirs: &[PathBuf]) -> Arc<InversionDb> {
    let db = match InversionDb::load(dirs) {
        Ok(db) => db,
        Err(e) => {
            tracing::warn!(error = %e, "textual-inversion embeddings not loaded");
            return Arc::new(InversionDb::empty());
        }
    };
    let names: Vec<&str> = db.inversions().map(|i| i.name()).collect();
    if !names.is_empty() {
        tracing::info!(
            count = names.len(),
            names = %names.join(", "),
            "textual-inversion embeddings loaded"
        );
    }
    for (name, error) in db.refused() {
        tracing::warn!(
            name,
            error = %error,
            "embedding refused: prompts that use it will fail"
        );
    }
    Arc::new(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_that_appears_later_is_read_on_the_next_check() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("embeddings");
        let mut inversions = Inversions::load(vec![folder.clone()]);
        assert_eq!(inversions.current().inversions().count(), 0);
        std::fs::create_dir(&folder).unwrap();
        let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/embeddings/kiln.safetensors");
        std::fs::copy(fixture, folder.join("kiln.safetensors")).unwrap();
        // Not before the recheck interval…
        assert!(inversions.current().get("kiln").is_none());
        inversions.checked = (inversions.checked.checked_sub(RECHECK)).expect("uptime over 2 s");
        assert!(inversions.current().get("kiln").is_some());
    }
}
