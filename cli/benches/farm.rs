//! Farm efficiency (issue 5), not a test: images/s through coordinator + worker ÷ images/s of
//! the bare engine loop, on the same tiny model and CPU, in one process and one run. The tiny
//! model renders in milliseconds, so per-image overhead (lease, heartbeat, PNG, upload,
//! complete) shows the most here.
//!
//! Run: `cargo bench -p kiln-cli --bench farm --profile dev [-- CELLS]` (default 200 cells,
//! 64×64, LCM 4 steps, kohya LoRA at 1.0; SQLite coordinator and file:// storage in a temp dir).
//! The bare loop and the farm run alternately, 3 rounds of CELLS images each, and the medians
//! are compared, so load that drifts during the run hits both sides. The worker polls an empty
//! queue every 50 ms (it idles during the bare rounds; a sweep starts at most 50 ms late).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use kiln_coordinator::clock::SystemClock;
use kiln_coordinator::config::Settings;
use kiln_coordinator::queue::Queue;
use kiln_coordinator::store::Store;
use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_worker::agent::{self, AgentConfig};
use kiln_worker::engine::{Device, LoraSpec, Pipeline, RenderRequest, SamplerName};
use kiln_worker::upload::{RetryPolicy, Storage, StorageUrl};

/// How often the bench asks whether the sweep is done: the end time is late by at most this
/// (0.2 % of a 20 s run), and the polls cost the shared CPU little (every 5 ms, as before
/// 2026-11-26 13:15, they took a few percent of it and were counted as farm overhead).
const POLL: Duration = Duration::from_millis(50);

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference")
}

fn request(seed: u64) -> RenderRequest {
    RenderRequest {
        prompt: format!("a red fox in a forest, seed {seed}"),
        negative_prompt: String::new(),
        seed,
        steps: 4,
        cfg_scale: 1.0,
        sampler: SamplerName::LCM,
        width: 64,
        height: 64,
        clip_skip: 1,
        ..RenderRequest::default()
    }
}

/// The bare engine loop: one loaded pipeline, render + PNG encode, back to back; seeds from
/// `first`.
fn bare(p: &Pipeline, first: u64, n: u64) -> f64 {
    let cancel = AtomicBool::new(false);
    let t = Instant::now();
    for seed in first..first + n {
        let out = p.render(&request(seed), &mut |_| {}, &cancel).unwrap();
        std::hint::black_box(out.to_png().unwrap());
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// The same cells through an embedded coordinator and one worker agent (prefetch 1): starts
/// them, warms the worker's pipeline with one cell, and returns a function that runs one
/// sweep of `n` cells from seed `first` and gives its images/s.
async fn farm() -> (tempfile::TempDir, Farm) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Settings {
        db: Some(format!("sqlite://{}", dir.path().join("kiln.db").display())),
        listen: Some("127.0.0.1:0".into()),
        maintenance_interval_ms: Some(1000),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let store = Store::connect(&cfg.db, &cfg.store).await.unwrap();
    let queue = Queue::new(store, Arc::new(SystemClock), cfg.queue.clone());
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        kiln_coordinator::server::serve(
            queue,
            listener,
            &cfg.security,
            cfg.maintenance_interval,
            None,
            std::future::pending(),
        )
        .await
    });
    let url: StorageUrl = format!("file://{}", dir.path().join("out").display())
        .parse()
        .unwrap();
    let storage = Storage::open(&url, &Default::default()).await.unwrap();
    let agent_cfg = AgentConfig {
        coordinator: format!("http://{addr}"),
        access: Default::default(),
        name: "bench".into(),
        device: Device::Cpu,
        models: vec![fixtures()],
        embeddings: Vec::new(),
        cache_bytes: 1 << 30,
        paths: Default::default(),
        device_cache_bytes: 1 << 30,
        max_pixels: 1 << 20,
        memory_mib: 8192,
        prefetch: 1,
        batch: 1,
        upload_retry: RetryPolicy::default(),
        idle_poll: Duration::from_millis(50),
        drain_timeout: Duration::from_secs(60),
        metrics_addr: None,
        model_cache: Default::default(),
        yielding: Default::default(),
        vae_tiling: Default::default(),
    };
    let client = SweepServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Warm the worker's pipeline cache with one cell so both sides exclude model loading.
    let submit = |key: &str, seeds: std::ops::Range<u64>| {
        let cells = seeds
            .map(|seed| pb::RenderCell {
                model: "tiny-sd15".into(),
                loras: vec![pb::LoraRef {
                    name: "lora_kohya".into(),
                    strength: 1.0,
                    sha256: String::new(),
                }],
                prompt: format!("a red fox in a forest, seed {seed}"),
                seed,
                steps: 4,
                cfg: 1.0,
                sampler: pb::Sampler::Lcm as i32,
                width: 64,
                height: 64,
                ..Default::default()
            })
            .collect();
        vec![
            pb::SubmitSweepRequest {
                part: Some(pb::submit_sweep_request::Part::Header(pb::SweepHeader {
                    idempotency_key: key.into(),
                    ..Default::default()
                })),
            },
            pb::SubmitSweepRequest {
                part: Some(pb::submit_sweep_request::Part::Cells(pb::CellChunk {
                    cells,
                })),
            },
        ]
    };
    tokio::spawn(agent::run(agent_cfg, storage, std::future::pending()));
    let wait = |id: u64, mut c: SweepServiceClient<tonic::transport::Channel>| async move {
        loop {
            let s = c
                .get_sweep(pb::GetSweepRequest { sweep_id: id })
                .await
                .unwrap()
                .into_inner();
            if s.finished {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    };
    let run: Farm = Box::new(move |first, n| {
        let mut client = client.clone();
        let msgs = submit(&format!("bench-{first}"), first..first + n);
        Box::pin(async move {
            let t = Instant::now();
            let s = client
                .submit_sweep(tokio_stream::iter(msgs))
                .await
                .unwrap()
                .into_inner();
            wait(s.sweep_id, client.clone()).await;
            n as f64 / t.elapsed().as_secs_f64()
        })
    });
    run(1_000_000, 1).await;
    (dir, run)
}

type Farm = Box<dyn Fn(u64, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = f64>>>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // SAFETY: first thing in main, before any thread is started (as `kiln` does).
    unsafe { kiln_worker::engine::threads::fix_thread_count(None) };
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let rounds = 3;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_dir, farm) = rt.block_on(farm());
    let lora = LoraSpec {
        path: fixtures().join("lora_kohya.safetensors"),
        strength: 1.0,
        text_encoder_strength: None,
    };
    let pipeline = Pipeline::load(&fixtures().join("tiny-sd15"), &[lora], Device::Cpu).unwrap();
    bare(&pipeline, 2_000_000, 1);
    // Alternate the two so that load drifting during the run hits both.
    let (mut bares, mut farms) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let first = round * n;
        let b = bare(&pipeline, first, n);
        let f = rt.block_on(farm(first, n));
        println!(
            "round {round}: bare {b:.2} images/s, coordinator + worker {f:.2} images/s, \
             efficiency {:.3}",
            f / b
        );
        bares.push(b);
        farms.push(f);
    }
    let (b, f) = (median(bares), median(farms));
    println!("bare engine loop: {n} images per round, median {b:.2} images/s");
    println!("coordinator + worker: {n} images per round, median {f:.2} images/s");
    println!("farm efficiency (ratio of medians): {:.3}", f / b);
    std::process::exit(0);
}
