//! File hashes for an image's metadata — A1111's "Model hash" of a checkpoint file, a LoRA's
//! "addnet" hash, a diffusers folder's files — remembered between loads and processes instead
//! of computed on every load (about a second per GB on this project's machines). The engine
//! only asks ([`remembered`]); what remembers is installed once by the binary ([`install`]):
//! the worker's memo keyed by path, size and modification time (`crate::cache::hashes`), as
//! A1111's `cache.json` is. Without one, every load hashes, as before.

use std::path::Path;
use std::sync::OnceLock;

use crate::engine::error::Result;

/// The sha256 of a whole file.
pub const FILE_SHA256: &str = "sha256";
/// A1111's LoRA hash: the sha256 of a safetensors file after its header.
pub const ADDNET: &str = "addnet";

/// Remembers hashes of files by kind ([`FILE_SHA256`], [`ADDNET`]) and path, forgetting one
/// whose file changed since.
pub trait Memo: Send + Sync {
    /// The remembered hash of `kind` of the file at `path`, if the file is as it was.
    fn get(&self, kind: &str, path: &Path) -> Option<String>;
    /// Remembers `hash` as the hash of `kind` of the file at `path` as it is now.
    fn put(&self, kind: &str, path: &Path, hash: &str);
}

static INSTALLED: OnceLock<Box<dyn Memo>> = OnceLock::new();

/// Makes `memo` the one loads use, for the rest of the process; a second install is ignored.
pub fn install(memo: Box<dyn Memo>) {
    let _ = INSTALLED.set(memo);
}

/// The hash of `kind` of the file at `path`: remembered, or `compute`d (from bytes the loader
/// has read anyway) and then remembered.
pub(crate) fn remembered(
    kind: &str,
    path: &Path,
    compute: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let Some(memo) = INSTALLED.get() else {
        return compute();
    };
    if let Some(hash) = memo.get(kind, path) {
        return Ok(hash);
    }
    let hash = compute()?;
    memo.put(kind, path, &hash);
    Ok(hash)
}
