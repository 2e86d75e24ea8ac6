//! One path per fetched image, never two alike: when a name pattern gives two cells the same
//! file name, the later one (in query order, by cell id) gets `-2`, `-3`, … before `.png`.
//!
//! Names are compared as the strictest common file systems compare them, so a folder fetched
//! on Linux still copies whole to Windows (NTFS: case-insensitive) or macOS (APFS: case- and
//! normalisation-insensitive): `Fox.png`, `fox.png` and `fox.png` spelt with a decomposed
//! accent are one name. A folder a file already took (or the reverse) is suffixed the same way.
//! Paths are built with `std::path`; names come in already portable (`name`).

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use unicode_normalization::UnicodeNormalization;

/// The paths handed out so far, as compared on disk.
#[derive(Debug, Default)]
pub struct Names {
    files: HashSet<String>,
    folders: HashSet<String>,
}

/// `path` as a case- and normalisation-insensitive file system compares it.
fn key(path: &[String]) -> String {
    path.join("/").nfc().collect::<String>().to_lowercase()
}

/// `name` with `-n` before its extension (files) or at its end (folders).
fn suffixed(name: &str, n: u32, is_file: bool) -> String {
    match name.rsplit_once('.').filter(|_| is_file) {
        Some((stem, ext)) => format!("{stem}-{n}.{ext}"),
        None => format!("{name}-{n}"),
    }
}

impl Names {
    /// Places `parts` (folders, then the file name): the relative path to write, and whether
    /// a name was changed to keep it apart from an earlier one.
    pub fn place(&mut self, parts: &[String]) -> anyhow::Result<(PathBuf, bool)> {
        let Some((file, folders)) = parts.split_last() else {
            anyhow::bail!("a name pattern gave no file name");
        };
        let mut path: Vec<String> = Vec::with_capacity(parts.len());
        let mut renamed = false;
        for folder in folders {
            // A folder only collides with a file: sharing a folder is the point of folders.
            let mut name = folder.clone();
            let mut n = 1;
            while self
                .files
                .contains(&key(&[path.as_slice(), &[name.clone()]].concat()))
            {
                n += 1;
                name = suffixed(folder, n, false);
                renamed = true;
            }
            path.push(name);
            self.folders.insert(key(&path));
        }
        let mut name = file.clone();
        let mut n = 1;
        loop {
            let k = key(&[path.as_slice(), &[name.clone()]].concat());
            if !self.files.contains(&k) && !self.folders.contains(&k) {
                self.files.insert(k);
                break;
            }
            n += 1;
            name = suffixed(file, n, true);
            renamed = true;
        }
        path.push(name);
        let rel: PathBuf = path.iter().collect();
        // Belt and braces over `name`'s rules: each part is one plain name, so the path
        // cannot climb out of the output folder or be absolute on any system.
        anyhow::ensure!(
            path.iter().all(|p| {
                let mut c = Path::new(p).components();
                matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
            }),
            "refusing the file name {}: not a plain relative path",
            rel.display()
        );
        Ok((rel, renamed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(names: &mut Names, path: &str) -> (String, bool) {
        let parts: Vec<String> = path.split('/').map(String::from).collect();
        let (p, renamed) = names.place(&parts).unwrap();
        let shown: Vec<String> = p
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        (shown.join("/"), renamed)
    }

    #[test]
    fn equal_names_get_numbered_suffixes_in_order() {
        let mut n = Names::default();
        assert_eq!(place(&mut n, "fox.png"), ("fox.png".into(), false));
        assert_eq!(place(&mut n, "fox.png"), ("fox-2.png".into(), true));
        assert_eq!(place(&mut n, "fox.png"), ("fox-3.png".into(), true));
        // A name that is itself a suffixed one is kept apart too.
        assert_eq!(place(&mut n, "fox-2.png"), ("fox-2-2.png".into(), true));
        assert_eq!(place(&mut n, "cat.png"), ("cat.png".into(), false));
    }

    #[test]
    fn names_differing_in_case_or_normal_form_collide() {
        let mut n = Names::default();
        assert_eq!(place(&mut n, "Fox.png").0, "Fox.png");
        assert_eq!(place(&mut n, "fox.PNG").0, "fox-2.PNG");
        assert_eq!(place(&mut n, "caf\u{e9}.png").0, "caf\u{e9}.png");
        assert_eq!(place(&mut n, "cafe\u{301}.png").0, "cafe\u{301}-2.png");
    }

    #[test]
    fn folders_are_shared_but_never_clash_with_files() {
        let mut n = Names::default();
        assert_eq!(place(&mut n, "foxes/1.png").0, "foxes/1.png");
        assert_eq!(place(&mut n, "foxes/2.png").0, "foxes/2.png");
        assert_eq!(place(&mut n, "Foxes/1.png").0, "Foxes/1-2.png");
        // A file named like a folder, then a folder named like a file.
        assert_eq!(place(&mut n, "foxes"), ("foxes-2".into(), true));
        assert_eq!(place(&mut n, "x.png"), ("x.png".into(), false));
        assert_eq!(place(&mut n, "x.png/1.png"), ("x.png-2/1.png".into(), true));
        assert_eq!(place(&mut n, "x.png/2.png").0, "x.png-2/2.png");
    }

    #[test]
    fn parts_that_are_not_plain_names_are_refused() {
        for bad in ["..", ".", "", "/abs"] {
            let parts = vec![bad.to_string(), "1.png".to_string()];
            assert!(Names::default().place(&parts).is_err(), "{bad:?}");
        }
        assert!(Names::default().place(&[]).is_err());
    }
}
