//! A completed cell's image: `GET /images/{cell}` (the PNG, `?download=1` as a file) and
//! `GET /thumbs/{cell}` (a JPEG from [`super::thumbs`]).
//!
//! The coordinator never stores images: workers put them in storages (`s3://…`, `file://…`)
//! and report the storage, key and sha256 in the result. This module reads them back through
//! an [`ImageSource`] the binary wires in (the storages it was told to read) and serves only
//! bytes whose sha256 is the one the result records. What a storage or an object key holds
//! stays out of answers: a browser sees "not found" with the storage URL (never its
//! credentials), or "storage unavailable"; the log has the rest.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_proto::CellId;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::Caller;
use super::page;
use super::source::ImageSource;
use super::state::{Web, WebError};
use super::thumbs::ThumbError;
use crate::domain::auth::Principal;
use crate::domain::rows::CellRow;
use crate::domain::state::CellState;
use crate::result::RenderResult;

pub(super) fn routes() -> Router<Web> {
    Router::new()
        .route("/images/{cell}", get(full))
        .route("/thumbs/{cell}", get(thumb))
}

#[derive(Deserialize)]
struct Download {
    download: Option<String>,
}

async fn full(
    State(web): State<Web>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Query(q): Query<Download>,
) -> Result<Response, Failure> {
    let c = completed(&web, &caller, &id).await?;
    let png = fetch(web.images.as_ref(), &c).await?;
    let mut response = image_response(png, "image/png");
    if matches!(q.download.as_deref(), Some("1" | "true" | "yes")) {
        let value = format!("attachment; filename=\"{}\"", c.file_name());
        response.headers_mut().insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&value).expect("digits and dashes"),
        );
    }
    Ok(response)
}

async fn thumb(
    State(web): State<Web>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let c = completed(&web, &caller, &id).await?;
    let jpeg = web
        .thumbs
        .get(&c.result.sha256, || fetch(web.images.as_ref(), &c))
        .await
        .map_err(|e| match e {
            ThumbError::Source(u) => Failure::Image(u),
            other => {
                tracing::error!(cell = %c.cell.id, error = %other, "thumbnail failed");
                Failure::Web(WebError::Internal)
            }
        })?;
    Ok(image_response(jpeg, "image/jpeg"))
}

fn image_response(bytes: Vec<u8>, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // A completed cell's image never changes; the caller's cookie decides who sees it.
            (header::CACHE_CONTROL, "private, max-age=86400"),
            // The bytes came from a worker: never let a browser read them as anything else.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response()
}

/// What an image request answers instead of an image.
#[derive(Debug)]
pub(super) enum Failure {
    /// The cell is unknown, hidden or not completed.
    Web(WebError),
    /// The cell is completed but its image cannot be served.
    Image(Unavailable),
}

impl From<WebError> for Failure {
    fn from(e: WebError) -> Self {
        Self::Web(e)
    }
}

impl From<Unavailable> for Failure {
    fn from(e: Unavailable) -> Self {
        Self::Image(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        match self {
            Self::Web(e) => e.into_response(),
            Self::Image(u @ (Unavailable::NotRead { .. } | Unavailable::Missing { .. })) => {
                WebError::NotFound(u.to_string()).into_response()
            }
            Self::Image(Unavailable::Corrupt) => WebError::Internal.into_response(),
            Self::Image(u @ Unavailable::Failed) => {
                let status = StatusCode::SERVICE_UNAVAILABLE;
                (status, page::error_page(status, &u.to_string())).into_response()
            }
        }
    }
}

/// Why a completed cell's image cannot be had; the text is safe to show (and is what a zip's
/// `README.txt` lists).
#[derive(Debug, thiserror::Error)]
pub(super) enum Unavailable {
    /// No storage of this coordinator is the one the image is in.
    #[error("this coordinator does not read storage {storage} (start it with --images {storage})")]
    NotRead {
        /// The storage URL, credentials removed.
        storage: String,
    },
    /// The storage is read but has no such object.
    #[error("the image is missing from storage {storage}")]
    Missing {
        /// The storage URL, credentials removed.
        storage: String,
    },
    /// The bytes read do not have the recorded sha256 (logged as corrupt).
    #[error("the stored image does not match its recorded sha256")]
    Corrupt,
    /// The storage failed (logged).
    #[error("storage unavailable")]
    Failed,
}

/// A completed cell with what naming and fetching its image needs.
#[derive(Debug)]
pub(super) struct Completed {
    /// The row.
    pub cell: CellRow,
    /// Its result.
    pub result: RenderResult,
    /// Its seed.
    pub seed: u64,
}

impl Completed {
    /// `row` if it is completed with a result; a stored result or spec that does not parse
    /// is corrupt.
    pub fn from_row(cell: CellRow) -> crate::Result<Option<Completed>> {
        #[derive(Deserialize)]
        struct Seed {
            seed: u64,
        }
        let Some(json) = cell
            .result_json
            .as_deref()
            .filter(|_| cell.state == CellState::Completed)
        else {
            return Ok(None);
        };
        let result = RenderResult::from_json(json)?;
        let seed = serde_json::from_str::<Seed>(&cell.spec_json)
            .map_err(|e| crate::Error::Corrupt(format!("cells.spec: {e}")))?
            .seed;
        Ok(Some(Completed { cell, result, seed }))
    }

