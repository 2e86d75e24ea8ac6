//! Model references to files on this PC. A cell names its model and LoRAs by file name (found
//! in the worker's `--models` folders), or by a relative path inside one of them
//! (`sd15/dreamshaper`); each worker maps them to its own files, so PCs need not share paths.
//!
//! A cell comes from the network, so a reference may only reach inside the `--models` folders:
//! absolute paths, drive prefixes and `..` are refused before the file system is touched, and
//! the refusal says nothing about what exists outside them. A worker whose owner trusts every
//! submitter (`kiln run`, or `kiln worker --allow-any-path`) also takes paths as they are. A
//! reference that resolves to nothing is bad input naming what was searched.

use std::path::{Component, Path, PathBuf};

/// Which references a worker accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathPolicy {
    /// Names and relative paths inside the `--models` folders only.
    #[default]
    ModelsOnly,
    /// Also absolute paths and `..`, taken as they are (the worker's owner submits every cell).
    AnyPath,
}

/// [`resolve`] as a lease is planned: the same answers, except that an `hf:` or `https://`
/// reference not fetched yet gets a placeholder path instead of being fetched here (the agent
/// fetches it just before the render, [`super::pinned`]), so planning never waits on the
/// network.
pub fn plan(
    reference: &str,
    dirs: &[PathBuf],
    what: &str,
    policy: PathPolicy,
) -> Result<PathBuf, String> {
    if crate::hub::is_reference(reference) {
        return crate::hub::planned(reference, what, policy == PathPolicy::AnyPath);
    }
    resolve(reference, dirs, what, policy)
}

/// Finds `reference` as a name (with or without `.safetensors`) or a relative path in `dirs`,
/// or, under [`PathPolicy::AnyPath`], as a path of its own.
pub fn resolve(
    reference: &str,
    dirs: &[PathBuf],
    what: &str,
    policy: PathPolicy,
) -> Result<PathBuf, String> {
    // `hf:OWNER/REPO…` and `https://…`: fetched (or found offline) by the hub module.
    if crate::hub::is_reference(reference) {
        return crate::hub::resolve(reference, what, policy == PathPolicy::AnyPath);
    }
    if reference.is_empty() || reference.contains('\0') {
        return Err(format!("{what} name {reference:?} is empty or not text"));
    }
    let as_path = Path::new(reference);
    // `\` separates on Windows only; a name holding one is refused everywhere, so a sweep
    // means the same on every worker.
    let inside = !reference.contains('\\')
        && as_path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        if policy == PathPolicy::AnyPath {
            if as_path.exists() {
                return Ok(as_path.to_path_buf());
            }
            return Err(format!("{what} not found: {reference}"));
        }
        return Err(format!(
            "{what} {reference:?} refused: a cell may only name files inside this worker's \
             --models folders (a name or a relative path, no absolute path or `..`)"
        ));
    }
    let names = [reference.to_string(), format!("{reference}.safetensors")];
    for dir in dirs {
        for name in &names {
            let candidate = dir.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    // A bare name is also looked for in subfolders, as A1111 finds `<lora:name>` anywhere
    // under its Lora folder by file stem.
    if as_path.components().count() == 1
        && let Some(found) = dirs.iter().find_map(|d| find_by_stem(d, reference))
    {
        return Ok(found);
    }
    if policy == PathPolicy::AnyPath && as_path.exists() {
        // `kiln run`: a path relative to where it was started.
        return Ok(as_path.to_path_buf());
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(format!(
        "{what} not found: {reference:?} (searched --models folders: {})",
        if searched.is_empty() {
            "none given".to_string()
        } else {
            searched.join(", ")
        }
    ))
}

/// How deep below a `--models` folder [`find_by_stem`] looks, and how many entries it reads at
/// most: a folder of models is small, and a huge tree must not stall a render.
const STEM_SEARCH_DEPTH: usize = 4;
const STEM_SEARCH_ENTRIES: usize = 20_000;

/// The first `<stem>.safetensors` (or folder `<stem>`) below `dir`, breadth first, in name
/// order, never entering a linked folder (no loops, no wandering out of the tree).
fn find_by_stem(dir: &Path, stem: &str) -> Option<PathBuf> {
    let file = format!("{stem}.safetensors");
    let mut level = vec![dir.to_path_buf()];
    let mut read = 0usize;
    for _ in 0..STEM_SEARCH_DEPTH {
        let mut next = Vec::new();
        for folder in level {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
            read += entries.len();
            if read > STEM_SEARCH_ENTRIES {
                return None;
            }
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let name = entry.file_name();
                // A linked file counts (owners link models in); a linked folder is not entered.
                let is_file = kind.is_file() || (kind.is_symlink() && entry.path().is_file());
                if (is_file && name == file.as_str()) || (kind.is_dir() && name == stem) {
                    return Some(entry.path());
                }
                if kind.is_dir() {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_relative_paths_and_misses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lcm.safetensors"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("sd15/dreamshaper")).unwrap();
        let dirs = vec![dir.path().to_path_buf()];
        let only = PathPolicy::ModelsOnly;
        assert_eq!(
            resolve("lcm", &dirs, "LoRA", only).unwrap(),
            dir.path().join("lcm.safetensors")
        );
        assert_eq!(
            resolve("sd15/dreamshaper", &dirs, "model", only).unwrap(),
            dir.path().join("sd15/dreamshaper")
        );
        // A bare name is found in a subfolder by its stem, as A1111 finds LoRAs.
        std::fs::create_dir_all(dir.path().join("styles/old")).unwrap();
        std::fs::write(dir.path().join("styles/old/detail.safetensors"), b"x").unwrap();
        assert_eq!(
            resolve("detail", &dirs, "LoRA", only).unwrap(),
            dir.path().join("styles/old/detail.safetensors")
        );
        let e = resolve("nope", &dirs, "model", only).unwrap_err();
        assert!(e.contains("model not found") && e.contains("nope"), "{e}");
    }

    #[test]
    fn paths_out_of_the_models_folders_are_refused_without_looking() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir(&models).unwrap();
        let dirs = vec![models];
        let full = dir.path().join("secret");
        // The same answer whether the file exists or not: nothing is revealed.
        for reference in [
            full.to_str().unwrap(),
            "/no/such/file",
            "../secret",
            "../no-such-file",
            "a/../../secret",
            "..\\secret",
            "C:\\Windows\\win.ini",
        ] {
            let e = resolve(reference, &dirs, "LoRA", PathPolicy::ModelsOnly).unwrap_err();
            assert!(e.contains("refused"), "{reference}: {e}");
            assert!(!e.contains("not found"), "{reference}: {e}");
        }
        for reference in ["", "a\0b"] {
            assert!(resolve(reference, &dirs, "model", PathPolicy::ModelsOnly).is_err());
        }
        // The owner's own `kiln run` takes paths as they are.
        assert_eq!(
            resolve(full.to_str().unwrap(), &dirs, "LoRA", PathPolicy::AnyPath).unwrap(),
            full
        );
    }
}
