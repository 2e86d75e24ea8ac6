//! Downloading one file into the cache: the storage's bytes streamed from the `.part` file's
//! length on, written and hashed on a blocking thread as they arrive, then flushed, verified
//! and renamed to the blob's name (see the [module header](super)).

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::Ordering;

use sha2::{Digest, Sha256};

use super::{DiskCache, DiskError, io, model_key, spawn_blocking, stat, sync_dir};
use crate::upload::{Storage, UploadError};

impl DiskCache {
    /// Streams the rest of `hex` from `offset` into its `.part` file, then verifies and
    /// renames it. A broken stream leaves the `.part` for the next try to resume.
    pub(super) async fn download(
        &self,
        hex: &str,
        storage: &Storage,
        offset: u64,
        hasher: Box<Sha256>,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(), DiskError> {
        let key = model_key(hex);
        let started = std::time::Instant::now();
        let mut reader = match storage.read_from(&key, offset).await {
            Ok(r) => r,
            Err(UploadError::NotFound(_)) => {
                return Err(DiskError::Missing {
                    hex: hex.to_string(),
                    key,
                });
            }
            Err(e) => return Err(DiskError::Storage(e)),
        };
        let size = reader.size;
        if offset > size {
            // Longer than the object: not a prefix of it. Start again.
            let part = self.partial_path(hex);
            std::fs::remove_file(&part).map_err(io(&part))?;
            return Err(DiskError::Mismatch {
                hex: hex.to_string(),
                got: "a partial file longer than the object".into(),
            });
        }
        let cache = self.clone();
        spawn_blocking(move || Ok(cache.evict_to(cache.budget.saturating_sub(size - offset))))
            .await?;
        // S3 chunks are 8 MiB parts: two queued keep the writer busy without holding more.
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(2);
        // Spawned now (not when awaited): it drains the channel while the bytes stream in.
        let writer = {
            let (cache, hex) = (self.clone(), hex.to_string());
            tokio::task::spawn_blocking(move || cache.write_part(&hex, rx, *hasher, size))
        };
        let mut done = offset;
        progress(done, size);
        let streamed = async {
            while let Some(chunk) = reader.next_chunk().await.map_err(DiskError::Storage)? {
                done += chunk.len() as u64;
                let n = chunk.len() as u64;
                self.counters
                    .downloaded_bytes
                    .fetch_add(n, Ordering::Relaxed);
                if tx.send(Chunk::Data(chunk)).await.is_err() {
                    break; // The writer failed; its error is the one to report.
                }
                progress(done, size);
            }
            Ok::<(), DiskError>(())
        }
        .await;
        if streamed.is_ok() {
            let _ = tx.send(Chunk::End).await;
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| DiskError::Task(e.to_string()))
            .and_then(|w| w);
        let ms = started.elapsed().as_millis() as u64;
        self.counters.download_ms.fetch_add(ms, Ordering::Relaxed);
        streamed?;
        written?;
        self.counters.downloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The blocking half of a download: appends chunks to the `.part` file while hashing,
    /// and on the end marker flushes, verifies and renames it to its blob name.
    fn write_part(
        &self,
        hex: &str,
        mut rx: tokio::sync::mpsc::Receiver<Chunk>,
        mut hasher: Sha256,
        size: u64,
    ) -> Result<(), DiskError> {
        let part = self.partial_path(hex);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(io(&part))?;
        let mut ended = false;
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Chunk::Data(bytes) => {
                    hasher.update(&bytes);
                    file.write_all(&bytes).map_err(io(&part))?;
                }
                Chunk::End => {
                    ended = true;
                    break;
                }
            }
        }
        // Kept for the next try to resume, whole or not.
        file.sync_all().map_err(io(&part))?;
        drop(file);
        if !ended {
            return Ok(());
        }
        let got = hex::encode(hasher.finalize());
        let len = std::fs::metadata(&part).map_err(io(&part))?.len();
        if got != hex || len != size {
            std::fs::remove_file(&part).map_err(io(&part))?;
            tracing::warn!(
                sha256 = hex,
                got,
                "downloaded model does not match its sha256"
            );
            return Err(DiskError::Mismatch {
                hex: hex.to_string(),
                got,
            });
        }
        let blob = self.blob_path(hex);
        std::fs::rename(&part, &blob).map_err(io(&blob))?;
        sync_dir(&self.root.join("blobs"))?;
        self.write_meta(hex, stat(&blob)?)
    }
}

/// What a download's writer receives.
enum Chunk {
    Data(Vec<u8>),
    /// Everything arrived: verify and rename.
    End,
}
