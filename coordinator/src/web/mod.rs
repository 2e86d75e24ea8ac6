//! The web UI: a farm overview with live progress, sweep pages, a gallery queried with the
//! filter language, an X/Y view and keepers, served as HTML (maud, escaped by default) with
//! a little JavaScript, every asset embedded in the binary.
//!
//! It is routes on the coordinator's own port ([`crate::server`] merges [`router`] beside the
//! gRPC services and accepts HTTP/1.1 there), so it serves exactly where the gRPC API serves:
//! the same address, the same TLS, and the same tokens ([`auth`]: the token a user signs in
//! with is kept in an HttpOnly, SameSite=Strict cookie and resolved per request through
//! [`Queue::principal`], as the gRPC layer does). It calls the same [`Queue`] and query code as
//! `api/`; it never reads a database or storage by itself: images come through an
//! [`ImageSource`] the binary wires in (the storages it was told to read).
//!
//! # Layout
//! - [`auth`]: the caller of a request, sign-in and sign-out, the CSRF rule for changes.
//! - [`state`]: what every handler shares ([`state::Web`]), errors as the browser sees them.
//! - [`page`]: the page frame, the sign-in form, formatting helpers, the error page.
//! - [`overview`]: `/`: sweeps and workers, live over server-sent events; sweep actions.
//! - [`sweep`]: `/sweeps/{id}`: plan, progress, failures grouped by reason.
//! - [`gallery`]: `/gallery`, `/cells/{id}`, keepers, binding keys for the query box.
//! - [`xy`]: `/xy`: one or two bindings as axes, in the browser and as a PNG.
//! - [`images`]: full images and thumbnails ([`thumbs`]) read through an [`ImageSource`]
//!   ([`source`]); `zip`: everything a query matches, streamed.
//! - [`assets`]: the embedded CSS and JavaScript.

mod assets;
pub mod auth;
mod gallery;
pub mod images;
mod overview;
mod page;
mod source;
mod state;
mod sweep;
pub mod thumbs;
mod xy;
mod zip;

use std::sync::Arc;

use axum::Router;
use axum::response::{IntoResponse, Response};

use crate::queue::Queue;
use state::Web;
use state::WebError;

pub use source::{ImageError, ImageSource, NoImages};
pub use thumbs::Thumbs;

/// What the web UI needs besides the queue.
#[derive(Clone)]
pub struct WebOptions {
    /// Where result images are read from.
    pub images: Arc<dyn ImageSource>,
    /// The thumbnail cache.
    pub thumbs: Arc<Thumbs>,
}

impl std::fmt::Debug for WebOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebOptions").finish_non_exhaustive()
    }
}

/// The web UI's routes, for [`crate::server`] to merge beside the gRPC services.
pub fn router(
    queue: Queue,
    options: WebOptions,
    require_tokens: bool,
    tls: bool,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let web = Web {
        queue,
        images: options.images,
        thumbs: options.thumbs,
        require_tokens,
        tls,
        stopping,
    };
    Router::new()
        .merge(assets::routes())
        .merge(auth::routes())
        .merge(overview::routes())
        .merge(sweep::routes())
        .merge(gallery::routes())
        .merge(xy::routes())
        .merge(images::routes())
        .merge(zip::routes())
        .with_state(web)
}

/// What answers a path no route has, on the merged port: a gRPC "unimplemented" to a gRPC
/// client, a 404 page to anyone else.
pub async fn fallback(request: axum::extract::Request) -> Response {
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unimplemented("")
            .into_http::<axum::body::Body>()
            .map(axum::body::Body::new)
    } else {
        WebError::NotFound("no such page".into()).into_response()
    }
}
