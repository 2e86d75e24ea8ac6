//! The worker agent: register → lease → resolve files → render on the render thread → PNG →
//! upload → complete, with heartbeats and per-step progress while rendering.
//!
//! Rules it keeps:
//! - a lost lease (heartbeat says so) aborts the render and the attempt is never completed;
//! - an image is reported complete only after its object is stored; storage that stays down
//!   fails the attempt as transient (retried later, maybe elsewhere);
//! - a leased cell is checked and read into its request and pipeline key before anything is
//!   fetched or rendered; what cannot be is bad input ([`cell`]);
//! - failures are classed: bad input is not retried, device trouble is retried elsewhere,
//!   anything passing is retried after a backoff;
//! - the coordinator going away is survived: calls are retried with backoff, and the worker
//!   registers again if the coordinator forgot it;
//! - the device does not wait on the network: leasing runs beside the render and keeps a
//!   backlog ([`backlog`]), the next cell's pipeline is prepared while the current one renders,
//!   and uploads and completes run beside the next render (at most two in flight), all under
//!   one heartbeat task;
//! - with `batch > 1`, backlog cells that share model, LoRA stack, size, steps, CFG and sampler
//!   render as one UNet batch, each with its own seed's noise;
//! - a drain (SIGTERM) finishes the current render and its upload, and releases
//!   leased-but-unstarted cells;
//! - the worker yields to its PC's owner ([`yielding`], [`pause`]): while a listed game runs,
//!   another process uses the GPU, outside the allowed hours or when the admin pauses it, it
//!   stops leasing, finishes or hands back its render within a grace, hands back its backlog
//!   and frees device memory, and resumes by itself; the reason rides on the heartbeat;
//! - textual-inversion embeddings come from each models folder's `embeddings/` and the
//!   `--embeddings` folders, read on the render thread at start and again when they change
//!   ([`inversions`]);
//! - a model, VAE or LoRA pinned by sha256 renders with exactly that content: a matching
//!   `--models` file or the disk model cache's, downloaded just before the render when this
//!   machine lacks it (the download is the cell's load time and activity), and the lease
//!   calls tell the coordinator which models this machine holds ([`pinned`]);
//! - an `hf:` or `https://` reference is planned without the network and fetched just
//!   before the render, as a pinned download is ([`remote`]).

pub mod access;
mod backlog;
mod cell;
mod finish;
pub mod inversions;
pub mod link;
pub mod metrics;
mod pause;
mod pictures;
pub mod pinned;
mod remote;
pub mod renderer;
pub mod resolve;
pub mod tracked;
pub mod yielding;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::v1 as pb;
use tokio::sync::watch;

use self::backlog::{Backlog, Held, Leaser};
use self::finish::Finisher;
use self::link::Link;
use self::pictures::{PictureFailure, Pictures};
use self::renderer::{Item, RenderFailure, Renderer};
use self::tracked::Tracked;
use crate::engine::{Device, InitImage, VaeTiling};
use crate::upload::{RetryPolicy, Storage};

