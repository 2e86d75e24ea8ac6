//! Model references to files on this PC. A cell names its model and LoRAs by file name (found
//! in the worker's `--models` folders) or by path; each worker maps them to its own files, so
//! PCs need not share paths. A reference that resolves to nothing is bad input naming what was
//! searched.

use std::path::{Path, PathBuf};

/// Finds `reference` as a path, or as a name (with or without `.safetensors`) in `dirs`.
pub fn resolve(reference: &str, dirs: &[PathBuf], what: &str) -> Result<PathBuf, String> {
    let as_path = Path::new(reference);
    if as_path.is_absolute() || reference.contains(['/', '\\']) {
        if as_path.exists() {
            return Ok(as_path.to_path_buf());
        }
        return Err(format!("{what} not found: {reference}"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_misses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lcm.safetensors"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("dreamshaper")).unwrap();
        let dirs = vec![dir.path().to_path_buf()];
        assert_eq!(
            resolve("lcm", &dirs, "LoRA").unwrap(),
            dir.path().join("lcm.safetensors")
        );
        assert_eq!(
            resolve("dreamshaper", &dirs, "model").unwrap(),
            dir.path().join("dreamshaper")
        );
        let full = dir.path().join("lcm.safetensors");
        assert_eq!(resolve(full.to_str().unwrap(), &[], "LoRA").unwrap(), full);
        let e = resolve("nope", &dirs, "model").unwrap_err();
        assert!(e.contains("model not found") && e.contains("nope"), "{e}");
    }
}
