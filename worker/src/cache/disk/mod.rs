//! The disk model cache: model files fetched from the pool's model storage
//! (`models/sha256/<hex>`), kept by content under a byte budget, shared by every worker on
//! the machine.
//!
//! Layout under the cache folder:
//! - `blobs/<hex>`: complete files, each verified against its sha256 before it got this name;
//! - `partial/<hex>.part`: a download under way or interrupted (resumed from its length);
//! - `locks/<hex>.lock`: held exclusively while a process checks or downloads `<hex>`, so one
//!   download per file per machine; the others wait, then find the blob;
//! - `locks/<hex>.use`: held shared by each process using `<hex>`; eviction takes it
//!   exclusively with `try_lock` and skips what it cannot take, so a file in use is never
//!   removed;
//! - `meta/<hex>.json`: size and modification time when it was verified, and last use (LRU);
//! - `named/<hex>/<name>`: hard links that give a blob the file name its reference uses (the
//!   engine names models, LoRAs and embeddings after their file stem).
//!
//! Writes are atomic: bytes go to the `.part` file, which is hashed (its existing prefix
//! first, then each new chunk), flushed to disk and only then renamed to its blob name (and
//! the folder flushed where the OS allows), so a crash never leaves a file that looks
//! complete. A blob whose size or modification time differ from those recorded at
//! verification is hashed again before use, and fetched again when it no longer matches. A
//! download whose bytes do not hash to the name is deleted and fetched once more from scratch,
//! then is an error. All file work and hashing runs on blocking threads. The budget counts
//! complete blobs; the least recently used go first, when a download needs room and after it.
//! This module knows storage only as [`Storage::read_from`]; it never knows about cells.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::upload::{Storage, UploadError};

mod download;

/// The cache's default budget, bytes (50 GB).
pub const DEFAULT_BUDGET: u64 = 50_000_000_000;

/// Chunk size of hashing reads.
const READ_CHUNK: usize = 1 << 20;

/// The storage key of a model file by its sha256 (relative to the storage root or prefix).
pub fn model_key(hex: &str) -> String {
    format!("models/sha256/{hex}")
}

/// Whether `s` is a sha256 as cells carry it: 64 lower-case hex digits.
pub use kiln_proto::picture::is_sha256_hex as is_sha256;

/// What can go wrong fetching a model into the cache.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Not a sha256.
    #[error("{0:?} is not a sha256 (64 lower-case hex digits)")]
    BadHash(String),
    /// The model storage has no such file.
    #[error("model {hex} is not in the model storage (no object {key})")]
    Missing {
        /// Its sha256.
        hex: String,
        /// The key looked up.
        key: String,
    },
    /// The model storage failed (network, server).
    #[error("model storage: {0}")]
    Storage(UploadError),
    /// The downloaded bytes did not hash to the name, twice.
    #[error("model {hex}: the downloaded file hashes to {got}, fetched twice")]
    Mismatch {
        /// The expected sha256.
        hex: String,
        /// What the bytes hashed to.
        got: String,
    },
    /// A cache file could not be read or written.
    #[error("model cache {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `name` for a blob's view that is not a plain file name.
    #[error("{0:?} is not a file name")]
    BadName(String),
    /// A blocking task panicked or was cancelled.
    #[error("model cache task: {0}")]
    Task(String),
}

