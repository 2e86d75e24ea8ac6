//! The web UI's images (`/images/{cell}`, `/thumbs/{cell}`) and zips (`/download.zip`) through
//! the router the server merges, on a real queue (SQLite) with completed cells whose PNGs are in
//! an in-memory storage: only bytes with the recorded sha256 are served, a caller sees only its
//! own sweeps, every failure says why without credentials, thumbnails are made once, and a zip
//! holds exactly the completed cells the filter matches, paged through, with what is missing
//! listed in its README.txt.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use futures::StreamExt;
use futures::future::BoxFuture;
use kiln_coordinator::clock::Millis;
use kiln_coordinator::domain::auth::Secret;
use kiln_coordinator::domain::lease::Fence;
use kiln_coordinator::domain::state::Scope;
use kiln_coordinator::result::RenderResult;
use kiln_coordinator::web::{ImageError, ImageSource, Thumbs, WebOptions};
use kiln_proto::{CellId, SweepId};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use crate::harness::{Backend, Fixture, T0, cell, submission};

const STORAGE: &str = "file:///srv/kiln";

/// A storage of objects in memory, counting reads.
#[derive(Default)]
struct Objects {
    objects: HashMap<String, Vec<u8>>,
    gets: AtomicUsize,
}

impl ImageSource for Objects {
    fn get<'a>(
        &'a self,
        storage: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, ImageError>> {
        Box::pin(async move {
            self.gets.fetch_add(1, Ordering::SeqCst);
            Ok((storage == STORAGE)
                .then(|| self.objects.get(key).cloned())
                .flatten())
        })
    }

    fn reads(&self, storage: &str) -> bool {
        storage == STORAGE
    }
}

