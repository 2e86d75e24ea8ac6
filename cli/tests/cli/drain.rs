//! A worker process told to stop with SIGTERM drains: it finishes the render in flight
//! (completed, not lost), gives back the cell it had prefetched without counting an attempt,
//! exits 0, and shows as drained.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::v1 as pb;

use crate::{clients, spawn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let (mut sweeps, _) = clients(&c.addr).await;
    let cells: Vec<pb::RenderCell> = (0..6)
        .map(|seed| pb::RenderCell {
            model: "tiny-sd15".into(),
            prompt: "a fox".into(),
            seed,
            steps: 8,
            cfg: 1.0,
            sampler: pb::Sampler::Lcm as i32,
            // Big enough that the worker is mid-render when the signal comes.
            width: 256,
            height: 256,
            ..Default::default()
        })
        .collect();
    let msgs = crate::submit_messages(
        pb::SweepHeader {
            idempotency_key: "drain".into(),
            ..Default::default()
        },
        cells,
    );
    let sweep = sweeps
        .submit_sweep(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .sweep_id;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "worker",
            "--coordinator",
            &format!("http://{}", c.addr),
            "--prefetch",
            "1",
        ])
        .arg("--storage")
        .arg(format!("file://{}", dir.path().join("out").display()))
        .arg("--models")
        .arg(&fixtures)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // Wait until a render is under way (progress reported), with one more cell prefetched.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = sweeps
            .list_workers(pb::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        if w.iter().any(|w| w.running.iter().any(|p| p.step >= 1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never started rendering"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = worker.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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
    let (mut sweeps, _) = clients(&c.addr).await;
    let cells: Vec<pb::RenderCell> = (0..2)
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
        .collect();
    crate::submit_cells(&mut sweeps, "gone", cells).await;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["worker", "--coordinator", &format!("http://{}", c.addr)])
        .args(["--drain-timeout-secs", "2"])
        .arg("--storage")
        .arg(format!("file://{}", dir.path().join("out").display()))
        .arg("--models")
        .arg(&fixtures)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Once a render is under way, the coordinator dies for good.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = sweeps
            .list_workers(pb::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        if w.iter().any(|w| !w.running.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never leased");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let pid = worker.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The render in flight (about a second here), then at most the 2 s drain timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = worker.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the worker did not exit after SIGTERM with its coordinator gone");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
