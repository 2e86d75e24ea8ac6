//! The storages a coordinator reads result images from, for its web UI: an
//! [`ImageSource`] over the same [`Storage`] drivers workers write with.
//!
//! A result names its storage by the URL its worker printed (`storage.url().to_string()`,
//! e.g. `s3://renders/kiln` or `file:///srv/kiln`); an image resolves when one of the storages
//! given here prints the same, or parses to the same URL (`s3://renders/kiln/`). Object keys
//! come from workers: [`Storage::get`] refuses any that is not a plain relative key.

use std::future::Future;
use std::pin::Pin;

use anyhow::Context;
use kiln_coordinator::web::{ImageError, ImageSource};
use kiln_worker::upload::{S3Options, Storage, StorageUrl, UploadError};

/// Storages opened to read images from.
#[derive(Debug)]
pub struct StorageImages {
    /// Each storage with the URL results name it by.
    storages: Vec<(String, StorageUrl, Storage)>,
}

impl StorageImages {
    /// Opens every storage in `urls` (S3 options apply to `s3://` ones).
    pub async fn open(urls: &[StorageUrl], s3: &S3Options) -> anyhow::Result<StorageImages> {
        let mut storages = Vec::with_capacity(urls.len());
        for url in urls {
            let storage = Storage::open(url, s3)
                .await
                .with_context(|| format!("opening storage {url} to read images from"))?;
            let url = storage.url();
            storages.push((url.to_string(), url, storage));
        }
        Ok(StorageImages { storages })
    }

    /// The storage a result's `storage` names, if it is one of these.
    fn find(&self, storage: &str) -> Option<&Storage> {
        let exact = self
            .storages
            .iter()
            .find(|(printed, _, _)| printed == storage);
        exact
            .or_else(|| {
                let url: StorageUrl = storage.parse().ok()?;
                self.storages.iter().find(|(_, u, _)| *u == url)
            })
            .map(|(_, _, s)| s)
    }
}

impl ImageSource for StorageImages {
    fn get<'a>(
        &'a self,
        storage: &'a str,
        key: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Vec<u8>>, ImageError>> + Send + 'a>> {
        Box::pin(async move {
            let Some(s) = self.find(storage) else {
                return Ok(None);
            };
            match s.get(key).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(UploadError::NotFound(_)) => Ok(None),
                Err(_) if kiln_worker::upload::check_key(key).is_err() => {
                    Err(ImageError::BadKey(key.to_string()))
                }
                Err(e) => Err(ImageError::Read {
                    storage: s.url().to_string(),
                    key: key.to_string(),
                    message: e.to_string(),
                }),
            }
        })
    }

    fn reads(&self, storage: &str) -> bool {
        self.find(storage).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn images_resolve_by_the_url_workers_record() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let url = StorageUrl::File(out.clone());
        // What a worker does: open its storage, put the PNG, record `storage.url()`.
        let worker = Storage::open(&url, &S3Options::default()).await.unwrap();
        worker
            .put("sweeps/1/2/1.png", b"png".to_vec())
            .await
            .unwrap();
        let recorded = worker.url().to_string();

        let other = StorageUrl::File(dir.path().join("other"));
        let images = StorageImages::open(&[other, url], &S3Options::default())
            .await
            .unwrap();
        let get = |storage: String, key: &'static str| {
            let images = &images;
            async move { images.get(&storage, key).await }
        };
        assert_eq!(
            get(recorded.clone(), "sweeps/1/2/1.png").await.unwrap(),
            Some(b"png".to_vec())
        );
        // The same folder written with a trailing slash is the same storage.
        let slashed = format!("{recorded}/");
        assert!(images.reads(&slashed));
        assert_eq!(
            get(slashed, "sweeps/1/2/1.png").await.unwrap(),
            Some(b"png".to_vec())
        );
        assert_eq!(
            get(recorded.clone(), "sweeps/1/2/9.png").await.unwrap(),
            None
        );
        let elsewhere = format!("file://{}", dir.path().join("nowhere").display());
        assert!(!images.reads(&elsewhere));
        assert_eq!(get(elsewhere, "sweeps/1/2/1.png").await.unwrap(), None);
        assert!(!images.reads("s3://renders/kiln"));
        // A hostile key never leaves the storage's folder.
        std::fs::write(dir.path().join("secret.png"), b"secret").unwrap();
        for key in ["../secret.png", "/etc/passwd", "sweeps/../../secret.png"] {
            assert!(
                matches!(get(recorded.clone(), key).await, Err(ImageError::BadKey(_))),
                "{key}"
            );
        }
    }

    #[tokio::test]
    async fn a_storage_that_cannot_open_is_an_error() {
        let err = StorageImages::open(&["s3://b/p".parse().unwrap()], &S3Options::default())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("s3://b/p"), "{err:#}");
    }
}
