//! The embedded CSS and JavaScript: served from the binary, so the UI works on a LAN without
//! internet (no CDN, no build step). Paths carry the crate version, so a new binary's assets
//! are never mistaken for cached ones.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::state::Web;

/// Where the stylesheet is served.
pub(super) const CSS_PATH: &str = concat!("/assets/kiln-", env!("CARGO_PKG_VERSION"), ".css");
/// Where the script is served.
pub(super) const JS_PATH: &str = concat!("/assets/kiln-", env!("CARGO_PKG_VERSION"), ".js");

const CSS: &str = include_str!("assets/kiln.css");
const JS: &str = include_str!("assets/kiln.js");
const CACHE: &str = "public, max-age=86400";

pub(super) fn routes() -> Router<Web> {
    Router::new()
        .route(
            CSS_PATH,
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                        (header::CACHE_CONTROL, CACHE),
                    ],
                    CSS,
                )
                    .into_response()
            }),
        )
        .route(
            JS_PATH,
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, CACHE),
                    ],
                    JS,
                )
                    .into_response()
            }),
        )
}
