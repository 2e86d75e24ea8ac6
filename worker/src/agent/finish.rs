//! The uploader/completer: one owned task that takes rendered images over a channel, uploads
//! each under its attempt's own key and then completes the attempt (or fails it as transient
//! when storage stays down), at most [`MAX_FINISHING`] at once, beside the next render. A
//! complete tops the backlog up in the same call (`CompleteRequest.lease_next`). Closing it
//! (the drain) waits for what it was given, up to a limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::backlog::{Held, Leaser};
use super::metrics::Metrics;
use super::renderer;
use crate::engine::Device;
use crate::upload::{RetryPolicy, Storage};

/// Uploads (with their completes) in flight beside the render.
const MAX_FINISHING: usize = 2;

/// The uploader/completer task and its inbox.
pub(super) struct Finisher {
    inbox: mpsc::Sender<(Held, renderer::Rendered)>,
    task: JoinHandle<()>,
}

impl Finisher {
    /// Starts the task; it reports through `leaser`'s link and frees the attempts it finishes.
    pub(super) fn spawn(
        leaser: Arc<Leaser>,
        storage: Storage,
        retry: RetryPolicy,
        device: Device,
        metrics: Metrics,
    ) -> Self {
        // One image may wait while MAX_FINISHING are in flight; then the render loop waits.
        let (inbox, mut rx) = mpsc::channel::<(Held, renderer::Rendered)>(1);
        let task = tokio::spawn(async move {
            let mut running = JoinSet::new();
            loop {
                while running.len() >= MAX_FINISHING {
                    running.join_next().await;
                }
                tokio::select! {
                    next = rx.recv() => {
                        let Some((held, rendered)) = next else { break };
                        let (leaser, storage, retry) = (leaser.clone(), storage.clone(), retry.clone());
                        let metrics = metrics.clone();
                        running.spawn(async move {
                            let a = held.attempt();
                            let r = finish(&leaser, &storage, &retry, device, &held, rendered).await;
                            if let Ok(phases) = &r {
                                metrics.rendered(phases);
                            }
                            if let Err(e) = r {
                                tracing::warn!(cell = a.cell_id, error = %e, "attempt ended without a report");
                            }
                            leaser.tracked.remove(a);
                            leaser.backlog.finishing_ended();
                        });
                    }
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                }
            }
            while running.join_next().await.is_some() {}
        });
        Self { inbox, task }
    }

    /// Hands a rendered image over (waits while the task is full).
    pub(super) async fn send(&self, held: Held, rendered: renderer::Rendered) {
        // The task ends only after the inbox closes, so the send cannot fail.
        let _ = self.inbox.send((held, rendered)).await;
    }

    /// Takes no more, and waits up to `limit` for every image handed over to be reported.
    /// False when the limit passed: the rest were given up (their leases expire and the cells
    /// run again).
    pub(super) async fn close(self, limit: Duration) -> bool {
        drop(self.inbox);
        let mut task = self.task;
        match tokio::time::timeout(limit, &mut task).await {
            Ok(_) => true,
            Err(_) => {
                // Dropping the task's JoinSet aborts the uploads in flight.
                task.abort();
                false
            }
        }
    }
}

/// Phase times of a completed image, milliseconds.
type Phases = Vec<(&'static str, f64)>;

/// Uploads a rendered image under its attempt's own key, then completes the attempt (or
/// fails it as transient when storage stays down). Never completes without the object. The
/// phase times of an image whose complete was accepted; empty when it was not completed.
async fn finish(
    leaser: &Leaser,
    storage: &Storage,
    retry: &RetryPolicy,
    device: Device,
    held: &Held,
    rendered: renderer::Rendered,
) -> anyhow::Result<Phases> {
    let link = &leaser.link;
    let attempt = held.attempt();
    let Some(okey) = held.object_key() else {
        let msg = "the coordinator leased a task with malformed ids".to_string();
        link.fail(attempt, pb::FailureClass::BadInput, msg).await?;
        return Ok(Vec::new());
    };
    let sha256 = hex::encode(Sha256::digest(&rendered.png));
    let bytes = rendered.png.len() as u64;
    let t = Instant::now();
    if let Err(e) = storage.put_with_retry(&okey, rendered.png, retry).await {
        link.fail(
            attempt,
            pb::FailureClass::Transient,
            format!("upload failed: {e}"),
        )
        .await?;
        return Ok(Vec::new());
    }
    let upload_ms = t.elapsed().as_secs_f64() * 1000.0;
    if held.is_lost() {
        // The object stays under this attempt's own key; it can never be a result.
        return Ok(Vec::new());
    }
    let phases: Phases = vec![
        ("load", rendered.load_ms),
        ("text_encode", rendered.times.text_encode_ms),
        ("unet", rendered.times.unet_ms),
        ("vae", rendered.times.vae_ms),
        ("encode", rendered.encode_ms),
        ("upload", upload_ms),
    ];
    let result = pb::RenderResult {
        object_key: okey,
        storage: storage.url().to_string(),
        sha256,
        bytes,
        width: rendered.width,
        height: rendered.height,
        device: device.to_string(),
        timings_ms: phases
            .iter()
            .map(|&(phase, ms)| (phase.to_string(), ms.round() as u64))
            .chain([("batch".to_string(), rendered.times.batch as u64)])
            .collect(),
        parameters: rendered.parameters,
        notes: rendered.notes,
    };
    // Top the backlog up in the same call when it has a gap.
    let want = leaser.backlog.claim();
    tracing::debug!(cell = attempt.cell_id, lease_next = want, "completing");
    let loaded = if want > 0 {
        leaser.loaded()
    } else {
        Vec::new()
    };
    let (tasks, outcome) = match link.complete(attempt, result, want as u32, loaded).await {
        Ok(tasks) => (tasks, Ok(phases)),
        Err(e) => (Vec::new(), Err(e)),
    };
    leaser.admit(tasks);
    leaser.backlog.unclaim(want);
    outcome
}
