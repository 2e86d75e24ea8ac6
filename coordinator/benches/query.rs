//! Query benchmark (not a test): 1,000,000 completed cells (10 sweeps of 100,000, submitted
//! through `Queue::submit`, then finished in bulk by `Store::sweep_complete_all_unfenced`, a
//! bench/test-only method) plus one sweep of 10,000 queued cells, then `Store::analyze` (as the
//! maintenance loop does at start and hourly); then the time to the first page (100 rows) of
//! typical `kiln query` filters, on SQLite and on Postgres. Then the web gallery over the same
//! cells (issue 17): `GET /gallery?q=…` and `GET /gallery/count?q=…` through the router the
//! server merges (`tower::ServiceExt::oneshot`: status and the whole body), the server's time
//! for a page of 100 tiles; images are not read for it (the page only links `/thumbs/{cell}`).
//!
//! Run: `cargo bench -p kiln-coordinator --bench query --profile dev [-- sqlite|postgres]`
//! (Postgres from KILN_TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test; a
//! fresh schema is created and dropped). `KILN_BENCH_KEEP=1` keeps the database
//! (`/tmp/kiln-query-bench.db`, schema `kiln_qbench`) and reuses it on the next run, to look at
//! query plans.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_coordinator::clock::SystemClock;
use kiln_coordinator::query::{Filter, parse_sort};
use kiln_coordinator::queue::{Queue, QueueConfig, Submission};
use kiln_coordinator::result::RenderResult;
use kiln_coordinator::store::{CellQuery, DatabaseUrl, Store, StoreOptions};
use kiln_coordinator::sweep::{CellSpec, LoraSpec};
use kiln_coordinator::web::{self, NoImages, Thumbs, WebOptions};
use kiln_proto::sampler::SamplerName;
use tower::ServiceExt;

const SWEEPS: usize = 10;
const CELLS_PER_SWEEP: u64 = 100_000;
const QUEUED_CELLS: u64 = 10_000;
const RUNS: usize = 7;

const ANIMALS: [&str; 5] = ["fox", "cat", "owl", "wolf", "bear"];
const PLACES: [&str; 3] = ["forest", "city", "beach"];
const STRENGTHS: [&str; 4] = ["0.25", "0.5", "0.75", "1.0"];
const CFGS: [f32; 4] = [1.0, 1.5, 2.0, 2.5];
const STYLES: [&str; 10] = [
    "golden hour",
    "foggy morning",
    "oil painting",
    "watercolor",
    "studio light",
    "35mm film",
    "night, neon",
    "overcast",
    "backlit",
    "macro",
];

