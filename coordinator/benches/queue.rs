//! Queue benchmark (not a test): submit 100,000 cells, then lease+complete cycles per second
//! with 64 concurrent simulated workers, on SQLite and on Postgres. The "workers" are a
//! simulator: in-process tasks that lease cells and complete them at once, so the number is
//! the coordinator's own ceiling, with no rendering. Submit is measured with the intake off
//! (every cell inserted with its sweep) and on (the default; `queue::intake`), side by side. Three cycle modes: lease(1) then complete,
//! lease(4) then complete each, and complete-and-lease-next (`Queue::complete_and_lease`, the
//! `CompleteRequest.lease_next` path: one call per cell).
//!
//! Run: `cargo bench -p kiln-coordinator --bench queue --profile dev [-- sqlite|postgres]`
//! (Postgres from KILN_TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test;
//! a fresh schema is created and dropped.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_coordinator::clock::SystemClock;
use kiln_coordinator::domain::lease::{Fence, LeasedCell};
use kiln_coordinator::domain::rows::WorkerRegistration;
use kiln_coordinator::domain::state::DeviceKind;
use kiln_coordinator::queue::{Queue, QueueConfig, Submission};
use kiln_coordinator::store::{DatabaseUrl, Store, StoreOptions};
use kiln_coordinator::sweep::{CellSpec, LoraSpec};
use kiln_proto::sampler::SamplerName;

const SUBMIT_CELLS: u64 = 100_000;
const CYCLE_CELLS: u64 = 20_000;
const WORKERS: usize = 64;
const RESULT: &str = r#"{"object_key":"k","sha256":"00"}"#;

/// How a simulated worker cycles.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `Lease` of up to n cells, then `Complete` of each.
    Lease(usize),
    /// `Complete` with `lease_next = 1`: the result and the next lease in one call.
    CompleteLeaseNext,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Lease(n) => write!(f, "lease({n})+complete"),
            Mode::CompleteLeaseNext => write!(f, "complete+lease-next"),
        }
    }
}