impl DiskError {
    /// Whether trying again later may help (storage trouble); the rest are permanent for
    /// this file, or trouble with this machine's disk.
    pub fn is_transient(&self) -> bool {
        matches!(self, DiskError::Storage(_) | DiskError::Task(_))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Counters since the cache was opened (this process's share).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Files found complete and verified.
    pub hits: u64,
    /// Downloads finished.
    pub downloads: u64,
    /// Bytes received from storage.
    pub downloaded_bytes: u64,
    /// Milliseconds spent downloading.
    pub download_ms: u64,
    /// Blobs found corrupt (hash mismatch) and deleted.
    pub corrupt: u64,
    /// Blobs evicted.
    pub evictions: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    downloads: AtomicU64,
    downloaded_bytes: AtomicU64,
    download_ms: AtomicU64,
    corrupt: AtomicU64,
    evictions: AtomicU64,
}

/// What `meta/<hex>.json` records.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Meta {
    /// Size when verified.
    size: u64,
    /// Modification time when verified, ns since the epoch.
    mtime_ns: u64,
    /// Last use, ms since the epoch.
    last_used_ms: u64,
}

/// A blob in use: holds its shared use lock until dropped, so no process evicts it.
#[derive(Debug)]
pub struct Blob {
    hex: String,
    path: PathBuf,
    _use: File,
}

impl Blob {
    /// Its sha256.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Its file, under the name it was asked for.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The disk model cache of one folder (see the module header).
#[derive(Clone, Debug)]
pub struct DiskCache {
    root: PathBuf,
    budget: u64,
    counters: Arc<Counters>,
}

impl DiskCache {
    /// The default folder: the OS cache folder's `kiln/models` (`~/.cache/kiln/models`,
    /// `%LOCALAPPDATA%\kiln\models`, `~/Library/Caches/kiln/models`).
    pub fn default_dir() -> Option<PathBuf> {
        dirs::cache_dir().map(|d| d.join("kiln").join("models"))
    }

    /// Opens (and creates) the cache folder `root`, keeping at most `budget` bytes of blobs.
    pub fn open(root: PathBuf, budget: u64) -> Result<Self, DiskError> {
        for sub in ["blobs", "partial", "locks", "meta", "named"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(Self {
            root,
            budget,
            counters: Arc::default(),
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Where the blob of `hex` lives once complete.
    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs").join(hex)
    }

    /// Where an interrupted download of `hex` is kept.
    pub fn partial_path(&self, hex: &str) -> PathBuf {
        self.root.join("partial").join(format!("{hex}.part"))
    }

    /// The path [`Self::ensure`] gives `hex` under `name`.
    pub fn named_path(&self, hex: &str, name: &str) -> PathBuf {
        self.root.join("named").join(hex).join(name)
    }

    /// This process's counters.
    pub fn stats(&self) -> DiskStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DiskStats {
            hits: get(&c.hits),
            downloads: get(&c.downloads),
            downloaded_bytes: get(&c.downloaded_bytes),
            download_ms: get(&c.download_ms),
            corrupt: get(&c.corrupt),
            evictions: get(&c.evictions),
        }
    }

    /// The sha256 of every complete blob (blocking: reads the folder).
    pub fn held(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("blobs")) else {
            return Vec::new();
        };
        let mut held: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_sha256(n))
            .collect();
        held.sort();
        held
    }

    /// The file of `hex`, named `name` (a plain file name), fetched from `storage` when this
    /// machine lacks it, and held in use until the returned [`Blob`] drops. `progress` hears
    /// (bytes done, bytes in all) as a download goes.
    pub async fn ensure(
        &self,
        hex: &str,
        name: &str,
        storage: &Storage,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Blob, DiskError> {
        if !is_sha256(hex) {
            return Err(DiskError::BadHash(hex.to_string()));
        }
        check_name(name)?;
        let mut last_mismatch = None;
        for _ in 0..2 {
            let (held, state) = self.blocking(hex, |c, hex| c.check(hex)).await?;
            let (offset, hasher) = match state {
                State::Ready => {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return self.named(hex, name, held).await;
                }
                State::Fetch { offset, hasher } => (offset, hasher),
            };
            match self.download(hex, storage, offset, hasher, progress).await {
                Ok(()) => {
                    let blob = self.named(hex, name, held).await?;
                    let cache = self.clone();
                    spawn_blocking(move || Ok(cache.evict_to(cache.budget))).await?;
                    return Ok(blob);
                }
                Err(DiskError::Mismatch { got, .. }) => last_mismatch = Some(got),
                Err(e) => return Err(e),
            }
        }
        Err(DiskError::Mismatch {
            hex: hex.to_string(),
            got: last_mismatch.unwrap_or_default(),
        })
    }

    /// Runs `f` on a blocking thread with the download lock of `hex` held and the use lock
    /// taken shared; gives back the use lock and `f`'s answer (the download lock is held by
    /// [`Held`] until dropped).
    async fn blocking<T: Send + 'static>(
        &self,
        hex: &str,
        f: impl FnOnce(&DiskCache, &str) -> Result<T, DiskError> + Send + 'static,
    ) -> Result<(Held, T), DiskError> {
        let (cache, hex) = (self.clone(), hex.to_string());
        spawn_blocking(move || {
            let download = cache.lock_file(&hex, "lock")?;
            download
                .lock()
                .map_err(io(&cache.lock_path(&hex, "lock")))?;
            let using = cache.lock_file(&hex, "use")?;
            using
                .lock_shared()
                .map_err(io(&cache.lock_path(&hex, "use")))?;
            let t = f(&cache, &hex)?;
            Ok((
                Held {
                    download: Some(download),
                    using,
                },
                t,
            ))
        })
        .await
    }

