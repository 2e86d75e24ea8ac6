//! The X/Y view (`/xy`): completed cells matching a query, laid out along one or two axes (a
//! binding, or `seed`, `cfg`, `steps`, `sampler`, …), as A1111's X/Y plot lays them out but
//! after the fact and across the whole farm's results; and the same sheet as a PNG
//! (`/xy.png`), drawn by the contact-sheet code `kiln grid` uses ([`crate::grid`]).

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::Caller;
use super::gallery::completed;
use super::page;
use super::state::{Web, WebError, WebResult};
use super::sweep::urlencode;
use crate::domain::auth::Principal;
use crate::domain::rows::CellRow;
use crate::grid::{self, Layout};
use crate::result::RenderResult;
use crate::sweep::CellSpec;

/// Most cells read for one sheet (the first by the sort), and most values on one axis.
const MAX_CELLS: i64 = 500;
const MAX_VALUES: usize = 64;

pub(super) fn routes() -> Router<Web> {
    Router::new()
        .route("/xy", get(xy_page))
        .route("/xy.png", get(xy_png))
}

#[derive(Deserialize, Default)]
struct XyParams {
    #[serde(default)]
    q: String,
    #[serde(default)]
    x: String,
    #[serde(default)]
    y: String,
    #[serde(default)]
    sort: String,
}

/// Rows with their specs, and where they fall.
struct Sheet {
    rows: Vec<(CellRow, CellSpec)>,
    layout: Layout,
    /// Whether [`MAX_CELLS`] cut the rows.
    cut: bool,
}

async fn sheet(web: &Web, who: &Principal, p: &XyParams) -> WebResult<Sheet> {
    let q = completed(web, who, &p.q, &p.sort, MAX_CELLS, 0).await?;
    let rows: Vec<(CellRow, CellSpec)> = web
        .queue
        .query(&q)
        .await?
        .into_iter()
        .filter_map(|c| {
            let spec = serde_json::from_str(&c.spec_json).ok()?;
            Some((c, spec))
        })
        .collect();
    let value = |r: &(CellRow, CellSpec), k: &str| grid::spec_value(&r.1, k);
    let bindings = |r: &(CellRow, CellSpec)| r.1.bindings.keys().cloned().collect::<Vec<_>>();
    let y = Some(p.y.trim()).filter(|y| !y.is_empty());
    if !rows.is_empty() {
        for key in std::iter::once(p.x.trim()).chain(y) {
            grid::check_axis(&rows, key, value, bindings).map_err(WebError::BadRequest)?;
        }
    }
    let layout = grid::layout(&rows, p.x.trim(), y, value);
    if layout.xs.len() > MAX_VALUES || layout.ys.len() > MAX_VALUES {
        return Err(WebError::BadRequest(format!(
            "an axis takes {} values here; at most {MAX_VALUES} fit (narrow the query)",
            layout.xs.len().max(layout.ys.len())
        )));
    }
    Ok(Sheet {
        cut: rows.len() as i64 == MAX_CELLS,
        rows,
        layout,
    })
}

