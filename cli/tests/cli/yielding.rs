//! A worker yields to its PC's owner, as real processes: a coordinator, a `kiln worker`
//! rendering a long sweep of the tiny model, and a real program named in `--yield-process`
//! started and killed by the test. When the program starts the worker hands its render back
//! within the grace, leases nothing, and `kiln workers` shows why; when it exits rendering
//! resumes; at the end every cell completed exactly once. The same with the allowed hours on a
//! clock the test sets (`KILN_TEST_YIELD_CLOCK_FILE`), with the fake busy GPU
//! (`KILN_TEST_YIELD_GPU_BUSY_FILE`: a second process on a GPU cannot be caused here), and
//! with the admin's `kiln workers pause|resume|drain`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use tonic::transport::Channel;

use crate::drain::slow_cells;
use crate::util::{Worker, kiln, worker_command};
use crate::{clients, spawn_with};

/// The grace the worker gets to finish a render once it must yield.
const GRACE_SECS: u64 = 1;

/// The worker's record in `kiln workers` (there is at most one worker; none before it
/// registered).
async fn record_of(sweeps: &mut SweepServiceClient<Channel>) -> Option<pb::WorkerRecord> {
    let w = sweeps
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(w.len() <= 1, "one worker");
    w.into_iter().next()
}

/// The registered worker's record.
async fn record(sweeps: &mut SweepServiceClient<Channel>) -> pb::WorkerRecord {
    record_of(sweeps).await.expect("the worker registered")
}

