//! The worker agent: register → lease → resolve files → render on the render thread → PNG →
//! upload → complete, with heartbeats and per-step progress while rendering.
//!
//! Rules it keeps:
//! - a lost lease (heartbeat says so) aborts the render and the attempt is never completed;
//! - an image is reported complete only after its object is stored; storage that stays down
//!   fails the attempt as transient (retried later, maybe elsewhere);
//! - failures are classed: bad input is not retried, device trouble is retried elsewhere,
//!   anything passing is retried after a backoff;
//! - the coordinator going away is survived: calls are retried with backoff, and the worker
//!   registers again if the coordinator forgot it;
//! - uploads and completes run beside the next render (at most two in flight), under the same
//!   heartbeats, so the device does not wait on storage or the network;
//! - a drain (SIGTERM) finishes the current render and its upload, and releases
//!   leased-but-unstarted cells.

pub mod link;
pub mod renderer;
pub mod resolve;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use self::link::{Link, Tracked};
use self::renderer::{RenderFailure, Renderer};
use crate::cache::PipelineKey;
use crate::engine::{Device, RenderRequest, SamplerKind};
use crate::upload::{RetryPolicy, Storage, object_key};

/// Agent settings, validated by the CLI.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Coordinator URL.
    pub coordinator: String,
    /// Worker name shown in `kiln workers`.
    pub name: String,
    /// Compute device.
    pub device: Device,
    /// Folders searched for model and LoRA names.
    pub models: Vec<PathBuf>,
    /// Pipeline cache budget, bytes.
    pub cache_bytes: u64,
    /// Largest width×height it accepts.
    pub max_pixels: u64,
    /// Device memory declared to the coordinator, MiB.
    pub memory_mib: u64,
    /// Cells leased ahead of the one rendering (0 = lease one at a time).
    pub prefetch: u32,
    /// Upload retries.
    pub upload_retry: RetryPolicy,
    /// Wait between empty lease polls.
    pub idle_poll: Duration,
}

/// One leased attempt the agent holds.
struct Held {
    task: pb::LeasedTask,
    cancel: Arc<AtomicBool>,
    /// Set when the coordinator says the lease is lost (never complete).
    lost: Arc<AtomicBool>,
}

impl Held {
    fn attempt(&self) -> pb::AttemptRef {
        pb::AttemptRef {
            cell_id: self.task.cell_id,
            attempt: self.task.attempt,
        }
    }
}

