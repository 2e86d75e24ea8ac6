//! A worker process told to stop with SIGTERM drains: it finishes the render in flight
//! (completed, not lost), gives back the cell it had prefetched without counting an attempt,
//! exits 0, and shows as drained.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use tonic::transport::Channel;

use crate::{clients, spawn};

/// `n` cells big enough (256², 8 steps) that the worker is mid-render when a signal comes.
pub(crate) fn slow_cells(n: u64) -> Vec<pb::RenderCell> {
    (0..n)
        .map(|seed| pb::RenderCell {
            model: "tiny-sd15".into(),
            prompt: format!("a fox {seed}"),
            seed,
            steps: 8,
            cfg: 1.0,
            sampler: pb::Sampler::Lcm as i32,
            width: 256,
            height: 256,
            ..Default::default()
        })
        .collect()
}

/// A worker process on the coordinator at `addr`, with the fixtures as its models.
fn worker(addr: &str, out: &Path, extra: &[&str]) -> Child {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference");
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["worker", "--coordinator", &format!("http://{addr}")])
        .args(extra)
        .arg("--storage")
        .arg(format!("file://{}", out.display()))
        .arg("--models")
        .arg(&fixtures)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until some worker holds a cell that has reached `step` (0: leased at all).
async fn wait_until_rendering(sweeps: &mut SweepServiceClient<Channel>, step: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = sweeps
            .list_workers(pb::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        if w.iter().any(|w| w.running.iter().any(|p| p.step >= step)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never started rendering"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM and waits at most `limit` for the exit.
async fn terminate(worker: &mut Child, limit: Duration) -> ExitStatus {
    let pid = worker.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = worker.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the worker did not exit within {limit:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let (mut sweeps, _, _) = clients(&c.addr).await;
    let sweep = crate::submit_cells(&mut sweeps, "drain", slow_cells(6)).await;
    let out = dir.path().join("out");
    let mut worker = worker(&c.addr, &out, &["--prefetch", "1"]);
    // Wait until a render is under way (progress reported), with one more cell prefetched.
    wait_until_rendering(&mut sweeps, 1).await;
    let status = terminate(&mut worker, Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}");

    let s = sweeps
        .get_sweep(pb::GetSweepRequest { sweep_id: sweep })
        .await
        .unwrap()
        .into_inner();
    let n = s.counts.unwrap();
    assert_eq!(n.running, 0, "nothing left leased");
    assert!(n.completed >= 1, "the render in flight was finished");
    assert_eq!(n.completed + n.available, 6);
    let rows = sweeps
        .query_results(pb::QueryResultsRequest {
            sweep_id: sweep,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .cells;
    for r in rows
        .iter()
        .filter(|r| r.state == pb::CellState::Available as i32)
    {
        // Given back under the attempt it was leased with, and with one more allowed, so the
        // next lease is a new attempt and the cell keeps every attempt it had (5 by default).
        assert!(r.attempt <= 1, "cell {}: attempt {}", r.cell_id, r.attempt);
        assert_eq!(
            r.max_attempts - r.attempt,
            5,
            "cell {} was given back uncounted",
            r.cell_id
        );
    }
    let w = sweeps
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(w[0].drained && !w[0].online);
}

/// SIGTERM while the coordinator is gone: the worker finishes its render, cannot report it, and
/// still exits once its drain timeout has passed (the cell's lease expires and it runs again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_coordinator_gone_ends_within_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let mut c = spawn(&db, dir.path());
    let (mut sweeps, _, _) = clients(&c.addr).await;
    crate::submit_cells(&mut sweeps, "gone", slow_cells(2)).await;
    let out = dir.path().join("out");
    let mut worker = worker(&c.addr, &out, &["--drain-timeout-secs", "2"]);
    // Once a render is under way, the coordinator dies for good.
    wait_until_rendering(&mut sweeps, 0).await;
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    // The render in flight (about a second here), then at most the 2 s drain timeout.
    let status = terminate(&mut worker, Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
}
