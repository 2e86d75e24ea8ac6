//! `kiln.v1.WorkerService`: the worker-facing adapter. Every write names its attempt, and the
//! queue fences it on (cell, attempt, worker); a stale write answers FAILED_PRECONDITION
//! "lease lost".

use std::pin::Pin;

use futures::Stream;
use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_service_server::WorkerService;
use tonic::{Request, Response, Status};

use super::auth::{principal, session};
use super::convert::{self, attempt_to_wire, fence, worker_id};
use super::pictures::IMAGE_CHUNK_BYTES;
use crate::domain::failure::Decision;
use crate::domain::lease::Fence;
use crate::domain::lease::{HeartbeatStatus, LeasedCell};
use crate::domain::state::Scope;
use crate::queue::Queue;
use crate::{Error, Result};
use kiln_proto::WorkerId;

/// A picture's bytes in chunks of at most [`IMAGE_CHUNK_BYTES`].
type ImageStream = Pin<Box<dyn Stream<Item = Result<pb::ImageChunk, Status>> + Send>>;

/// The worker service.
#[derive(Clone, Debug)]
pub struct WorkerApi {
    queue: Queue,
}

impl WorkerApi {
    /// A service over `queue`.
    pub fn new(queue: Queue) -> Self {
        Self { queue }
    }

    /// The worker `id` names, refused unless the caller holds a worker token and this worker's
    /// session credential.
    async fn worker<T>(&self, request: &Request<T>, id: u64) -> Result<WorkerId> {
        principal(request)?.require(Scope::Worker)?;
        let worker = worker_id(id)?;
        self.queue
            .authenticate_worker(worker, session(request))
            .await?;
        Ok(worker)
    }

    /// The fence of a worker write, its worker authenticated ([`WorkerApi::worker`]).
    async fn fence<T>(
        &self,
        request: &Request<T>,
        id: u64,
        attempt: Option<&pb::AttemptRef>,
    ) -> Result<Fence> {
        self.worker(request, id).await?;
        fence(id, attempt)
    }
}

/// Leased cells as the wire's tasks.
fn tasks_to_wire(leased: Vec<LeasedCell>) -> Result<Vec<pb::LeasedTask>> {
    leased
        .into_iter()
        .map(|c| {
            Ok(pb::LeasedTask {
                cell_id: c.id.0 as u64,
                sweep_id: c.sweep_id.0 as u64,
                number: c.number as u32,
                attempt: c.attempt.0 as u32,
                cell: Some(convert::cell_to_wire(convert::spec_from_json(
                    &c.spec_json,
                )?)),
                cell_key: c.cell_key,
                affinity_key: c.affinity_key,
                lease_expires_at_ms: c.lease_expires_at.0,
            })
        })
        .collect()
}

