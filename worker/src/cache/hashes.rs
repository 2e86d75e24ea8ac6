//! The sha256 of local model files, remembered by (canonical path, size, modification time) in
//! one small JSON file under the model cache folder (as A1111's `cache.json`), so a 2 GB file
//! is hashed once, not once per cell or per start. Used to match a pinned sha256 against the
//! file a reference names in `--models`, to tell the coordinator what the worker holds, and by
//! the engine for the metadata's hashes as it loads ([`SharedMemo`], which also remembers
//! other kinds of hash, such as A1111's LoRA hash).
//!
//! Only files a cell resolved are ever hashed; nothing walks the models folders. The memo is
//! bounded ([`MAX_ENTRIES`], the oldest entries go first) and written atomically; several
//! workers on one machine may share it (the last writer wins, and a lost entry is only hashed
//! again). Every call does file work: call it from a blocking thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::engine::load::hashes::{FILE_SHA256, Memo};

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
        self.known_kind(FILE_SHA256, path)
    }

    /// The remembered hash of `kind` of `path` if the file has not changed since.
    pub fn known_kind(&self, kind: &str, path: &Path) -> Option<String> {
        let (key, size, mtime_ns) = identity(kind, path)?;
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
        if identity(FILE_SHA256, path).is_none() {
            return Err(DiskError::Io {
                path: path.to_owned(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let (sha256, _, _) = hash_file(path, Default::default())?;
        self.remember(FILE_SHA256, path, &sha256);
        Ok(sha256)
    }

    /// Remembers `hash` as the hash of `kind` of `path` as the file is now, and saves.
    pub fn remember(&mut self, kind: &str, path: &Path, hash: &str) {
        let Some((key, size, mtime_ns)) = identity(kind, path) else {
            return;
        };
        // Re-read first so entries other workers wrote meanwhile are kept.
        self.entries = Self::open(self.file.clone()).entries;
        self.entries.insert(
            key,
            Entry {
                size,
                mtime_ns,
                sha256: hash.to_owned(),
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

/// (key, size, mtime ns) of a regular file: the key is its canonical path for a whole-file
/// sha256, else the kind, a NUL (no path holds one) and the path.
fn identity(kind: &str, path: &Path) -> Option<(String, u64, u64)> {
    let canonical = path.canonicalize().ok()?;
    let (size, mtime) = super::disk::stat(&canonical).ok()?;
    let m = std::fs::metadata(&canonical).ok()?;
    let path = canonical.to_string_lossy();
    let key = if kind == FILE_SHA256 {
        path.into_owned()
    } else {
        format!("{kind}\0{path}")
    };
    m.is_file().then_some((key, size, mtime))
}

/// A memo shared by the agent and the engine's loads ([`Memo`]).
#[derive(Clone, Debug)]
pub struct SharedMemo(pub Arc<Mutex<HashMemo>>);

impl SharedMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMemo> {
        // Each update leaves the memo whole; a panic elsewhere does not spoil it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Memo for SharedMemo {
    fn get(&self, kind: &str, path: &Path) -> Option<String> {
        self.lock().known_kind(kind, path)
    }

    fn put(&self, kind: &str, path: &Path, hash: &str) {
        self.lock().remember(kind, path, hash);
    }
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

    #[test]
    fn other_kinds_are_kept_apart_and_not_reported_as_held() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("l.safetensors");
        std::fs::write(&file, b"abc").unwrap();
        let memo = SharedMemo(Arc::new(Mutex::new(HashMemo::open(
            dir.path().join("hashes.json"),
        ))));
        memo.put("addnet", &file, "1234");
        assert_eq!(memo.get("addnet", &file).as_deref(), Some("1234"));
        assert_eq!(memo.get(FILE_SHA256, &file), None);
        let again = HashMemo::open(dir.path().join("hashes.json"));
        assert_eq!(again.known_kind("addnet", &file).as_deref(), Some("1234"));
        assert!(again.held().is_empty(), "only whole-file sha256s are held");
    }
}
