//! `file://DIR` storage: each object is a file under DIR at its key's path, written to a
//! temporary name, flushed to disk, then renamed, so a reader never sees half an image and a
//! crash leaves no partial object at the key.

use std::path::{Component, Path, PathBuf};

use super::UploadError;

/// A local folder of objects.
#[derive(Clone, Debug)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Uses (and creates) `root`.
    pub fn new(root: PathBuf) -> Result<Self, UploadError> {
        std::fs::create_dir_all(&root).map_err(|source| UploadError::Io {
            path: root.display().to_string(),
            source,
        })?;
        Ok(Self { root })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of `key`; keys are `/`-separated and may not climb out of the root.
    pub(super) fn path(&self, key: &str) -> Result<PathBuf, UploadError> {
        let rel = Path::new(key);
        if key.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(UploadError::Config(format!(
                "object key {key:?} is not a relative path"
            )));
        }
        Ok(key
            .split('/')
            .fold(self.root.clone(), |p, part| p.join(part)))
    }

    pub(super) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), UploadError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| UploadError::Config(format!("upload task: {e}")))?
    }

    pub(super) async fn get(&self, key: &str) -> Result<Vec<u8>, UploadError> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(UploadError::NotFound(key.to_string()))
            }
            Err(source) => Err(UploadError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), UploadError> {
    use std::io::Write;
    let io = |source| UploadError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_and_refuse_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path().join("out")).unwrap();
        s.put("sweeps/1/2/1.png", b"png".to_vec()).await.unwrap();
        assert_eq!(s.get("sweeps/1/2/1.png").await.unwrap(), b"png");
        assert!(
            dir.path()
                .join("out")
                .join("sweeps")
                .join("1")
                .join("2")
                .join("1.png")
                .exists()
        );
        assert!(matches!(
            s.get("sweeps/9.png").await,
            Err(UploadError::NotFound(_))
        ));
        assert!(s.put("../escape.png", vec![]).await.is_err());
        assert!(s.put("/abs.png", vec![]).await.is_err());
    }
}
