//! Putting a big local file (a registry model, gigabytes) at a key once, resumably. On S3 it is
//! a multipart upload in parts of [`part_bytes`] (fixed by the file's size, so a later run cuts
//! the same parts): a run first looks for an unfinished upload of the same key (the
//! upload id an earlier run on this machine remembered, else ListMultipartUploads where the
//! server has it), keeps the parts it already holds at their full size (ListParts) and
//! sends only the rest, then completes it. On `file://DIR` the file is copied to `<key>.part`
//! (continued from its length) and renamed into place. Either way nothing is sent when an
//! object of the file's size is at the key already: keys name content (`models/sha256/…`), so
//! an object there of the right size is the same file. The file is read a part at a time, never
//! whole; progress is reported as bytes at the key's upload so far.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use md5::Digest as _;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{S3Store, Storage, UploadError, check_key};

/// The smallest part: S3 needs at least 5 MiB for every part but the last.
pub const MIN_PART_BYTES: u64 = 8 << 20;

/// Most parts of one upload (S3 allows 10,000).
const MAX_PARTS: u64 = 9_000;

/// The part size of a file of `size` bytes: [`MIN_PART_BYTES`], or larger (whole MiB) when
/// the file needs more than 9,000 parts.
pub fn part_bytes(size: u64) -> u64 {
    let mib = 1 << 20;
    MIN_PART_BYTES.max(size.div_ceil(MAX_PARTS).div_ceil(mib) * mib)
}

/// What [`Storage::put_file`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uploaded {
    /// An object of the file's size was at the key already: nothing was sent.
    Present,
    /// The file is at the key now; `resumed` bytes of it were sent by an earlier run.
    Sent {
        /// Bytes an interrupted upload had sent, kept rather than sent again.
        resumed: u64,
    },
    /// Stopped after the `max_parts` new parts asked for; the upload is unfinished.
    Stopped {
        /// Parts the server holds now.
        parts_done: u32,
        /// Parts in all.
        parts: u32,
    },
}

/// Bytes sent (or kept) so far, for a progress bar.
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

impl Storage {
    /// Puts the file at `path` (`size` bytes) at `key`, resumably (see the module header).
    /// `max_parts` stops after that many newly sent parts, leaving the upload unfinished.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        max_parts: Option<u32>,
        progress: Progress<'_>,
    ) -> Result<Uploaded, UploadError> {
        check_key(key)?;
        match self {
            Storage::File(f) => {
                let target = key
                    .split('/')
                    .fold(f.root().to_path_buf(), |p, s| p.join(s));
                copy_resumably(path, &target, size, progress).await
            }
            Storage::S3(s) => put_multipart(s, key, path, size, max_parts, progress).await,
        }
    }
}

