//! Streaming reads of stored objects from a byte offset: what the worker's model cache
//! downloads with. An S3 object is read with a ranged GET (`Range: bytes=N-`), a `file://`
//! object by seeking; either way the bytes arrive in chunks and are never held whole, so a
//! 2 GB checkpoint costs a chunk of memory, and an interrupted download resumes where its
//! partial file ends.

use aws_sdk_s3::primitives::ByteStream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{S3Store, Storage, UploadError, check_key};

/// Size of the chunks a `file://` object is read in.
const FILE_CHUNK: usize = 1 << 20;

/// The rest of an object from some offset, chunk by chunk.
pub struct ObjectReader {
    /// The object's whole size, bytes.
    pub size: u64,
    body: Body,
}

enum Body {
    Empty,
    File(tokio::fs::File),
    S3 { key: String, stream: ByteStream },
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
            Body::S3 { key, stream } => match stream.try_next().await {
                Ok(chunk) => Ok(chunk.map(|b| b.to_vec())),
                Err(e) => Err(UploadError::S3 {
                    op: "get",
                    key: key.clone(),
                    message: e.to_string(),
                }),
            },
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

/// A HEAD for the size, then a ranged GET of the rest (none when nothing is left: S3 answers
/// a range past the end with 416).
async fn s3_read_from(s: &S3Store, key: &str, offset: u64) -> Result<ObjectReader, UploadError> {
    let full = s.full_key(key);
    let failed = |op, e: String| UploadError::S3 {
        op,
        key: full.clone(),
        message: e,
    };
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
                failed(
                    "head",
                    aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
                )
            }
        })?;
    let size = head.content_length().unwrap_or(0).max(0) as u64;
    if offset >= size {
        return Ok(ObjectReader {
            size,
            body: Body::Empty,
        });
    }
    let out = s
        .client
        .get_object()
        .bucket(&s.bucket)
        .key(&full)
        .range(format!("bytes={offset}-"))
        .send()
        .await
        .map_err(|e| failed("get", aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
    // A server that ignores the range sends the whole object: appending it would corrupt.
    if out.content_range().is_none() {
        return Err(failed(
            "get",
            format!("bytes={offset}-: the server ignored the range"),
        ));
    }
    Ok(ObjectReader {
        size,
        body: Body::S3 {
            key: full.clone(),
            stream: out.body,
        },
    })
}