/// Runs the agent until `shutdown` resolves, then drains.
pub async fn run(
    cfg: AgentConfig,
    storage: Storage,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let info = pb::WorkerInfo {
        name: cfg.name.clone(),
        device_kind: match cfg.device {
            Device::Cpu => pb::DeviceKind::Cpu,
            Device::Cuda(_) => pb::DeviceKind::Cuda,
            Device::Metal(_) => pb::DeviceKind::Metal,
        } as i32,
        device_model: cfg.device.to_string(),
        memory_mib: cfg.memory_mib,
        max_pixels: cfg.max_pixels,
        loaded: vec![],
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let link = tokio::select! {
        l = Link::connect(&cfg.coordinator, info) => l,
        _ = &mut shutdown => return Ok(()),
    };
    let renderer = Renderer::spawn(cfg.cache_bytes);
    let mut queue: VecDeque<Held> = VecDeque::new();
    // Affinity keys of cells rendered, with the pipeline each used.
    let mut affinity: Vec<(String, PipelineKey)> = Vec::new();
    // Every attempt held, for the heartbeat task; uploads finish in the background.
    let tracked: Tracked = Arc::default();
    let heartbeats = link.spawn_heartbeats(tracked.clone());
    let mut finishing: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    let mut draining = false;
    loop {
        if !draining && queue.len() <= cfg.prefetch as usize {
            let loaded = loaded_keys(&affinity, &renderer);
            let want = cfg.prefetch + 1 - queue.len() as u32;
            let tasks = tokio::select! {
                t = link.lease(want, loaded) => t,
                _ = &mut shutdown => { draining = true; Vec::new() }
            };
            for task in tasks {
                let h = Held {
                    task,
                    cancel: Arc::new(AtomicBool::new(false)),
                    lost: Arc::new(AtomicBool::new(false)),
                };
                track(&tracked, &h);
                queue.push_back(h);
            }
        }
        let Some(held) = queue.pop_front() else {
            if draining {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.idle_poll) => continue,
                _ = &mut shutdown => { draining = true; continue }
            }
        };
        if draining {
            queue.push_front(held);
            break;
        }
        let rendered = tokio::select! {
            r = render_one(&cfg, &link, &renderer, &held, &mut affinity) => r,
            _ = &mut shutdown => {
                // Finish the render in flight, then drain.
                draining = true;
                render_one(&cfg, &link, &renderer, &held, &mut affinity).await
            }
        };
        match rendered {
            Some(rendered) => {
                // Upload and complete beside the next render; at most two in flight.
                while finishing.len() >= 2 {
                    finishing.join_next().await;
                }
                let (link, storage, tracked) = (link.clone(), storage.clone(), tracked.clone());
                let retry = cfg.upload_retry.clone();
                let device = cfg.device;
                finishing.spawn(async move {
                    let a = held.attempt();
                    if let Err(e) = finish(&link, &storage, &retry, device, &held, rendered).await {
                        tracing::warn!(cell = a.cell_id, error = %e, "attempt ended without a report");
                    }
                    untrack(&tracked, a);
                });
            }
            None => untrack(&tracked, held.attempt()),
        }
        // Drop prefetched attempts the coordinator took back meanwhile.
        queue.retain(|h| {
            let keep = !h.lost.load(Ordering::Relaxed);
            if !keep {
                untrack(&tracked, h.attempt());
            }
            keep
        });
    }
    while finishing.join_next().await.is_some() {}
    let rest: Vec<pb::AttemptRef> = queue.iter().map(Held::attempt).collect();
    link.release(rest, true).await;
    heartbeats.abort();
    tracing::info!("drained");
    Ok(())
}

fn track(tracked: &Tracked, h: &Held) {
    tracked.lock().unwrap_or_else(|e| e.into_inner()).push((
        h.attempt(),
        h.cancel.clone(),
        h.lost.clone(),
    ));
}

fn untrack(tracked: &Tracked, a: pb::AttemptRef) {
    tracked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(x, _, _)| *x != a);
}

fn loaded_keys(affinity: &[(String, PipelineKey)], renderer: &Renderer) -> Vec<String> {
    let loaded = renderer.loaded();
    affinity
        .iter()
        .filter(|(_, k)| loaded.contains(k))
        .map(|(a, _)| a.clone())
        .collect()
}

