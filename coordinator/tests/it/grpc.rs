//! The gRPC API against a real server on 127.0.0.1:0 (SQLite in a temp dir), through the
//! generated tonic clients.

use std::time::Duration;

use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_proto::v1::worker_service_client::WorkerServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::harness::{Backend, Served, TestDb};

/// Sends the session credential of the last registration, as a worker does.
#[derive(Clone, Default)]
pub struct Session(std::sync::Arc<std::sync::Mutex<Option<AsciiMetadataValue>>>);

impl Session {
    pub fn set(&self, session: &str) {
        *self.0.lock().unwrap() = Some(session.parse().unwrap());
    }
}

impl tonic::service::Interceptor for Session {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(s) = self.0.lock().unwrap().clone() {
            r.metadata_mut().insert("x-kiln-session", s);
        }
        Ok(r)
    }
}

pub(crate) struct Server {
    pub(crate) sweeps: SweepServiceClient<Channel>,
    pub(crate) workers: WorkerServiceClient<InterceptedService<Channel, Session>>,
    session: Session,
    channel: Channel,
    served: Served,
    _db: TestDb,
}

impl Server {
    pub(crate) async fn start() -> Server {
        let db = TestDb::new(Backend::Sqlite).await;
        let served = Served::start(&db, Default::default()).await;
        let session = Session::default();
        let channel = served.channel().await;
        Server {
            sweeps: SweepServiceClient::new(channel.clone()),
            workers: WorkerServiceClient::with_interceptor(channel.clone(), session.clone()),
            session,
            channel,
            served,
            _db: db,
        }
    }

    pub(crate) async fn shutdown(self) {
        self.served.stop().await;
    }
}

pub(crate) fn render_cell(seed: u64) -> pb::RenderCell {
    pb::RenderCell {
        model: "tiny-sd15".into(),
        loras: vec![pb::LoraRef {
            name: "lcm.safetensors".into(),
            strength: 1.0,
            sha256: String::new(),
        }],
        prompt: "a fox".into(),
        negative_prompt: String::new(),
        seed,
        steps: 4,
        cfg: 1.0,
        sampler: pb::Sampler::Lcm as i32,
        width: 512,
        height: 512,
        rng: pb::RngSource::Cpu as i32,
        bindings: [("animal".to_string(), "fox".to_string())].into(),
        min_memory_mib: 0,
        vae: String::new(),
        clip_skip: 0,
        ..Default::default()
    }
}

pub(crate) fn submit_stream(
    key: &str,
    chunks: Vec<Vec<pb::RenderCell>>,
) -> Vec<pb::SubmitSweepRequest> {
    let mut msgs = vec![pb::SubmitSweepRequest {
        part: Some(pb::submit_sweep_request::Part::Header(pb::SweepHeader {
            name: key.into(),
            idempotency_key: key.into(),
            priority: 0,
            max_attempts: 0,
            spec: "# sweep file".into(),
            ..Default::default()
        })),
    }];
    msgs.extend(chunks.into_iter().map(|cells| pb::SubmitSweepRequest {
        part: Some(pb::submit_sweep_request::Part::Cells(pb::CellChunk {
            cells,
        })),
    }));
    msgs
}

