//! Where rendered images go: `s3://bucket/prefix` on any S3-compatible server (aws-sdk-s3,
//! path-style or virtual-hosted, static credentials) or `file://DIR` for a single machine.
//! Keys are `sweeps/{sweep}/{cell}/{attempt}.png` under the prefix, so a zombie attempt can
//! never overwrite the winner. Puts are retried with exponential backoff; a put that keeps
//! failing is an error the agent reports as a transient failure, never a completed cell.
//! Workers also read models from a storage, streamed from an offset ([`fetch`]).

mod fetch;
mod file;
mod multipart;
mod s3;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use kiln_proto::{Attempt, CellId, SweepId};

pub use fetch::ObjectReader;
pub use file::FileStore;
pub use multipart::{MIN_PART_BYTES, Uploaded, part_bytes};
pub use s3::{S3Options, S3Store};

/// What can go wrong storing an image.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The storage URL or options are wrong.
    #[error("storage configuration: {0}")]
    Config(String),
    /// The local filesystem refused.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The S3 server refused or could not be reached.
    #[error("s3 {op} {key}: {message}")]
    S3 {
        /// Operation.
        op: &'static str,
        /// Object key.
        key: String,
        /// The SDK's description.
        message: String,
    },
    /// No object at this key.
    #[error("no object at {0}")]
    NotFound(String),
}

/// A parsed storage URL.
#[derive(Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// `file://DIR` (or a plain path).
    File(std::path::PathBuf),
    /// `s3://bucket/prefix`.
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix without leading or trailing slash (may be empty).
        prefix: String,
    },
}

impl FromStr for StorageUrl {
    type Err = UploadError;
    fn from_str(s: &str) -> Result<Self, UploadError> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(UploadError::Config(format!("{s:?}: s3:// needs a bucket")));
            }
            Ok(StorageUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            })
        } else if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(UploadError::Config(format!(
                    "{s:?}: file:// needs a folder"
                )));
            }
            Ok(StorageUrl::File(path.into()))
        } else if s.contains("://") {
            Err(UploadError::Config(format!(
                "{s:?}: expected s3://BUCKET/PREFIX or file://DIR"
            )))
        } else {
            Ok(StorageUrl::File(s.into()))
        }
    }
}

impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::File(p) => write!(f, "file://{}", p.display()),
            StorageUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StorageUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl fmt::Debug for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The object key of an attempt's image (relative to the storage prefix).
pub fn object_key(sweep: SweepId, cell: CellId, attempt: Attempt) -> String {
    format!("sweeps/{sweep}/{cell}/{attempt}.png")
}

/// Refuses a key that is not `/`-separated plain names: empty, absolute, with `.`, `..` or
/// empty parts, backslashes or control characters.
pub fn check_key(key: &str) -> Result<(), UploadError> {
    let plain = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && !part.chars().any(|c| c == '\\' || c.is_control())
    };
    if key.len() > 1024 || !key.split('/').all(plain) {
        return Err(UploadError::Config(format!(
            "object key {key:?} is not a relative path"
        )));
    }
    Ok(())
}

/// How puts are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Tries in all.
    pub attempts: u32,
    /// Wait before the second try; doubles after each.
    pub first_backoff: Duration,
    /// Longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        }
    }
}

/// A place to put images.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Local folder.
    File(FileStore),
    /// S3-compatible bucket.
    S3(S3Store),
}

impl Storage {
    /// Opens the storage `url` names (S3 options apply to `s3://` only).
    pub async fn open(url: &StorageUrl, s3: &S3Options) -> Result<Storage, UploadError> {
        Ok(match url {
            StorageUrl::File(dir) => Storage::File(FileStore::new(dir.clone())?),
            StorageUrl::S3 { bucket, prefix } => {
                Storage::S3(S3Store::new(bucket.clone(), prefix.clone(), s3)?)
            }
        })
    }

    /// The URL, as recorded in results.
    pub fn url(&self) -> StorageUrl {
        match self {
            Storage::File(f) => StorageUrl::File(f.root().to_path_buf()),
            Storage::S3(s) => s.url(),
        }
    }

    /// Stores `bytes` at `key` once.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), UploadError> {
        match self {
            Storage::File(f) => f.put(key, bytes).await,
            Storage::S3(s) => s.put(key, bytes).await,
        }
    }

    /// Stores `bytes` at `key`, retrying with exponential backoff. Returns the last error if
    /// every try failed.
    pub async fn put_with_retry(
        &self,
        key: &str,
        bytes: Vec<u8>,
        policy: &RetryPolicy,
    ) -> Result<(), UploadError> {
        let mut backoff = policy.first_backoff;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.put(key, bytes.clone()).await {
                Ok(()) => return Ok(()),
                Err(e @ UploadError::Config(_)) => return Err(e),
                Err(e) if tries >= policy.attempts.max(1) => return Err(e),
                Err(e) => {
                    tracing::warn!(key, tries, error = %e, "upload failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(policy.max_backoff);
                }
            }
        }
    }

    /// Reads the object at `key`, which must be a plain relative key (keys come from results,
    /// which workers write: a key that climbs out of the storage's folder or prefix is refused
    /// before anything is read).
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, UploadError> {
        check_key(key)?;
        match self {
            Storage::File(f) => f.get(key).await,
            Storage::S3(s) => s.get(key).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print() {
        assert_eq!(
            "s3://renders/farm/".parse::<StorageUrl>().unwrap(),
            StorageUrl::S3 {
                bucket: "renders".into(),
                prefix: "farm".into()
            }
        );
        assert_eq!(
            "s3://b".parse::<StorageUrl>().unwrap().to_string(),
            "s3://b"
        );
        assert!(matches!(
            "file:///srv/kiln".parse::<StorageUrl>().unwrap(),
            StorageUrl::File(p) if p == std::path::Path::new("/srv/kiln")
        ));
        assert!("ftp://x".parse::<StorageUrl>().is_err());
        assert!("s3://".parse::<StorageUrl>().is_err());
        assert_eq!(
            object_key(SweepId(1), CellId(22), Attempt(3)),
            "sweeps/1/22/3.png"
        );
    }

    #[tokio::test]
    async fn gets_refuse_keys_that_climb_out() {
        let bad = [
            "../escape.png",
            "sweeps/../../x.png",
            "/abs.png",
            "",
            "sweeps//1.png",
            "./a.png",
            "a\\..\\b.png",
            "a\nb",
        ];
        let dir = tempfile::tempdir().unwrap();
        let file = Storage::open(
            &StorageUrl::File(dir.path().join("s")),
            &S3Options::default(),
        )
        .await
        .unwrap();
        // No server listens on port 9: a key that got past the check would fail differently.
        let s3 = Storage::open(
            &"s3://b/p".parse().unwrap(),
            &S3Options {
                endpoint: Some("http://127.0.0.1:9".into()),
                access_key: Some("a".into()),
                secret_key: Some("s".into()),
                path_style: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        for storage in [&file, &s3] {
            for key in bad {
                assert!(
                    matches!(storage.get(key).await, Err(UploadError::Config(_))),
                    "{storage:?} {key:?}"
                );
            }
        }
        assert!(check_key("sweeps/1/22/3.png").is_ok());
        assert!(matches!(
            file.get("sweeps/1/22/3.png").await,
            Err(UploadError::NotFound(_))
        ));
    }
}
