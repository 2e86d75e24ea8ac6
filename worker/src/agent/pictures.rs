//! img2img start pictures of leased cells: fetched from the coordinator by sha256
//! (`GetImage`), checked against that hash, decoded and resized on a blocking thread
//! ([`crate::picture`]), and kept for the next cells of the same sweep (a few, least recently
//! used first out).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tonic::Code;

use super::link::Link;
use crate::engine::image::RgbImage;

/// Resized pictures kept: a sweep's init pictures times its sizes, for the sweeps in flight.
const KEPT: usize = 8;

/// Why a cell's picture is not at hand.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PictureFailure {
    /// The cell can never render with it (no such picture, or one that does not decode).
    BadInput(String),
    /// The coordinator could not be asked now; another attempt may succeed.
    Transient(String),
}

/// Resized pictures by (sha256, width, height).
#[derive(Clone, Default)]
pub(super) struct Pictures {
    kept: Arc<Mutex<VecDeque<Kept>>>,
}

/// (sha256, width, height).
type Key = (String, u32, u32);

/// One resized picture and what it is.
type Kept = (Key, Arc<RgbImage>);

impl Pictures {
    /// The picture stored under `sha256`, at `width` × `height`.
    pub(super) async fn get(
        &self,
        link: &Link,
        sha256: &str,
        width: u32,
        height: u32,
    ) -> Result<Arc<RgbImage>, PictureFailure> {
        let key = (sha256.to_owned(), width, height);
        if let Some(hit) = self.take(&key) {
            self.keep(key, hit.clone());
            return Ok(hit);
        }
        let bytes = link.get_image(sha256).await.map_err(|s| match s.code() {
            Code::NotFound | Code::InvalidArgument | Code::OutOfRange => {
                PictureFailure::BadInput(format!("init image: {}", s.message()))
            }
            _ => PictureFailure::Transient(format!("init image not fetched: {}", s.message())),
        })?;
        let want = sha256.to_owned();
        let picture = tokio::task::spawn_blocking(move || {
            // A picture that is not the one named (a broken store or link) is never rendered.
            let got = hex::encode(Sha256::digest(&bytes));
            if got != want {
                return Err(PictureFailure::Transient(format!(
                    "init image: the coordinator sent bytes of sha256 {got}, not {want}"
                )));
            }
            crate::picture::init_picture(&bytes, width, height)
                .map_err(|e| PictureFailure::BadInput(format!("init image: {e}")))
        })
        .await
        .map_err(|e| PictureFailure::Transient(format!("init image: {e}")))??;
        let picture = Arc::new(picture);
        self.keep(key, picture.clone());
        Ok(picture)
    }

    fn take(&self, key: &Key) -> Option<Arc<RgbImage>> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let at = kept.iter().position(|(k, _)| k == key)?;
        kept.remove(at).map(|(_, p)| p)
    }

    fn keep(&self, key: Key, picture: Arc<RgbImage>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(k, _)| *k != key);
        kept.push_back((key, picture));
        while kept.len() > KEPT {
            kept.pop_front();
        }
    }
}