/// The typical first pages timed: (label, filter, sort).
const QUERIES: &[(&str, &str, &str)] = &[
    (
        "issue example: sweep+binding+cfg+seed range+prompt, by seed",
        r#"sweep = "sweep-3" and animal = "fox" and cfg >= 1.5 and seed between 1000 and 1100 and prompt ~ "forest""#,
        "seed",
    ),
    (
        "sweep+binding+cfg, by seed (no seed range)",
        r#"sweep = "sweep-3" and animal = "fox" and cfg >= 1.5"#,
        "seed",
    ),
    (
        "sweep+binding+cfg, by -seed",
        r#"sweep = "sweep-3" and animal = "owl" and cfg = 2.5"#,
        "-seed",
    ),
    (
        "sweep+binding, grid order cfg,seed",
        r#"sweep = "sweep-9" and place = "beach""#,
        "cfg,seed",
    ),
    (
        "sweep+binding, mixed order cfg,-seed",
        r#"sweep = "sweep-9" and place = "beach""#,
        "cfg,-seed",
    ),
    (
        "numeric binding in a sweep",
        r#"sweep = "sweep-5" and strength >= 0.75"#,
        "",
    ),
    (
        "prompt substring (1 in 3 cells)",
        r#"prompt ~ "forest""#,
        "",
    ),
    (
        "prompt substring (1 in 10 cells), by seed",
        r#"prompt ~ "watercolor""#,
        "seed",
    ),
    (
        "prompt substring (100 cells in 1M)",
        r#"prompt ~ "unicorn""#,
        "",
    ),
    (
        "state (10,000 queued of 1.01M)",
        r#"state = "available""#,
        "",
    ),
    (
        "state + binding, by -finished",
        r#"state = "completed" and animal = "bear""#,
        "-finished",
    ),
    ("binding, by -finished", r#"animal = "bear""#, "-finished"),
];

/// The gallery pages timed: (label, filter, sort, page).
const GALLERY: &[(&str, &str, &str, u32)] = &[
    (
        "sweep + binding",
        r#"sweep = "sweep-3" and animal = "fox""#,
        "",
        1,
    ),
    (
        "sweep + binding, page 50",
        r#"sweep = "sweep-3" and animal = "fox""#,
        "",
        50,
    ),
    (
        "sweep + binding, by -seed",
        r#"sweep = "sweep-3" and animal = "fox""#,
        "-seed",
        1,
    ),
    ("binding, all sweeps", r#"animal = "bear""#, "", 1),
    ("binding, all sweeps, page 50", r#"animal = "bear""#, "", 50),
    (
        "binding, all sweeps, by -finished",
        r#"animal = "bear""#,
        "-finished",
        1,
    ),
    ("no filter", "", "", 1),
];

/// The match counts timed (`/gallery/count`, fetched by the page after it paints).
const COUNTS: &[&str] = &[
    r#"sweep = "sweep-3" and animal = "fox""#,
    r#"animal = "bear""#,
    "",
];

fn cell(i: u64) -> CellSpec {
    let animal = ANIMALS[(i / 4 % 5) as usize];
    let place = PLACES[(i / 20 % 3) as usize];
    let style = STYLES[(i / 60 % 10) as usize];
    let mut prompt = format!("a {animal} in a {place}, {style}, highly detailed");
    if i % 10_000 == 1234 {
        prompt.push_str(", unicorn");
    }
    CellSpec {
        model: "dreamshaper_8.safetensors".into(),
        loras: vec![LoraSpec {
            name: "lcm-lora-sdv1-5.safetensors".into(),
            strength: 1.0,
            sha256: String::new(),
        }],
        prompt,
        negative_prompt: "blurry, lowres".into(),
        seed: i,
        steps: 4,
        cfg: CFGS[(i % 4) as usize],
        sampler: SamplerName::LCM,
        width: 512,
        height: 512,
        rng: "cpu".into(),
        bindings: [
            ("animal".to_string(), animal.to_string()),
            ("place".to_string(), place.to_string()),
            ("style".to_string(), style.to_string()),
            (
                "strength".to_string(),
                STRENGTHS[(i / 7 % 4) as usize].to_string(),
            ),
        ]
        .into(),
        min_memory_mib: 0,
        vae: String::new(),
        clip_skip: 1,
        subseed: 0,
        subseed_strength: 0.0,
        seed_resize_from: None,
        hires: None,
        eta: None,
        init: None,
        model_sha256: String::new(),
        vae_sha256: String::new(),
    }
}

fn submission(name: &str, n: u64) -> Submission {
    Submission {
        name: name.into(),
        idempotency_key: name.into(),
        priority: 0,
        max_attempts: None,
        spec: String::new(),
        cells: (0..n).map(cell).collect(),
        owner: None,
        unique_name: false,
    }
}

/// Fills the database unless a kept one is already full.
async fn seed(queue: &Queue) {
    if queue.sweeps(100, None, None).await.unwrap().len() == SWEEPS + 1 {
        println!("reusing the kept database");
        return;
    }
    let result = RenderResult {
        object_key: "sweeps/1/1/1.png".into(),
        storage: "file:///out".into(),
        sha256: "0".repeat(64),
        bytes: 400_000,
        width: 512,
        height: 512,
        device: "cuda:0 NVIDIA GeForce RTX 3060".into(),
        ..Default::default()
    }
    .to_json()
    .unwrap();
    let t = Instant::now();
    for s in 0..SWEEPS {
        let out = queue
            .submit(submission(&format!("sweep-{s}"), CELLS_PER_SWEEP))
            .await
            .unwrap();
        queue.take_in(Some(out.id)).await.unwrap();
        let n = queue
            .store()
            .sweep_complete_all_unfenced(out.id, &result, queue.now())
            .await
            .unwrap();
        assert_eq!(n, CELLS_PER_SWEEP);
    }
    let queued = queue
        .submit(submission("queued", QUEUED_CELLS))
        .await
        .unwrap();
    queue.take_in(Some(queued.id)).await.unwrap();
    // What the maintenance loop does at start and hourly.
    queue.store().analyze().await.unwrap();
    println!(
        "seeded {} completed + {QUEUED_CELLS} queued cells in {:.1} s",
        SWEEPS as u64 * CELLS_PER_SWEEP,
        t.elapsed().as_secs_f64()
    );
}

async fn bench(name: &str, url: DatabaseUrl) {
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .unwrap();
    let queue = Queue::new(store.clone(), Arc::new(SystemClock), QueueConfig::default());
    seed(&queue).await;
    println!("{name}: first page (100 rows), median and max of {RUNS} runs after one warm-up");
    for (label, filter, sort) in QUERIES {
        let q = CellQuery {
            filter: Some(Filter::parse(filter).unwrap()),
            sorts: parse_sort(sort).unwrap(),
            limit: 100,
            ..Default::default()
        };
        let rows = queue.query(&q).await.unwrap().len();
        let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let t = Instant::now();
            std::hint::black_box(queue.query(&q).await.unwrap());
            times.push(t.elapsed());
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name:8} {:>8.1} ms (max {:>7.1})  {rows:>3} rows  {label}",
            ms(times[RUNS / 2]),
            ms(times[RUNS - 1]),
        );
    }
    gallery(name, &queue).await;
    store.close().await;
}

/// Median and max of [`RUNS`] runs of `f` after one warm-up, and what the warm-up returned.
async fn timed<T, F, Fut>(mut f: F) -> (Duration, Duration, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let first = f().await;
    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        std::hint::black_box(f().await);
        times.push(t.elapsed());
    }
    times.sort();
    (times[RUNS / 2], times[RUNS - 1], first)
}

