//! The sha256 of local model files, remembered by (canonical path, size, modification time) in
//! one small JSON file under the model cache folder (as A1111's `cache.json`), so a 2 GB file
//! is hashed once, not once per cell or per start. Used to match a pinned sha256 against the
//! file a reference names in `--models`, and to tell the coordinator what the worker holds.
//!
//! Only files a cell resolved are ever hashed; nothing walks the models folders. The memo is
//! bounded ([`MAX_ENTRIES`], the oldest entries go first) and written atomically; several
//! workers on one machine may share it (the last writer wins, and a lost entry is only hashed
//! again). Every call does file work: call it from a blocking thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::disk::{DiskError, hash_file};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Entry {
    size: u64,
    mtime_ns: u64,
    sha256: String,
    /// When it was hashed, for dropping the oldest.
    hashed_ms: u64,
}

/// The memo of one file.
#[derive(Debug)]
pub struct HashMemo {
    file: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl HashMemo {
    /// Reads the memo at `file` (empty when absent or unreadable: it is only a memo).
    pub fn open(file: PathBuf) -> Self {
        let entries = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self { file, entries }
    }

    /// The remembered sha256 of `path` if the file has not changed since it was hashed.
    pub fn known(&self, path: &Path) -> Option<String> {
        let (key, size, mtime_ns) = identity(path)?;
        self.entries
            .get(&key)
            .filter(|e| (e.size, e.mtime_ns) == (size, mtime_ns))
            .map(|e| e.sha256.clone())
    }

    /// The sha256 of `path`, remembered or computed (and then remembered).
    pub fn hash(&mut self, path: &Path) -> Result<String, DiskError> {
        if let Some(known) = self.known(path) {
            return Ok(known);
        }
        let io = |source| DiskError::Io {
            path: path.to_owned(),
            source,
        };
        let (key, size, mtime_ns) =
            identity(path).ok_or_else(|| io(std::io::ErrorKind::NotFound.into()))?;
        let (sha256, _, _) = hash_file(path, Default::default())?;
        // Re-read first so entries other workers wrote meanwhile are kept.
        self.entries = Self::open(self.file.clone()).entries;
        self.entries.insert(
            key,
            Entry {
                size,
                mtime_ns,
                sha256: sha256.clone(),
                hashed_ms: super::disk::now_ms(),
            },
        );
        while self.entries.len() > MAX_ENTRIES {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.hashed_ms)
                .map(|(k, _)| k.clone())
                .expect("the memo is not empty");
            self.entries.remove(&oldest);
        }
        self.save();
        Ok(sha256)
    }

    /// The sha256 of every remembered file that is still as it was hashed.
    pub fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = self
            .entries
            .iter()
            .filter(|(path, _)| self.known(Path::new(path)).is_some())
            .map(|(_, e)| e.sha256.clone())
            .collect();
        held.sort();
        held.dedup();
        held
    }

    fn save(&self) {
        let tmp = self
            .file
            .with_extension(format!("tmp-{}", std::process::id()));
        let text = serde_json::to_vec(&self.entries).expect("entries are always JSON");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = written {
            tracing::warn!(file = %self.file.display(), error = %e, "hash memo not saved");
        }
    }
}

/// (canonical path, size, mtime ns) of a regular file.
fn identity(path: &Path) -> Option<(String, u64, u64)> {
    let canonical = path.canonicalize().ok()?;
    let (size, mtime) = super::disk::stat(&canonical).ok()?;
    let m = std::fs::metadata(&canonical).ok()?;
    m.is_file()
        .then(|| (canonical.to_string_lossy().into_owned(), size, mtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_hashed_once_and_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.safetensors");
        std::fs::write(&file, b"abc").unwrap();
        let mut memo = HashMemo::open(dir.path().join("hashes.json"));
        assert_eq!(memo.known(&file), None);
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(memo.hash(&file).unwrap(), abc);
        // Read back by another process's memo.
        let again = HashMemo::open(dir.path().join("hashes.json"));
        assert_eq!(again.known(&file).as_deref(), Some(abc));
        assert_eq!(again.held(), [abc]);
        std::fs::write(&file, b"abcd").unwrap();
        assert_eq!(again.known(&file), None, "a new size is not the same file");
        assert_ne!(memo.hash(&file).unwrap(), abc);
    }
}
