//! Where the web UI reads result images from: the [`ImageSource`] the binary wires in (the
//! storages it was told to read), and [`NoImages`] for a coordinator told none.

use futures::future::BoxFuture;

/// Where result images are read from.
pub trait ImageSource: Send + Sync + 'static {
    /// The bytes of object `key` in storage `storage` (a result's `storage`, as the worker
    /// wrote it); `Ok(None)` when this source does not read that storage or has no such object.
    fn get<'a>(
        &'a self,
        storage: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, ImageError>>;

    /// Whether this source reads `storage` at all (so a missing image can be told apart from
    /// a storage nobody configured). Sources that cannot tell say yes.
    fn reads(&self, storage: &str) -> bool {
        let _ = storage;
        true
    }
}

/// Why an image could not be read. Its text is for the log: it names the storage and key.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The result's object key is not a plain relative path (`..`, absolute, empty parts).
    #[error("object key {0:?} is not a relative path")]
    BadKey(String),
    /// The storage refused or could not be reached.
    #[error("reading {key:?} from {storage}: {message}")]
    Read {
        /// The storage URL (without credentials).
        storage: String,
        /// The object key.
        key: String,
        /// What went wrong.
        message: String,
    },
}

/// A source that reads nothing: a coordinator started without storages to read.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoImages;

impl ImageSource for NoImages {
    fn get<'a>(
        &'a self,
        _storage: &'a str,
        _key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, ImageError>> {
        Box::pin(async { Ok(None) })
    }

    fn reads(&self, _storage: &str) -> bool {
        false
    }
}
