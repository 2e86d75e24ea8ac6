//! A sweep's page (`/sweeps/{id}`): its progress, its plan (the sweep file as submitted, with
//! the files it referenced, and the binding keys its cells vary by), and its failed attempts
//! grouped by reason, each group with the cells, attempts and workers it happened on.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use maud::{Markup, html};

use super::auth::Caller;
use super::overview::sweep_line;
use super::page;
use super::state::{Web, WebResult};
use crate::domain::state::FailureClass;
use crate::store::KeyScope;

/// Cells with failures read for the page.
const FAILED_CELLS_READ: i64 = 2_000;
/// Attempts listed under each reason.
const ATTEMPTS_LISTED: usize = 12;

pub(super) fn routes() -> Router<Web> {
    Router::new().route("/sweeps/{id}", get(sweep_page))
}

/// The sweep file as stored (`queue::stored_source`): its text and the files it referenced.
#[derive(serde::Deserialize, Default)]
struct Stored {
    #[serde(default)]
    path: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    files: BTreeMap<String, String>,
}

/// One reason: attempts that failed with the same class and first line of message.
struct Reason {
    class: FailureClass,
    message: String,
    /// (cell, number, attempt, worker)
    attempts: Vec<(i64, i64, i32, i64)>,
}

async fn sweep_page(
    State(web): State<Web>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> WebResult<Markup> {
    let id = super::state::sweep_id(&id)?;
    let sweep = web.sweep(&who, id).await?;
    let line = sweep_line(&web, &sweep).await?;
    let stored: Stored = web
        .queue
        .store()
        .sweep_spec(id)
        .await
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let scope = KeyScope {
        sweeps: Some(vec![id]),
        owner: None,
    };
    let keys = web.queue.store().binding_keys(&scope, 100).await?;
    let failed = web
        .queue
        .store()
        .sweep_failures(id, FAILED_CELLS_READ)
        .await?;
    let mut reasons: Vec<Reason> = Vec::new();
    for c in &failed {
        for e in &c.errors {
            let message = e.message.lines().next().unwrap_or("").to_string();
            let at = reasons
                .iter()
                .position(|r| r.class == e.class && r.message == message);
            let r = match at {
                Some(i) => &mut reasons[i],
                None => {
                    reasons.push(Reason {
                        class: e.class,
                        message,
                        attempts: Vec::new(),
                    });
                    reasons.last_mut().expect("just pushed")
                }
            };
            r.attempts.push((c.cell.0, c.number, e.attempt, e.worker));
        }
    }
    reasons.sort_by_key(|r| std::cmp::Reverse(r.attempts.len()));
    let gallery = format!("/gallery?q={}", urlencode(&format!("sweep = {}", id.0)));
    Ok(page::frame(
        &sweep.name,
        html! {
            h1 { "Sweep #" (id.0) " " (sweep.name) " "
                span class={"state " (line.state)} { @if line.finished { "finished" } @else { (line.state) } } }
            p.dim {
                "created " (page::time(sweep.created_at)) " UTC · priority " (sweep.priority)
                " · up to " (sweep.max_attempts) " attempts"
                @if let Some(o) = &sweep.owner { " · owner " (o) }
            }
            p { a href=(gallery) { "Gallery" } " · " a href={"/xy?q=" (urlencode(&format!("sweep = {}", id.0)))} { "X/Y view" } }
            h2 { "Progress" }
            table {
                thead { tr {
                    th.num { "done" } th.num { "failed" } th.num { "running" } th.num { "waiting" }
                    th.num { "cancelled" } th.num { "total" } th.num { "images/s" } th.num { "ETA" }
                } }
                tbody { tr {
                    td.num { (line.done) } td.num { (line.failed) } td.num { (line.running) }
                    td.num { (sweep.counts.available + sweep.counts.scheduled + sweep.counts.retryable + sweep.counts.held) }
                    td.num { (sweep.counts.cancelled) } td.num { (line.total) }
                    td.num { (format!("{:.2}", line.rate)) }
                    td.num { @if line.finished { "done" } @else { (page::duration(line.eta_ms)) } }
                } }
            }
            h2 { "Plan" }
            p { (line.total) " cells, varied by: "
                @if keys.is_empty() { span.dim { "nothing (one prompt, one setting)" } }
                @for (i, k) in keys.iter().enumerate() {
                    @if i > 0 { ", " }
                    code { (k) }
                }
            }
            @if !stored.text.is_empty() {
                details open {
                    summary { code { (if stored.path.is_empty() { "sweep file" } else { &stored.path }) } }
                    pre.infotext { (stored.text) }
                }
            }
            @for (name, text) in &stored.files {
                details {
                    summary { code { (name) } " (" (text.lines().count()) " lines)" }
                    pre.infotext { (text) }
                }
            }
            h2 { "Failures" }
            @if reasons.is_empty() {
                p.dim { "No failed attempts." }
            } @else {
                table.failures {
                    thead { tr { th.num { "attempts" } th { "class" } th { "reason" } th { "cell / attempt / worker" } } }
                    tbody {
                        @for r in &reasons {
                            tr {
                                td.num { (r.attempts.len()) }
                                td { (r.class) }
                                td.error { (r.message) }
                                td {
                                    @for (cell, number, attempt, worker) in r.attempts.iter().take(ATTEMPTS_LISTED) {
                                        div { a href={"/cells/" (cell)} { "cell " (cell) " (#" (number) ")" }
                                            " attempt " (attempt) " on worker " (worker) }
                                    }
                                    @if r.attempts.len() > ATTEMPTS_LISTED {
                                        div.dim { "and " (r.attempts.len() - ATTEMPTS_LISTED) " more" }
                                    }
                                }
                            }
                        }
                    }
                }
                @if failed.len() as i64 == FAILED_CELLS_READ {
                    p.dim { "The first " (FAILED_CELLS_READ) " cells with failures are counted." }
                }
            }
        },
    ))
}

/// `s` percent-encoded for a query string value.
pub(super) fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