/// Agent settings, checked once by [`AgentConfig::validate`] when the agent starts.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Coordinator URL.
    pub coordinator: String,
    /// Token and TLS trust for the coordinator.
    pub access: access::Access,
    /// Worker name shown in `kiln workers`.
    pub name: String,
    /// Compute device.
    pub device: Device,
    /// Folders searched for model and LoRA names; each one's `embeddings/` subfolder holds
    /// textual-inversion embeddings.
    pub models: Vec<PathBuf>,
    /// More folders of textual-inversion embeddings, after the models folders' (a later
    /// folder's file wins a name).
    pub embeddings: Vec<PathBuf>,
    /// Whether a cell may name files outside `models`.
    pub paths: resolve::PathPolicy,
    /// Pipeline cache budget in host memory, bytes.
    pub cache_bytes: u64,
    /// Pipeline cache budget in device memory, bytes (GPU devices only).
    pub device_cache_bytes: u64,
    /// Largest width×height it accepts.
    pub max_pixels: u64,
    /// Device memory declared to the coordinator, MiB.
    pub memory_mib: u64,
    /// Cells held beyond the next batch: while a batch renders, the backlog holds `batch +
    /// prefetch` cells (0 = only the next batch).
    pub prefetch: u32,
    /// Cells rendered as one UNet batch when they share model, LoRA stack, size, steps, CFG
    /// and sampler (1 = one at a time).
    pub batch: u32,
    /// Upload retries.
    pub upload_retry: RetryPolicy,
    /// Wait between empty lease polls.
    pub idle_poll: Duration,
    /// On a drain, the longest wait for the uploads and completes of finished renders when
    /// storage or the coordinator does not answer; then they are given up (their leases
    /// expire and the cells run again, so nothing is lost).
    pub drain_timeout: Duration,
    /// Where `GET /metrics` (Prometheus) is served; `None`: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The disk model cache for models pinned by sha256, and where they are fetched from.
    pub model_cache: pinned::ModelCacheConfig,
    /// When to yield to the PC's owner.
    pub yielding: yielding::YieldConfig,
    /// When the VAE decodes in tiles (every render on this worker).
    pub vae_tiling: VaeTiling,
}

impl AgentConfig {
    /// Checks the settings once, before the agent starts: the coordinator URL parses, the
    /// models folders exist, the batch and timings are in range.
    pub fn validate(&self) -> anyhow::Result<()> {
        access::endpoint(&self.coordinator, &self.access)
            .map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
        for dir in &self.models {
            anyhow::ensure!(dir.is_dir(), "--models {}: not a folder", dir.display());
        }
        for dir in &self.embeddings {
            anyhow::ensure!(dir.is_dir(), "--embeddings {}: not a folder", dir.display());
        }
        anyhow::ensure!(
            (1..=64).contains(&self.batch),
            "--batch {}: must be 1..=64",
            self.batch
        );
        anyhow::ensure!(
            !self.idle_poll.is_zero(),
            "the idle poll interval must not be 0"
        );
        anyhow::ensure!(
            !self.drain_timeout.is_zero(),
            "the drain timeout must not be 0"
        );
        anyhow::ensure!(
            self.upload_retry.attempts >= 1,
            "upload tries must be at least 1"
        );
        self.yielding.validate()
    }

    /// Where textual-inversion embeddings are looked for: each models folder's `embeddings/`
    /// (which may appear later), then the `embeddings` folders.
    pub fn inversion_dirs(&self) -> Vec<PathBuf> {
        let subfolders = self.models.iter().map(|m| m.join("embeddings"));
        subfolders.chain(self.embeddings.iter().cloned()).collect()
    }
}

