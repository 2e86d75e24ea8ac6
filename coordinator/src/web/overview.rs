//! The farm overview (`/`): every sweep with its progress (done, failed, running, total,
//! images/s, ETA) and every worker (device, current cell and step, images/s, last seen, recent
//! errors), kept live by server-sent events (`/events`, an event on each queue change, at most
//! every [`DEBOUNCE`], and every [`TICK`] for rates); and the sweep actions (pause, resume,
//! cancel, retry failed) as `POST /sweeps/{id}/{action}`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use futures::Stream;
use maud::html;
use serde::Serialize;

use super::auth::{Caller, Changer};
use super::page;
use super::state::{Web, WebError, WebResult};
use crate::domain::auth::Principal;
use crate::domain::rows::{SweepRow, WorkerRow};
use crate::domain::state::SweepState;
use crate::queue::RecentFailure;

/// Changes closer together than this make one event.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// An event at least this often (rates and "last seen" move without changes).
const TICK: Duration = Duration::from_secs(2);
/// Sweeps shown, newest first.
const SWEEPS_SHOWN: i64 = 50;
/// Recent errors shown per worker.
const ERRORS_SHOWN: usize = 3;

pub(super) fn routes() -> Router<Web> {
    Router::new()
        .route("/", get(overview))
        .route("/events", get(events))
        .route("/sweeps/{id}/{action}", post(action))
}

/// One sweep's line.
#[derive(Serialize, Debug, PartialEq)]
pub(super) struct SweepLine {
    pub id: i64,
    pub name: String,
    pub state: &'static str,
    pub finished: bool,
    pub done: u64,
    pub failed: u64,
    pub running: u64,
    pub total: u64,
    /// Images per second (last minute, or the sweep's life when shorter).
    pub rate: f64,
    /// Time left at that rate; -1 when unknown.
    pub eta_ms: i64,
}

/// One worker's line.
#[derive(Serialize, Debug, PartialEq)]
struct WorkerLine {
    id: i64,
    name: String,
    /// online, offline or drained.
    status: &'static str,
    device: String,
    cell: Option<i64>,
    step: i64,
    total: i64,
    rate: f64,
    last_seen: String,
    errors: Vec<ErrorLine>,
}

#[derive(Serialize, Debug, PartialEq)]
struct ErrorLine {
    text: String,
    at_text: String,
}

/// What the overview shows, as the page embeds it and `/events` sends it.
#[derive(Serialize, Debug, PartialEq)]
struct Farm {
    at: String,
    sweeps: Vec<SweepLine>,
    workers: Vec<WorkerLine>,
}

/// A sweep's line: counts from `s`, the rate asked of the queue for unfinished sweeps.
pub(super) async fn sweep_line(web: &Web, s: &SweepRow) -> crate::Result<SweepLine> {
    let c = &s.counts;
    let remaining = c.available + c.scheduled + c.running + c.retryable + c.held;
    let rate = if remaining > 0 {
        web.queue
            .sweep_rate(s.id, crate::clock::Millis(s.created_at))
            .await?
    } else {
        0.0
    };
    let eta_ms = match remaining {
        0 => 0,
        _ if rate > 0.0 => (remaining as f64 / rate * 1000.0) as i64,
        _ => -1,
    };
    Ok(SweepLine {
        id: s.id.0,
        name: s.name.clone(),
        state: s.state.as_str(),
        finished: remaining == 0 && s.state != SweepState::Paused,
        done: c.completed,
        failed: c.discarded,
        running: c.running,
        total: c.total(),
        rate,
        eta_ms,
    })
}

fn worker_line(
    web: &Web,
    w: WorkerRow,
    running: &[crate::domain::rows::ProgressRow],
    failures: &[RecentFailure],
) -> WorkerLine {
    let now = web.queue.now().0;
    let ttl = web.queue.config().lease_ttl_ms;
    let status = if w.drained {
        "drained"
    } else if now - w.last_seen_at <= ttl {
        "online"
    } else {
        "offline"
    };
    let current = running.iter().find(|p| p.worker == w.id);
    let errors = failures
        .iter()
        .rev()
        .filter(|f| f.worker == w.id)
        .take(ERRORS_SHOWN)
        .map(|f| ErrorLine {
            text: format!(
                "cell {} attempt {}: {}: {}",
                f.cell.0,
                f.attempt.0,
                f.class,
                short(&f.message)
            ),
            at_text: page::time(f.at),
        })
        .collect();
    WorkerLine {
        id: w.id.0,
        name: w.info.name,
        status,
        device: if w.info.device_model.is_empty() {
            w.info.device_kind.to_string()
        } else {
            format!("{} · {}", w.info.device_kind, w.info.device_model)
        },
        cell: current.map(|p| p.cell.0),
        step: current.map_or(0, |p| p.step),
        total: current.map_or(0, |p| p.total),
        rate: w.completed_recently as f64 / 60.0,
        last_seen: format!("{} ago", page::duration((now - w.last_seen_at).max(0))),
        errors,
    }
}

