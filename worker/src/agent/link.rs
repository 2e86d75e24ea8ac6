//! The agent's connection to the coordinator: registration with backoff, and calls that
//! survive the coordinator restarting (UNAVAILABLE is retried; NOT_FOUND for our worker id
//! re-registers). Heartbeats and progress run as background tasks while a cell renders.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_service_client::WorkerServiceClient;
use tokio::sync::watch;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::access::{Access, Credentials};
use super::tracked::Tracked;
use super::yielding::Order;

/// The worker service client, every call carrying the token and the session.
type Client = WorkerServiceClient<InterceptedService<Channel, Credentials>>;

/// Shortest wait between two progress reports of one attempt.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Longest wait between reconnection tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A registered worker's line to the coordinator.
#[derive(Clone)]
pub struct Link {
    client: Client,
    credentials: Credentials,
    info: pb::WorkerInfo,
    worker_id: Arc<AtomicU64>,
    heartbeat: Duration,
    /// sha256 of the models this machine holds, sent with each lease.
    cached_models: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Most model hashes told with a lease (the coordinator's bound, `LeaseRequest.cached_models`).
const MAX_EXPECTED: usize = 4096;

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
    )
}

impl Link {
    /// Connects and registers, retrying with backoff until the coordinator answers. Fails
    /// on a malformed `url` or TLS settings ([`super::access::endpoint`]), and when the
    /// coordinator refuses the token.
    pub async fn connect(url: &str, access: &Access, info: pb::WorkerInfo) -> anyhow::Result<Link> {
        // A lazy channel reconnects by itself after the coordinator restarts.
        let channel = super::access::endpoint(url, access)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        let credentials = Credentials::new(access)?;
        let link = Link {
            client: WorkerServiceClient::with_interceptor(channel, credentials.clone()),
            credentials,
            info,
            worker_id: Arc::new(AtomicU64::new(0)),
            heartbeat: Duration::from_secs(5),
            cached_models: Arc::default(),
        };
        let mut backoff = Duration::from_millis(200);
        let mut link = link;
        loop {
            match link.register().await {
                Ok(hb) => {
                    link.heartbeat = hb;
                    return Ok(link);
                }
                Err(e) if matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                    anyhow::bail!("the coordinator refused this worker: {}", e.message());
                }
                Err(e) => {
                    tracing::warn!(coordinator = %url, error = %e.message(), "register failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn register(&self) -> Result<Duration, tonic::Status> {
        let r = self
            .client
            .clone()
            .register(pb::RegisterRequest {
                info: Some(self.info.clone()),
            })
            .await?
            .into_inner();
        self.credentials
            .set_session(&r.session)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.worker_id.store(r.worker_id, Ordering::SeqCst);
        tracing::info!(worker = r.worker_id, "registered");
        Ok(Duration::from_millis(
            r.heartbeat_interval_ms.clamp(200, 60_000),
        ))
    }

    fn id(&self) -> u64 {
        self.worker_id.load(Ordering::SeqCst)
    }

    /// Runs `call` until it succeeds or fails for a reason retrying cannot fix; re-registers
    /// when the coordinator does not know this worker.
    async fn retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Client, u64) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = Duration::from_millis(200);
        loop {
            match call(self.client.clone(), self.id()).await {
                Ok(r) => return Ok(r.into_inner()),
                // Forgotten (a new database), or our session is not the one on record.
                Err(s)
                    if (s.code() == Code::NotFound && s.message().starts_with("worker"))
                        || (s.code() == Code::Unauthenticated
                            && s.message().contains("worker session")) =>
                {
                    tracing::warn!("coordinator forgot this worker; registering again");
                    let _ = self.register().await;
                }
                Err(s) if retryable(&s) => {
                    tracing::warn!(what, error = %s.message(), "coordinator unreachable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// The bytes of the picture stored under `sha256` (a leased cell's img2img start),
    /// refused past [`kiln_proto::picture::MAX_FILE_BYTES`]. `Err(status)` when the
    /// coordinator has no such picture or the stream broke.
    pub async fn get_image(&self, sha256: &str) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .retry("get image", |mut c, id| {
                let sha256 = sha256.to_owned();
                async move {
                    c.get_image(pb::GetImageRequest {
                        sha256,
                        worker_id: id,
                    })
                    .await
                }
            })
            .await?;
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if data.len() + chunk.data.len() > kiln_proto::picture::MAX_FILE_BYTES {
                return Err(tonic::Status::out_of_range(
                    "the picture is larger than a picture may be",
                ));
            }
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// Replaces the sha256s of the models this machine holds, told with each lease.
    pub fn set_cached_models(&self, held: Vec<String>) {
        *self.cached_models.lock().unwrap_or_else(|e| e.into_inner()) = held;
    }

    /// Adds the models `cells` pin to the set told with each lease, until the next
    /// [`Link::set_cached_models`] (after a download) replaces it with what is on disk.
    pub fn expect_models<'a>(&self, cells: impl Iterator<Item = &'a pb::RenderCell>) {
        let mut held = self.cached_models.lock().unwrap_or_else(|e| e.into_inner());
        for c in cells {
            let pins = [&c.model_sha256, &c.vae_sha256]
                .into_iter()
                .chain(c.loras.iter().map(|l| &l.sha256))
                .chain(c.embedding_sha256.values());
            for h in pins {
                if !h.is_empty() && !held.contains(h) && held.len() < MAX_EXPECTED {
                    held.push(h.clone());
                }
            }
        }
    }

    /// Leases up to `n` cells.
    pub async fn lease(&self, n: u32, loaded: Vec<String>) -> Vec<pb::LeasedTask> {
        let cached_models = self
            .cached_models
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let r = self
            .retry("lease", |mut c, id| {
                let (loaded, cached_models) = (loaded.clone(), cached_models.clone());
                async move {
                    c.lease(pb::LeaseRequest {
                        worker_id: id,
                        max_tasks: n.max(1),
                        loaded,
                        cached_models,
                    })
                    .await
                }
            })
            .await;
        match r {
            Ok(r) => r.tasks,
            Err(s) => {
                tracing::error!(error = %s.message(), "lease refused");
                Vec::new()
            }
        }
    }

    /// Reports a completed attempt and leases up to `lease_next` more cells in the same call
    /// (one round trip per image). A lost lease is logged, not an error: the cell is someone
    /// else's now, and nothing is leased.
    pub async fn complete(
        &self,
        a: pb::AttemptRef,
        result: pb::RenderResult,
        lease_next: u32,
        loaded: Vec<String>,
    ) -> anyhow::Result<Vec<pb::LeasedTask>> {
        let r = self
            .retry("complete", |mut c, id| {
                let (result, loaded) = (result.clone(), loaded.clone());
                async move {
                    c.complete(pb::CompleteRequest {
                        worker_id: id,
                        attempt: Some(a),
                        result: Some(result),
                        lease_next,
                        loaded,
                    })
                    .await
                }
            })
            .await;
        let tasks = r.as_ref().map(|r| r.tasks.clone()).unwrap_or_default();
        self.finish("complete", a, r.map(|_| ()))?;
        Ok(tasks)
    }

    /// Reports a failed attempt.
    pub async fn fail(
        &self,
        a: pb::AttemptRef,
        class: pb::FailureClass,
        message: String,
    ) -> anyhow::Result<()> {
        tracing::warn!(cell = a.cell_id, attempt = a.attempt, ?class, %message, "attempt failed");
        let r = self
            .retry("fail", |mut c, id| {
                let message = message.clone();
                async move {
                    c.fail(pb::FailRequest {
                        worker_id: id,
                        attempt: Some(a),
                        class: class as i32,
                        message,
                    })
                    .await
                }
            })
            .await;
        self.finish("fail", a, r.map(|_| ()))
    }

    fn finish(
        &self,
        what: &str,
        a: pb::AttemptRef,
        r: Result<(), tonic::Status>,
    ) -> anyhow::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::FailedPrecondition => {
                tracing::info!(cell = a.cell_id, attempt = a.attempt, "{what}: lease lost");
                Ok(())
            }
            Err(s) => Err(anyhow::anyhow!("{what} refused: {}", s.message())),
        }
    }

    /// Gives attempts back (drain).
    pub async fn release(&self, attempts: Vec<pb::AttemptRef>, draining: bool) {
        let r = self
            .client
            .clone()
            .release(pb::ReleaseRequest {
                worker_id: self.id(),
                attempts,
                draining,
            })
            .await;
        if let Err(s) = r {
            tracing::warn!(error = %s.message(), "release failed; the leases will expire instead");
        }
    }

    /// Heartbeats every attempt in `tracked` (read afresh each beat) until aborted; flags lost
    /// and cancelled ones. Each beat also carries why the worker yields to its owner (`paused`,
    /// beating at once when that changes) and brings back the admin's order into `orders`; so
    /// an idle or yielded worker beats too.
    pub fn spawn_heartbeats(
        &self,
        tracked: Tracked,
        mut paused: watch::Receiver<Option<String>>,
        orders: watch::Sender<Order>,
    ) -> tokio::task::JoinHandle<()> {
        let link = self.clone();
        tokio::spawn(async move {
            let mut watching = true;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(link.heartbeat) => {}
                    changed = paused.changed(), if watching => watching = changed.is_ok(),
                }
                let paused_reason = paused.borrow_and_update().clone().unwrap_or_default();
                let held = tracked.snapshot();
                let attempts: Vec<pb::AttemptRef> = held.iter().map(|h| h.0).collect();
                let r = link
                    .client
                    .clone()
                    .heartbeat(pb::HeartbeatRequest {
                        worker_id: link.id(),
                        attempts,
                        loaded: vec![],
                        paused_reason,
                    })
                    .await;
                let r = match r {
                    Ok(r) => r.into_inner(),
                    Err(s) => {
                        // Keep rendering through a blip; the lease TTL covers several beats.
                        tracing::warn!(error = %s.message(), "heartbeat failed");
                        continue;
                    }
                };
                let order = Order::from_wire(r.control);
                orders.send_if_modified(|o| std::mem::replace(o, order) != order);
                for (a, flags) in &held {
                    if r.lost.contains(a) {
                        tracing::warn!(
                            cell = a.cell_id,
                            attempt = a.attempt,
                            "lease lost: aborting"
                        );
                        flags.mark_lost();
                    }
                    if r.cancelled.contains(a) {
                        flags.mark_cancelled();
                    }
                }
            }
        })
    }

    /// Reports (step, steps) and `activity` of `a` once; whether the user cancelled it (false
    /// when the call failed: the next report or heartbeat tells).
    async fn progress(
        &self,
        a: pb::AttemptRef,
        (step, total_steps): (u32, u32),
        activity: String,
    ) -> bool {
        let r = self
            .client
            .clone()
            .report_progress(pb::ProgressRequest {
                worker_id: self.id(),
                attempt: Some(a),
                step,
                total_steps,
                activity,
            })
            .await;
        r.is_ok_and(|r| r.into_inner().cancel_requested)
    }

    /// Forwards what the worker is doing before the first step (a download) as the activity
    /// of `attempts`, at most every 250 ms, until aborted.
    pub fn spawn_activity(
        &self,
        attempts: Vec<pb::AttemptRef>,
        mut rx: watch::Receiver<String>,
    ) -> tokio::task::JoinHandle<()> {
        let link = self.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let activity = rx.borrow_and_update().clone();
                for &a in &attempts {
                    link.progress(a, (0, 0), activity.clone()).await;
                }
                tokio::time::sleep(PROGRESS_EVERY).await;
            }
        })
    }

    /// Forwards per-step progress until aborted: the first report after 250 ms, then at most
    /// every 250 ms. A render shorter than that sends none (its complete says it all), so fast
    /// models cost the coordinator no extra call per image.
    pub fn spawn_progress(
        &self,
        a: pb::AttemptRef,
        mut rx: watch::Receiver<(u32, u32)>,
        cancel: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let link = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                if rx.changed().await.is_err() {
                    return;
                }
                let steps = *rx.borrow_and_update();
                if link.progress(a, steps, String::new()).await {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
        })
    }
}
