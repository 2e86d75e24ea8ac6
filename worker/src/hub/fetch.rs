//! HTTP for the hub and for URLs: a repo's commit and file list, and files streamed to disk.
//!
//! Redirects are followed here rather than by the client, because the hub's answer to
//! `GET {endpoint}/{repo}/resolve/{commit}/{file}` carries the file's identity (`X-Linked-Etag`
//! or `ETag`, `X-Linked-Size`) on the first response, before large files redirect to a CDN;
//! the token goes only to the origin it was meant for. A file is written to `<dest>.incomplete`
//! and renamed when whole; a later try resumes with `Range` where the server honours it, and a
//! file past the size bound is stopped and removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{self, HeaderMap};
use reqwest::{Response, StatusCode, Url};
use tokio::io::AsyncWriteExt;

/// How many redirects one download follows.
const MAX_REDIRECTS: usize = 8;
/// The largest repo description read, bytes.
const MAX_INFO_BYTES: usize = 16 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server could not be reached or the transfer broke.
    #[error("{url}: {source}")]
    Network {
        /// What was requested.
        url: String,
        /// The client's error.
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}{hint}")]
    Status {
        /// What was requested.
        url: String,
        /// Its status.
        status: StatusCode,
        /// What to do about it.
        hint: &'static str,
    },
    /// The answer was not what the hub protocol says.
    #[error("{url}: {reason}")]
    Protocol {
        /// What was requested.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The file is past the size bound.
    #[error("{url}: {bytes} bytes is past the download limit of {max} bytes")]
    TooLarge {
        /// What was requested.
        url: String,
        /// Its size (so far).
        bytes: u64,
        /// The bound.
        max: u64,
    },
    /// Writing to the cache failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl FetchError {
    /// Whether the server was not reached at all (offline rules apply).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, FetchError::Network { source, .. } if source.is_connect() || source.is_timeout())
    }
}

fn network(url: &str) -> impl FnOnce(reqwest::Error) -> FetchError + '_ {
    move |source| FetchError::Network {
        url: url.to_owned(),
        source,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A repo at a commit: what the hub's `api/models/{repo}/revision/{rev}` says.
#[derive(Debug, serde::Deserialize)]
pub struct RepoInfo {
    /// The commit.
    pub sha: String,
    /// Its files.
    pub siblings: Vec<Sibling>,
}

/// One file of a repo.
#[derive(Debug, serde::Deserialize)]
pub struct Sibling {
    /// Its path in the repo.
    pub rfilename: String,
}

/// What a hub file's first response says about it.
pub struct FileMeta {
    /// The blob name: `X-Linked-Etag` (LFS files' sha256) or `ETag`, unquoted.
    pub etag: String,
    /// Its size when told.
    pub size: Option<u64>,
}

/// An HTTP client for one hub endpoint.
pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    token: Option<String>,
    max_bytes: u64,
}

