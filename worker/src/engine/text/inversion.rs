//! The embedding database: textual-inversion embeddings found in folders, by name, and where
//! their names occur in a prompt's tokens, as A1111's `EmbeddingDatabase` finds them.
//!
//! Owns:
//! - scanning folders, subfolders too (A1111 walks them): `.safetensors` files are read
//!   ([`crate::engine::load::inversion`]); `.pt` and `.bin` files are pickles and refused;
//!   empty files and anything else (preview images, notes) are skipped, as A1111 skips them.
//!   A refused file is kept under its name, so that a prompt using it fails with the reason
//!   instead of rendering the name as plain words;
//! - names: the file stem. A later folder's file replaces an earlier one of the same name (as
//!   A1111 re-registers a name), except that a usable file always beats a refused one (the
//!   `.pt` next to its `.safetensors` conversion);
//! - the lookup of `find_embedding_at_position`: each name tokenized as a prompt part is
//!   (no BOS/EOS, no truncation), candidates filed under their first token, longest first, and
//!   a match needs every token of the name in a row. `kiln-glow` is `kiln</w> -</w> glow</w>`,
//!   so `kilnglow` (`kil n glow</w>`) is not it;
//! - the database's identity ([`InversionDb::fingerprint`], from every name and file hash) for
//!   caches, and whether its folders changed since it was read ([`InversionDb::changed`]: the
//!   size and modification time of each file, cheap enough to ask before every job).
//!
//! It reads files, so callers build it off async threads (the worker's render thread, the CLI).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::engine::error::{EngineError, Result};
use crate::engine::load::inversion::Inversion;
use crate::engine::text::tokenizer::ClipTokenizer;

/// The most embedding files one database looks at (a folder tree larger than this is not an
/// embeddings folder).
pub const MAX_FILES: usize = 10_000;
/// How deep subfolders are searched.
pub const MAX_DEPTH: usize = 8;

/// An embedding file as the database holds it.
#[derive(Clone, Debug)]
enum Entry {
    Ready(Arc<Inversion>),
    Refused(Arc<EngineError>),
}

/// What the scan saw of one file: path, length, modification time.
type Seen = (PathBuf, u64, Option<SystemTime>);

/// Textual-inversion embeddings by name, and their names' tokens.
#[derive(Default)]
pub struct InversionDb {
    dirs: Vec<PathBuf>,
    entries: BTreeMap<String, Entry>,
    /// First token id → (the name's ids, the name), longest first.
    lookup: HashMap<u32, Vec<(Vec<u32>, String)>>,
    fingerprint: String,
    seen: Vec<Seen>,
}

