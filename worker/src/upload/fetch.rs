//! Streaming reads of stored objects from a byte offset: what the worker's model cache
//! downloads with. An S3 object is read as ranged GETs of [`S3_PART`] bytes, [`S3_PARALLEL`]
//! of them in flight and handed on in order (as `aws s3 cp` reads; one GET at a time ran at
//! a third of the speed); a `file://` object by seeking. Either way the bytes arrive in
//! order, in chunks, and are never held whole, so a 2 GB checkpoint holds
//! `S3_PART × S3_PARALLEL` (64 MiB) in flight at most, and an interrupted download resumes
//! where its partial file ends.

use std::collections::VecDeque;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::task::JoinHandle;

use super::{S3Store, Storage, UploadError, check_key};

/// Size of the chunks a `file://` object is read in.
const FILE_CHUNK: usize = 1 << 20;

/// Bytes per ranged GET of an S3 object (the AWS CLI's default part size).
const S3_PART: u64 = 8 << 20;

/// Ranged GETs of one object in flight at once. Measured on loopback s3s-fs with a 512 MiB
/// object (`tools/bench/model_fetch.sh`): 1 in flight took 7–9 s, 4 took 3.3–3.6 s, 8 took
/// 2.1–2.8 s (as `aws s3 cp`, which runs 10), 12 and 16 no better.
const S3_PARALLEL: usize = 8;

/// The rest of an object from some offset, chunk by chunk.
pub struct ObjectReader {
    /// The object's whole size, bytes.
    pub size: u64,
    body: Body,
}

enum Body {
    Empty,
    File(tokio::fs::File),
    S3(S3Parts),
}

/// The ranged GETs of one S3 object: those in flight, oldest (next in order) first, and
/// where the next one to start begins.
struct S3Parts {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    next: u64,
    size: u64,
    in_flight: VecDeque<JoinHandle<Result<Vec<u8>, UploadError>>>,
}

impl S3Parts {
    /// Starts GETs until [`S3_PARALLEL`] are in flight or the object is covered.
    fn fill(&mut self) {
        while self.in_flight.len() < S3_PARALLEL && self.next < self.size {
            let (start, end) = (self.next, (self.next + S3_PART).min(self.size));
            self.next = end;
            let get = get_range(
                self.client.clone(),
                self.bucket.clone(),
                self.key.clone(),
                start,
                end,
            );
            self.in_flight.push_back(tokio::spawn(get));
        }
    }

    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, UploadError> {
        self.fill();
        let Some(part) = self.in_flight.pop_front() else {
            return Ok(None);
        };
        let bytes = part.await.map_err(|e| UploadError::S3 {
            op: "get",
            key: self.key.clone(),
            message: e.to_string(),
        })??;
        self.fill();
        Ok(Some(bytes))
    }
}

impl Drop for S3Parts {
    /// A reader dropped mid-object (a failed write, a cancelled download) stops its GETs.
    fn drop(&mut self) {
        for part in &self.in_flight {
            part.abort();
        }
    }
}

/// One ranged GET, `start..end`, read whole: exactly `end - start` bytes or an error (a
/// server that ignores the range, or sends a different length, would corrupt the file).
async fn get_range(
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, UploadError> {
    let failed = |message: String| UploadError::S3 {
        op: "get",
        key: key.clone(),
        message,
    };
    let out = client
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .range(format!("bytes={start}-{}", end - 1))
        .send()
        .await
        .map_err(|e| failed(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
    if out.content_range().is_none() {
        return Err(failed(format!(
            "bytes={start}-{}: the server ignored the range",
            end - 1
        )));
    }
    let want = (end - start) as usize;
    let mut buf = Vec::with_capacity(want);
    let mut body = out.body;
    while let Some(frame) = body.try_next().await.map_err(|e| failed(e.to_string()))? {
        if buf.len() + frame.len() > want {
            return Err(failed(format!(
                "bytes={start}-{}: the server sent more than the range",
                end - 1
            )));
        }
        buf.extend_from_slice(&frame);
    }
    if buf.len() != want {
        return Err(failed(format!(
            "bytes={start}-{}: the server sent {} of {want} bytes",
            end - 1,
            buf.len()
        )));
    }
    Ok(buf)
}

impl ObjectReader {
    /// The next chunk; `None` at the end of the object.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, UploadError> {
        match &mut self.body {
            Body::Empty => Ok(None),
            Body::File(f) => {
                let mut buf = vec![0u8; FILE_CHUNK];
                let n = f.read(&mut buf).await.map_err(|source| UploadError::Io {
                    path: "model object".into(),
                    source,
                })?;
                buf.truncate(n);
                Ok((n > 0).then_some(buf))
            }
            Body::S3(parts) => parts.next_chunk().await,
        }
    }
}

impl Storage {
    /// Opens the object at `key` (a plain relative key, checked as [`Storage::get`] checks it)
    /// for reading from byte `offset` on. An offset at or past the end reads nothing.
    pub async fn read_from(&self, key: &str, offset: u64) -> Result<ObjectReader, UploadError> {
        check_key(key)?;
        match self {
            Storage::File(f) => {
                let path = f.path(key)?;
                let mut file = match tokio::fs::File::open(&path).await {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(UploadError::NotFound(key.to_string()));
                    }
                    Err(source) => {
                        let path = path.display().to_string();
                        return Err(UploadError::Io { path, source });
                    }
                };
                let io = |source| UploadError::Io {
                    path: path.display().to_string(),
                    source,
                };
                let size = file.metadata().await.map_err(io)?.len();
                if offset >= size {
                    return Ok(ObjectReader {
                        size,
                        body: Body::Empty,
                    });
                }
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(io)?;
                Ok(ObjectReader {
                    size,
                    body: Body::File(file),
                })
            }
            Storage::S3(s) => s3_read_from(s, key, offset).await,
        }
    }
}

/// A HEAD for the size, then ranged GETs of the rest as the reader asks (none when nothing
/// is left).
async fn s3_read_from(s: &S3Store, key: &str, offset: u64) -> Result<ObjectReader, UploadError> {
    let full = s.full_key(key);
    let head = s
        .client
        .head_object()
        .bucket(&s.bucket)
        .key(&full)
        .send()
        .await
        .map_err(|e| {
            if e.as_service_error().is_some_and(|s| s.is_not_found()) {
                UploadError::NotFound(full.clone())
            } else {
                UploadError::S3 {
                    op: "head",
                    key: full.clone(),
                    message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
                }
            }
        })?;
    let size = head.content_length().unwrap_or(0).max(0) as u64;
    if offset >= size {
        return Ok(ObjectReader {
            size,
            body: Body::Empty,
        });
    }
    let mut parts = S3Parts {
        client: s.client.clone(),
        bucket: s.bucket.clone(),
        key: full,
        next: offset,
        size,
        in_flight: VecDeque::new(),
    };
    parts.fill();
    Ok(ObjectReader {
        size,
        body: Body::S3(parts),
    })
}