impl Client {
    /// A client for `endpoint` (`https://huggingface.co`), sending `token` to it.
    pub fn new(endpoint: &str, token: Option<String>, max_bytes: u64) -> Result<Self, FetchError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(network(endpoint))?;
        Ok(Self {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            token,
            max_bytes,
        })
    }

    /// The commit `revision` of `repo` points at, and its files.
    pub async fn repo_info(&self, repo: &str, revision: &str) -> Result<RepoInfo, FetchError> {
        let url = format!("{}/api/models/{repo}/revision/{revision}", self.endpoint);
        let response = self.get(&url, None, true).await?;
        let response = self.follow(response, &url, None).await?;
        let body = response.bytes().await.map_err(network(&url))?;
        if body.len() > MAX_INFO_BYTES {
            return Err(FetchError::Protocol {
                url,
                reason: "repo description too large".into(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| FetchError::Protocol {
            url,
            reason: format!("not a repo description: {e}"),
        })
    }

    /// `file` of `repo` at `commit`: its identity from the first response, and the bytes
    /// written by `blob` (called with the metadata; returns where to write, or `None` when
    /// that blob is already whole).
    pub async fn hub_file(
        &self,
        repo: &str,
        commit: &str,
        file: &str,
        blob: impl FnOnce(&FileMeta) -> Option<PathBuf>,
    ) -> Result<FileMeta, FetchError> {
        let url = format!("{}/{repo}/resolve/{commit}/{file}", self.endpoint);
        let mut first = self.get(&url, None, true).await?;
        if !first.status().is_redirection() {
            first = check_status(first, &url)?;
        }
        let meta = file_meta(first.headers()).ok_or_else(|| FetchError::Protocol {
            url: url.clone(),
            reason: "no ETag on the hub's answer".into(),
        })?;
        if let Some(size) = meta.size {
            self.check_size(&url, size)?;
        }
        let Some(dest) = blob(&meta) else {
            return Ok(meta);
        };
        let partial = incomplete(&dest);
        let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        // A whole answer can be written as it is; a partial file resumes with a new request.
        let response = if first.status() == StatusCode::OK && have == 0 {
            first
        } else {
            let target = redirect_target(&first, &url)?.unwrap_or_else(|| url.clone());
            let from = (have > 0).then_some(have);
            let r = self.get(&target, from, same_origin(&target, &url)).await?;
            self.follow(r, &url, from).await?
        };
        self.write(response, &url, &dest, have, meta.size).await?;
        Ok(meta)
    }

    /// The file at `url` written to `dest` (resuming `<dest>.incomplete`).
    pub async fn url_file(&self, url: &str, dest: &Path) -> Result<(), FetchError> {
        let have = std::fs::metadata(incomplete(dest))
            .map(|m| m.len())
            .unwrap_or(0);
        let from = (have > 0).then_some(have);
        let response = self.get(url, from, false).await?;
        let response = self.follow(response, url, from).await?;
        let size = match response.status() {
            StatusCode::PARTIAL_CONTENT => response.content_length().map(|n| n + have),
            StatusCode::RANGE_NOT_SATISFIABLE => None,
            _ => response.content_length(),
        };
        self.write(response, url, dest, have, size).await
    }

    fn check_size(&self, url: &str, bytes: u64) -> Result<(), FetchError> {
        if bytes > self.max_bytes {
            return Err(FetchError::TooLarge {
                url: url.to_owned(),
                bytes,
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    /// One GET, with the token when `auth` and a `Range` from `from`.
    async fn get(&self, url: &str, from: Option<u64>, auth: bool) -> Result<Response, FetchError> {
        let mut request = self.http.get(url);
        if let (true, Some(token)) = (auth, &self.token) {
            request = request.bearer_auth(token);
        }
        if let Some(from) = from {
            request = request.header(header::RANGE, format!("bytes={from}-"));
        }
        request.send().await.map_err(network(url))
    }

    /// Follows redirects from `response` (asking for bytes `from..` again each time, and
    /// sending the token only while on `origin`'s host) and checks the final status.
    async fn follow(
        &self,
        mut response: Response,
        origin: &str,
        from: Option<u64>,
    ) -> Result<Response, FetchError> {
        let mut url = response.url().to_string();
        for _ in 0..MAX_REDIRECTS {
            let Some(next) = redirect_target(&response, &url)? else {
                return check_status(response, &url);
            };
            response = self.get(&next, from, same_origin(&next, origin)).await?;
            url = next;
        }
        Err(FetchError::Protocol {
            url,
            reason: "too many redirects".into(),
        })
    }

    /// Streams `response` into `<dest>.incomplete` (appending after `have` bytes when it is
    /// a `206`), then renames it to `dest`.
    async fn write(
        &self,
        mut response: Response,
        url: &str,
        dest: &Path,
        have: u64,
        size: Option<u64>,
    ) -> Result<(), FetchError> {
        let partial = incomplete(dest);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(parent))?;
        }
        let status = response.status();
        let resumed = status == StatusCode::PARTIAL_CONTENT && have > 0;
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            // Every byte is here already when the size says so; else start again next time.
            if size == Some(have) {
                return tokio::fs::rename(&partial, dest).await.map_err(io(dest));
            }
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(FetchError::Protocol {
                url: url.to_owned(),
                reason: "the server refused to resume; try again".into(),
            });
        }
        if let Some(total) = response.content_length() {
            self.check_size(url, if resumed { have } else { 0 } + total)?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&partial)
            .await
            .map_err(io(&partial))?;
        let mut written = if resumed { have } else { 0 };
        loop {
            let chunk = response.chunk().await.map_err(network(url))?;
            let Some(chunk) = chunk else { break };
            written += chunk.len() as u64;
            if let Err(e) = self.check_size(url, written) {
                drop(file);
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
            file.write_all(&chunk).await.map_err(io(&partial))?;
        }
        file.flush().await.map_err(io(&partial))?;
        file.sync_all().await.map_err(io(&partial))?;
        drop(file);
        if let Some(size) = size
            && size != written
        {
            return Err(FetchError::Protocol {
                url: url.to_owned(),
                reason: format!("{written} bytes arrived of {size}; try again to resume"),
            });
        }
        tokio::fs::rename(&partial, dest).await.map_err(io(dest))
    }
}

/// `<dest>.incomplete`, where a download in progress is kept.
pub fn incomplete(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".incomplete");
    dest.with_file_name(name)
}

fn file_meta(headers: &HeaderMap) -> Option<FileMeta> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let etag = text("x-linked-etag").or_else(|| text("etag"))?;
    let etag = etag
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_owned();
    let size = text("x-linked-size")
        .or_else(|| text("content-length"))
        .and_then(|s| s.parse().ok());
    Some(FileMeta { etag, size })
}

/// The absolute URL a 3xx answer points at; `None` for any other answer.
fn redirect_target(response: &Response, url: &str) -> Result<Option<String>, FetchError> {
    if !response.status().is_redirection() {
        return Ok(None);
    }
    let bad = |reason: &str| FetchError::Protocol {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let location = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad("a redirect without Location"))?;
    let base = Url::parse(url).map_err(|_| bad("not a URL"))?;
    let next = base
        .join(location)
        .map_err(|_| bad("a redirect to no URL"))?;
    if !matches!(next.scheme(), "https" | "http") {
        return Err(bad("a redirect to neither https nor http"));
    }
    Ok(Some(next.to_string()))
}

fn same_origin(a: &str, b: &str) -> bool {
    match (Url::parse(a), Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

fn check_status(response: Response, url: &str) -> Result<Response, FetchError> {
    let status = response.status();
    if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
        return Ok(response);
    }
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            " (a gated or private repo: set HF_TOKEN to a token with access)"
        }
        StatusCode::NOT_FOUND => " (no such repo, revision or file)",
        _ => "",
    };
    Err(FetchError::Status {
        url: url.to_owned(),
        status,
        hint,
    })
}