impl std::fmt::Debug for InversionDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InversionDb")
            .field("dirs", &self.dirs)
            .field("names", &self.entries.keys().collect::<Vec<_>>())
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl InversionDb {
    /// A database of no embeddings: every prompt is plain words.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads every embedding file under `dirs`, in order (a later folder wins a name). A
    /// folder that does not exist holds nothing; it is looked at again by [`Self::changed`].
    pub fn load(dirs: &[PathBuf]) -> Result<Self> {
        let seen = scan(dirs);
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for (path, _, _) in &seen {
            let entry = match Inversion::read(path) {
                Ok(inversion) => Entry::Ready(Arc::new(inversion)),
                Err(e) => Entry::Refused(Arc::new(e)),
            };
            let name = stem(path);
            let keep_old = matches!(
                (entries.get(&name), &entry),
                (Some(Entry::Ready(_)), Entry::Refused(_))
            );
            if !keep_old {
                entries.insert(name, entry);
            }
        }
        Self::index(dirs.to_vec(), entries, seen)
    }

    /// This database with the embedding files `files` over it, each named after its file's
    /// stem and winning that name: the embeddings a cell pins by content. Its folders (and so
    /// [`Self::changed`]) stay this database's.
    pub fn with_files(&self, files: &[PathBuf]) -> Result<Self> {
        let mut entries = self.entries.clone();
        for path in files {
            let entry = match Inversion::read(path) {
                Ok(inversion) => Entry::Ready(Arc::new(inversion)),
                Err(e) => Entry::Refused(Arc::new(e)),
            };
            entries.insert(stem(path), entry);
        }
        Self::index(self.dirs.clone(), entries, self.seen.clone())
    }

    /// Indexes `entries` by their names' tokens.
    fn index(
        dirs: Vec<PathBuf>,
        entries: BTreeMap<String, Entry>,
        seen: Vec<Seen>,
    ) -> Result<Self> {
        let tokenizer = ClipTokenizer::shared()?;
        let mut lookup: HashMap<u32, Vec<(Vec<u32>, String)>> = HashMap::new();
        for name in entries.keys() {
            let ids = tokenizer.tokenize(name);
            if let Some(&first) = ids.first() {
                lookup.entry(first).or_default().push((ids, name.clone()));
            }
        }
        for candidates in lookup.values_mut() {
            // Stable: names of equal length stay in name order.
            candidates.sort_by_key(|(ids, _)| std::cmp::Reverse(ids.len()));
        }
        Ok(Self {
            dirs,
            fingerprint: fingerprint(&entries),
            entries,
            lookup,
            seen,
        })
    }

    /// The folders it was read from.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Whether any embedding file under its folders was added, removed or rewritten since it
    /// was read (by size and modification time; no file is opened).
    pub fn changed(&self) -> bool {
        scan(&self.dirs) != self.seen
    }

    /// Equal for two databases exactly when they hold the same names with the same files (and
    /// the same refusals): part of every prompt-embedding cache key.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The usable embeddings, by name.
    pub fn inversions(&self) -> impl Iterator<Item = &Arc<Inversion>> {
        self.entries.values().filter_map(|e| match e {
            Entry::Ready(i) => Some(i),
            Entry::Refused(_) => None,
        })
    }

    /// The names whose files were refused, and why.
    pub fn refused(&self) -> impl Iterator<Item = (&str, &EngineError)> {
        self.entries.iter().filter_map(|(name, e)| match e {
            Entry::Refused(error) => Some((name.as_str(), error.as_ref())),
            Entry::Ready(_) => None,
        })
    }

    /// The usable embedding named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Inversion>> {
        match self.entries.get(name)? {
            Entry::Ready(i) => Some(i),
            Entry::Refused(_) => None,
        }
    }

    /// The embedding whose name's tokens start at `tokens[at]` (the longest such name) and how
    /// many tokens the name takes; an error when that name's file was refused.
    pub(crate) fn find(
        &self,
        tokens: &[u32],
        at: usize,
    ) -> Result<Option<(Arc<Inversion>, usize)>> {
        let Some(candidates) = tokens.get(at).and_then(|t| self.lookup.get(t)) else {
            return Ok(None);
        };
        for (ids, name) in candidates {
            if tokens[at..].starts_with(ids) {
                return match &self.entries[name] {
                    Entry::Ready(i) => Ok(Some((i.clone(), ids.len()))),
                    Entry::Refused(error) => Err(EngineError::InversionRefused {
                        name: name.clone(),
                        error: error.clone(),
                    }),
                };
            }
        }
        Ok(None)
    }
}

/// A short digest of every name and what it holds; "" for no entries (as [`InversionDb::empty`]).
fn fingerprint(entries: &BTreeMap<String, Entry>) -> String {
    if entries.is_empty() {
        return String::new();
    }
    let mut digest = Sha256::new();
    for (name, entry) in entries {
        let what = match entry {
            Entry::Ready(i) => i.hash().to_owned(),
            Entry::Refused(e) => format!("refused: {e}"),
        };
        digest.update(format!("{name}\0{what}\n").as_bytes());
    }
    hex::encode(&digest.finalize()[..8])
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `path` is a file A1111 would load as an embedding (images aside).
fn is_candidate(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["safetensors", "pt", "bin"].contains(&e.to_ascii_lowercase().as_str()))
}

