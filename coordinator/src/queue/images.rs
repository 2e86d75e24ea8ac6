//! img2img pictures: each checked whole once, at upload ([`kiln_proto::picture`], decoded on a
//! blocking thread under the heavy-work permit), stored by the sha256 of its bytes, served to
//! workers by that hash, and required present when a sweep names it.

use kiln_proto::picture::{self, PictureError};
use sha2::{Digest, Sha256};

use super::Queue;
use super::submit::blocking;
use crate::domain::rows::ImageRow;
use crate::{Error, Result};

impl Queue {
    /// Checks and stores an uploaded picture; the same bytes twice are stored once.
    pub async fn put_image(&self, data: Vec<u8>) -> Result<ImageRow> {
        if data.len() > picture::MAX_FILE_BYTES {
            return Err(picture_error(PictureError::FileTooLarge {
                bytes: data.len(),
            }));
        }
        let _turn = self.heavy_turn().await?;
        let (row, data) = blocking(move || {
            let (info, _) = picture::decode_rgb8(&data).map_err(picture_error)?;
            let row = ImageRow {
                sha256: hex::encode(Sha256::digest(&data)),
                format: info.format.as_str().to_string(),
                width: info.width,
                height: info.height,
                bytes: data.len() as u64,
            };
            Ok((row, data))
        })
        .await?;
        self.store.image_put(&row, &data, self.now()).await
    }

    /// A stored picture's bytes.
    pub async fn image(&self, sha256: &str) -> Result<Vec<u8>> {
        check_sha256(sha256)?;
        self.store
            .image_data(sha256)
            .await?
            .ok_or_else(|| Error::ImageNotFound(sha256.to_string()))
    }

    /// Refuses (naming the first) when any of `sha256s` is not a stored picture.
    pub async fn require_images(&self, sha256s: &[&str]) -> Result<()> {
        for sha in sha256s {
            check_sha256(sha)?;
        }
        match self.store.images_missing(sha256s).await?.into_iter().next() {
            Some(sha) => Err(Error::ImageNotFound(sha)),
            None => Ok(()),
        }
    }
}

/// A sha256 as cells and requests name pictures: 64 lowercase hex digits.
fn check_sha256(s: &str) -> Result<()> {
    if picture::is_sha256_hex(s) {
        Ok(())
    } else {
        Err(Error::invalid("sha256: not 64 lowercase hex digits"))
    }
}

fn picture_error(e: PictureError) -> Error {
    match e {
        PictureError::FileTooLarge { .. } => Error::TooLarge(format!("picture: {e}")),
        _ => Error::invalid(format!("picture: {e}")),
    }
}