async fn xy_page(
    State(web): State<Web>,
    Caller(who): Caller,
    Query(p): Query<XyParams>,
) -> Response {
    let chosen = !p.x.trim().is_empty();
    let (status, body) = if chosen {
        match sheet(&web, &who, &p).await {
            Ok(s) => (StatusCode::OK, table(&s, &p)),
            Err(WebError::BadRequest(m)) => (
                StatusCode::BAD_REQUEST,
                html! { p #query-error.error { (m) } },
            ),
            Err(e) => return e.into_response(),
        }
    } else {
        (
            StatusCode::OK,
            html! { p.dim { "Choose an X axis: a binding key (animal, lora.lcm.strength, …) or seed, cfg, steps, sampler, model, prompt, size." } },
        )
    };
    let png = format!(
        "/xy.png?q={}&x={}&y={}&sort={}",
        urlencode(&p.q),
        urlencode(&p.x),
        urlencode(&p.y),
        urlencode(&p.sort)
    );
    (
        status,
        page::frame(
            "X/Y",
            html! {
                h1 { "X/Y view" }
                form.query method="get" action="/xy" {
                    input #q type="text" name="q" value=(p.q) list="q-keys" autocomplete="off" spellcheck="false"
                        placeholder="filter, e.g. sweep = \"foxes\" and steps = 4";
                    datalist #q-keys {}
                    input #x type="text" name="x" value=(p.x) placeholder="X axis (e.g. cfg)" size="16";
                    input #y type="text" name="y" value=(p.y) placeholder="Y axis (optional)" size="16";
                    button type="submit" { "Show" }
                    @if chosen { a.button href=(png) { "PNG" } }
                }
                (body)
            },
        ),
    )
        .into_response()
}

fn table(s: &Sheet, p: &XyParams) -> Markup {
    let l = &s.layout;
    html! {
        p.count { (s.rows.len()) " images on " (l.xs.len()) " × " (l.ys.len()) " tiles"
            @if l.hidden > 0 { "; " (l.hidden) " more fall on filled tiles (the first by the sort is shown)" }
            @if s.cut { "; only the first " (MAX_CELLS) " matches are laid out" } }
        table #xy.xy data-x=(p.x.trim()) data-y=(p.y.trim()) {
            thead { tr {
                th { (p.y.trim()) " ╲ " (p.x.trim()) }
                @for x in &l.xs { th.x { (x) } }
            } }
            tbody {
                @for (yi, y) in l.ys.iter().enumerate() {
                    tr {
                        th.y { (y) }
                        @for (xi, x) in l.xs.iter().enumerate() {
                            @match l.tiles[yi][xi] {
                                Some(i) => {
                                    @let c = &s.rows[i].0;
                                    td data-x=(x) data-y=(y) data-cell=(c.id.0) {
                                        a href={"/cells/" (c.id.0)} {
                                            img src={"/thumbs/" (c.id.0)} loading="lazy" alt={"cell " (c.id.0)};
                                        }
                                        @if l.counts[yi][xi] > 1 { span.dim { "+" (l.counts[yi][xi] - 1) } }
                                    }
                                }
                                None => { td.empty data-x=(x) data-y=(y) { "—" } }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn xy_png(
    State(web): State<Web>,
    Caller(who): Caller,
    Query(p): Query<XyParams>,
) -> WebResult<Response> {
    if p.x.trim().is_empty() {
        return Err(WebError::BadRequest("x: choose an axis".into()));
    }
    let s = sheet(&web, &who, &p).await?;
    let l = &s.layout;
    let mut images = Vec::with_capacity(l.xs.len() * l.ys.len());
    for row in &l.tiles {
        for tile in row {
            images.push(match tile {
                Some(i) => tile_image(&web, &s.rows[*i].0).await,
                None => None,
            });
        }
    }
    let (x, y) = (p.x.trim().to_string(), p.y.trim().to_string());
    let layout = s.layout;
    let png = tokio::task::spawn_blocking(move || {
        grid::sheet_png(
            &layout,
            &x,
            Some(y.as_str()).filter(|y| !y.is_empty()),
            images,
        )
    })
    .await
    .map_err(|_| WebError::Internal)?
    .map_err(|e| {
        tracing::warn!(error = %e, "X/Y sheet");
        WebError::Internal
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (
                header::CONTENT_DISPOSITION,
                "inline; filename=\"kiln-xy.png\"",
            ),
        ],
        png,
    )
        .into_response())
}

/// A tile's image, decoded; `None` (a grey tile) when it cannot be read.
async fn tile_image(web: &Web, c: &CellRow) -> Option<image::RgbImage> {
    let r = RenderResult::from_json(c.result_json.as_deref()?).ok()?;
    let bytes = web.images.get(&r.storage, &r.object_key).await.ok()??;
    tokio::task::spawn_blocking(move || {
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .ok()
            .map(|i| i.to_rgb8())
    })
    .await
    .ok()?
}
