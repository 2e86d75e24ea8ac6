//! The Hugging Face hub cache on disk, as `huggingface_hub` lays it out, so files a user
//! already downloaded with it are reused and the other way round:
//!
//! ```text
//! $HF_HUB_CACHE/models--OWNER--REPO/
//!   blobs/<etag>                      the bytes, named by the hub's ETag (sha256 for LFS)
//!   blobs/<etag>.incomplete           a download in progress (resumed from its length)
//!   snapshots/<commit>/<file>         a link to ../../blobs/<etag> (a copy where links fail)
//!   refs/<revision>                   the commit a branch or tag pointed at when last fetched
//! ```
//!
//! Every name joined here was checked by [`super::reference`], so nothing lands outside the
//! repo's folder.

use std::io;
use std::path::{Path, PathBuf};

/// One repo's folder in a hub cache.
#[derive(Clone, Debug)]
pub struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    /// `hub_cache/models--OWNER--REPO` (`folder` from [`super::HubRef::cache_folder`]).
    pub fn new(hub_cache: &Path, folder: &str) -> Self {
        Self {
            root: hub_cache.join(folder),
        }
    }

    /// The commit `revision` names: itself when it is a commit hash, else `refs/<revision>`.
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_owned());
        }
        let commit = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let commit = commit.trim();
        is_commit(commit).then(|| commit.to_owned())
    }

    /// Records that `revision` points at `commit`.
    pub fn write_ref(&self, revision: &str, commit: &str) -> io::Result<()> {
        if revision == commit {
            return Ok(());
        }
        let refs = self.root.join("refs");
        std::fs::create_dir_all(&refs)?;
        std::fs::write(refs.join(revision), commit)
    }

    /// `snapshots/<commit>`.
    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// `snapshot/<file>` with `file`'s `/` as this OS separates paths.
    pub fn snapshot_file(&self, commit: &str, file: &str) -> PathBuf {
        file.split('/')
            .fold(self.snapshot(commit), |path, part| path.join(part))
    }

    /// `blobs/<etag>`.
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// The files of a snapshot (two folder levels, as a diffusers repo has), relative and
    /// `/`-separated; empty when there is no such snapshot.
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        let mut out = Vec::new();
        let top = self.snapshot(commit);
        let Ok(entries) = std::fs::read_dir(&top) else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if path.is_file() {
                out.push(name);
            } else if path.is_dir()
                && let Ok(inner) = std::fs::read_dir(&path)
            {
                for e in inner.flatten() {
                    if e.path().is_file() {
                        out.push(format!("{name}/{}", e.file_name().to_string_lossy()));
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Makes `snapshots/<commit>/<file>` show `blobs/<etag>`: a relative link where the OS
    /// allows one, else a hard link or a copy.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> io::Result<PathBuf> {
        let dest = self.snapshot_file(commit, file);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&dest);
        let blob = self.blob(etag);
        link_file(&blob, &dest, file.matches('/').count() + 2, etag)?;
        Ok(dest)
    }
}

/// A 40-hex-digit git commit hash.
fn is_commit(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(unix)]
fn link_file(_blob: &Path, dest: &Path, up: usize, etag: &str) -> io::Result<()> {
    // `../../blobs/<etag>` from `snapshots/<commit>/`, one more `..` per folder of the file.
    let mut target = PathBuf::new();
    for _ in 0..up {
        target.push("..");
    }
    target.push("blobs");
    target.push(etag);
    std::os::unix::fs::symlink(target, dest)
}

#[cfg(not(unix))]
fn link_file(blob: &Path, dest: &Path, _up: usize, _etag: &str) -> io::Result<()> {
    // Windows needs a privilege for symbolic links; huggingface_hub copies there too.
    std::fs::hard_link(blob, dest).or_else(|_| std::fs::copy(blob, dest).map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_link_blobs_and_refs_name_commits() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(dir.path(), "models--o--r");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(repo.commit_of("main"), None);
        repo.write_ref("main", commit).unwrap();
        assert_eq!(repo.commit_of("main").as_deref(), Some(commit));
        assert_eq!(repo.commit_of(commit).as_deref(), Some(commit));
        std::fs::create_dir_all(repo.blob("e").parent().unwrap()).unwrap();
        std::fs::write(repo.blob("e"), b"weights").unwrap();
        let linked = repo.link(commit, "unet/w.safetensors", "e").unwrap();
        assert_eq!(std::fs::read(&linked).unwrap(), b"weights");
        repo.link(commit, "model_index.json", "e").unwrap();
        assert_eq!(
            repo.snapshot_files(commit),
            vec![
                "model_index.json".to_string(),
                "unet/w.safetensors".to_string()
            ]
        );
        assert!(repo.snapshot_files("nope").is_empty());
    }
}