/// The first line of a message, at most 160 characters.
fn short(m: &str) -> String {
    let line = m.lines().next().unwrap_or("");
    match line.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

async fn farm(web: &Web, caller: &Principal) -> crate::Result<Farm> {
    let rows = web
        .queue
        .sweeps(SWEEPS_SHOWN, None, caller.only_owner())
        .await?;
    let mut sweeps = Vec::with_capacity(rows.len());
    for s in &rows {
        sweeps.push(sweep_line(web, s).await?);
    }
    let running = web.queue.running(None, None).await?;
    let failures = web.queue.recent_failures();
    let workers = web
        .queue
        .workers()
        .await?
        .into_iter()
        .map(|w| worker_line(web, w, &running, &failures))
        .collect();
    Ok(Farm {
        at: page::time(web.queue.now().0),
        sweeps,
        workers,
    })
}

async fn overview(State(web): State<Web>, Caller(who): Caller) -> WebResult<maud::Markup> {
    let farm = farm(&web, &who).await?;
    let json = serde_json::to_string(&farm).map_err(|_| WebError::Internal)?;
    Ok(page::frame(
        "Farm",
        html! {
            div #farm data-farm=(json) {
                h1 { "Farm " span #live.dim { "connecting…" } }
                p #action-result.dim {}
                h2 { "Sweeps" }
                table.sweeps {
                    thead { tr {
                        th { "sweep" } th { "state" } th { "progress" }
                        th.num { "done" } th.num { "failed" } th.num { "running" } th.num { "total" }
                        th.num { "images/s" } th.num { "ETA" } th {} th { "actions" }
                    } }
                    tbody #sweeps-body {}
                }
                h2 { "Workers" }
                table.workers {
                    thead { tr {
                        th { "worker" } th { "status" } th { "device" } th { "rendering" }
                        th.num { "step" } th.num { "images/s" } th { "last seen" } th { "recent errors" }
                    } }
                    tbody #workers-body {}
                }
            }
        },
    ))
}

async fn events(
    State(web): State<Web>,
    Caller(who): Caller,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = web.queue.events().subscribe();
    let stopping = web.stopping.clone();
    let stream = futures::stream::unfold(
        (web, who, changes, stopping, true),
        |(web, who, mut changes, mut stopping, first)| async move {
            let stopped = *stopping.borrow();
            if stopped {
                return None;
            }
            if !first {
                tokio::select! {
                    _ = changes.changed() => tokio::time::sleep(DEBOUNCE).await,
                    _ = tokio::time::sleep(TICK) => {}
                    _ = async { stopping.wait_for(|s| *s).await.is_ok() } => return None,
                }
            }
            let event = match farm(&web, &who).await {
                Ok(f) => Event::default()
                    .event("farm")
                    .json_data(&f)
                    .unwrap_or_else(|_| Event::default().comment("unserialisable")),
                Err(e) => {
                    tracing::warn!(error = %e, "farm overview");
                    Event::default().comment("unavailable")
                }
            };
            Some((Ok(event), (web, who, changes, stopping, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Serialize)]
struct Done {
    message: String,
}

async fn action(
    State(web): State<Web>,
    Changer(who): Changer,
    Path((id, action)): Path<(String, String)>,
) -> WebResult<Json<Done>> {
    let id = super::state::sweep_id(&id)?;
    web.sweep(&who, id).await?;
    let message = match action.as_str() {
        "pause" => format!("sweep {}: {} cells held", id.0, web.queue.pause(id).await?),
        "resume" => format!(
            "sweep {}: {} cells released",
            id.0,
            web.queue.resume(id).await?
        ),
        "cancel" => {
            let (cancelled, asked) = web.queue.cancel(id).await?;
            format!(
                "sweep {}: {cancelled} cells cancelled, {asked} running cells asked to stop",
                id.0
            )
        }
        "retry" => format!(
            "sweep {}: {} failed cells queued again",
            id.0,
            web.queue.retry_failed(id).await?
        ),
        _ => return Err(WebError::NotFound("no such action".into())),
    };
    Ok(Json(Done { message }))
}
