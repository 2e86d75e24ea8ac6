//! The gallery (`/gallery`): completed cells matching a filter-language query, sorted as
//! `kiln query --sort` sorts, 100 thumbnails a page (the next pages come by infinite scroll or
//! links); the count of matches (`/gallery/count`, fetched after the page paints); the binding
//! keys offered as one types (`/keys`); an image's page (`/cells/{id}`) with every parameter,
//! binding, timing and the A1111 infotext; and keepers (`POST /cells/{id}/keeper`).

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::auth::{Caller, Changer};
use super::page;
use super::state::{Web, WebError, WebResult};
use super::sweep::urlencode;
use crate::domain::auth::Principal;
use crate::domain::rows::CellRow;
use crate::domain::state::CellState;
use crate::query::{Column, Field, parse_sort};
use crate::result::RenderResult;
use crate::store::{CellQuery, KeyScope};
use crate::sweep::CellSpec;

/// Thumbnails per page.
pub(super) const PER_PAGE: i64 = 100;
/// Binding keys offered by the query box.
const KEYS_OFFERED: usize = 200;
/// The fields of the filter language, offered with the binding keys.
const FIELDS: &[&str] = &[
    "sweep", "seed", "cfg", "steps", "sampler", "model", "prompt", "negative", "width", "height",
    "state", "worker", "device", "finished", "starred", "rating",
];

pub(super) fn routes() -> Router<Web> {
    Router::new()
        .route("/gallery", get(gallery))
        .route("/gallery/count", get(count))
        .route("/keys", get(keys))
        .route("/cells/{id}", get(cell_page))
        .route("/cells/{id}/keeper", post(keeper))
}

/// The gallery's parameters.
#[derive(Deserialize, Default, Debug)]
pub(super) struct GalleryParams {
    /// The filter (filter language).
    #[serde(default)]
    pub q: String,
    /// `--sort` keys.
    #[serde(default)]
    pub sort: String,
    /// Page, from 1.
    pub page: Option<u32>,
    /// Only the tiles (for infinite scroll).
    pub fragment: Option<u8>,
    /// Newest-first pages: start after this `FINISHED.ID` (the last tile of the page before).
    pub before: Option<String>,
}

/// The query for completed cells matching `q`, sorted by `sort`.
pub(super) async fn completed(
    web: &Web,
    who: &Principal,
    q: &str,
    sort: &str,
    limit: i64,
    offset: i64,
) -> WebResult<CellQuery> {
    let mut query = web.cell_query(who, q, sort, limit, offset).await?;
    query.states = vec![CellState::Completed];
    // Without a sort: a sweep's images in plan order, the farm's newest first (both served by
    // an index; plan order across every sweep is not: see BENCHMARKS.md, "Web gallery").
    let one_sweep = query
        .filter
        .as_ref()
        .and_then(crate::query::sweep_scope)
        .is_some();
    if sort.trim().is_empty() && !one_sweep {
        query.sorts = parse_sort("-finished").map_err(crate::Error::from)?;
    }
    Ok(query)
}

/// Whether `q` pages newest first (`-finished`), where the next page starts after the last
/// row seen (`before=FINISHED.ID`) rather than at an offset: deep pages stay on the index.
fn newest_first(q: &CellQuery) -> bool {
    matches!(q.sorts.as_slice(), [k] if k.descending && k.field == Field::Column(Column::Finished))
}

/// `before=FINISHED.ID` as given by a "more" link; anything else is ignored.
fn position(s: Option<&str>) -> Option<(i64, i64)> {
    let (at, id) = s?.split_once('.')?;
    Some((at.parse().ok()?, id.parse().ok()?))
}