async fn submit(s: &mut Server, key: &str, n: u64) -> pb::SubmitSweepResponse {
    let cells = (0..n).map(render_cell).collect();
    s.sweeps
        .submit_sweep(tokio_stream::iter(submit_stream(key, vec![cells])))
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn register(s: &mut Server) -> u64 {
    let r = s
        .workers
        .register(pb::RegisterRequest {
            info: Some(pb::WorkerInfo {
                name: "pc-1".into(),
                device_kind: pb::DeviceKind::Cuda as i32,
                device_model: "RTX 3060".into(),
                memory_mib: 12288,
                max_pixels: 1024 * 1024,
                loaded: vec![],
                version: "test".into(),
                storage: "file:///tmp/kiln".into(),
                render_level: kiln_proto::sampler::RENDER_LEVEL,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    s.session.set(&r.session);
    r.worker_id
}

/// Leases exactly one cell for `worker`.
pub(crate) async fn lease_one(s: &mut Server, worker: u64) -> pb::LeasedTask {
    s.workers
        .lease(pb::LeaseRequest {
            worker_id: worker,
            max_tasks: 1,
            loaded: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .remove(0)
}

fn result() -> pb::RenderResult {
    pb::RenderResult {
        object_key: "sweeps/1/1/1.png".into(),
        storage: "file:///tmp/kiln".into(),
        sha256: "ab".repeat(32),
        bytes: 1234,
        width: 512,
        height: 512,
        device: "RTX 3060".into(),
        timings_ms: [("unet".to_string(), 800u64)].into(),
        parameters: "a fox\nSteps: 4".into(),
        notes: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_lease_heartbeat_complete_and_query() {
    let mut s = Server::start().await;
    let health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "kiln.v1.WorkerService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let sub = submit(&mut s, "api", 3).await;
    assert_eq!((sub.cell_count, sub.duplicate), (3, false));
    let worker = register(&mut s).await;
    let tasks = s
        .workers
        .lease(pb::LeaseRequest {
            worker_id: worker,
            max_tasks: 2,
            loaded: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 2);
    let t = &tasks[0];
    assert_eq!(t.cell.as_ref().unwrap().bindings["animal"], "fox");
    let a = pb::AttemptRef {
        cell_id: t.cell_id,
        attempt: t.attempt,
    };
    let hb = s
        .workers
        .heartbeat(pb::HeartbeatRequest {
            worker_id: worker,
            attempts: vec![a],
            loaded: vec![t.affinity_key.clone()],
            paused_reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.extended, vec![a]);
    assert!(hb.lost.is_empty() && hb.cancelled.is_empty());
    let p = s
        .workers
        .report_progress(pb::ProgressRequest {
            worker_id: worker,
            attempt: Some(a),
            step: 2,
            total_steps: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!p.cancel_requested);
    s.workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(a),
            result: Some(result()),
            ..Default::default()
        })
        .await
        .unwrap();
    // The second leased task is released on drain.
    let b = pb::AttemptRef {
        cell_id: tasks[1].cell_id,
        attempt: tasks[1].attempt,
    };
    let rel = s
        .workers
        .release(pb::ReleaseRequest {
            worker_id: worker,
            attempts: vec![b],
            draining: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rel.released, 1);

    let sweep = s
        .sweeps
        .get_sweep(pb::GetSweepRequest {
            sweep_id: sub.sweep_id,
        })
        .await
        .unwrap()
        .into_inner();
    let counts = sweep.counts.unwrap();
    assert_eq!(
        (counts.total, counts.completed, counts.available),
        (3, 1, 2)
    );
    let q = s
        .sweeps
        .query_results(pb::QueryResultsRequest {
            sweep_id: sub.sweep_id,
            states: vec![pb::CellState::Completed as i32],
            bindings: [("animal".to_string(), "fox".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.cells.len(), 1);
    let rec = &q.cells[0];
    assert_eq!(rec.result.as_ref().unwrap().sha256, "ab".repeat(32));
    assert_eq!(rec.worker_id, worker);
    let workers = s
        .sweeps
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    assert!(workers[0].online);
    assert_eq!(
        workers[0].info.as_ref().unwrap().loaded,
        vec![t.affinity_key.clone()]
    );
    let listed = s
        .sweeps
        .list_sweeps(pb::ListSweepsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sweeps.len(), 1);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_codes_and_the_server_stays_up() {
    let mut s = Server::start().await;
    let sub = submit(&mut s, "bad", 1).await;
    let worker = register(&mut s).await;
    let code = |r: Result<tonic::Response<_>, tonic::Status>| -> (Code, String) {
        let e = r.map(|_: tonic::Response<()>| ()).unwrap_err();
        (e.code(), e.message().to_string())
    };
    let unit =
        |r: Result<tonic::Response<pb::Sweep>, tonic::Status>| r.map(|_| tonic::Response::new(()));

    assert_eq!(
        code(unit(
            s.sweeps
                .get_sweep(pb::GetSweepRequest { sweep_id: 999 })
                .await
        ))
        .0,
        Code::NotFound
    );
    assert_eq!(
        code(unit(
            s.sweeps
                .get_sweep(pb::GetSweepRequest { sweep_id: 0 })
                .await
        ))
        .0,
        Code::InvalidArgument
    );
    let r = s
        .workers
        .lease(pb::LeaseRequest {
            worker_id: 424242,
            max_tasks: 1,
            loaded: vec![],
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
    let r = s
        .workers
        .lease(pb::LeaseRequest {
            worker_id: worker,
            max_tasks: 0,
            loaded: vec![],
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);

    // Wrong attempt: the distinct "lease lost" answer.
    let t = lease_one(&mut s, worker).await;
    let wrong = pb::AttemptRef {
        cell_id: t.cell_id,
        attempt: t.attempt + 1,
    };
    let e = s
        .workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(wrong),
            result: Some(result()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("lease lost"), "{}", e.message());
    let e = s
        .workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(pb::AttemptRef {
                cell_id: 77777,
                attempt: 1,
            }),
            result: Some(result()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let right = pb::AttemptRef {
        cell_id: t.cell_id,
        attempt: t.attempt,
    };
    let mut bad_result = result();
    bad_result.sha256 = "xyz".into();
    let e = s
        .workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(right),
            result: Some(bad_result),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = s
        .workers
        .fail(pb::FailRequest {
            worker_id: worker,
            attempt: Some(right),
            class: 99,
            message: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = s
        .workers
        .register(pb::RegisterRequest { info: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Malformed sweeps: no header, a bad cell (named), an unknown sampler.
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(
            submit_stream("x", vec![vec![render_cell(1)]]).split_off(1),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut bad = render_cell(1);
    bad.width = 100;
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(submit_stream(
            "y",
            vec![vec![render_cell(0), bad]],
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("cell 1") && e.message().contains("width"),
        "{}",
        e.message()
    );
    let mut bad = render_cell(1);
    bad.sampler = 42;
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(submit_stream("z", vec![vec![bad]])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A sweep file is planned by the coordinator; its errors name file:line:col.
    let header = pb::SweepHeader {
        idempotency_key: "file".into(),
        spec_path: "foxes.toml".into(),
        spec: "model = \"m\"\nprompt = \"a {fox|}\"\nseeds = [1]\nbogus = 3\n".into(),
        ..Default::default()
    };
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(vec![pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Header(header)),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("foxes.toml:4:"), "{}", e.message());

    // Oversized: a field past its limit, and a message past the transport limit.
    let mut big = render_cell(1);
    big.prompt = "x".repeat(20_000);
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(submit_stream("big", vec![vec![big]])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    // Past the sweep service's limit (room for the documented 1 + 48 MiB of files).
    let past_limit = kiln_coordinator::api::MAX_SWEEP_MESSAGE_BYTES / 500_000 + 2;
    let huge: Vec<_> = (0..past_limit as u64)
        .map(|i| {
            let mut c = render_cell(i);
            c.negative_prompt = "y".repeat(500_000);
            c
        })
        .collect();
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(submit_stream("huge", vec![huge])))
        .await
        .unwrap_err();
    // tonic's own answer for a message past the decode limit.
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    assert!(e.message().contains("too large"), "{}", e.message());

    // Still serving, and nothing from the failed submits was stored.
    let listed = s
        .sweeps
        .list_sweeps(pb::ListSweepsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sweeps.len(), 1);
    assert_eq!(listed.sweeps[0].id, sub.sweep_id);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sweeps_stream_in_chunks_and_resubmit_is_idempotent() {
    let mut s = Server::start().await;
    let chunks: Vec<Vec<_>> = (0..20u64)
        .map(|c| (c * 1000..(c + 1) * 1000).map(render_cell).collect())
        .collect();
    let first = s
        .sweeps
        .submit_sweep(tokio_stream::iter(submit_stream(
            "big-sweep",
            chunks.clone(),
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.cell_count, 20_000);
    let again = s
        .sweeps
        .submit_sweep(tokio_stream::iter(submit_stream("big-sweep", chunks)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.sweep_id, again.duplicate, again.cell_count),
        (first.sweep_id, true, 20_000)
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_progress_and_cancel_reaches_the_worker() {
    let mut s = Server::start().await;
    let sub = submit(&mut s, "watch", 2).await;
    let worker = register(&mut s).await;
    let mut watch = s
        .sweeps
        .watch_sweep(pb::SweepRequest {
            sweep_id: sub.sweep_id,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.sweep.unwrap().counts.unwrap().available, 2);

    let tasks = s
        .workers
        .lease(pb::LeaseRequest {
            worker_id: worker,
            max_tasks: 2,
            loaded: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let a = pb::AttemptRef {
        cell_id: tasks[0].cell_id,
        attempt: tasks[0].attempt,
    };
    let b = pb::AttemptRef {
        cell_id: tasks[1].cell_id,
        attempt: tasks[1].attempt,
    };
    s.workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(a),
            result: Some(result()),
            ..Default::default()
        })
        .await
        .unwrap();
    let c = s
        .sweeps
        .cancel_sweep(pb::SweepRequest {
            sweep_id: sub.sweep_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.cancelled, c.cancel_requested), (0, 1));
    let hb = s
        .workers
        .heartbeat(pb::HeartbeatRequest {
            worker_id: worker,
            attempts: vec![b],
            loaded: vec![],
            paused_reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.cancelled, vec![b]);
    let f = s
        .workers
        .fail(pb::FailRequest {
            worker_id: worker,
            attempt: Some(b),
            class: pb::FailureClass::Cancelled as i32,
            message: "cancelled by user".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.state, pb::CellState::Cancelled as i32);

    // The stream ends once the sweep is finished, its last event saying so.
    let mut last = None;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = watch.next().await {
            last = Some(ev.unwrap());
        }
    })
    .await;
    assert!(ended.is_ok(), "watch stream ended");
    let last = last.unwrap().sweep.unwrap();
    assert!(last.finished);
    assert_eq!(last.counts.unwrap().completed, 1);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_with_lease_next_hands_out_the_next_cell_in_one_call() {
    let mut s = Server::start().await;
    let sweep = submit(&mut s, "combined", 3).await;
    let worker = register(&mut s).await;
    let t = lease_one(&mut s, worker).await;
    assert_eq!(t.number, 0);
    let done = |t: &pb::LeasedTask| pb::AttemptRef {
        cell_id: t.cell_id,
        attempt: t.attempt,
    };

    // A stale attempt: FAILED_PRECONDITION "lease lost", and no task comes with it.
    let stale = pb::AttemptRef {
        cell_id: t.cell_id,
        attempt: t.attempt + 1,
    };
    let e = s
        .workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(stale),
            result: Some(result()),
            lease_next: 1,
            loaded: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("lease lost"), "{}", e.message());

    // Complete #0 and get #1 in the same response, with its cell and lease.
    let r = s
        .workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(done(&t)),
            result: Some(result()),
            lease_next: 1,
            loaded: vec![t.affinity_key.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.tasks.len(), 1);
    let next = &r.tasks[0];
    assert_eq!((next.number, next.attempt), (1, 1));
    assert_eq!(next.cell.as_ref().unwrap().seed, 1);
    assert!(next.lease_expires_at_ms > 0);

    // Without lease_next: a plain complete, no tasks; the last cell stays available.
    let r = s
        .workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(done(next)),
            result: Some(result()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.tasks.is_empty());
    let g = s
        .sweeps
        .get_sweep(pb::GetSweepRequest {
            sweep_id: sweep.sweep_id,
        })
        .await
        .unwrap()
        .into_inner();
    let c = g.counts.unwrap();
    assert_eq!((c.completed, c.available, c.running), (2, 1, 0));
    s.shutdown().await;
}