/// A 512×512 PNG that differs by `seed`.
fn png(seed: u64) -> Vec<u8> {
    let img = image::RgbImage::from_fn(512, 512, |x, y| {
        image::Rgb([(x / 2) as u8, (y / 2) as u8, (seed * 40) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

struct Farm {
    fx: Fixture,
    app: Router,
    objects: Arc<Objects>,
    _thumbs: Arc<Thumbs>,
    /// Flips `stopping`, as the server does when it stops.
    stop: tokio::sync::watch::Sender<bool>,
    sweep: SweepId,
    /// Cell ids by seed.
    cells: Vec<CellId>,
    /// The cells left running: seed, lease, object key.
    running: Vec<(u64, Fence, String)>,
    alice: String,
    bob: String,
}

impl Farm {
    /// Alice's sweep of `n` cells (seeds 0..n), each completed with `result(seed)` (`None`:
    /// left running), and the objects `objects(seed)` puts in storage.
    async fn start(
        n: u64,
        result: impl Fn(u64, &str) -> Option<RenderResult>,
        objects: impl Fn(u64) -> Vec<Vec<u8>>,
    ) -> Farm {
        let fx = Fixture::new(Backend::Sqlite).await;
        let mut tokens = Vec::new();
        for owner in ["alice", "bob"] {
            let secret = Secret::generate();
            fx.queue
                .store()
                .token_insert("t", owner, Scope::Submit, &secret.hash(), Millis(T0))
                .await
                .unwrap();
            tokens.push(secret.expose().to_string());
        }
        let mut sub = submission("a", (0..n).map(cell).collect());
        sub.owner = Some("alice".into());
        let sweep = fx.queue.submit(sub).await.unwrap().id;
        let w = fx.worker("gpu").await;
        let mut cells = vec![CellId(0); n as usize];
        let mut stored = Objects::default();
        let mut running = Vec::new();
        loop {
            let leased = fx.queue.lease(w, 32, None).await.unwrap();
            if leased.is_empty() {
                break;
            }
            for l in leased {
                let spec: serde_json::Value = serde_json::from_str(&l.spec_json).unwrap();
                let seed = spec["seed"].as_u64().unwrap();
                cells[seed as usize] = l.id;
                let key = format!("sweeps/{}/{}/{}.png", l.sweep_id, l.id, l.attempt.0);
                for bytes in objects(seed) {
                    stored.objects.insert(key.clone(), bytes);
                }
                let f = Fence {
                    cell: l.id,
                    attempt: l.attempt,
                    worker: w,
                };
                match result(seed, &key) {
                    Some(r) => fx.queue.complete(f, &r.to_json().unwrap()).await.unwrap(),
                    None => running.push((seed, f, key)),
                }
            }
        }
        assert!(!cells.contains(&CellId(0)), "every cell leased");
        let objects = Arc::new(stored);
        let thumbs = Arc::new(Thumbs::temporary().unwrap());
        let options = WebOptions {
            images: objects.clone(),
            thumbs: thumbs.clone(),
        };
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let app = kiln_coordinator::web::router(fx.queue.clone(), options, true, false, stopping);
        let bob = tokens.pop().unwrap();
        let alice = tokens.pop().unwrap();
        Farm {
            fx,
            app,
            objects,
            _thumbs: thumbs,
            stop,
            sweep,
            cells,
            running,
            alice,
            bob,
        }
    }

    /// GET `path` as the holder of `token`: status, headers and the whole body (`Err` when the
    /// body ends in an error).
    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, HeaderMap, Result<Vec<u8>, String>) {
        let mut req = Request::get(path);
        if let Some(t) = token {
            req = req.header(header::COOKIE, format!("theme=dark; kiln_token={t}"));
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string());
        (parts.status, parts.headers, body)
    }
}

fn result(key: &str, png: &[u8], storage: &str) -> RenderResult {
    RenderResult {
        object_key: key.into(),
        storage: storage.into(),
        sha256: sha(png),
        bytes: png.len() as u64,
        width: 512,
        height: 512,
        ..Default::default()
    }
}

fn text(b: &Result<Vec<u8>, String>) -> String {
    String::from_utf8_lossy(b.as_ref().unwrap()).into_owned()
}

/// Seeds 0, 1: good; 2: bytes that are not the recorded ones; 3: in a storage this
/// coordinator does not read; 4: missing from storage; 5: still running.
async fn mixed_farm() -> Farm {
    Farm::start(
        6,
        |seed, key| match seed {
            0..=2 | 4 => Some(result(key, &png(seed), STORAGE)),
            3 => Some(result(key, &png(seed), "s3://AKIA:hunter2@other/x")),
            _ => None,
        },
        |seed| match seed {
            0 | 1 | 3 => vec![png(seed)],
            2 => vec![png(99)],
            _ => vec![],
        },
    )
    .await
}

#[tokio::test]
async fn images_are_served_only_verified_and_only_to_their_owner() {
    let farm = mixed_farm().await;
    let (alice, bob) = (Some(farm.alice.as_str()), Some(farm.bob.as_str()));
    let c = &farm.cells;

    let (status, headers, body) = farm.get(&format!("/images/{}", c[0]), alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), png(0));
    assert_eq!(headers[header::CONTENT_TYPE], "image/png");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(headers.get(header::CONTENT_DISPOSITION).is_none());

    let (status, headers, _) = farm
        .get(&format!("/images/{}?download=1", c[1]), alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    let number = farm.fx.queue.cell(c[1]).await.unwrap().number;
    assert_eq!(
        headers[header::CONTENT_DISPOSITION],
        format!("attachment; filename=\"{}-{number:06}-1.png\"", farm.sweep).as_str()
    );

    // Another owner, or nobody signed in, gets no image.
    let (status, _, body) = farm.get(&format!("/images/{}", c[0]), bob).await;
    assert!(
        matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND),
        "{status}"
    );
    assert_ne!(body.unwrap(), png(0));
    let (status, _, _) = farm.get(&format!("/images/{}", c[0]), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Ids that name no cell are 404s, whatever they look like.
    for id in [
        "abc",
        "0",
        "-1",
        "99999999",
        "18446744073709551615",
        "1.5",
        "%20",
    ] {
        let (status, _, _) = farm.get(&format!("/images/{id}"), alice).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "/images/{id}");
        let (status, _, _) = farm.get(&format!("/thumbs/{id}"), alice).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "/thumbs/{id}");
    }

    // Bytes that do not match the recorded sha256 are never served.
    let (status, _, body) = farm.get(&format!("/images/{}", c[2]), alice).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_ne!(body.unwrap(), png(99));
    let (status, _, _) = farm.get(&format!("/thumbs/{}", c[2]), alice).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

    // A storage this coordinator does not read: named (without its credentials) with the flag.
    let (status, _, body) = farm.get(&format!("/images/{}", c[3]), alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let page = text(&body);
    assert!(
        page.contains("does not read storage s3://other/x"),
        "{page}"
    );
    assert!(page.contains("--images"), "{page}");
    assert!(
        !page.contains("hunter2") && !page.contains("AKIA"),
        "{page}"
    );

    let (status, _, body) = farm.get(&format!("/images/{}", c[4]), alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text(&body).contains("missing from storage file:///srv/kiln"));

    let (status, _, body) = farm.get(&format!("/images/{}", c[5]), alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text(&body).contains("is running"), "{}", text(&body));
    farm.fx.finish().await;
}

#[tokio::test]
async fn thumbnails_are_small_jpegs_made_once() {
    let farm = mixed_farm().await;
    let alice = Some(farm.alice.as_str());
    let path = format!("/thumbs/{}", farm.cells[1]);
    let (status, headers, body) = farm.get(&path, alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "image/jpeg");
    assert_eq!(headers[header::CACHE_CONTROL], "private, max-age=86400");
    let jpeg = body.unwrap();
    let thumb = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (256, 256));
    let reads = farm.objects.gets.load(Ordering::SeqCst);
    let (status, _, again) = farm.get(&path, alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again.unwrap(), jpeg);
    assert_eq!(
        farm.objects.gets.load(Ordering::SeqCst),
        reads,
        "served from the cache"
    );
    // The cache does not let another owner see it.
    let (status, _, _) = farm.get(&path, Some(&farm.bob)).await;
    assert!(
        matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND),
        "{status}"
    );
    farm.fx.finish().await;
}

fn unzip(b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(b)).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut out = Vec::new();
            f.read_to_end(&mut out).unwrap();
            (f.name().unwrap().to_string(), out)
        })
        .collect()
}