fn loaded(keys: Vec<String>) -> Option<Vec<String>> {
    Some(keys).filter(|k| !k.is_empty())
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        principal(&request)?.require(Scope::Worker)?;
        let reg = convert::registration_from_wire(request.into_inner().info)?;
        let (id, session) = self.queue.register(&reg).await?;
        tracing::info!(worker = %id, name = %reg.name, device = %reg.device_model, "worker registered");
        let cfg = self.queue.config();
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id.0 as u64,
            lease_ttl_ms: cfg.lease_ttl_ms as u64,
            heartbeat_interval_ms: cfg.heartbeat_interval_ms as u64,
            session: session.expose().to_string(),
        }))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let worker = self.worker(&request, request.get_ref().worker_id).await?;
        let r = request.into_inner();
        let loaded = loaded(r.loaded);
        self.queue.report_cached_models(worker, &r.cached_models)?;
        let leased = self
            .queue
            .lease(worker, r.max_tasks as usize, loaded.as_deref())
            .await?;
        let tasks = tasks_to_wire(leased)?;
        Ok(Response::new(pb::LeaseResponse { tasks }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker = self.worker(&request, request.get_ref().worker_id).await?;
        let r = request.into_inner();
        if r.attempts.len() > 1024 {
            return Err(Error::TooLarge("attempts: at most 1024".into()).into());
        }
        let attempts = r
            .attempts
            .iter()
            .map(|a| convert::attempt_ref(Some(a)))
            .collect::<Result<Vec<_>>>()?;
        let control = self.queue.pauses().report(worker, &r.paused_reason)?;
        let loaded = loaded(r.loaded);
        let (statuses, expires) = self
            .queue
            .heartbeat(worker, &attempts, loaded.as_deref())
            .await?;
        let mut out = pb::HeartbeatResponse {
            lease_expires_at_ms: expires.0,
            control: convert::control_to_wire(control) as i32,
            ..Default::default()
        };
        for ((cell, attempt), status) in attempts.into_iter().zip(statuses) {
            let a = attempt_to_wire(cell, attempt);
            match status {
                HeartbeatStatus::Extended => out.extended.push(a),
                HeartbeatStatus::CancelRequested => {
                    out.extended.push(a);
                    out.cancelled.push(a);
                }
                HeartbeatStatus::Lost => out.lost.push(a),
            }
        }
        Ok(Response::new(out))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ProgressRequest>,
    ) -> Result<Response<pb::ProgressResponse>, Status> {
        let r = request.get_ref();
        let f = self
            .fence(&request, r.worker_id, r.attempt.as_ref())
            .await?;
        let r = request.into_inner();
        // Checked (and kept) first; shown only with the attempt it names.
        self.queue.report_activity(f, &r.activity)?;
        let cancel_requested = self.queue.progress(f, r.step, r.total_steps).await?;
        Ok(Response::new(pb::ProgressResponse { cancel_requested }))
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let r = request.get_ref();
        let f = self
            .fence(&request, r.worker_id, r.attempt.as_ref())
            .await?;
        let r = request.into_inner();
        let result =
            convert::result_from_wire(r.result.ok_or_else(|| Error::invalid("result: required"))?);
        result.validate()?;
        self.queue.check_result(f.worker, &result).await?;
        let next = r.lease_next as usize;
        let loaded = loaded(r.loaded);
        let leased = self
            .queue
            .complete_and_lease(f, &result.to_json()?, next, loaded.as_deref())
            .await?;
        Ok(Response::new(pb::CompleteResponse {
            tasks: tasks_to_wire(leased)?,
        }))
    }

    async fn fail(
        &self,
        request: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        let r = request.get_ref();
        let f = self
            .fence(&request, r.worker_id, r.attempt.as_ref())
            .await?;
        let r = request.into_inner();
        let class = convert::failure_class_from_wire(r.class)?;
        let decision = self.queue.fail(f, class, &r.message).await?;
        tracing::info!(cell = %f.cell, attempt = %f.attempt, worker = %f.worker, %class, ?decision, "attempt failed");
        let (state, retry_at_ms) = match decision {
            Decision::Retry { at } => (pb::CellState::Retryable, at.0),
            Decision::Discard { .. } => (pb::CellState::Discarded, 0),
            Decision::Cancel => (pb::CellState::Cancelled, 0),
        };
        Ok(Response::new(pb::FailResponse {
            state: state as i32,
            retry_at_ms,
        }))
    }

    type GetImageStream = ImageStream;

    async fn get_image(
        &self,
        request: Request<pb::GetImageRequest>,
    ) -> Result<Response<ImageStream>, Status> {
        self.worker(&request, request.get_ref().worker_id).await?;
        let data = self.queue.image(&request.get_ref().sha256).await?;
        let chunks: Vec<Result<pb::ImageChunk, Status>> = data
            .chunks(IMAGE_CHUNK_BYTES)
            .map(|c| Ok(pb::ImageChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let worker = self.worker(&request, request.get_ref().worker_id).await?;
        let r = request.into_inner();
        let attempts = r
            .attempts
            .iter()
            .map(|a| convert::attempt_ref(Some(a)))
            .collect::<Result<Vec<_>>>()?;
        let released = self.queue.release(worker, &attempts, r.draining).await?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }
}