/// Runs the agent until `shutdown` resolves, then drains.
pub async fn run(
    cfg: AgentConfig,
    storage: Storage,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    // The admin's orders (heartbeat replies): a drain ends the agent as a SIGTERM does.
    let (orders, orders_rx) = watch::channel(yielding::Order::None);
    let mut drain_order = orders_rx.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = drain_order.wait_for(|o| *o == yielding::Order::Drain) => {
                tracing::info!("drain asked by the coordinator's admin");
            }
        }
    };
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
        storage: storage.url().to_string(),
        render_level: kiln_proto::sampler::RENDER_LEVEL,
    };
    let pinned = pinned::Pinned::open(
        &cfg.model_cache,
        &storage,
        cfg.models.clone(),
        cfg.paths,
        cfg.inversion_dirs(),
    )
    .map_err(|e| anyhow::anyhow!("--model-cache: {e}"))?;
    // Loads take the metadata's file hashes from the same memo (hashed once per file).
    crate::engine::load::hashes::install(Box::new(pinned.memo()));
    let link = tokio::select! {
        l = Link::connect(&cfg.coordinator, &cfg.access, info) => l?,
        _ = &mut shutdown => return Ok(()),
    };
    link.set_cached_models(pinned.held().await);
    let budget = crate::cache::Budget {
        host_bytes: cfg.cache_bytes,
        device_bytes: cfg.device_cache_bytes,
    };
    let renderer = Renderer::spawn_with_inversions(budget, cfg.inversion_dirs());
    let metrics =
        metrics::Metrics::new(cfg.memory_mib << 20).with_model_cache(pinned.disk().clone());
    let serving = match cfg.metrics_addr {
        Some(addr) => Some(
            metrics::serve(addr, metrics.clone(), renderer.clone())
                .await?
                .1,
        ),
        None => None,
    };
    let pictures = Pictures::default();
    let batch = cfg.batch.max(1) as usize;
    let backlog = Arc::new(Backlog::new(batch, cfg.prefetch as usize));
    // Every attempt held, for the heartbeat task; uploads finish in the background.
    let tracked = Tracked::default();
    let y = &cfg.yielding;
    let mut yield_rx = yielding::spawn_monitor(y.sources(orders_rx), y.clock(), y.poll).await;
    let heartbeats = link.spawn_heartbeats(tracked.clone(), yield_rx.clone(), orders);
    let (stop_leasing, stop_rx) = watch::channel(false);
    let planner = cfg.clone();
    let leaser = Arc::new(Leaser {
        link: link.clone(),
        renderer: renderer.clone(),
        backlog: backlog.clone(),
        tracked: tracked.clone(),
        affinity: Arc::default(),
        idle_poll: cfg.idle_poll,
        plan: Box::new(move |task| cell::plan(&planner, task)),
    });
    let leasing = tokio::spawn(leaser.clone().run(stop_rx));
    let finisher = Finisher::spawn(
        leaser.clone(),
        storage,
        cfg.upload_retry.clone(),
        cfg.device,
        metrics.clone(),
    );
    let hold = pause::Hold {
        link: &link,
        backlog: &backlog,
        tracked: &tracked,
        renderer: &renderer,
    };
    let mut draining = false;
    // Cached model files in use by loaded pipelines (see `pinned`).
    let mut in_use = Vec::new();
    while !draining {
        if yield_rx.borrow_and_update().is_some() {
            draining = hold.hold(&mut yield_rx, &mut shutdown).await;
            continue;
        }
        // A reason that came and went during a render's grace stopped leasing.
        backlog.set_paused(false);
        let group = backlog.take(batch);
        if group.is_empty() {
            tokio::select! {
                _ = backlog.arrived.notified() => {}
                _ = pause::reason(yield_rx.clone()) => {}
                _ = &mut shutdown => draining = true,
            }
            continue;
        }
        let rendered = {
            let rendering = render_group(
                Stage {
                    link: &link,
                    renderer: &renderer,
                    pictures: &pictures,
                    pinned: &pinned,
                },
                &group,
                &mut in_use,
            );
            tokio::pin!(rendering);
            tokio::select! {
                r = &mut rendering => r,
                _ = &mut shutdown => {
                    // Finish the render in flight, then drain.
                    draining = true;
                    rendering.await
                }
                _ = pause::reason(yield_rx.clone()) => {
                    backlog.set_paused(true);
                    pause::within_grace(rendering, &group, cfg.yielding.grace).await
                }
            }
        };
        for (held, rendered) in group.into_iter().zip(rendered) {
            let Some(rendered) = rendered else {
                tracked.remove(held.attempt());
                continue;
            };
            // Counted before the next take, so the leasing task leaves the top-up to this
            // attempt's complete; uploaded and completed beside the next render.
            backlog.finishing_started();
            finisher.send(held, rendered).await;
        }
        // Drop queued attempts the coordinator took back meanwhile.
        for a in backlog.drop_lost() {
            tracked.remove(a);
        }
    }
    metrics.draining();
    backlog.stop();
    let _ = stop_leasing.send(true);
    // A lease call in flight lands in the backlog; a coordinator that is down cannot hold
    // the drain for long (those leases expire instead).
    let mut leasing = leasing;
    if tokio::time::timeout(Duration::from_secs(5), &mut leasing)
        .await
        .is_err()
    {
        leasing.abort();
    }
    if !finisher.close(cfg.drain_timeout).await {
        tracing::warn!(
            "storage or the coordinator did not answer within the drain timeout: the images \
             not reported are given up, and their cells will run again"
        );
    }
    let rest: Vec<pb::AttemptRef> = backlog.drain().iter().map(Held::attempt).collect();
    // No heartbeat after the release marks the worker drained (a beat marks it active).
    heartbeats.abort();
    let _ = heartbeats.await;
    link.release(rest, true).await;
    if let Some(serving) = serving {
        serving.abort();
    }
    tracing::info!("drained");
    Ok(())
}

