//! The whole farm as real processes on loopback: `kiln coordinator` (SQLite, and again on
//! Postgres), three `kiln worker` processes rendering the tiny reference model with the real
//! engine, and a real S3 server (s3s-fs). During one 60-cell sweep a worker is killed with
//! SIGKILL, the coordinator is killed and restarted on the same database and port, and storage
//! is down for a while. Afterwards every cell succeeded exactly once and every result points at
//! its own object, whose bytes match the recorded sha256.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_worker::upload::{S3Store, Storage, StorageUrl};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::s3server::{ACCESS_KEY, S3Server, SECRET_KEY};

const CELLS: u64 = 60;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn coordinator(db: &str, port: u16, config: &Path) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--config")
        .arg(config)
        .env("KILN_DB", db)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc(child)
}

fn worker(name: &str, port: u16, s3: &S3Server) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "worker",
                "--coordinator",
                &format!("http://127.0.0.1:{port}"),
            ])
            .args(["--storage", "s3://farm/renders", "--s3-path-style"])
            .args(["--s3-endpoint", &s3.endpoint, "--name", name])
            .args(["--upload-tries", "2", "--idle-poll-ms", "50"])
            .arg("--models")
            .arg(fixtures())
            .env("KILN_S3_ACCESS_KEY", ACCESS_KEY)
            .env("KILN_S3_SECRET_KEY", SECRET_KEY)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn client(port: u16) -> SweepServiceClient<Channel> {
    let ch = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    SweepServiceClient::new(ch)
}

async fn progress(port: u16, sweep: u64) -> Option<pb::SweepCounts> {
    let mut c = client(port).await;
    c.get_sweep(pb::GetSweepRequest { sweep_id: sweep })
        .await
        .ok()
        .and_then(|r| r.into_inner().counts)
}

async fn wait_for(port: u16, sweep: u64, done: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(c) = progress(port, sweep).await
            && c.completed >= done
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sweep did not reach {done} completed cells"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn transient_failures(port: u16, sweep: u64) -> usize {
    let Ok(r) = client(port)
        .await
        .query_results(pb::QueryResultsRequest {
            sweep_id: sweep,
            limit: 1000,
            ..Default::default()
        })
        .await
    else {
        return 0;
    };
    r.into_inner()
        .cells
        .iter()
        .flat_map(|c| &c.errors)
        .filter(|e| e.class == pb::FailureClass::Transient as i32)
        .count()
}

async fn farm_survives_faults(db: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    // Short leases and backoff so the faults resolve within the test.
    std::fs::write(
        &config,
        "lease_ttl_secs = 5\nheartbeat_secs = 1\nmaintenance_interval_ms = 100\nretry_base_ms = 200\n",
    )
    .unwrap();
    let mut s3 = S3Server::start();
    let url: StorageUrl = "s3://farm/renders".parse().unwrap();
    S3Store::new("farm".into(), "renders".into(), &s3.options())
        .unwrap()
        .create_bucket()
        .await
        .unwrap();
    let storage = Storage::open(&url, &s3.options()).await.unwrap();

    let port = free_port();
    let mut coord = coordinator(db, port, &config);
    let cells: Vec<pb::RenderCell> = (0..CELLS)
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
    let msgs = crate::submit_messages(
        pb::SweepHeader {
            name: "faults".into(),
            idempotency_key: "faults".into(),
            max_attempts: 30,
            ..Default::default()
        },
        cells,
    );
    let sweep = client(port)
        .await
        .submit_sweep(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .sweep_id;

    let mut w1 = worker("w1", port, &s3);
    let _w2 = worker("w2", port, &s3);
    let _w3 = worker("w3", port, &s3);

    // 1. Storage goes down: uploads fail, attempts fail as transient; it comes back later.
    wait_for(port, sweep, 10, Duration::from_secs(120)).await;
    s3.stop();
    let deadline = Instant::now() + Duration::from_secs(60);
    while transient_failures(port, sweep).await == 0 {
        assert!(
            Instant::now() < deadline,
            "no attempt failed while storage was down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    s3.resume();

    // 2. A worker dies with SIGKILL mid-sweep.
    wait_for(port, sweep, 25, Duration::from_secs(120)).await;
    w1.0.kill().unwrap();
    w1.0.wait().unwrap();

    // 3. The coordinator dies with SIGKILL and comes back on the same database and port.
    wait_for(port, sweep, 40, Duration::from_secs(120)).await;
    coord.0.kill().unwrap();
    coord.0.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    coord = coordinator(db, port, &config);

    wait_for(port, sweep, CELLS, Duration::from_secs(180)).await;
    let counts = progress(port, sweep).await.unwrap();
    assert_eq!(
        (counts.total, counts.completed, counts.discarded),
        (CELLS, CELLS, 0)
    );

    let rows = client(port)
        .await
        .query_results(pb::QueryResultsRequest {
            sweep_id: sweep,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .cells;
    assert_eq!(rows.len() as u64, CELLS);
    let mut keys = HashSet::new();
    for row in &rows {
        let r = row.result.as_ref().expect("completed cells have a result");
        // Its own object: the key names this cell and its winning attempt.
        assert_eq!(
            r.object_key,
            format!("sweeps/{sweep}/{}/{}.png", row.cell_id, row.attempt)
        );
        assert!(
            keys.insert(r.object_key.clone()),
            "two results share an object"
        );
        let bytes = storage
            .get(&r.object_key)
            .await
            .expect("result object exists");
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            r.sha256,
            "object matches its sha256"
        );
        assert_eq!(bytes.len() as u64, r.bytes);
        assert!(r.parameters.contains("Steps: 4"), "{}", r.parameters);
    }
    // The outage's failures are in the history of cells that still completed once.
    assert!(transient_failures(port, sweep).await > 0);
    drop(coord);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farm_on_sqlite_survives_worker_coordinator_and_storage_faults() {
    let dir = tempfile::tempdir().unwrap();
    farm_survives_faults(&format!(
        "sqlite://{}",
        dir.path().join("kiln.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farm_on_postgres_survives_worker_coordinator_and_storage_faults() {
    let pg = crate::PgSchema::new("kiln_farm").await;
    farm_survives_faults(&pg.url).await;
    pg.drop().await;
}