/// The web gallery's pages and counts over the bench's cells, as the browser asks for them.
async fn gallery(name: &str, queue: &Queue) {
    let thumbs = Arc::new(Thumbs::temporary().unwrap());
    let options = WebOptions {
        images: Arc::new(NoImages),
        thumbs,
    };
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let app = web::router(queue.clone(), options, false, false, stopping);
    // GET `path`: the whole body of its answer, which must be a 200.
    let get = |path: String| {
        let app = app.clone();
        async move {
            let request = axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            let (parts, body) = app.oneshot(request).await.unwrap().into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
            body
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{name}: web gallery, median and max of {RUNS} requests after one warm-up");
    for (label, filter, sort, page) in GALLERY {
        let mut path = format!(
            "/gallery?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("q", filter)
                .append_pair("sort", sort)
                .finish()
        );
        // Page N as the browser reaches it: by following N-1 "more" links (untimed), which
        // carry the last row's position on newest-first pages and a page number otherwise.
        for _ in 1..*page {
            let body = get(path.clone()).await;
            let html = String::from_utf8_lossy(&body);
            let more = html
                .split("id=\"more\" href=\"")
                .nth(1)
                .expect("a next page");
            path = more[..more.find('"').unwrap()].replace("&amp;", "&");
        }
        let (median, max, body) = timed(|| get(path.clone())).await;
        let tiles = String::from_utf8_lossy(&body)
            .matches("src=\"/thumbs/")
            .count();
        assert_eq!(tiles, 100, "{path}: a full page");
        println!(
            "{name:8} {:>8.1} ms (max {:>7.1})  {tiles} tiles, {:>3} KB  GET /gallery {label}: {filter} sort {sort:?} page {page} ({path})",
            ms(median),
            ms(max),
            body.len() / 1000,
        );
    }
    for filter in COUNTS {
        let path = format!(
            "/gallery/count?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("q", filter)
                .finish()
        );
        let (median, max, body) = timed(|| get(path.clone())).await;
        println!(
            "{name:8} {:>8.1} ms (max {:>7.1})  {}  GET /gallery/count: {filter}",
            ms(median),
            ms(max),
            String::from_utf8_lossy(&body),
        );
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |b: &str| which.is_empty() || which.iter().any(|w| w == b);
    let keep = std::env::var_os("KILN_BENCH_KEEP").is_some();
    if want("sqlite") {
        let dir = tempfile::tempdir().unwrap();
        let path = if keep {
            std::path::PathBuf::from("/tmp/kiln-query-bench.db")
        } else {
            dir.path().join("bench.db")
        };
        bench(
            "sqlite",
            DatabaseUrl::Sqlite(format!("sqlite://{}", path.display())),
        )
        .await;
    }
    if want("postgres") {
        let base = std::env::var("KILN_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = if keep {
            "kiln_qbench".to_string()
        } else {
            format!("kiln_qbench_{}", std::process::id())
        };
        let admin = sqlx::PgPool::connect(&base).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .execute(&admin)
        .await
        .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = DatabaseUrl::Postgres(format!("{base}{sep}options=-c%20search_path%3D{schema}"));
        bench("postgres", url).await;
        if !keep {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&admin)
                .await
                .unwrap();
        }
    }
}