/// What rendering a group needs.
struct Stage<'a> {
    link: &'a Link,
    renderer: &'a Renderer,
    pictures: &'a Pictures,
    pinned: &'a pinned::Pinned,
}

/// Renders a group of alike attempts as one batch. Failures are reported here; `None` means
/// there is nothing to upload for that attempt (failed, cancelled or lost). `in_use` holds
/// the cached model files of loaded pipelines, and is updated.
async fn render_group(
    stage: Stage<'_>,
    group: &[Held],
    in_use: &mut Vec<crate::cache::disk::Blob>,
) -> Vec<Option<renderer::Rendered>> {
    let Stage {
        link,
        renderer,
        pictures,
        pinned,
    } = stage;
    let mut out: Vec<Option<renderer::Rendered>> = group.iter().map(|_| None).collect();
    let mut members = Vec::with_capacity(group.len());
    let mut items = Vec::with_capacity(group.len());
    let mut reporters = Vec::with_capacity(group.len());
    let mut key = None;
    for (i, held) in group.iter().enumerate() {
        match &held.plan {
            Err(msg) => report(link, held, pb::FailureClass::BadInput, msg.clone()).await,
            Ok((k, request)) => {
                let mut request = request.clone();
                if let Some(cell) = held
                    .task
                    .cell
                    .as_ref()
                    .filter(|c| !c.init_image_sha256.is_empty())
                {
                    let picture = pictures
                        .get(link, &cell.init_image_sha256, request.width, request.height)
                        .await;
                    match picture {
                        Ok(p) => {
                            request.init_image = Some(InitImage {
                                image: (*p).clone(),
                                strength: cell.strength,
                            });
                        }
                        Err(PictureFailure::BadInput(m)) => {
                            report(link, held, pb::FailureClass::BadInput, m).await;
                            continue;
                        }
                        Err(PictureFailure::Transient(m)) => {
                            report(link, held, pb::FailureClass::Transient, m).await;
                            continue;
                        }
                    }
                }
                key.get_or_insert_with(|| k.clone());
                let (progress, progress_rx) = watch::channel((0u32, request.steps as u32));
                reporters.push(link.spawn_progress(
                    held.attempt(),
                    progress_rx,
                    held.flags.cancel.clone(),
                ));
                items.push(Item {
                    request,
                    cancel: held.flags.cancel.clone(),
                    progress,
                });
                members.push(i);
            }
        }
    }
    let Some(mut key) = key else {
        return out;
    };
    let attempts: Vec<pb::AttemptRef> = members.iter().map(|&i| group[i].attempt()).collect();
    let cells: Vec<&pb::RenderCell> = members
        .iter()
        .filter_map(|&i| group[i].task.cell.as_ref())
        .collect();
    let fetched = pinned
        .fetch_reporting(link, &cells, &mut key, attempts)
        .await;
    let (fetched, fetch_ms) = match fetched {
        Ok(f) => f,
        Err(failure) => {
            for r in reporters {
                r.abort();
            }
            let (class, msg) = match failure {
                pinned::FetchFailure::BadInput(m) => (pb::FailureClass::BadInput, m),
                pinned::FetchFailure::Transient(m) => (pb::FailureClass::Transient, m),
                pinned::FetchFailure::Resource(m) => (pb::FailureClass::Resource, m),
            };
            for &i in &members {
                report(link, &group[i], class, msg.clone()).await;
            }
            return out;
        }
    };
    let results = renderer
        .render_with_embeddings(key, items, fetched.embeddings)
        .await;
    for r in reporters {
        r.abort();
    }
    // Keep the files of loaded pipelines (and what this render fetched, if still loaded).
    in_use.extend(fetched.blobs);
    let loaded = renderer.loaded();
    in_use.retain(|b| loaded.iter().any(|k| pinned::uses(k, b.path())));
    if fetch_ms > 0.0 {
        link.set_cached_models(pinned.held().await);
    }
    let share = fetch_ms / members.len().max(1) as f64;
    for (i, result) in members.into_iter().zip(results) {
        let held = &group[i];
        if held.is_lost() {
            tracing::info!(
                cell = held.task.cell_id,
                attempt = held.task.attempt,
                "lease lost: result dropped"
            );
            continue;
        }
        match result {
            Ok(mut r) => {
                r.load_ms += share;
                out[i] = Some(r);
            }
            Err(RenderFailure::Cancelled) if held.flags.is_yielded() => {
                pause::hand_back(link, held).await
            }
            Err(RenderFailure::Cancelled) => {
                report(
                    link,
                    held,
                    pb::FailureClass::Cancelled,
                    "cancelled by user".into(),
                )
                .await
            }
            Err(RenderFailure::BadInput(m)) => {
                report(link, held, pb::FailureClass::BadInput, m).await
            }
            Err(RenderFailure::Resource(m) | RenderFailure::OutOfMemory(m)) => {
                report(link, held, pb::FailureClass::Resource, m).await
            }
        }
    }
    out
}