    /// The image's file name: `{sweep}-{number:06}-{seed}.png`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{:06}-{}.png",
            self.cell.sweep_id, self.cell.number, self.seed
        )
    }
}

/// Cell `id` (text from the URL) if `caller` may see it and it is completed.
async fn completed(web: &Web, caller: &Principal, id: &str) -> Result<Completed, WebError> {
    let no_such = || WebError::NotFound(format!("no cell {}", shown(id)));
    let id = id
        .parse::<u64>()
        .ok()
        .and_then(CellId::from_wire)
        .ok_or_else(no_such)?;
    let cell = web.cell(caller, id).await?;
    let state = cell.state;
    Completed::from_row(cell)?.ok_or_else(|| {
        WebError::NotFound(format!(
            "cell {id} is {state}: only completed cells have an image"
        ))
    })
}

/// The PNG of a completed cell, checked against its recorded sha256.
pub(super) async fn fetch(images: &dyn ImageSource, c: &Completed) -> Result<Vec<u8>, Unavailable> {
    let r = &c.result;
    let storage = || shown(&r.storage);
    let bytes = match images.get(&r.storage, &r.object_key).await {
        Ok(Some(b)) => b,
        Ok(None) if images.reads(&r.storage) => {
            return Err(Unavailable::Missing { storage: storage() });
        }
        Ok(None) => return Err(Unavailable::NotRead { storage: storage() }),
        Err(e) => {
            tracing::warn!(cell = %c.cell.id, error = %e, "reading an image failed");
            return Err(Unavailable::Failed);
        }
    };
    let want = r.sha256.to_ascii_lowercase();
    let (bytes, matches) = tokio::task::spawn_blocking(move || {
        let got = hex::encode(Sha256::digest(&bytes));
        (bytes, got == want)
    })
    .await
    .map_err(|_| Unavailable::Failed)?;
    if !matches {
        tracing::error!(
            cell = %c.cell.id, storage = %storage(), key = %r.object_key,
            "corrupt image: its sha256 is not the one its result records"
        );
        return Err(Unavailable::Corrupt);
    }
    Ok(bytes)
}

/// Text from a URL or a result, fit to show: credentials (`user:pass@`) removed, at most 200
/// characters.
pub(super) fn shown(s: &str) -> String {
    let s = match s.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
                None => s.to_string(),
            }
        }
        None => s.to_string(),
    };
    match s.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_never_shown() {
        assert_eq!(shown("s3://renders/farm"), "s3://renders/farm");
        assert_eq!(shown("s3://key:secret@renders/farm"), "s3://renders/farm");
        assert_eq!(shown("https://a@b@host/x@y"), "https://host/x@y");
        assert_eq!(shown("file:///srv/kiln"), "file:///srv/kiln");
        assert_eq!(shown(&"x".repeat(300)).chars().count(), 201);
    }

    #[test]
    fn unavailable_images_say_why_without_credentials() {
        let not_read = Unavailable::NotRead {
            storage: shown("s3://ak:sk@bucket/p"),
        };
        assert_eq!(
            not_read.to_string(),
            "this coordinator does not read storage s3://bucket/p (start it with --images \
             s3://bucket/p)"
        );
        let r = Failure::Image(not_read).into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = Failure::Image(Unavailable::Failed).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let r = Failure::Image(Unavailable::Corrupt).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