    /// Under the download lock: is the blob complete and intact, or where does its download
    /// start? Deletes a blob that no longer hashes to its name.
    fn check(&self, hex: &str) -> Result<State, DiskError> {
        let blob = self.blob_path(hex);
        if blob.is_file() {
            let stat = stat(&blob)?;
            let recorded = self.read_meta(hex);
            let intact = match recorded {
                Some(m) if (m.size, m.mtime_ns) == stat => true,
                // Changed since it was verified (or never recorded): hash it again.
                _ => hash_file(&blob, Sha256::new())?.0 == hex,
            };
            if intact {
                self.write_meta(hex, stat)?;
                return Ok(State::Ready);
            }
            tracing::warn!(
                sha256 = hex,
                "cached model file is corrupt: fetching it again"
            );
            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            self.remove(hex)?;
        }
        let part = self.partial_path(hex);
        if part.is_file() {
            let (_, len, hasher) = hash_file(&part, Sha256::new())?;
            return Ok(State::Fetch {
                offset: len,
                hasher: Box::new(hasher),
            });
        }
        Ok(State::Fetch {
            offset: 0,
            hasher: Box::default(),
        })
    }

    /// Gives the blob `name` under `named/<hex>/` (a hard link) and releases the download
    /// lock, keeping the use lock in the answer.
    async fn named(&self, hex: &str, name: &str, held: Held) -> Result<Blob, DiskError> {
        let path = self.named_path(hex, name);
        let (blob, view) = (self.blob_path(hex), path.clone());
        let using = spawn_blocking(move || {
            if !view.is_file() {
                let dir = view.parent().expect("a named path has a folder");
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                match std::fs::hard_link(&blob, &view) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(&view)(e)),
                }
            }
            Ok(held.release())
        })
        .await?;
        Ok(Blob {
            hex: hex.to_string(),
            path,
            _use: using,
        })
    }

    /// Evicts least recently used blobs until at most `target` bytes are held, skipping any
    /// that a process uses or downloads. Returns how many were evicted. Blocking.
    pub fn evict_to(&self, target: u64) -> usize {
        let mut blobs: Vec<(u64, u64, String)> = self
            .held()
            .into_iter()
            .filter_map(|hex| {
                let size = std::fs::metadata(self.blob_path(&hex)).ok()?.len();
                let last = self.read_meta(&hex).map_or(0, |m| m.last_used_ms);
                Some((last, size, hex))
            })
            .collect();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort();
        let mut evicted = 0;
        for (_, size, hex) in blobs {
            if total <= target {
                break;
            }
            match self.try_evict(&hex) {
                Ok(true) => {
                    total -= size;
                    evicted += 1;
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        sha256 = hex,
                        bytes = size,
                        "model evicted from the disk cache"
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(sha256 = hex, error = %e, "evicting a cached model"),
            }
        }
        evicted
    }

    /// Removes `hex` if no process downloads or uses it; false when one does.
    fn try_evict(&self, hex: &str) -> Result<bool, DiskError> {
        let download = self.lock_file(hex, "lock")?;
        let using = self.lock_file(hex, "use")?;
        for (file, kind) in [(&download, "lock"), (&using, "use")] {
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(false),
                Err(TryLockError::Error(e)) => return Err(io(&self.lock_path(hex, kind))(e)),
            }
        }
        self.remove(hex)?;
        Ok(true)
    }