/// Waits (at most `limit`) until `ok` holds of the worker's record; returns how long it took.
async fn wait_for(
    sweeps: &mut SweepServiceClient<Channel>,
    what: &str,
    limit: Duration,
    ok: impl Fn(&pb::WorkerRecord) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let w = record_of(sweeps).await;
        if w.as_ref().is_some_and(&ok) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the worker renders (a cell past step 1), then until it yields with `reason`
/// (no cell leased, the reason shown by `kiln workers`), and checks it leases nothing while
/// `cause` lasts; then `end` removes the cause and rendering must resume.
async fn yields_while<T>(
    addr: &str,
    sweeps: &mut SweepServiceClient<Channel>,
    reason: &str,
    cause: impl FnOnce() -> T,
    end: impl FnOnce(T),
) {
    wait_for(sweeps, "rendering", Duration::from_secs(120), |w| {
        w.running.iter().any(|p| p.step >= 1)
    })
    .await;
    let caused = cause();
    // The grace, a poll, a step of the render to notice, and a loaded machine's slack.
    let took = wait_for(sweeps, reason, Duration::from_secs(GRACE_SECS + 15), |w| {
        w.running.is_empty() && w.paused_reason == reason
    })
    .await;
    println!("{reason}: yielded in {took:?}");
    let shown = kiln(addr, &["workers"]);
    assert!(shown.contains(&format!("paused: {reason}")), "{shown}");
    // Nothing leased while it yields.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let w = record(sweeps).await;
        assert!(w.running.is_empty(), "leased while yielding: {w:?}");
        assert!(w.online, "a yielding worker stays online: {w:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    end(caused);
    wait_for(sweeps, "resumed", Duration::from_secs(60), |w| {
        w.paused_reason.is_empty() && !w.running.is_empty()
    })
    .await;
}

/// A real program called `name`: /bin/sleep copied under that name, sleeping a long while.
fn game(dir: &Path, name: &str) -> Child {
    let exe = dir.join(name);
    std::fs::copy("/bin/sleep", &exe).unwrap();
    Command::new(&exe).arg("600").spawn().unwrap()
}

/// Every cell of `sweep` completed exactly once: no attempt failed, and storage holds one
/// image per cell, its own attempt's.
async fn every_cell_once(sweeps: &mut SweepServiceClient<Channel>, sweep: u64, n: u64, out: &Path) {
    let cells = crate::finished_cells(sweeps, sweep, Duration::from_secs(600)).await;
    assert_eq!(cells.len() as u64, n);
    for c in &cells {
        assert_eq!(
            c.state,
            pb::CellState::Completed as i32,
            "cell {}",
            c.cell_id
        );
        assert!(c.errors.is_empty(), "cell {}: {:?}", c.cell_id, c.errors);
        let key = &c.result.as_ref().unwrap().object_key;
        assert_eq!(
            key,
            &format!("sweeps/{sweep}/{}/{}.png", c.cell_id, c.attempt)
        );
        assert!(out.join(key).is_file(), "{key}");
    }
    let mut pngs = 0;
    for cell_dir in std::fs::read_dir(out.join(format!("sweeps/{sweep}"))).unwrap() {
        pngs += std::fs::read_dir(cell_dir.unwrap().path()).unwrap().count();
    }
    assert_eq!(pngs as u64, n, "one image per cell, none rendered twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_yields_to_a_game_a_busy_gpu_the_hours_and_the_admin() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "heartbeat_secs = 1\n").unwrap();
    let c = spawn_with(&db, dir.path(), &["--config", config.to_str().unwrap()]);
    let (mut sweeps, _, _) = clients(&c.addr).await;
    const CELLS: u64 = 14;
    let sweep = crate::submit_cells(&mut sweeps, "yield", slow_cells(CELLS)).await;

    let out = dir.path().join("out");
    let busy = dir.path().join("gpu-busy");
    let clock = dir.path().join("clock");
    // Monday 23:00: inside the allowed hours.
    std::fs::write(&clock, "2026-12-07T23:00:00").unwrap();
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(
        &worker_config,
        "[yield]\nprocesses = [\"kiln-test-game\"]\nhours = \"22:00-08:00\"\npoll_ms = 5000\n",
    )
    .unwrap();
    let mut worker = Worker(
        worker_command(&c.addr, &out, &[&crate::util::fixtures()])
            .arg("--config")
            .arg(&worker_config)
            // The flag wins over the file's 5 s.
            .args(["--yield-poll-ms", "200"])
            .args(["--yield-grace-secs", &GRACE_SECS.to_string()])
            .env("KILN_TEST_YIELD_GPU_BUSY_FILE", &busy)
            .env("KILN_TEST_YIELD_CLOCK_FILE", &clock)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // A game starts: the worker yields; the game exits: it resumes.
    yields_while(
        &c.addr,
        &mut sweeps,
        "kiln-test-game running",
        || game(dir.path(), "kiln-test-game"),
        |mut g: Child| {
            g.kill().unwrap();
            g.wait().unwrap();
        },
    )
    .await;
    // Another process on the GPU (the fake source).
    yields_while(
        &c.addr,
        &mut sweeps,
        "another process uses the GPU (test)",
        || std::fs::write(&busy, "").unwrap(),
        |()| std::fs::remove_file(&busy).unwrap(),
    )
    .await;
    // Tuesday noon: outside the hours; then Tuesday 22:30: inside again.
    yields_while(
        &c.addr,
        &mut sweeps,
        "outside 22:00-08:00",
        || std::fs::write(&clock, "2026-12-08T12:00:00").unwrap(),
        |()| std::fs::write(&clock, "2026-12-08T22:30:00").unwrap(),
    )
    .await;
    // The admin pauses it remotely, then resumes it.
    let id = record(&mut sweeps).await.worker_id.to_string();
    yields_while(
        &c.addr,
        &mut sweeps,
        "paused by the admin",
        || {
            kiln(&c.addr, &["workers", "pause", &id]);
        },
        |()| {
            kiln(&c.addr, &["workers", "resume", &id]);
        },
    )
    .await;

    every_cell_once(&mut sweeps, sweep, CELLS, &out).await;

    // The admin drains it: it exits by itself and shows as drained.
    kiln(&c.addr, &["workers", "drain", &id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the drained worker did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(kiln(&c.addr, &["workers"]).contains("drained"));
}