fn cell(seed: u64) -> CellSpec {
    CellSpec {
        model: "dreamshaper_8.safetensors".into(),
        loras: vec![LoraSpec {
            name: "lcm-lora-sdv1-5.safetensors".into(),
            strength: 1.0,
            sha256: String::new(),
        }],
        prompt: format!(
            "a {} fox in a forest, golden hour, highly detailed",
            ["red", "arctic", "fennec"][(seed % 3) as usize]
        ),
        negative_prompt: "blurry, lowres".into(),
        seed,
        steps: 4,
        cfg: 1.0,
        sampler: SamplerName::LCM,
        width: 512,
        height: 512,
        rng: "cpu".into(),
        bindings: [
            ("animal".to_string(), "fox".to_string()),
            ("seed".to_string(), seed.to_string()),
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

fn registration() -> WorkerRegistration {
    WorkerRegistration {
        name: "sim".into(),
        device_kind: DeviceKind::Cpu,
        device_model: "simulator".into(),
        memory_mib: 8192,
        max_pixels: 1 << 20,
        loaded: vec![],
        version: "bench".into(),
        storage: "file:///tmp/kiln-test".into(),
        render_level: kiln_proto::sampler::RENDER_LEVEL,
    }
}

/// Workers that lease and complete the cells of another sweep meanwhile.
const BUSY_WORKERS: usize = 16;

/// What a submit of 100,000 cells does to the leases and completes of workers busy on another
/// sweep: `BUSY_WORKERS` simulated workers cycle lease(1)+complete on a sweep of their own, and
/// from the submit's start until its last cell is in the queue, each cycle's time is recorded.
/// Returns (slowest cycle, cycles per second) in that window.
async fn busy_while_submitting(q: &Queue, key: &str) -> (Duration, f64) {
    let other = q
        .submit(submission(&format!("{key}-other"), 40_000))
        .await
        .unwrap()
        .id;
    q.take_in(Some(other)).await.unwrap();
    let window = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..BUSY_WORKERS {
        let q = q.clone();
        let (window, stop) = (window.clone(), stop.clone());
        let w = q.register(&registration()).await.unwrap().0;
        tasks.push(tokio::spawn(async move {
            let (mut slowest, mut cycles) = (Duration::ZERO, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let counted = window.load(Ordering::Relaxed);
                let t = Instant::now();
                let Some(c) = q.lease(w, 1, None).await.unwrap().pop() else {
                    break;
                };
                let fence = Fence {
                    cell: c.id,
                    attempt: c.attempt,
                    worker: w,
                };
                q.complete(fence, RESULT).await.unwrap();
                if counted && window.load(Ordering::Relaxed) {
                    slowest = slowest.max(t.elapsed());
                    cycles += 1;
                }
            }
            (slowest, cycles)
        }));
    }
    // Into their stride first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    window.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let out = q.submit(submission(key, SUBMIT_CELLS)).await.unwrap();
    q.take_in(Some(out.id)).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    window.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (mut slowest, mut cycles) = (Duration::ZERO, 0);
    for t in tasks {
        let (s, n) = t.await.unwrap();
        slowest = slowest.max(s);
        cycles += n;
    }
    assert!(cycles > 0, "the busy workers ran out of cells");
    q.cancel(out.id).await.unwrap();
    q.cancel(other).await.unwrap();
    (slowest, cycles as f64 / secs)
}

fn submission(key: &str, n: u64) -> Submission {
    Submission {
        name: key.into(),
        idempotency_key: key.into(),
        priority: 0,
        max_attempts: None,
        spec: String::new(),
        cells: (0..n).map(cell).collect(),
        owner: None,
        unique_name: false,
    }
}

async fn bench(name: &str, url: DatabaseUrl) {
    let store = Store::connect(
        &url,
        &StoreOptions {
            max_connections: std::env::var("KILN_BENCH_PG_POOL")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(32),
        },
    )
    .await
    .unwrap();
    let mut cfg = QueueConfig::default();
    if let Some(n) = std::env::var("KILN_BENCH_INTAKE_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.intake_chunk = n;
    }
    if let Some(l) = std::env::var("KILN_BENCH_LOOKAHEAD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.lookahead = l;
    }
    // The same queue with the intake off: every cell inserted with its sweep, as before it.
    let direct = Queue::new(
        store.clone(),
        Arc::new(SystemClock),
        QueueConfig {
            intake_chunk: usize::MAX,
            ..cfg.clone()
        },
    );
    let queue = Queue::new(store.clone(), Arc::new(SystemClock), cfg);

    // The CPU part of submit alone (validation, hashes, JSON), for the profile in BENCHMARKS.md.
    let t = Instant::now();
    for (i, c) in (0..SUBMIT_CELLS).map(cell).enumerate() {
        std::hint::black_box(kiln_coordinator::sweep::NewCell::new(i as u32, c).unwrap());
    }
    let prepare_s = t.elapsed().as_secs_f64();
    // Submit with every cell inserted with the sweep (the intake off) and with the default:
    // the first chunk with the sweep, the rest as intake chunks, moved by the mover (woken by
    // the submit) and by `take_in` here. Each runs twice, in the order off, on, on, off, since
    // every submit finds the earlier ones' rows in the table (more index pages to insert into).
    let mut submits = Vec::new();
    for (round, intake) in [false, true, true, false].into_iter().enumerate() {
        let q = if intake { &queue } else { &direct };
        let t = Instant::now();
        let out = q
            .submit(submission(&format!("bench-submit-{round}"), SUBMIT_CELLS))
            .await
            .unwrap();
        let submit_s = t.elapsed().as_secs_f64();
        assert_eq!(out.cell_count, SUBMIT_CELLS);
        q.take_in(Some(out.id)).await.unwrap();
        let queued_s = t.elapsed().as_secs_f64();
        let s = q.sweep(out.id).await.unwrap();
        assert_eq!(s.counts.available, SUBMIT_CELLS);
        assert_eq!(store.intake_pending().await.unwrap(), 0);
        // Cancel it so the next phases have their own queue.
        q.cancel(out.id).await.unwrap();
        submits.push((intake, submit_s, queued_s));
    }

    // Workers busy on another sweep while a sweep is submitted, the intake off and on.
    let mut busy = Vec::new();
    if std::env::var_os("KILN_BENCH_SUBMIT_ONLY").is_none() {
        for (q, how) in [(&direct, "intake off"), (&queue, "intake on ")] {
            let key = format!("bench-busy-{}", busy.len());
            busy.push((how, busy_while_submitting(q, &key).await));
        }
    }

    // Cycle modes: lease(n) then complete each (two kinds of call per cell), and the combined
    // complete-and-lease-next call (one call per cell after the first lease).
    let modes: &[Mode] = if std::env::var_os("KILN_BENCH_SUBMIT_ONLY").is_some() {
        &[]
    } else {
        &[Mode::Lease(1), Mode::Lease(4), Mode::CompleteLeaseNext]
    };
    for &mode in modes {
        let key = format!("bench-cycle-{mode}");
        let sweep = queue
            .submit(submission(&key, CYCLE_CELLS))
            .await
            .unwrap()
            .id;
        // Every cell in the queue before the clock starts.
        queue.take_in(Some(sweep)).await.unwrap();
        let reg = registration();
        let mut tasks = Vec::new();
        let t = Instant::now();
        for _ in 0..WORKERS {
            let q = queue.clone();
            let w = q.register(&reg).await.unwrap().0;
            tasks.push(tokio::spawn(async move {
                let fence = |c: &LeasedCell| Fence {
                    cell: c.id,
                    attempt: c.attempt,
                    worker: w,
                };
                let mut done = 0u64;
                match mode {
                    Mode::Lease(batch) => loop {
                        let leased = q.lease(w, batch, None).await.unwrap();
                        if leased.is_empty() {
                            return done;
                        }
                        for c in leased {
                            q.complete(fence(&c), RESULT).await.unwrap();
                            done += 1;
                        }
                    },
                    Mode::CompleteLeaseNext => {
                        let mut next = q.lease(w, 1, None).await.unwrap();
                        while let Some(c) = next.pop() {
                            next = q
                                .complete_and_lease(fence(&c), RESULT, 1, None)
                                .await
                                .unwrap();
                            done += 1;
                        }
                        done
                    }
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        let s = queue.sweep(sweep).await.unwrap();
        assert_eq!((total, s.counts.completed), (CYCLE_CELLS, CYCLE_CELLS));
        println!(
            "{name:8} {mode}: {CYCLE_CELLS} cycles, {WORKERS} workers: {secs:.2} s = {:.0} cycles/s",
            CYCLE_CELLS as f64 / secs
        );
    }
    println!(
        "{name:8} validate+hash+JSON of {SUBMIT_CELLS} cells alone, one thread: {prepare_s:.2} s"
    );
    for (how, (slowest, rate)) in busy {
        println!(
            "{name:8} {BUSY_WORKERS} workers busy on another sweep while {SUBMIT_CELLS} cells are submitted, {how}: slowest lease+complete {:.0} ms, {rate:.0} cycles/s",
            slowest.as_secs_f64() * 1e3
        );
    }
    for (intake, submit_s, queued_s) in submits {
        let how = if intake { "intake on " } else { "intake off" };
        println!(
            "{name:8} submit, {how}: {SUBMIT_CELLS} cells in {submit_s:.2} s = {:.0} cells/s; all in the queue after {queued_s:.2} s",
            SUBMIT_CELLS as f64 / submit_s
        );
    }
    store.close().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |b: &str| which.is_empty() || which.iter().any(|w| w == b);
    if want("sqlite") {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        ));
        bench("sqlite", url).await;
    }
    if want("postgres") {
        let base = std::env::var("KILN_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("kiln_bench_{}", std::process::id());
        let admin = sqlx::PgPool::connect(&base).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = DatabaseUrl::Postgres(format!("{base}{sep}options=-c%20search_path%3D{schema}"));
        bench("postgres", url).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&admin)
            .await
            .unwrap();
    }
}