/// Resolves and renders one attempt. Failures are reported here; `None` means there is
/// nothing to upload (failed, cancelled or lost).
async fn render_one(
    cfg: &AgentConfig,
    link: &Link,
    renderer: &Renderer,
    held: &Held,
    affinity: &mut Vec<(String, PipelineKey)>,
) -> Option<renderer::Rendered> {
    let task = &held.task;
    let attempt = held.attempt();
    let report = |class, msg: String| async move {
        if let Err(e) = link.fail(attempt, class, msg).await {
            tracing::warn!(cell = attempt.cell_id, error = %e, "failure not reported");
        }
    };
    let Some(cell) = task.cell.clone() else {
        report(pb::FailureClass::BadInput, "leased task has no cell".into()).await;
        return None;
    };
    let key = match pipeline_key(cfg, &cell) {
        Ok(k) => k,
        Err(msg) => {
            report(pb::FailureClass::BadInput, msg).await;
            return None;
        }
    };
    let request = RenderRequest {
        prompt: cell.prompt.clone(),
        negative_prompt: cell.negative_prompt.clone(),
        seed: cell.seed,
        steps: cell.steps as usize,
        cfg_scale: cell.cfg,
        sampler: match pb::Sampler::try_from(cell.sampler) {
            Ok(pb::Sampler::EulerA) => SamplerKind::EulerAncestral,
            _ => SamplerKind::Lcm,
        },
        width: cell.width,
        height: cell.height,
    };
    let (progress_tx, progress_rx) = watch::channel((0u32, cell.steps));
    let reporter = link.spawn_progress(attempt, progress_rx, held.cancel.clone());
    let rendered = renderer
        .render(key.clone(), request, held.cancel.clone(), progress_tx)
        .await;
    reporter.abort();
    if held.lost.load(Ordering::Relaxed) {
        tracing::info!(
            cell = task.cell_id,
            attempt = task.attempt,
            "lease lost: result dropped"
        );
        return None;
    }
    match rendered {
        Ok(r) => {
            affinity.retain(|(a, _)| a != &task.affinity_key);
            affinity.push((task.affinity_key.clone(), key));
            if affinity.len() > 64 {
                affinity.remove(0);
            }
            Some(r)
        }
        Err(RenderFailure::Cancelled) => {
            report(pb::FailureClass::Cancelled, "cancelled by user".into()).await;
            None
        }
        Err(RenderFailure::BadInput(m)) => {
            report(pb::FailureClass::BadInput, m).await;
            None
        }
        Err(RenderFailure::Resource(m)) => {
            report(pb::FailureClass::Resource, m).await;
            None
        }
    }
}

/// Uploads a rendered image under its attempt's own key, then completes the attempt (or
/// fails it as transient when storage stays down). Never completes without the object.
async fn finish(
    link: &Link,
    storage: &Storage,
    retry: &RetryPolicy,
    device: Device,
    held: &Held,
    rendered: renderer::Rendered,
) -> anyhow::Result<()> {
    let task = &held.task;
    let attempt = held.attempt();
    let okey = object_key(task.sweep_id, task.cell_id, task.attempt);
    let sha256 = hex::encode(Sha256::digest(&rendered.png));
    let bytes = rendered.png.len() as u64;
    let t = Instant::now();
    if let Err(e) = storage.put_with_retry(&okey, rendered.png, retry).await {
        return link
            .fail(
                attempt,
                pb::FailureClass::Transient,
                format!("upload failed: {e}"),
            )
            .await;
    }
    let upload_ms = t.elapsed().as_millis() as u64;
    if held.lost.load(Ordering::Relaxed) {
        // The object stays under this attempt's own key; it can never be a result.
        return Ok(());
    }
    let result = pb::RenderResult {
        object_key: okey,
        storage: storage.url().to_string(),
        sha256,
        bytes,
        width: rendered.width,
        height: rendered.height,
        device: device.to_string(),
        timings_ms: [
            ("load".to_string(), rendered.load_ms),
            ("render".to_string(), rendered.render_ms),
            ("encode".to_string(), rendered.encode_ms),
            ("upload".to_string(), upload_ms),
        ]
        .into(),
        parameters: rendered.parameters,
        notes: rendered.notes,
    };
    link.complete(attempt, result).await
}

fn pipeline_key(cfg: &AgentConfig, cell: &pb::RenderCell) -> Result<PipelineKey, String> {
    let model = resolve::resolve(&cell.model, &cfg.models, "model")?;
    let loras = cell
        .loras
        .iter()
        .map(|l| Ok((resolve::resolve(&l.name, &cfg.models, "LoRA")?, l.strength)))
        .collect::<Result<Vec<_>, String>>()?;
    if u64::from(cell.width) * u64::from(cell.height) > cfg.max_pixels {
        return Err(format!(
            "{}x{} is past this worker's max pixels {}",
            cell.width, cell.height, cfg.max_pixels
        ));
    }
    Ok(PipelineKey {
        model,
        loras,
        device: cfg.device,
    })
}
