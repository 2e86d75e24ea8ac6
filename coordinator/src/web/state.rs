//! What every handler of the web UI shares: [`Web`] (the queue, the image source, the
//! thumbnail cache, the security settings), the lookups that check who may see what, and
//! [`WebError`], an error as the browser sees it (a status and words that reveal nothing
//! internal).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_proto::CellId;

use super::page;
use super::source::ImageSource;
use super::thumbs::Thumbs;
use crate::domain::auth::Principal;
use crate::domain::rows::{CellRow, SweepRow};
use crate::query::{Filter, Pos, parse_sort};
use crate::queue::Queue;
use crate::store::CellQuery;
use crate::{Error, Result};

/// The state every handler shares.
#[derive(Clone)]
pub(crate) struct Web {
    pub(super) queue: Queue,
    pub(super) images: Arc<dyn ImageSource>,
    pub(super) thumbs: Arc<Thumbs>,
    /// Whether callers need a token (else every caller is [`Principal::open`]).
    pub(super) require_tokens: bool,
    /// Whether the port serves TLS (the cookie is then `Secure`).
    pub(super) tls: bool,
    /// Turns true when the coordinator stops: live streams end, so shutdown never waits on
    /// an open browser tab.
    pub(super) stopping: tokio::sync::watch::Receiver<bool>,
}

/// Most rows one gallery or X/Y page shows.
pub(crate) const MAX_PAGE: i64 = 500;

impl Web {
    /// Sweep `id`, if `caller` may see it.
    pub(crate) async fn sweep(
        &self,
        caller: &Principal,
        id: kiln_proto::SweepId,
    ) -> Result<SweepRow> {
        let sweep = self.queue.sweep(id).await?;
        caller.may_see(sweep.owner.as_deref())?;
        Ok(sweep)
    }

    /// Cell `id`, if `caller` may see its sweep.
    pub(crate) async fn cell(&self, caller: &Principal, id: CellId) -> Result<CellRow> {
        let cell = self.queue.cell(id).await?;
        self.sweep(caller, cell.sweep_id).await?;
        Ok(cell)
    }

    /// The query a filter-language `filter` and `--sort` text make for `caller`, its names
    /// checked (unknown sweeps and binding keys are refused with what exists).
    pub(crate) async fn cell_query(
        &self,
        caller: &Principal,
        filter: &str,
        sort: &str,
        limit: i64,
        offset: i64,
    ) -> Result<CellQuery> {
        let (filter, located): (Option<Filter>, Vec<(String, Pos)>) = if filter.trim().is_empty() {
            (None, Vec::new())
        } else {
            let (f, keys) = Filter::parse_located(filter)?;
            (Some(f), keys)
        };
        let q = CellQuery {
            owner: caller.only_owner().map(str::to_string),
            filter,
            sorts: if sort.trim().is_empty() {
                Vec::new()
            } else {
                parse_sort(sort)?
            },
            limit: limit.clamp(1, MAX_PAGE),
            offset: offset.max(0),
            ..Default::default()
        };
        self.queue.check_names(&q, &located).await?;
        Ok(q)
    }
}

/// A sweep id from a path segment; anything else is a page that does not exist.
pub(crate) fn sweep_id(s: &str) -> WebResult<kiln_proto::SweepId> {
    s.parse()
        .ok()
        .and_then(kiln_proto::SweepId::from_wire)
        .ok_or_else(|| WebError::NotFound(format!("no sweep {:?}", short_id(s))))
}

/// A cell id from a path segment; anything else is a page that does not exist.
pub(crate) fn cell_id(s: &str) -> WebResult<CellId> {
    s.parse()
        .ok()
        .and_then(CellId::from_wire)
        .ok_or_else(|| WebError::NotFound(format!("no cell {:?}", short_id(s))))
}

/// At most 20 characters of an id given in a path, for an error message.
fn short_id(s: &str) -> String {
    s.chars().take(20).collect()
}

/// An error as the browser sees it: a status and a message that reveals nothing internal.
#[derive(Debug)]
pub(crate) enum WebError {
    /// 400, with the message shown to the user (a parser error, a bad parameter).
    BadRequest(String),
    /// 401: not signed in.
    Unauthenticated,
    /// 403.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 500; the cause is logged, not shown.
    Internal,
}

impl WebError {
    /// The status and the text shown for it.
    pub(crate) fn parts(&self) -> (StatusCode, String) {
        match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            Self::Unauthenticated => (StatusCode::UNAUTHORIZED, "sign in with a token".into()),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, m.clone()),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            Self::Conflict(m) => (StatusCode::CONFLICT, m.clone()),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (the coordinator's log has it)".into(),
            ),
        }
    }
}

impl From<Error> for WebError {
    fn from(e: Error) -> Self {
        match e {
            Error::SweepNotFound(_) | Error::CellNotFound(_) | Error::WorkerNotFound(_) => {
                Self::NotFound(e.to_string())
            }
            Error::Invalid(m) | Error::TooLarge(m) => Self::BadRequest(m),
            Error::Unauthenticated(_) => Self::Unauthenticated,
            Error::PermissionDenied(m) => Self::Forbidden(m),
            Error::Conflict(m) | Error::Busy(m) => Self::Conflict(m),
            Error::NameTaken { .. } => Self::Conflict(e.to_string()),
            other => {
                tracing::error!(error = %other, "web request failed");
                Self::Internal
            }
        }
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, message) = self.parts();
        (status, page::error_page(status, &message)).into_response()
    }
}

/// A handler's result.
pub(crate) type WebResult<T> = std::result::Result<T, WebError>;
