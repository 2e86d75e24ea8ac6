//! A small HTTP server on loopback in the Hugging Face hub's URL layout, for the tests of
//! `hf:` and URL references (shared with the CLI's tests):
//!
//! - `GET /api/models/{owner}/{repo}/revision/{rev}`: `{"sha": COMMIT, "siblings": [...]}`;
//! - `GET /{owner}/{repo}/resolve/{rev}/{file}`: small files answered at once with an `ETag`,
//!   `.safetensors` (LFS) files redirected to `/cdn/…` with `X-Linked-Etag` (sha256) and
//!   `X-Linked-Size`, as the hub does;
//! - `GET /cdn/{owner}/{repo}/{file}` and `GET /files/{name}`: the bytes, honouring
//!   `Range: bytes=N-`.
//!
//! Every request is counted by path and its `Authorization` and `Range` headers recorded, so
//! tests can assert what was fetched; [`HubServer::busy_for`] makes it answer 503 for a while.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use sha2::{Digest, Sha256};

/// The commit every repo of the server is at.
pub const COMMIT: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Its path.
    pub path: String,
    /// Its `Authorization` header.
    pub authorization: Option<String>,
    /// Its `Range` header.
    pub range: Option<String>,
}

#[derive(Default)]
struct Shared {
    /// repo → file → bytes.
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// `/files/NAME` → bytes.
    files: BTreeMap<String, Vec<u8>>,
    seen: Vec<Seen>,
    /// Requests still to answer 503 (a hub that is busy for a while).
    busy: usize,
}

/// A running server; stops when dropped (with the test's runtime).
#[derive(Clone)]
pub struct HubServer {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    shared: Arc<Mutex<Shared>>,
}

impl HubServer {
    /// Starts serving (no repos yet) on a port of its own, on a thread of its own, so tests
    /// without a runtime can use it too.
    pub fn start() -> HubServer {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let state = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new().fallback(serve).with_state(state);
                axum::serve(listener, app).await.unwrap();
            });
        });
        let addr: SocketAddr = rx.recv().unwrap();
        HubServer {
            endpoint: format!("http://{addr}"),
            shared,
        }
    }

    /// Adds `repo` (`OWNER/NAME`) with `files` (path in the repo → bytes).
    pub fn add_repo(&self, repo: &str, files: BTreeMap<String, Vec<u8>>) {
        self.lock().repos.insert(repo.to_owned(), files);
    }

    /// Adds `repo` with every file under `dir` (two folder levels), plus `extra`.
    pub fn add_repo_dir(&self, repo: &str, dir: &Path, extra: &[(&str, &[u8])]) {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() {
                for inner in std::fs::read_dir(entry.path()).unwrap().flatten() {
                    let inner_name = inner.file_name().to_string_lossy().into_owned();
                    files.insert(
                        format!("{name}/{inner_name}"),
                        std::fs::read(inner.path()).unwrap(),
                    );
                }
            } else {
                files.insert(name, std::fs::read(entry.path()).unwrap());
            }
        }
        for (name, bytes) in extra {
            files.insert((*name).to_owned(), bytes.to_vec());
        }
        self.add_repo(repo, files);
    }

    /// Serves `bytes` at `/files/NAME`; returns its URL.
    pub fn add_file(&self, name: &str, bytes: Vec<u8>) -> String {
        self.lock().files.insert(name.to_owned(), bytes);
        format!("{}/files/{name}", self.endpoint)
    }

    /// Answers the next `n` requests with 503 Service Unavailable, as a hub under load does.
    pub fn busy_for(&self, n: usize) {
        self.lock().busy = n;
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// How many requests' paths start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .count()
    }

    /// The files of `repo` downloaded (through `/resolve/`), sorted, each once per request.
    pub fn resolved(&self, repo: &str) -> Vec<String> {
        let prefix = format!("/{repo}/resolve/");
        let mut out: Vec<String> = self
            .lock()
            .seen
            .iter()
            .filter_map(|s| s.path.strip_prefix(&prefix))
            .map(|rest| {
                rest.split_once('/')
                    .map(|(_, f)| f)
                    .unwrap_or(rest)
                    .to_owned()
            })
            .collect();
        out.sort();
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn status(code: StatusCode) -> Response {
    Response::builder()
        .status(code)
        .body(Body::empty())
        .unwrap()
}

async fn serve(State(shared): State<Arc<Mutex<Shared>>>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_owned();
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    s.seen.push(Seen {
        path: path.clone(),
        authorization: text(header::AUTHORIZATION),
        range: text(header::RANGE),
    });
    if s.busy > 0 {
        s.busy -= 1;
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "models", owner, repo, "revision", rev] => {
            let Some(files) = s.repos.get(&format!("{owner}/{repo}")) else {
                return status(StatusCode::NOT_FOUND);
            };
            if *rev != "main" && *rev != COMMIT {
                return status(StatusCode::NOT_FOUND);
            }
            let siblings: Vec<_> = files
                .keys()
                .map(|f| serde_json::json!({ "rfilename": f }))
                .collect();
            let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap()
        }
        ["cdn", owner, repo, file @ ..] => {
            let Some(bytes) = s
                .repos
                .get(&format!("{owner}/{repo}"))
                .and_then(|r| r.get(&file.join("/")))
            else {
                return status(StatusCode::NOT_FOUND);
            };
            ranged(bytes, text(header::RANGE))
        }
        ["files", name] => match s.files.get(*name) {
            Some(bytes) => ranged(bytes, text(header::RANGE)),
            None => status(StatusCode::NOT_FOUND),
        },
        [owner, repo, "resolve", rev, file @ ..] => {
            let repo = format!("{owner}/{repo}");
            let file = file.join("/");
            let Some(bytes) = s.repos.get(&repo).and_then(|r| r.get(&file)) else {
                return status(StatusCode::NOT_FOUND);
            };
            if *rev != "main" && *rev != COMMIT {
                return status(StatusCode::NOT_FOUND);
            }
            let sha = hex::encode(Sha256::digest(bytes));
            let b = Response::builder().header("x-repo-commit", COMMIT);
            if file.ends_with(".safetensors") {
                b.status(StatusCode::FOUND)
                    .header("x-linked-etag", format!("\"{sha}\""))
                    .header("x-linked-size", bytes.len().to_string())
                    .header(header::ETAG, "\"git-blob-id\"")
                    .header(header::LOCATION, format!("/cdn/{repo}/{file}"))
                    .body(Body::empty())
                    .unwrap()
            } else {
                // A regular (git) file: its ETag is its git blob id; any stable name works.
                b.header(header::ETAG, format!("\"{}\"", &sha[..40]))
                    .body(Body::from(bytes.clone()))
                    .unwrap()
            }
        }
        _ => status(StatusCode::NOT_FOUND),
    }
}

/// `bytes`, or from `Range: bytes=N-` on with `206`.
fn ranged(bytes: &[u8], range: Option<String>) -> Response {
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    match from {
        None => Response::builder()
            .body(Body::from(bytes.to_vec()))
            .unwrap(),
        Some(n) if n >= bytes.len() => status(StatusCode::RANGE_NOT_SATISFIABLE),
        Some(n) => Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {n}-{}/{}", bytes.len() - 1, bytes.len()),
            )
            .body(Body::from(bytes[n..].to_vec()))
            .unwrap(),
    }
}