#[tokio::test]
async fn zips_hold_the_completed_cells_the_filter_matches() {
    let farm = mixed_farm().await;
    let alice = Some(farm.alice.as_str());
    let f = &farm;
    let name = move |seed: u64| async move {
        let n =
            f.fx.queue
                .cell(f.cells[seed as usize])
                .await
                .unwrap()
                .number;
        format!("{}-{n:06}-{seed}.png", f.sweep)
    };

    let (status, headers, body) = farm.get("/download.zip", alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/zip");
    assert_eq!(
        headers[header::CONTENT_DISPOSITION],
        "attachment; filename=\"kiln-results.zip\""
    );
    let files = unzip(&body.unwrap());
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [name(0).await.as_str(), &name(1).await, "README.txt"]
    );
    assert_eq!(files[0].1, png(0));
    assert_eq!(files[1].1, png(1));
    let readme = String::from_utf8(files[2].1.clone()).unwrap();
    assert!(readme.contains("2 images."), "{readme}");
    assert!(readme.contains("Skipped 3 images"), "{readme}");
    for seed in [2, 3, 4] {
        assert!(readme.contains(&name(seed).await), "{readme}");
    }
    assert!(
        !readme.contains(&name(5).await),
        "running cells are not listed: {readme}"
    );
    assert!(!readme.contains("hunter2"), "{readme}");

    // A filter and a sort.
    let (status, _, body) = farm
        .get("/download.zip?q=seed%20%3C%3D%201&sort=-seed", alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<String> = unzip(&body.unwrap()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [name(1).await, name(0).await],
        "no README when nothing is missing"
    );

    // A filter that does not parse is a 400 with the parser's words; one that matches nothing,
    // or another owner's cells, a 404 — before any zip byte.
    let (status, headers, body) = farm.get("/download.zip?q=seed%20%3C%3D", alice).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_ne!(headers[header::CONTENT_TYPE], "application/zip");
    assert!(
        text(&body).contains("expected a value after"),
        "{}",
        text(&body)
    );
    let (status, _, _) = farm.get("/download.zip?q=seed%20%3D%205", alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "seed 5 is not completed");
    let (status, _, _) = farm.get("/download.zip", Some(&farm.bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = farm.get("/download.zip", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    farm.fx.finish().await;
}

#[tokio::test]
async fn zips_page_through_every_cell() {
    // More cells than three pages of 200; every one completed with its own image.
    let n = 450;
    let farm = Farm::start(
        n,
        |seed, key| Some(result(key, &seed.to_le_bytes(), STORAGE)),
        |seed| vec![seed.to_le_bytes().to_vec()],
    )
    .await;
    let (status, _, body) = farm.get("/download.zip?sort=seed", Some(&farm.alice)).await;
    assert_eq!(status, StatusCode::OK);
    let files = unzip(&body.unwrap());
    assert_eq!(files.len(), n as usize, "every cell once, no README");
    for (seed, (name, bytes)) in files.iter().enumerate() {
        assert!(name.ends_with(&format!("-{seed}.png")), "{name}");
        assert_eq!(bytes, &(seed as u64).to_le_bytes());
    }
    farm.fx.finish().await;
}

#[tokio::test]
async fn cells_completing_during_a_download_come_once() {
    // Seeds 100..400 completed, 0..100 running; 100 KB images, so the download's bounded
    // buffers hold a few dozen and the cell reader waits inside its first page.
    let n = 400;
    let image = |seed: u64| vec![seed as u8; 100 << 10];
    let farm = Farm::start(
        n,
        |seed, key| (seed >= 100).then(|| result(key, &image(seed), STORAGE)),
        |seed| vec![image(seed)],
    )
    .await;
    let req = Request::get("/download.zip?sort=seed")
        .header(header::COOKIE, format!("kiln_token={}", farm.alice))
        .body(Body::empty())
        .unwrap();
    let resp = farm.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body().into_data_stream();
    let mut zip = body.next().await.unwrap().unwrap().to_vec();
    // Cells that sort before every one downloaded so far complete: later pages shift by 100.
    for (seed, f, key) in &farm.running {
        let r = result(key, &image(*seed), STORAGE);
        farm.fx
            .queue
            .complete(*f, &r.to_json().unwrap())
            .await
            .unwrap();
    }
    while let Some(chunk) = body.next().await {
        zip.extend_from_slice(&chunk.unwrap());
    }
    let files = unzip(&zip);
    let seeds: Vec<u64> = files
        .iter()
        .map(|(name, _)| {
            name.rsplit('-')
                .next()
                .unwrap()
                .trim_end_matches(".png")
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(seeds, (100..400).collect::<Vec<_>>(), "each once, in order");
    assert!(files.iter().all(|(name, b)| {
        b == &image(
            name.rsplit('-')
                .next()
                .unwrap()
                .trim_end_matches(".png")
                .parse()
                .unwrap(),
        )
    }));
    farm.fx.finish().await;
}

#[tokio::test]
async fn a_stopping_coordinator_ends_downloads() {
    let image = |seed: u64| vec![seed as u8; 100 << 10];
    let farm = Farm::start(
        300,
        |seed, key| Some(result(key, &image(seed), STORAGE)),
        |seed| vec![image(seed)],
    )
    .await;
    let req = Request::get("/download.zip")
        .header(header::COOKIE, format!("kiln_token={}", farm.alice))
        .body(Body::empty())
        .unwrap();
    let resp = farm.app.clone().oneshot(req).await.unwrap();
    let mut body = resp.into_body().into_data_stream();
    let mut got = body.next().await.unwrap().unwrap().len();
    farm.stop.send(true).unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match body.next().await {
                Some(Ok(chunk)) => got += chunk.len(),
                Some(Err(e)) => return Some(e.to_string()),
                None => return None,
            }
        }
    })
    .await
    .expect("the body ends when the coordinator stops");
    let error = ended.expect("with an error, not as a whole zip");
    assert!(error.contains("stopping"), "{error}");
    assert!(got < 300 * (100 << 10), "{got} bytes came before the end");
    farm.fx.finish().await;
}

/// The tiles' cell ids of a gallery page and its "more" link, read from the HTML.
fn gallery_page(html: &str) -> (Vec<i64>, Option<String>) {
    let cells = html
        .split("data-cell=\"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
        .collect();
    let more = html
        .split("id=\"more\" href=\"")
        .nth(1)
        .map(|s| s[..s.find('"').unwrap()].replace("&amp;", "&"));
    (cells, more)
}

#[tokio::test]
async fn farm_wide_gallery_pages_newest_first_by_the_last_row_seen() {
    // 250 cells finished at the same millisecond (the fixture's clock): the position after a
    // page is (finished, id), so ties neither repeat nor drop a cell.
    let n = 250;
    let farm = Farm::start(
        n,
        |seed, key| Some(result(key, &seed.to_le_bytes(), STORAGE)),
        |seed| vec![seed.to_le_bytes().to_vec()],
    )
    .await;
    let mut by_position = Vec::new();
    let mut next = Some("/gallery?q=".to_string());
    let mut pages = 0;
    while let Some(path) = next {
        let (status, _, body) = farm.get(&path, Some(&farm.alice)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let (cells, more) = gallery_page(&text(&body));
        if pages > 0 {
            assert!(path.contains("&before="), "{path}");
        }
        by_position.extend(cells);
        next = more;
        pages += 1;
        assert!(pages <= 4, "the links never end");
    }
    assert_eq!(pages, 3);
    // The same order as pages by number (an offset) with the sort spelled out, every cell once.
    let mut by_offset = Vec::new();
    for page in 1..=3 {
        let path = format!("/gallery?q=&sort=-finished&page={page}");
        let (_, _, body) = farm.get(&path, Some(&farm.alice)).await;
        let (cells, more) = gallery_page(&text(&body));
        assert_eq!(more.is_some(), page < 3, "{path}");
        by_offset.extend(cells);
    }
    assert_eq!(by_position, by_offset);
    let mut all: Vec<i64> = farm.cells.iter().map(|c| c.0).collect();
    all.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(by_position, all, "newest first, ties by id");
    // A sweep's images come in plan order, paged by number.
    let path = format!("/gallery?q=sweep+%3D+{}", farm.sweep.0);
    let (_, _, body) = farm.get(&path, Some(&farm.alice)).await;
    let (cells, more) = gallery_page(&text(&body));
    let mut plan: Vec<i64> = farm.cells.iter().map(|c| c.0).collect();
    plan.sort_unstable();
    assert_eq!(cells, plan[..100]);
    assert!(more.unwrap().ends_with("&page=2"));
    farm.fx.finish().await;
}