    /// Deletes a blob with its record and views (under its locks).
    fn remove(&self, hex: &str) -> Result<(), DiskError> {
        let named = self.root.join("named").join(hex);
        if named.exists() {
            std::fs::remove_dir_all(&named).map_err(io(&named))?;
        }
        for path in [self.blob_path(hex), self.meta_path(hex)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(())
    }

    fn lock_path(&self, hex: &str, kind: &str) -> PathBuf {
        self.root.join("locks").join(format!("{hex}.{kind}"))
    }

    fn lock_file(&self, hex: &str, kind: &str) -> Result<File, DiskError> {
        let path = self.lock_path(hex, kind);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))
    }

    fn meta_path(&self, hex: &str) -> PathBuf {
        self.root.join("meta").join(format!("{hex}.json"))
    }

    fn read_meta(&self, hex: &str) -> Option<Meta> {
        let text = std::fs::read(self.meta_path(hex)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Records `(size, mtime)` as verified and now as the last use; atomically.
    fn write_meta(&self, hex: &str, (size, mtime_ns): (u64, u64)) -> Result<(), DiskError> {
        let meta = Meta {
            size,
            mtime_ns,
            last_used_ms: now_ms(),
        };
        let path = self.meta_path(hex);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let text = serde_json::to_vec(&meta).expect("a Meta is always JSON");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }
}

/// The two locks [`DiskCache::check`] ran under.
struct Held {
    download: Option<File>,
    using: File,
}

impl Held {
    /// Drops the download lock (closing the file releases it); keeps the use lock.
    fn release(mut self) -> File {
        self.download.take();
        self.using
    }
}

/// What [`DiskCache::check`] found.
enum State {
    /// The blob is complete and intact.
    Ready,
    /// Download from `offset`, `hasher` holding the hash of the bytes before it.
    Fetch { offset: u64, hasher: Box<Sha256> },
}

/// A file's name must be one plain component.
fn check_name(name: &str) -> Result<(), DiskError> {
    let plain = !name.is_empty()
        && !name.contains(['/', '\\', '\0'])
        && name != "."
        && name != ".."
        && Path::new(name).components().count() == 1;
    if plain {
        Ok(())
    } else {
        Err(DiskError::BadName(name.to_string()))
    }
}

async fn spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DiskError> + Send + 'static,
) -> Result<T, DiskError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DiskError::Task(e.to_string()))?
}

/// Size and modification time (ns since the epoch) of `path`.
pub(crate) fn stat(path: &Path) -> Result<(u64, u64), DiskError> {
    let m = std::fs::metadata(path).map_err(io(path))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Ok((m.len(), mtime))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Feeds the file at `path` into `hasher`; the hex digest, length and the hasher before
/// finalising (to go on with more bytes).
pub(crate) fn hash_file(
    path: &Path,
    mut hasher: Sha256,
) -> Result<(String, u64, Sha256), DiskError> {
    let mut file = File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let digest = hex::encode(hasher.clone().finalize());
    Ok((digest, len, hasher))
}

/// Flushes a folder's entries (a rename into it) to disk where the OS allows opening one.
fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir; // Windows cannot open a folder as a file; NTFS journals the rename.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hashes_are_checked() {
        assert!(is_sha256(&"a".repeat(64)));
        assert!(!is_sha256(&"A".repeat(64)));
        assert!(!is_sha256("abc"));
        assert!(check_name("dreamshaper.safetensors").is_ok());
        for bad in ["", "..", "a/b", "a\\b", "."] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(model_key("ab"), "models/sha256/ab");
    }
}
