//! `kiln` as a process: the coordinator killed with SIGKILL mid-sweep and restarted on the same
//! database loses nothing (SQLite file and Postgres), and SIGTERM shuts it down cleanly.

mod batch;
mod brought;
mod commands;
mod deploy;
mod devices;
mod drain;
mod farm;
mod farm_img2img;
mod farm_models;
mod farm_recipe;
mod hub;
#[path = "../../../worker/tests/it/hubserver.rs"]
mod hubserver;
mod metrics;
mod model;
mod outputs;
mod paths;
mod querydoc;
mod render;
#[path = "../../../worker/tests/it/s3server.rs"]
mod s3server;
mod secure;
mod sweepfile;
mod util;
mod web;
#[cfg(unix)]
mod wine;
mod yielding;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_proto::v1::worker_service_client::WorkerServiceClient;
use kiln_worker::agent::access::Credentials;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

struct Coordinator {
    child: Child,
    addr: String,
}

/// Submits `cells` as one sweep under idempotency key `key`; returns its id.
async fn submit_cells(
    sweeps: &mut SweepServiceClient<Channel>,
    key: &str,
    cells: Vec<pb::RenderCell>,
) -> u64 {
    let msgs = submit_messages(
        pb::SweepHeader {
            idempotency_key: key.into(),
            ..Default::default()
        },
        cells,
    );
    sweeps
        .submit_sweep(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .sweep_id
}

/// Waits (at most `limit`) for `sweep` to finish and returns its cells (at most 100).
async fn finished_cells(
    sweeps: &mut SweepServiceClient<Channel>,
    sweep: u64,
    limit: Duration,
) -> Vec<pb::CellRecord> {
    let deadline = Instant::now() + limit;
    while !sweeps
        .get_sweep(pb::GetSweepRequest { sweep_id: sweep })
        .await
        .unwrap()
        .into_inner()
        .finished
    {
        assert!(Instant::now() < deadline, "sweep {sweep} did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sweeps
        .query_results(pb::QueryResultsRequest {
            sweep_id: sweep,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .cells
}

/// A one-chunk `SubmitSweep` stream: `header`, then every cell.
fn submit_messages(
    header: pb::SweepHeader,
    cells: Vec<pb::RenderCell>,
) -> Vec<pb::SubmitSweepRequest> {
    vec![
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Header(header)),
        },
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Cells(pb::CellChunk {
                cells,
            })),
        },
    ]
}

fn spawn(db: &str, dir: &Path) -> Coordinator {
    spawn_with(db, dir, &[])
}

/// A coordinator as [`spawn`] starts it, with `extra` flags.
fn spawn_with(db: &str, dir: &Path, extra: &[&str]) -> Coordinator {
    let addr_file = dir.join(format!("addr-{}", rand::random::<u32>()));
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--maintenance-interval-ms",
            "100",
        ])
        .args(extra)
        .arg("--addr-file")
        .arg(&addr_file)
        // Configuration through the environment, as a service manager would set it.
        .env("KILN_DB", db)
        .env("KILN_LEASE_TTL_SECS", "30")
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kiln coordinator");
    let mut c = Coordinator {
        child,
        addr: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(addr) = std::fs::read_to_string(&addr_file)
            && !addr.is_empty()
        {
            c.addr = addr;
            return c;
        }
        assert!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Coordinator {
    // A failing test must not leave a coordinator running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A worker service client that sends the session its `Credentials` hold (set them after
/// registering, as the agent does).
type Workers = WorkerServiceClient<InterceptedService<Channel, Credentials>>;

async fn clients(addr: &str) -> (SweepServiceClient<Channel>, Workers, Credentials) {
    clients_as(addr, Credentials::default()).await
}

/// Clients whose worker calls carry `creds` (a worker's, from before a restart).
async fn clients_as(
    addr: &str,
    creds: Credentials,
) -> (SweepServiceClient<Channel>, Workers, Credentials) {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        SweepServiceClient::new(ch.clone()),
        WorkerServiceClient::with_interceptor(ch, creds.clone()),
        creds,
    )
}

fn cell(seed: u64) -> pb::RenderCell {
    pb::RenderCell {
        model: "tiny-sd15".into(),
        prompt: format!("a fox {seed}"),
        seed,
        steps: 4,
        cfg: 1.0,
        sampler: pb::Sampler::Lcm as i32,
        width: 512,
        height: 512,
        ..Default::default()
    }
}

fn result(cell: u64) -> pb::RenderResult {
    pb::RenderResult {
        object_key: format!("sweeps/1/{cell}/1.png"),
        sha256: format!("{:064x}", cell),
        width: 512,
        height: 512,
        ..Default::default()
    }
}

async fn kill_and_restart_loses_nothing(db: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = spawn(db, dir.path());
    let (mut sweeps, mut workers, creds) = clients(&c.addr).await;
    let msgs = vec![
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Header(pb::SweepHeader {
                name: "overnight".into(),
                idempotency_key: "overnight-1".into(),
                ..Default::default()
            })),
        },
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Cells(pb::CellChunk {
                cells: (0..50).map(cell).collect(),
            })),
        },
    ];
    let sweep = sweeps
        .submit_sweep(tokio_stream::iter(msgs.clone()))
        .await
        .unwrap()
        .into_inner();
    let worker = workers
        .register(pb::RegisterRequest {
            info: Some(pb::WorkerInfo {
                name: "pc".into(),
                max_pixels: 1 << 20,
                memory_mib: 8192,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    creds.set_session(&worker.session).unwrap();
    let worker = worker.worker_id;
    let tasks = workers
        .lease(pb::LeaseRequest {
            worker_id: worker,
            max_tasks: 5,
            loaded: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let refs: Vec<_> = tasks
        .iter()
        .map(|t| pb::AttemptRef {
            cell_id: t.cell_id,
            attempt: t.attempt,
        })
        .collect();
    for r in &refs[..3] {
        workers
            .complete(pb::CompleteRequest {
                worker_id: worker,
                attempt: Some(*r),
                result: Some(result(r.cell_id)),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // SIGKILL: no chance to flush or shut down.
    c.child.kill().unwrap();
    c.child.wait().unwrap();

    let mut c = spawn(db, dir.path());
    let (mut sweeps, mut workers, _) = clients_as(&c.addr, creds).await;
    let s = sweeps
        .get_sweep(pb::GetSweepRequest {
            sweep_id: sweep.sweep_id,
        })
        .await
        .unwrap()
        .into_inner();
    let counts = s.counts.unwrap();
    assert_eq!(
        (
            counts.total,
            counts.completed,
            counts.running,
            counts.available
        ),
        (50, 3, 2, 45)
    );
    // The same idempotency key still names the same sweep.
    let again = sweeps
        .submit_sweep(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.sweep_id, again.duplicate), (sweep.sweep_id, true));
    // The worker's leases survived: it heartbeats and completes the two in flight.
    let hb = workers
        .heartbeat(pb::HeartbeatRequest {
            worker_id: worker,
            attempts: refs[3..].to_vec(),
            loaded: vec![],
            paused_reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.extended, refs[3..].to_vec());
    for r in &refs[3..] {
        workers
            .complete(pb::CompleteRequest {
                worker_id: worker,
                attempt: Some(*r),
                result: Some(result(r.cell_id)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // A completed attempt cannot be completed twice, even across the restart.
    let e = workers
        .complete(pb::CompleteRequest {
            worker_id: worker,
            attempt: Some(refs[0]),
            result: Some(result(1)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    loop {
        let tasks = workers
            .lease(pb::LeaseRequest {
                worker_id: worker,
                max_tasks: 16,
                loaded: vec![],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .tasks;
        if tasks.is_empty() {
            break;
        }
        for t in tasks {
            assert_eq!(t.attempt, 1, "no cell was attempted twice");
            let r = pb::AttemptRef {
                cell_id: t.cell_id,
                attempt: t.attempt,
            };
            workers
                .complete(pb::CompleteRequest {
                    worker_id: worker,
                    attempt: Some(r),
                    result: Some(result(t.cell_id)),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let s = sweeps
        .get_sweep(pb::GetSweepRequest {
            sweep_id: sweep.sweep_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.finished);
    assert_eq!(s.counts.unwrap().completed, 50);
    let q = sweeps
        .query_results(pb::QueryResultsRequest {
            sweep_id: sweep.sweep_id,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.cells.len(), 50);
    for rec in &q.cells {
        assert_eq!(
            rec.result.as_ref().unwrap().sha256,
            format!("{:064x}", rec.cell_id),
            "each result is its own"
        );
    }

    // SIGTERM: graceful shutdown, exit 0.
    let pid = c.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = c.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_on_sqlite_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    kill_and_restart_loses_nothing(&db).await;
}

/// A fresh schema on the test Postgres (`KILN_TEST_DATABASE_URL`); dropped by `drop`.
struct PgSchema {
    admin: sqlx::PgPool,
    name: String,
    /// A database URL whose connections use only this schema.
    url: String,
}

impl PgSchema {
    async fn new(prefix: &str) -> PgSchema {
        let base = std::env::var("KILN_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("{prefix}_{}_{}", std::process::id(), rand::random::<u32>());
        let admin = sqlx::PgPool::connect(&base)
            .await
            .expect("Postgres (KILN_TEST_DATABASE_URL)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{name}");
        PgSchema { admin, name, url }
    }

    async fn drop(self) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.name
        )))
        .execute(&self.admin)
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_on_postgres_loses_nothing() {
    let pg = PgSchema::new("kiln_cli").await;
    kill_and_restart_loses_nothing(&pg.url).await;
    pg.drop().await;
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "coordinator",
            "--db",
            "mysql://nope",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mysql://nope") && err.contains("sqlite://"),
        "{err}"
    );
}
