//! The worker's model cache and render thread: a LoRA strength change re-merges from the
//! cached base instead of reading the checkpoint, the budget evicts least recently used first,
//! a pipeline prepared in the background is found ready by the render that needs it, and a
//! batch job answers each cell.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use kiln_worker::agent::renderer::{Item, RenderFailure, Renderer};
use kiln_worker::cache::{Budget, CacheStats, Found, PipelineCache, PipelineKey};
use kiln_worker::engine::{Device, LoraSpec, RenderRequest, SamplerName};
use tokio::sync::watch;

use crate::fixture::path;

fn key(strength: Option<f32>) -> PipelineKey {
    PipelineKey {
        model: path("tiny-sd15"),
        loras: strength
            .map(|s| {
                vec![LoraSpec {
                    path: path("lora_kohya.safetensors"),
                    strength: s,
                    text_encoder_strength: None,
                }]
            })
            .unwrap_or_default(),
        vae: None,
        device: Device::Cpu,
    }
}

#[test]
fn a_strength_change_rebuilds_from_the_cached_base() {
    let mut cache = PipelineCache::new(1 << 30);
    assert_eq!(cache.get(&key(Some(1.0))).expect("load").1, Found::Read);
    assert_eq!(
        cache.get(&key(Some(0.5))).expect("rebuild").1,
        Found::Rebuilt
    );
    assert_eq!(cache.get(&key(None)).expect("rebuild").1, Found::Rebuilt);
    assert_eq!(cache.get(&key(Some(1.0))).expect("hit").1, Found::Hit);
    assert_eq!(
        cache.stats,
        CacheStats {
            reads: 1,
            rebuilds: 2,
            hits: 1,
            evictions: 0
        }
    );
    assert_eq!(cache.keys().count(), 3);
}

#[test]
fn over_budget_the_least_recently_used_pipeline_goes_first() {
    // Measure one base and one merged pipeline, then allow the base and two pipelines.
    let mut probe = PipelineCache::new(u64::MAX);
    probe.get(&key(Some(1.0))).expect("load");
    let base_and_one = probe.used_bytes();
    let base = probe.base(&path("tiny-sd15")).expect("base cached").bytes();
    let one = base_and_one - base;
    assert!(one > 0);

    let mut cache = PipelineCache::new(base + 2 * one);
    cache.get(&key(Some(1.0))).expect("a");
    cache.get(&key(Some(0.5))).expect("b");
    cache
        .get(&key(Some(1.0)))
        .expect("a again: now b is least recent");
    cache.get(&key(Some(0.25))).expect("c evicts b");
    let keys: Vec<f32> = cache.keys().map(|k| k.loras[0].strength).collect();
    assert_eq!(keys, vec![1.0, 0.25]);
    assert_eq!(cache.stats.evictions, 1);
    assert_eq!(cache.stats.reads, 1, "the base stayed");
    assert!(cache.used_bytes() <= base + 2 * one);
}

fn item(seed: u64) -> (Item, watch::Receiver<(u32, u32)>) {
    let (progress, rx) = watch::channel((0, 0));
    (
        Item {
            request: RenderRequest {
                prompt: "a lighthouse".into(),
                negative_prompt: String::new(),
                seed,
                steps: 2,
                cfg_scale: 1.0,
                sampler: SamplerName::LCM,
                width: 64,
                height: 64,
                clip_skip: 1,
                ..RenderRequest::default()
            },
            cancel: Arc::new(AtomicBool::new(false)),
            progress,
        },
        rx,
    )
}

#[tokio::test]
async fn a_prepared_pipeline_is_ready_when_its_render_comes() {
    let renderer = Renderer::spawn(Budget::both(1 << 30));
    renderer.prepare(key(Some(0.5)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !renderer.loaded().contains(&key(Some(0.5))) {
        assert!(Instant::now() < deadline, "never prepared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (it, rx) = item(1);
    let out = renderer.render(key(Some(0.5)), vec![it]).await;
    let rendered = out.into_iter().next().unwrap().expect("renders");
    assert_eq!(rendered.load_ms, 0.0, "the render waited for a load");
    assert_eq!(*rx.borrow(), (2, 2), "progress reached the last step");
}

#[tokio::test]
async fn a_batch_job_answers_every_cell_and_fails_a_bad_one_alone() {
    let renderer = Renderer::spawn(Budget::both(1 << 30));
    let (a, _ra) = item(1);
    let (mut bad, _rb) = item(2);
    bad.request.width = 100;
    let (c, _rc) = item(3);
    let out = renderer.render(key(None), vec![a, bad, c]).await;
    assert_eq!(out.len(), 3);
    let a = out[0].as_ref().expect("first renders");
    assert!(matches!(&out[1], Err(RenderFailure::BadInput(m)) if m.contains("100")));
    let c = out[2].as_ref().expect("third renders");
    assert_eq!(a.times.batch, 2, "the two valid cells shared a batch");
    assert_ne!(a.png, c.png);
}

#[test]
fn cpu_pipelines_count_against_the_host_budget_only() {
    // No device memory at all: CPU pipelines must still be kept (they live in host memory),
    // and dropping the GPU pipelines after an out-of-memory leaves them alone.
    let mut cache = PipelineCache::with_budget(Budget {
        host_bytes: 1 << 30,
        device_bytes: 0,
    });
    cache.get(&key(Some(1.0))).expect("a");
    cache.get(&key(Some(0.5))).expect("b");
    cache.get(&key(None)).expect("c");
    assert_eq!(cache.keys().count(), 3);
    assert_eq!(cache.stats.evictions, 0);
    assert_eq!(cache.used_device_bytes(), 0);
    assert_eq!(cache.clear_device(), 0);
    assert_eq!(cache.keys().count(), 3);
}
