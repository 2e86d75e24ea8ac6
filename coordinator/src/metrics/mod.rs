//! The coordinator's Prometheus metrics, served as `GET /metrics` (OpenMetrics text, through
//! the `prometheus-client` crate) on the coordinator's own port, beside the gRPC services and
//! whether or not the web UI is on.
//!
//! Two kinds of numbers:
//! - counters of events, counted where they happen ([`Counters`], held by the queue): cells
//!   leased, completes accepted, failures by class (an expired lease is a failure of class
//!   `lease_expired`, counted by the maintenance pass that rescues it). They start at zero
//!   when the coordinator starts, as Prometheus counters do; `rate()` copes with restarts.
//! - gauges of state, read from the store at scrape time by one [`Store::farm_snapshot`]
//!   (three aggregate reads): cells per state of the newest [`SWEEPS_SHOWN`] sweeps, workers
//!   per state, the age of the oldest available cell. Only the newest sweeps get series, so
//!   the number of series stays bounded (8 states × [`SWEEPS_SHOWN`] sweeps) however many
//!   sweeps the database holds, and a finished sweep keeps showing its final counts until
//!   newer sweeps push it out.
//!
//! Who may scrape: the callers who may read. On a coordinator without tokens, anyone who can
//! reach the port (loopback unless told otherwise); with `--require-tokens`, a caller with
//! `authorization: Bearer <token>` of any scope that reads (Prometheus's `authorization`
//! setting with a `read` token). A read token's scrape shows only its owner's sweeps, as
//! `kiln sweeps` does; an admin token's shows every sweep. Farm-wide counters show to every
//! reader. It never knows SQL or gRPC statuses.
//!
//! [`Store::farm_snapshot`]: crate::store::Store::farm_snapshot

use crate::domain::auth::Principal;
use crate::domain::state::Scope;
use crate::queue::Queue;
use crate::{Error, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub mod counters;

pub use counters::{Counters, SWEEPS_SHOWN};

/// The content type of the OpenMetrics text format, which Prometheus asks for first.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition for `caller`: the counters, and the snapshot of the sweeps it may see.
pub async fn scrape(queue: &Queue, caller: &Principal) -> Result<String> {
    caller.require(Scope::Read)?;
    let now = queue.now();
    let snapshot = queue
        .store()
        .farm_snapshot(
            SWEEPS_SHOWN,
            caller.only_owner(),
            now.plus(-queue.config().lease_ttl_ms),
        )
        .await?;
    Ok(queue.counters().render(&snapshot, now.0))
}

#[derive(Clone)]
struct Scraped {
    queue: Queue,
    require_tokens: bool,
}

/// The `/metrics` route, for [`crate::server`] to merge beside the gRPC services.
pub fn router(queue: Queue, require_tokens: bool) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Scraped {
            queue,
            require_tokens,
        })
}

async fn metrics(State(s): State<Scraped>, headers: HeaderMap) -> Response {
    let caller = if s.require_tokens {
        match crate::api::bearer(&headers) {
            Some(token) => s.queue.principal(token).await,
            None => Err(Error::Unauthenticated("no bearer token".into())),
        }
    } else {
        Ok(Principal::open())
    };
    let out = match caller {
        Ok(p) => scrape(&s.queue, &p).await,
        Err(e) => Err(e),
    };
    match out {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(Error::Unauthenticated(_)) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this coordinator requires a token: authorization: Bearer <read token>\n",
        )
            .into_response(),
        Err(e @ Error::PermissionDenied(_)) => {
            (StatusCode::FORBIDDEN, format!("{e}\n")).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}
