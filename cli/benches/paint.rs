//! First-paint benchmark of the web gallery (issue 17: "first paint under 1 s on this
//! machine"), not a test: a real `kiln coordinator` over the query benchmark's SQLite
//! database (1,000,000 completed cells), and a real headless Chromium (Debian's `chromium`,
//! driven by its `chromedriver`) opening gallery pages. Per page it reads the browser's own
//! timings: `first-contentful-paint` (`performance.getEntriesByType('paint')`), the HTML's
//! first byte and `load`, when the last thumbnail in view arrived, when the match count
//! (`/gallery/count`, fetched after paint) arrived, and the bytes of the `/thumbs/` resources.
//!
//! Every cell of that database records the same image (sha256 `00…0`, which no storage
//! holds), so the thumbnail cache is filled beforehand with one real thumbnail (made by
//! [`Thumbs`] from a 512×512 PNG) under that name: each tile is its own request, answered from
//! the cache, as a page seen before is. Making thumbnails on a first view is in
//! `coordinator/benches/thumbs.rs`. Each run opens a different page, so the browser's cache
//! never answers for a thumbnail; the CSS and JavaScript come from it after the warm-up.
//!
//! Run: first `KILN_BENCH_KEEP=1 cargo bench -p kiln-coordinator --bench query --profile dev
//! -- sqlite` (keeps `/tmp/kiln-query-bench.db`), then
//! `cargo bench -p kiln-cli --bench paint --profile dev [-- DB]`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use kiln_coordinator::web::Thumbs;
use kiln_worker::engine::image::{RgbImage, encode_png};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The pages opened: (label, filter, sort, pages).
const PAGES: &[(&str, &str, &str, std::ops::RangeInclusive<u32>)] = &[
    (
        "sweep + binding",
        r#"sweep = "sweep-3" and animal = "fox""#,
        "",
        1..=7,
    ),
    (
        "binding, all sweeps, by -finished",
        r#"animal = "bear""#,
        "-finished",
        1..=7,
    ),
    ("binding, all sweeps", r#"animal = "bear""#, "", 1..=3),
];

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kiln coordinator` on a free port over `db`, with its thumbnails in `thumbs`.
fn coordinator(db: &str, thumbs: &std::path::Path, dir: &std::path::Path) -> (Killed, String) {
    let addr_file = dir.join("addr");
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--db", db])
        .arg("--thumbs-dir")
        .arg(thumbs)
        .arg("--addr-file")
        .arg(&addr_file)
        .env("KILN_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn kiln coordinator");
    let child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(addr) = std::fs::read_to_string(&addr_file)
            && !addr.is_empty()
        {
            return (child, addr);
        }
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// chromedriver and a headless Chromium session, as `cli/tests/cli/web.rs` starts them.
async fn browser() -> (Killed, Client) {
    let port = free_port();
    let driver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian: apt-get install chromium chromium-driver)"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"] }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) if Instant::now() > deadline => panic!("no WebDriver session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A 512×512 PNG of soft gradients with ripples and grain (as `web/thumbs.rs`'s tests make).
fn render_png() -> Vec<u8> {
    let side = 512u32;
    let mut pixels = Vec::with_capacity((side * side * 3) as usize);
    for y in 0..side {
        for x in 0..side {
            let (fx, fy) = (x as f32 / side as f32, y as f32 / side as f32);
            let ripple = ((fx * 40.0).sin() * (fy * 30.0).cos() * 20.0) as i32;
            let grain = ((x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 9) as i32 - 4;
            let c = |base: f32| ((base * 255.0) as i32 + ripple + grain).clamp(0, 255) as u8;
            pixels.extend([c(fx), c(fy), c(1.0 - fx * fy)]);
        }
    }
    let image = RgbImage {
        width: side,
        height: side,
        pixels,
    };
    encode_png(&image, &[]).unwrap()
}

/// Fills `dir` with the thumbnail every cell of the bench database names (sha256 `00…0`).
async fn fill_cache(dir: &std::path::Path) -> usize {
    let png = Arc::new(render_png());
    let sha = hex::encode(Sha256::digest(png.as_slice()));
    let maker = Thumbs::temporary().unwrap();
    let jpeg = maker
        .get(&sha, || async move {
            Ok::<_, std::convert::Infallible>(png.to_vec())
        })
        .await
        .unwrap();
    let zero = "0".repeat(64);
    std::fs::create_dir_all(dir.join("00")).unwrap();
    std::fs::write(dir.join("00").join(format!("{zero}.jpg")), &jpeg).unwrap();
    jpeg.len()
}

/// What the browser measured for the page it shows, once every thumbnail in view and the
/// count have arrived.
const MEASURE: &str = r#"
const [done] = arguments;
const inView = () => Array.from(document.querySelectorAll('#grid img'))
    .filter(i => i.getBoundingClientRect().top < innerHeight);
const ready = () => inView().every(i => i.complete)
    && !document.querySelector('#count').textContent.includes('counting');
const report = () => {
    const nav = performance.getEntriesByType('navigation')[0];
    const paint = performance.getEntriesByType('paint')
        .find(p => p.name === 'first-contentful-paint');
    const res = performance.getEntriesByType('resource');
    const thumbs = res.filter(r => r.name.includes('/thumbs/'));
    const count = res.find(r => r.name.includes('/gallery/count'));
    done({
        fcp: paint ? paint.startTime : null,
        ttfb: nav.responseStart,
        html: nav.responseEnd,
        load: nav.loadEventEnd,
        thumbs: thumbs.length,
        in_view: inView().length,
        tiles: document.querySelectorAll('#grid img').length,
        thumb_bytes: thumbs.reduce((s, r) => s + r.encodedBodySize, 0),
        thumb_transfer: thumbs.reduce((s, r) => s + r.transferSize, 0),
        thumbs_end: thumbs.reduce((m, r) => Math.max(m, r.responseEnd), 0),
        thumb_ms: thumbs.map(r => r.responseEnd - r.startTime)
            .sort((a, b) => a - b)[thumbs.length >> 1],
        count_end: count ? count.responseEnd : null,
        html_bytes: nav.encodedBodySize,
    });
};
const poll = () => ready() ? report() : setTimeout(poll, 20);
poll();
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let db = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/kiln-query-bench.db"));
    assert!(
        db.exists(),
        "{} is missing: make it with `KILN_BENCH_KEEP=1 cargo bench -p kiln-coordinator \
         --bench query --profile dev -- sqlite`",
        db.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let thumbs = dir.path().join("thumbs");
    let jpeg = fill_cache(&thumbs).await;
    let (_coordinator, addr) =
        coordinator(&format!("sqlite://{}", db.display()), &thumbs, dir.path());
    let base = format!("http://{addr}");
    let (_driver, b) = browser().await;
    // Warm-up: the browser caches the CSS and JavaScript; the server's caches warm.
    b.goto(&format!("{base}/gallery?q=sweep+%3D+%22sweep-1%22"))
        .await
        .unwrap();
    b.execute_async(MEASURE, vec![]).await.unwrap();
    // The coordinator's `ANALYZE` at start (10 s over 1M cells on this machine) is not timed.
    tokio::time::sleep(Duration::from_secs(20)).await;
    println!(
        "first paint of /gallery in headless Chromium (1400×1000 window), thumbnails cached \
         on the server ({jpeg} B each), median and max over the pages listed"
    );
    for (label, filter, sort, pages) in PAGES {
        let mut runs: Vec<Value> = Vec::new();
        for page in pages.clone() {
            let query = form_query(filter, sort, page);
            b.goto(&format!("{base}/gallery?{query}")).await.unwrap();
            runs.push(b.execute_async(MEASURE, vec![]).await.unwrap());
        }
        let col = |k: &str| -> Vec<f64> { runs.iter().map(|r| r[k].as_f64().unwrap()).collect() };
        let show = |k: &str| {
            let v = col(k);
            format!(
                "{:>5.0} (max {:>5.0})",
                median(v.clone()),
                v.iter().cloned().fold(0.0, f64::max)
            )
        };
        println!(
            "  {label}: {filter} sort {sort:?} pages {}–{}: {} tiles, {} in view, {} thumbnails \
             fetched, {:.0} KB of thumbnails, {:.0} KB HTML",
            pages.start(),
            pages.end(),
            runs[0]["tiles"],
            runs[0]["in_view"],
            median(col("thumbs")),
            median(col("thumb_bytes")) / 1000.0,
            median(col("html_bytes")) / 1000.0,
        );
        println!(
            "    ms: first byte {}  HTML {}  first paint {}  load {}  thumbnails in view {} \
             (each {})  count {}",
            show("ttfb"),
            show("html"),
            show("fcp"),
            show("load"),
            show("thumbs_end"),
            show("thumb_ms"),
            show("count_end"),
        );
    }
    b.close().await.unwrap();
}

/// `q=…&sort=…&page=…`, form-encoded.
fn form_query(filter: &str, sort: &str, page: u32) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!("q={}&sort={}&page={page}", enc(filter), enc(sort))
}