fn s3_error(op: &'static str, key: &str, e: impl std::error::Error) -> UploadError {
    UploadError::S3 {
        op,
        key: key.to_string(),
        message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> UploadError + '_ {
    move |source| UploadError::Io {
        path: path.display().to_string(),
        source,
    }
}

async fn put_multipart(
    s: &S3Store,
    key: &str,
    path: &Path,
    size: u64,
    max_parts: Option<u32>,
    progress: Progress<'_>,
) -> Result<Uploaded, UploadError> {
    let (client, bucket, full) = s.at(key);
    match client.head_object().bucket(bucket).key(&full).send().await {
        Ok(h) if h.content_length() == Some(size as i64) => {
            progress(size);
            return Ok(Uploaded::Present);
        }
        Ok(_) => {}
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {}
        Err(e) => return Err(s3_error("head", &full, e)),
    }
    let part = part_bytes(size);
    let parts = size.div_ceil(part).max(1);
    let record = record_path(bucket, &full);
    // An unfinished upload of this key: the one an earlier run here remembered, else the
    // newest the server lists (ListMultipartUploads, where the server has it).
    let mut resume = None;
    if let Some(id) = record.as_deref().and_then(read_record) {
        // Gone (completed, aborted, or another server's): start over.
        if let Ok(held) = held_parts(client, bucket, &full, &id, part, size).await {
            resume = Some((id, held));
        }
    }
    if resume.is_none() {
        let listed = client
            .list_multipart_uploads()
            .bucket(bucket)
            .prefix(&full)
            .send()
            .await;
        let unfinished = match listed {
            Ok(listed) => listed
                .uploads()
                .iter()
                .filter(|u| u.key() == Some(full.as_str()))
                .max_by_key(|u| u.initiated().map(|t| t.secs()))
                .and_then(|u| u.upload_id().map(str::to_owned)),
            // Servers without the listing (s3s-fs): only the remembered id resumes.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 501) => None,
            Err(e) => return Err(s3_error("list uploads", &full, e)),
        };
        if let Some(id) = unfinished {
            let held = held_parts(client, bucket, &full, &id, part, size).await?;
            resume = Some((id, held));
        }
    }
    let (upload_id, mut etags) = match resume {
        Some(r) => r,
        None => {
            let id = client
                .create_multipart_upload()
                .bucket(bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| s3_error("create upload", &full, e))?
                .upload_id()
                .map(str::to_owned)
                .ok_or_else(|| s3_error_text("create upload", &full, "no upload id"))?;
            (id, vec![None; parts as usize])
        }
    };
    if let Some(p) = &record {
        // Best effort: without it, a server without ListMultipartUploads starts over.
        let _ = p.parent().map(std::fs::create_dir_all);
        let _ = std::fs::write(p, &upload_id);
    }
    let resumed: u64 = (0..parts)
        .filter(|&i| etags[i as usize].is_some())
        .map(|i| part_len(i, part, size))
        .sum();
    let mut done = resumed;
    progress(done);
    let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    let mut sent = 0u32;
    for i in 0..parts {
        if etags[i as usize].is_some() {
            continue;
        }
        if max_parts.is_some_and(|m| sent >= m) {
            let parts_done = etags.iter().filter(|e| e.is_some()).count() as u32;
            return Ok(Uploaded::Stopped {
                parts_done,
                parts: parts as u32,
            });
        }
        let len = part_len(i, part, size);
        let mut buf = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(i * part))
            .await
            .map_err(io_error(path))?;
        file.read_exact(&mut buf).await.map_err(io_error(path))?;
        let out = client
            .upload_part()
            .bucket(bucket)
            .key(&full)
            .upload_id(&upload_id)
            .part_number(i as i32 + 1)
            .content_length(len as i64)
            .body(ByteStream::from(buf))
            .send()
            .await
            .map_err(|e| s3_error("upload part", &full, e))?;
        let tag = out
            .e_tag()
            .ok_or_else(|| s3_error_text("upload part", &full, "no ETag"))?;
        etags[i as usize] = Some(tag.to_string());
        sent += 1;
        done += len;
        progress(done);
    }
    // Held parts whose ETag the listing left out: S3 defines a part's ETag as the MD5 of its
    // bytes (quoted hex).
    for i in 0..parts {
        if etags[i as usize].as_deref() == Some("") {
            let len = part_len(i, part, size);
            let mut buf = vec![0u8; len as usize];
            file.seek(SeekFrom::Start(i * part))
                .await
                .map_err(io_error(path))?;
            file.read_exact(&mut buf).await.map_err(io_error(path))?;
            let md5 = md5::Md5::digest(&buf);
            etags[i as usize] = Some(format!("\"{}\"", hex::encode(md5)));
        }
    }
    let completed: Vec<CompletedPart> = etags
        .into_iter()
        .enumerate()
        .map(|(i, tag)| {
            CompletedPart::builder()
                .part_number(i as i32 + 1)
                .set_e_tag(tag)
                .build()
        })
        .collect();
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(&full)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send()
        .await
        .map_err(|e| s3_error("complete upload", &full, e))?;
    if let Some(p) = &record {
        let _ = std::fs::remove_file(p);
    }
    Ok(Uploaded::Sent { resumed })
}

/// Where the id of an unfinished upload of `bucket`/`full` is remembered between runs on this
/// machine (the OS cache folder's `kiln/uploads/`), for servers that cannot list unfinished
/// uploads.
fn record_path(bucket: &str, full: &str) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    let name = hex::encode(Sha256::digest(format!("{bucket}/{full}")));
    Some(dirs::cache_dir()?.join("kiln").join("uploads").join(name))
}

fn read_record(path: &Path) -> Option<String> {
    let id = std::fs::read_to_string(path).ok()?;
    let id = id.trim();
    (!id.is_empty() && id.len() <= 1024).then(|| id.to_owned())
}

/// The ETags of the parts upload `upload_id` holds at their full size, by part index.
async fn held_parts(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    full: &str,
    upload_id: &str,
    part: u64,
    size: u64,
) -> Result<Vec<Option<String>>, UploadError> {
    let parts = size.div_ceil(part).max(1);
    let mut etags: Vec<Option<String>> = vec![None; parts as usize];
    let mut marker: Option<String> = None;
    loop {
        let page = client
            .list_parts()
            .bucket(bucket)
            .key(full)
            .upload_id(upload_id)
            .set_part_number_marker(marker.clone())
            .send()
            .await
            .map_err(|e| s3_error("list parts", full, e))?;
        for p in page.parts() {
            let (Some(n), Some(len)) = (p.part_number(), p.size()) else {
                continue;
            };
            let Some(i) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)) else {
                continue;
            };
            if i < etags.len() && len as u64 == part_len(i as u64, part, size) {
                // An empty tag: held, but the server did not say its ETag (s3s-fs); it is
                // computed from the file before completing.
                etags[i] = Some(p.e_tag().unwrap_or_default().to_string());
            }
        }
        match page.next_part_number_marker() {
            Some(m) if page.is_truncated() == Some(true) => marker = Some(m.to_string()),
            _ => break,
        }
    }
    Ok(etags)
}

