//! Thumbnails for the gallery: made once per image and kept on disk, named by the sha256 of
//! the PNG they were made from (`DIR/ab/ab…64 hex….jpg`), so an image never gets a stale
//! thumbnail and the cache needs no index. The name is built from validated hex only: no
//! request text ever reaches a path.
//!
//! Making one decodes a PNG (bounded: at most [`MAX_PNG_BYTES`] and [`MAX_SIDE`]² pixels), so
//! it runs on tokio's blocking pool, at most [`MAKERS`] at a time; requests for a thumbnail
//! being made wait for it rather than making it again. Files are written to a temporary name
//! and renamed, so a reader never sees half a JPEG. It knows nothing of cells or storages:
//! the caller hands it the PNG (and [`Thumbs::get`] checks it against the hash).

use std::collections::HashMap;
use std::future::Future;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Longest side of a thumbnail, in pixels (smaller images keep their size).
pub const THUMB_SIDE: u32 = 256;
/// JPEG quality of thumbnails: the thumbnail of a 512×512 image with colour detail down to
/// 2 px is 13.6 KB at 75 (15.7 KB at 80), so a page of 100 stays under 1.5 MB.
const QUALITY: u8 = 75;
/// Largest PNG decoded.
pub const MAX_PNG_BYTES: usize = 64 << 20;
/// Widest or tallest PNG decoded.
pub const MAX_SIDE: u32 = 8192;
/// Most memory one decode may allocate (an 8192² RGBA image is 256 MiB).
const MAX_ALLOC: u64 = 512 << 20;
/// Thumbnails made at once.
const MAKERS: usize = 2;

/// Why no thumbnail came back. `E` is the error of the caller's PNG source.
#[derive(Debug, thiserror::Error)]
pub enum ThumbError<E> {
    /// The hash is not 64 hex digits.
    #[error("not a sha256: {0:?}")]
    BadHash(String),
    /// The PNG could not be had.
    #[error("{0}")]
    Source(E),
    /// The PNG's bytes do not have the hash it was asked for by.
    #[error("the PNG does not match sha256 {0}")]
    Mismatch(String),
    /// The PNG is over the limits or not a PNG.
    #[error("decoding the PNG: {0}")]
    Decode(String),
    /// The cache folder refused.
    #[error("thumbnail cache: {0}")]
    Io(#[from] std::io::Error),
}

/// A folder of thumbnails, filled on demand.
#[derive(Debug)]
pub struct Thumbs {
    dir: PathBuf,
    /// Remove `dir` when dropped (from [`Thumbs::temporary`]).
    owned: bool,
    makers: Semaphore,
    /// Thumbnails being made, by hash: later requests wait on the maker's lock.
    making: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Distinguishes the temporary files and folders this process makes.
static UNIQUE: AtomicU64 = AtomicU64::new(0);

impl Thumbs {
    /// Keeps thumbnails in `dir` (created if missing).
    pub fn new(dir: PathBuf) -> std::io::Result<Thumbs> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self::in_dir(dir, false))
    }

    /// Keeps thumbnails in a new folder under the system's temporary folder, removed when this
    /// is dropped (for tests, and a coordinator told of no cache folder).
    pub fn temporary() -> std::io::Result<Thumbs> {
        let dir = std::env::temp_dir().join(format!(
            "kiln-thumbs-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self::in_dir(dir, true))
    }

    fn in_dir(dir: PathBuf, owned: bool) -> Thumbs {
        Thumbs {
            dir,
            owned,
            makers: Semaphore::new(MAKERS),
            making: Mutex::new(HashMap::new()),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The JPEG thumbnail of the PNG whose sha256 is `sha256`: from the cache, or made from
    /// the bytes `png` produces (called only on a miss) and kept.
    pub async fn get<F, Fut, E>(&self, sha256: &str, png: F) -> Result<Vec<u8>, ThumbError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let sha = checked_hash(sha256).ok_or_else(|| ThumbError::BadHash(sha256.into()))?;
        let path = self.path(&sha);
        if let Some(jpeg) = read_cached(&path).await? {
            return Ok(jpeg);
        }
        let flight = self.join(&sha);
        let _turn = flight.lock.lock().await;
        // Whoever held the lock before may have made it.
        if let Some(jpeg) = read_cached(&path).await? {
            return Ok(jpeg);
        }
        let png = png().await.map_err(ThumbError::Source)?;
        let _permit = self.makers.acquire().await.expect("never closed");
        let made = tokio::task::spawn_blocking(move || {
            let jpeg = make(&sha, &png)?;
            write_atomically(&path, &jpeg).map_err(Made::Io)?;
            Ok(jpeg)
        })
        .await
        .map_err(|e| ThumbError::Io(std::io::Error::other(e)))?;
        made.map_err(|e| match e {
            Made::Mismatch(sha) => ThumbError::Mismatch(sha),
            Made::Decode(m) => ThumbError::Decode(m),
            Made::Io(e) => ThumbError::Io(e),
        })
    }

    /// The file of a (checked, lower-case) hash.
    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(&sha[..2]).join(format!("{sha}.jpg"))
    }

    /// The lock of the thumbnail `sha`, shared with any request making it now.
    fn join(&self, sha: &str) -> Flight<'_> {
        let mut making = self.making.lock().expect("not poisoned");
        let lock = making.entry(sha.to_string()).or_default().clone();
        Flight {
            thumbs: self,
            sha: sha.to_string(),
            lock,
        }
    }
}

impl Drop for Thumbs {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A request's share of making one thumbnail; the last one out forgets the lock.
struct Flight<'a> {
    thumbs: &'a Thumbs,
    sha: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut making = self.thumbs.making.lock().expect("not poisoned");
        // Clones are only made under this mutex: two owners are the map and us.
        if Arc::strong_count(&self.lock) <= 2 {
            making.remove(&self.sha);
        }
    }
}