async fn report(link: &Link, held: &Held, class: pb::FailureClass, msg: String) {
    let attempt = held.attempt();
    if let Err(e) = link.fail(attempt, class, msg).await {
        tracing::warn!(cell = attempt.cell_id, error = %e, "failure not reported");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn config(models: PathBuf) -> AgentConfig {
        AgentConfig {
            coordinator: "http://127.0.0.1:7450".into(),
            access: Default::default(),
            name: "test".into(),
            device: Device::Cpu,
            models: vec![models],
            embeddings: Vec::new(),
            paths: resolve::PathPolicy::ModelsOnly,
            cache_bytes: 1 << 30,
            device_cache_bytes: 0,
            max_pixels: 1 << 20,
            memory_mib: 8192,
            prefetch: 1,
            batch: 1,
            upload_retry: RetryPolicy::default(),
            idle_poll: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(60),
            metrics_addr: None,
            model_cache: Default::default(),
            yielding: Default::default(),
            vae_tiling: VaeTiling::Auto,
        }
    }

    #[test]
    fn settings_are_checked_once_at_start() {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
        assert!(config(fixtures.clone()).validate().is_ok());
        let mut bad = config(fixtures.clone());
        bad.coordinator = "http://[::1".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--coordinator")
        );
        let mut bad = config(fixtures.join("no-such-folder"));
        bad.batch = 1;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("not a folder")
        );
        let mut bad = config(fixtures.clone());
        bad.batch = 0;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--batch 0")
        );
        let mut cfg = config(fixtures.clone());
        cfg.embeddings = vec![fixtures.join("no-such-folder")];
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("--embeddings") && e.contains("not a folder"),
            "{e}"
        );
        cfg.embeddings = vec![fixtures.join("tiny-sd15")];
        assert_eq!(
            cfg.inversion_dirs(),
            [fixtures.join("embeddings"), fixtures.join("tiny-sd15")]
        );
    }
}