fn s3_error_text(op: &'static str, key: &str, message: &str) -> UploadError {
    UploadError::S3 {
        op,
        key: key.to_string(),
        message: message.to_string(),
    }
}

/// Bytes of part `i` (from 0) of a file of `size` cut in parts of `part`.
fn part_len(i: u64, part: u64, size: u64) -> u64 {
    part.min(size.saturating_sub(i * part))
}

/// Copies `src` to `target` by way of `<target>.part`, continuing a `.part` an earlier run
/// left; on a blocking thread.
async fn copy_resumably(
    src: &Path,
    target: &Path,
    size: u64,
    progress: Progress<'_>,
) -> Result<Uploaded, UploadError> {
    let (src, target) = (src.to_path_buf(), target.to_path_buf());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let copy = tokio::task::spawn_blocking(move || {
        copy_blocking(&src, &target, size, &|n| {
            let _ = tx.send(n);
        })
    });
    while let Some(n) = rx.recv().await {
        progress(n);
    }
    copy.await
        .map_err(|e| UploadError::Config(format!("upload task: {e}")))?
}

fn copy_blocking(
    src: &Path,
    target: &Path,
    size: u64,
    progress: &dyn Fn(u64),
) -> Result<Uploaded, UploadError> {
    if std::fs::metadata(target).is_ok_and(|m| m.len() == size) {
        progress(size);
        return Ok(Uploaded::Present);
    }
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let part: PathBuf = {
        let mut name = target.as_os_str().to_owned();
        name.push(".part");
        name.into()
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .map_err(io_error(&part))?;
    let mut resumed = out.metadata().map_err(io_error(&part))?.len();
    if resumed > size {
        out.set_len(0).map_err(io_error(&part))?;
        resumed = 0;
    }
    let mut input = std::fs::File::open(src).map_err(io_error(src))?;
    input
        .seek(SeekFrom::Start(resumed))
        .map_err(io_error(src))?;
    let mut done = resumed;
    progress(done);
    let mut buf = vec![0u8; 1 << 20];
    while done < size {
        let want = buf.len().min((size - done) as usize);
        let n = input.read(&mut buf[..want]).map_err(io_error(src))?;
        if n == 0 {
            return Err(UploadError::Io {
                path: src.display().to_string(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        out.write_all(&buf[..n]).map_err(io_error(&part))?;
        done += n as u64;
        progress(done);
    }
    out.sync_all().map_err(io_error(&part))?;
    drop(out);
    std::fs::rename(&part, target).map_err(io_error(target))?;
    Ok(Uploaded::Sent { resumed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_file_within_the_part_limit() {
        assert_eq!(part_bytes(1), MIN_PART_BYTES);
        let big = 200u64 << 30;
        let p = part_bytes(big);
        assert!(big.div_ceil(p) <= MAX_PARTS && p.is_multiple_of(1 << 20));
        let size: u64 = 20 << 20;
        let total: u64 = (0..size.div_ceil(MIN_PART_BYTES))
            .map(|i| part_len(i, MIN_PART_BYTES, size))
            .sum();
        assert_eq!(total, size);
    }

    #[tokio::test]
    async fn a_file_copy_continues_its_part_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let store = Storage::File(super::super::FileStore::new(dir.path().join("s")).unwrap());
        let key = "models/sha256/abc";
        let target = dir.path().join("s/models/sha256/abc");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        // An earlier run stopped after a million bytes.
        std::fs::write(
            dir.path().join("s/models/sha256/abc.part"),
            &data[..1_000_000],
        )
        .unwrap();
        let size = data.len() as u64;
        let got = store
            .put_file(key, &src, size, None, &|_| {})
            .await
            .unwrap();
        assert_eq!(got, Uploaded::Sent { resumed: 1_000_000 });
        assert_eq!(std::fs::read(&target).unwrap(), data);
        let again = store
            .put_file(key, &src, size, None, &|_| {})
            .await
            .unwrap();
        assert_eq!(again, Uploaded::Present);
    }
}