/// `s` in lower case if it is 64 hex digits.
fn checked_hash(s: &str) -> Option<String> {
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

async fn read_cached(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match tokio::fs::read(path).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why making a thumbnail failed (the [`ThumbError`]s that the blocking pool can return).
enum Made {
    Mismatch(String),
    Decode(String),
    Io(std::io::Error),
}

/// The JPEG thumbnail of `png`, which must hash to `sha` (blocking: decodes and encodes).
fn make(sha: &str, png: &[u8]) -> Result<Vec<u8>, Made> {
    if hex::encode(Sha256::digest(png)) != sha {
        return Err(Made::Mismatch(sha.into()));
    }
    let image = decode(png).map_err(Made::Decode)?;
    Ok(thumbnail_jpeg(&image))
}

/// Decodes a PNG within the limits.
fn decode(png: &[u8]) -> Result<DynamicImage, String> {
    if png.len() > MAX_PNG_BYTES {
        return Err(format!(
            "{} bytes, more than the {MAX_PNG_BYTES} decoded",
            png.len()
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(png), ImageFormat::Png);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    reader.decode().map_err(|e| e.to_string())
}

/// The size of a thumbnail of a `w`×`h` image: longest side [`THUMB_SIDE`], never larger.
fn fit(w: u32, h: u32) -> (u32, u32) {
    let long = w.max(h);
    if long <= THUMB_SIDE {
        return (w, h);
    }
    let scale = |s: u32| {
        ((u64::from(s) * u64::from(THUMB_SIDE) + u64::from(long) / 2) / u64::from(long)).max(1)
            as u32
    };
    (scale(w), scale(h))
}

fn thumbnail_jpeg(image: &DynamicImage) -> Vec<u8> {
    let (w, h) = fit(image.width(), image.height());
    let small = if (w, h) == (image.width(), image.height()) {
        image.to_rgb8()
    } else {
        image.resize_exact(w, h, FilterType::CatmullRom).to_rgb8()
    };
    let mut out = Vec::with_capacity(32 << 10);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, QUALITY)
        .encode_image(&small)
        .expect("encoding RGB8 into a Vec cannot fail");
    out
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files are in a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use image::{GenericImageView, Rgb, RgbImage};

    use super::*;

    /// Value noise in 0..1 at `(x, y)`: octaves from 128 px down to 2 px, each half as strong
    /// as the one before (the 1/f spectrum of photographs and renders).
    fn noise(x: u32, y: u32, channel: u32) -> f32 {
        let lattice = |i: u32, j: u32, o: u32| {
            let h = (i.wrapping_mul(73_856_093) ^ j.wrapping_mul(19_349_663))
                .wrapping_add(o.wrapping_mul(83_492_791) ^ channel.wrapping_mul(2_654_435_761));
            let h = h ^ (h >> 13);
            (h.wrapping_mul(1_274_126_177) >> 8) as f32 / (1 << 24) as f32
        };
        let (mut sum, mut weight, mut amp) = (0.0, 0.0, 1.0);
        for (o, cell) in [128u32, 64, 32, 16, 8, 4, 2].into_iter().enumerate() {
            let (i, j) = (x / cell, y / cell);
            let (fx, fy) = (
                (x % cell) as f32 / cell as f32,
                (y % cell) as f32 / cell as f32,
            );
            let o = o as u32;
            let top = lattice(i, j, o) * (1.0 - fx) + lattice(i + 1, j, o) * fx;
            let bottom = lattice(i, j + 1, o) * (1.0 - fx) + lattice(i + 1, j + 1, o) * fx;
            sum += amp * (top * (1.0 - fy) + bottom * fy);
            weight += amp;
            amp *= 0.5;
        }
        sum / weight
    }

    /// A PNG of a scene with detail at every scale, as renders have.
    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            // Stretched: averaged octaves are grey.
            Rgb([0, 1, 2]
                .map(|c| ((noise(x, y, c) - 0.5) * 3.0 * 255.0 + 128.0).clamp(0.0, 255.0) as u8))
        });
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn jpeg_dims(b: &[u8]) -> (u32, u32) {
        image::load_from_memory_with_format(b, ImageFormat::Jpeg)
            .unwrap()
            .dimensions()
    }

    #[tokio::test]
    async fn made_once_then_served_from_disk() {
        let thumbs = Thumbs::temporary().unwrap();
        let png = png(768, 512);
        let hash = sha(&png);
        let calls = AtomicUsize::new(0);
        let source = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(png.clone())
        };
        let first = thumbs.get(&hash, source).await.unwrap();
        assert_eq!(
            jpeg_dims(&first),
            (256, 171),
            "longest side 256, aspect kept"
        );
        let file = thumbs.dir().join(&hash[..2]).join(format!("{hash}.jpg"));
        assert_eq!(std::fs::read(&file).unwrap(), first);
        // The hash in upper case names the same thumbnail; the source is not asked again.
        let second = thumbs
            .get(&hash.to_ascii_uppercase(), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(Vec::new())
            })
            .await
            .unwrap();
        assert_eq!(second, first);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // No temporary files are left beside it.
        let names: Vec<_> = std::fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(format!("{hash}.jpg"))]);
    }

    #[tokio::test]
    async fn concurrent_requests_make_it_once() {
        let thumbs = Arc::new(Thumbs::temporary().unwrap());
        let png = Arc::new(png(512, 512));
        let hash = sha(&png);
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (thumbs, png, hash, calls) =
                    (thumbs.clone(), png.clone(), hash.clone(), calls.clone());
                tokio::spawn(async move {
                    thumbs
                        .get(&hash, || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            Ok::<_, std::convert::Infallible>(png.to_vec())
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        assert!(out.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(thumbs.making.lock().unwrap().is_empty(), "locks forgotten");
    }

    #[tokio::test]
    async fn small_images_are_not_upscaled_and_renders_stay_small() {
        let thumbs = Thumbs::temporary().unwrap();
        let small = png(100, 60);
        let t = thumbs
            .get(&sha(&small), || async {
                Ok::<_, std::convert::Infallible>(small.clone())
            })
            .await
            .unwrap();
        assert_eq!(jpeg_dims(&t), (100, 60));
        // The goal: a page of 100 thumbnails of 512×512 renders under 1.5 MB (this image has
        // more colour detail than renders do).
        let render = png(512, 512);
        let t = thumbs
            .get(&sha(&render), || async {
                Ok::<_, std::convert::Infallible>(render.clone())
            })
            .await
            .unwrap();
        assert_eq!(jpeg_dims(&t), (256, 256));
        assert!(t.len() < 15_000, "thumbnail of {} bytes", t.len());
    }

    #[tokio::test]
    async fn bad_hashes_wrong_bytes_and_non_pngs_are_refused() {
        let thumbs = Thumbs::temporary().unwrap();
        let never = || async { Err::<Vec<u8>, &str>("not asked") };
        for bad in ["../../etc/passwd", "", &"g".repeat(64), &"a".repeat(63)] {
            assert!(matches!(
                thumbs.get(bad, never).await,
                Err(ThumbError::BadHash(_))
            ));
        }
        let png = png(64, 64);
        let other = "0".repeat(64);
        assert!(matches!(
            thumbs
                .get(&other, || async { Ok::<_, &str>(png.clone()) })
                .await,
            Err(ThumbError::Mismatch(_))
        ));
        assert!(
            !thumbs
                .dir()
                .join("00")
                .join(format!("{other}.jpg"))
                .exists()
        );
        let text = b"not a png".to_vec();
        assert!(matches!(
            thumbs
                .get(&sha(&text), || async { Ok::<_, &str>(text.clone()) })
                .await,
            Err(ThumbError::Decode(_))
        ));
        assert!(matches!(
            thumbs
                .get(&sha(b"x"), || async { Err("storage down") })
                .await,
            Err(ThumbError::Source("storage down"))
        ));
    }

    #[test]
    fn oversized_pngs_are_refused_before_decoding() {
        // A 9000×8 PNG: small in bytes, over the side limit.
        let wide = {
            let mut out = Vec::new();
            RgbImage::new(MAX_SIDE + 1, 8)
                .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
                .unwrap();
            out
        };
        assert!(decode(&wide).is_err());
        assert!(decode(&png(MAX_SIDE.min(300), 8)).is_ok());
        let big = vec![0u8; MAX_PNG_BYTES + 1];
        assert!(decode(&big).unwrap_err().contains("more than"));
    }

    #[test]
    fn temporary_folders_are_removed() {
        let t = Thumbs::temporary().unwrap();
        let dir = t.dir().to_path_buf();
        assert!(dir.is_dir());
        drop(t);
        assert!(!dir.exists());
    }
}