/// Every non-empty candidate file under `dirs` (folders in order, each walked in name order),
/// at most [`MAX_FILES`].
fn scan(dirs: &[PathBuf]) -> Vec<Seen> {
    let mut seen = Vec::new();
    for dir in dirs {
        walk(dir, 0, &mut seen);
    }
    seen
}

fn walk(dir: &Path, depth: usize, seen: &mut Vec<Seen>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if seen.len() >= MAX_FILES {
            return;
        }
        // Follows links, as A1111's walk does; MAX_DEPTH ends a loop of them.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk(&path, depth + 1, seen);
            }
        } else if meta.is_file() && meta.len() > 0 && is_candidate(&path) {
            seen.push((path, meta.len(), meta.modified().ok()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn write(path: &Path, vectors: usize, fill: f32) {
        let t = Tensor::from_vec(vec![fill; vectors * 4], (vectors, 4), &Device::Cpu).unwrap();
        let map = std::collections::HashMap::from([("emb_params".to_owned(), t)]);
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn names_are_matched_by_their_whole_token_sequence_longest_first() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("kiln-glow.safetensors"), 3, 1.0);
        write(&dir.path().join("kiln.safetensors"), 1, 2.0);
        let db = InversionDb::load(&[dir.path().to_owned()]).unwrap();
        let tok = ClipTokenizer::shared().unwrap();
        let name_at = |text: &str, at: usize| {
            db.find(&tok.tokenize(text), at)
                .unwrap()
                .map(|(i, n)| (i.name().to_owned(), n))
        };
        assert_eq!(name_at("kiln-glow", 0), Some(("kiln-glow".into(), 3)));
        assert_eq!(name_at("KILN-glowing", 0), Some(("kiln".into(), 1)));
        assert_eq!(name_at("kilnglow", 0), None);
        assert_eq!(name_at("a kiln", 1), Some(("kiln".into(), 1)));
        assert_eq!(name_at("a kiln", 0), None);
    }

    #[test]
    fn later_folders_win_a_name_but_never_with_a_refused_file() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(&a.path().join("x.safetensors"), 1, 1.0);
        write(&b.path().join("x.safetensors"), 2, 1.0);
        write(&a.path().join("y.safetensors"), 1, 1.0);
        std::fs::write(b.path().join("y.pt"), b"PK\x03\x04").unwrap();
        std::fs::write(b.path().join("z.bin"), b"\x80\x02").unwrap();
        std::fs::write(b.path().join("empty.safetensors"), b"").unwrap();
        std::fs::write(b.path().join("x.preview.png"), b"png").unwrap();
        let db = InversionDb::load(&[a.path().to_owned(), b.path().to_owned()]).unwrap();
        assert_eq!(db.get("x").unwrap().vectors(), 2);
        assert_eq!(db.get("y").unwrap().vectors(), 1);
        let refused: Vec<&str> = db.refused().map(|(n, _)| n).collect();
        assert_eq!(refused, ["z"]);
        let names: Vec<&str> = db.inversions().map(|i| i.name()).collect();
        assert_eq!(names, ["x", "y"]);
        let tok = ClipTokenizer::shared().unwrap();
        let e = db.find(&tok.tokenize("z"), 0).unwrap_err();
        assert!(e.to_string().contains("z.bin"), "{e}");
    }

    #[test]
    fn a_changed_folder_is_noticed_and_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("nested/deeper");
        std::fs::create_dir_all(&sub).unwrap();
        write(&sub.join("e.safetensors"), 1, 1.0);
        let dirs = [dir.path().to_owned(), dir.path().join("absent")];
        let db = InversionDb::load(&dirs).unwrap();
        assert!(db.get("e").is_some());
        assert!(!db.changed());
        assert_eq!(
            db.fingerprint(),
            InversionDb::load(&dirs).unwrap().fingerprint()
        );
        write(&sub.join("f.safetensors"), 1, 1.0);
        assert!(db.changed());
        let again = InversionDb::load(&dirs).unwrap();
        assert_ne!(db.fingerprint(), again.fingerprint());
        assert_ne!(InversionDb::empty().fingerprint(), again.fingerprint());
    }
}