/// The page of the gallery; a bad query is shown in place, with the parser's words.
async fn gallery(
    State(web): State<Web>,
    Caller(who): Caller,
    Query(p): Query<GalleryParams>,
) -> Response {
    let page = p.page.unwrap_or(1).clamp(1, 100_000);
    let offset = i64::from(page - 1) * PER_PAGE;
    let mut keyset = false;
    let rows = match completed(&web, &who, &p.q, &p.sort, PER_PAGE, offset).await {
        Ok(mut q) => {
            keyset = newest_first(&q);
            if keyset && let Some(at) = position(p.before.as_deref()) {
                q.finished_before = Some(at);
                q.offset = 0;
            }
            web.queue.query(&q).await.map_err(WebError::from)
        }
        Err(e) => Err(e),
    };
    if p.fragment == Some(1) {
        return match rows {
            Ok(rows) => tiles(&rows, &p, page, keyset).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let (status, body) = match rows {
        Ok(rows) => (
            StatusCode::OK,
            html! {
                p #count.count data-src={"/gallery/count?q=" (urlencode(&p.q))} { "counting…" }
                @if rows.is_empty() { p.dim { "Nothing completed matches." } }
                div #grid.grid { (tiles(&rows, &p, page, keyset)) }
            },
        ),
        Err(WebError::BadRequest(m)) => (
            StatusCode::BAD_REQUEST,
            html! { p #query-error.error { (m) } },
        ),
        Err(e) => return e.into_response(),
    };
    let download = format!(
        "/download.zip?q={}&sort={}",
        urlencode(&p.q),
        urlencode(&p.sort)
    );
    (
        status,
        page::frame(
            "Gallery",
            html! {
                h1 { "Gallery" }
                form.query method="get" action="/gallery" {
                    input #q type="text" name="q" value=(p.q) list="q-keys" autocomplete="off" spellcheck="false"
                        placeholder="sweep = \"foxes\" and animal = \"fox\" and cfg >= 1.5";
                    datalist #q-keys {}
                    input type="text" name="sort" value=(p.sort) placeholder="sort: -seed, cfg, b.animal" size="18";
                    button type="submit" { "Search" }
                    a.button href=(download) { "Download all (zip)" }
                    a.button href={"/xy?q=" (urlencode(&p.q))} { "X/Y" }
                }
                (body)
            },
        ),
    )
        .into_response()
}

/// The tiles of one page, and the link to the next when there may be one: after the last
/// row's position when `keyset`, else the next page number.
fn tiles(rows: &[CellRow], p: &GalleryParams, page: u32, keyset: bool) -> Markup {
    let base = format!("/gallery?q={}&sort={}", urlencode(&p.q), urlencode(&p.sort));
    let next = match rows.last() {
        Some(c) if keyset => format!("{base}&before={}.{}", c.finalized_at.unwrap_or(0), c.id.0),
        _ => format!("{base}&page={}", page + 1),
    };
    html! {
        @for c in rows {
            @let spec = serde_json::from_str::<CellSpec>(&c.spec_json).ok();
            a.tile href={"/cells/" (c.id.0)} data-cell=(c.id.0) {
                img src={"/thumbs/" (c.id.0)} loading="lazy" alt={"cell " (c.id.0)};
                @if c.starred { span.star title="starred" { "★" } }
                div.cap title=(spec.as_ref().map_or(String::new(), |s| s.prompt.clone())) {
                    "#" (c.number)
                    @if let Some(s) = &spec {
                        " · " (s.seed)
                        @for (k, v) in &s.bindings { " · " (k) "=" (v) }
                    }
                }
            }
        }
        @if rows.len() as i64 == PER_PAGE {
            a #more href=(next) {
                "more"
            }
        }
    }
}

#[derive(Deserialize)]
struct CountParams {
    #[serde(default)]
    q: String,
}

#[derive(Serialize)]
struct Counted {
    count: Option<u64>,
    error: Option<String>,
}

async fn count(
    State(web): State<Web>,
    Caller(who): Caller,
    Query(p): Query<CountParams>,
) -> Json<Counted> {
    let n = match completed(&web, &who, &p.q, "", 1, 0).await {
        Ok(q) => web.queue.count(&q).await.map_err(WebError::from),
        Err(e) => Err(e),
    };
    Json(match n {
        Ok(n) => Counted {
            count: Some(n),
            error: None,
        },
        Err(e) => Counted {
            count: None,
            error: Some(e.parts().1),
        },
    })
}

#[derive(Serialize)]
struct Keys {
    keys: Vec<String>,
}

async fn keys(State(web): State<Web>, Caller(who): Caller) -> WebResult<Json<Keys>> {
    let scope = KeyScope {
        sweeps: None,
        owner: who.only_owner().map(str::to_string),
    };
    let mut keys: Vec<String> = FIELDS.iter().map(|f| f.to_string()).collect();
    keys.extend(web.queue.store().binding_keys(&scope, KEYS_OFFERED).await?);
    Ok(Json(Keys { keys }))
}

async fn cell_page(
    State(web): State<Web>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> WebResult<Markup> {
    let id = super::state::cell_id(&id)?;
    let c = web.cell(&who, id).await?;
    let sweep = web.sweep(&who, c.sweep_id).await?;
    let spec: CellSpec = serde_json::from_str(&c.spec_json).map_err(|_| WebError::Internal)?;
    let result = c
        .result_json
        .as_deref()
        .and_then(|r| RenderResult::from_json(r).ok());
    let errors: Vec<crate::domain::failure::ErrorEntry> =
        serde_json::from_str(&c.errors_json).unwrap_or_default();
    Ok(page::frame(
        &format!("cell {}", id.0),
        html! {
            h1 { "Cell " (id.0) " · " a href={"/sweeps/" (sweep.id.0)} { (sweep.name) } " #" (c.number) }
            div.detail {
                div {
                    @if result.is_some() {
                        img #image src={"/images/" (id.0)} alt={"cell " (id.0)};
                        p { a.button href={"/images/" (id.0) "?download=1"} { "Download PNG" } }
                    } @else {
                        p.dim { "No image: the cell is " (c.state) "." }
                    }
                }
                div {
                    div.keeper data-cell=(id.0) data-rating=(c.rating) {
                        button data-star=(u8::from(c.starred)) class=[c.starred.then_some("on")] {
                            @if c.starred { "★ starred" } @else { "☆ star" }
                        }
                        @for n in 1..=5u8 {
                            button data-rate=(n) title={"rate " (n)} class=[(c.rating >= n).then_some("on")] { (n) }
                        }
                        span #keeper-error.error {}
                    }
                    dl {
                        dt { "state" } dd { (c.state) " (attempt " (c.attempt) " of " (c.max_attempts) ")" }
                        dt { "seed" } dd #seed { (spec.seed) }
                        dt { "prompt" } dd #prompt { (spec.prompt) }
                        @if !spec.negative_prompt.is_empty() { dt { "negative" } dd { (spec.negative_prompt) } }
                        dt { "model" } dd { (spec.model) }
                        @for l in &spec.loras { dt { "LoRA" } dd { (l.name) " × " (l.strength) } }
                        @if !spec.vae.is_empty() { dt { "VAE" } dd { (spec.vae) } }
                        dt { "sampler" } dd { (spec.sampler.as_str()) ", " (spec.steps) " steps, CFG " (spec.cfg) }
                        dt { "size" } dd { (spec.width) "×" (spec.height) }
                        @if spec.clip_skip > 1 { dt { "clip skip" } dd { (spec.clip_skip) } }
                        @for (k, v) in &spec.bindings { dt.binding { (k) } dd { (v) } }
                        @if let Some(w) = c.worker { dt { "worker" } dd { (w.0) } }
                        @if let Some(r) = &result {
                            dt { "device" } dd { (r.device) }
                            @for (phase, ms) in &r.timings_ms { dt { (phase) } dd { (page::duration(*ms as i64)) } }
                            dt { "sha256" } dd.mono { (r.sha256) }
                        }
                        @if let Some(at) = c.finalized_at { dt { "finished" } dd { (page::time(at)) " UTC" } }
                    }
                    @if let Some(r) = &result {
                        h2 { "Infotext " button data-copy="infotext" { "copy" } }
                        pre #infotext.infotext { (r.parameters) }
                        @for n in &r.notes { p.dim { (n) } }
                    }
                    @if !errors.is_empty() {
                        h2 { "Failed attempts" }
                        @for e in &errors {
                            p.error { "attempt " (e.attempt) " on worker " (e.worker) ": " (e.class) ": " (e.message) }
                        }
                    }
                }
            }
        },
    ))
}

#[derive(Deserialize)]
struct KeeperChange {
    starred: Option<bool>,
    rating: Option<u8>,
}

#[derive(Serialize)]
struct KeeperState {
    starred: bool,
    rating: u8,
}

async fn keeper(
    State(web): State<Web>,
    Changer(who): Changer,
    Path(id): Path<String>,
    Json(change): Json<KeeperChange>,
) -> WebResult<Json<KeeperState>> {
    let id = super::state::cell_id(&id)?;
    web.cell(&who, id).await?;
    if change.rating.is_some_and(|r| r > 5) {
        return Err(WebError::BadRequest("rating: 0 to 5".into()));
    }
    let c = web
        .queue
        .set_keeper(id, change.starred, change.rating)
        .await?;
    Ok(Json(KeeperState {
        starred: c.starred,
        rating: c.rating,
    }))
}
