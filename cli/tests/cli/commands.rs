//! The client commands (`sweeps`, `status`, `pause`, `resume`, `cancel`, `retry --failed`,
//! `workers`, `watch`, `star`) as processes against a real coordinator process.

use std::process::Command;

use kiln_proto::v1 as pb;

use crate::util::json_rows;
use crate::{cell, clients, spawn, submit_cells};

fn kiln(addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_COORDINATOR", format!("http://{addr}"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_drive_a_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let (mut sweeps, mut workers, creds) = clients(&c.addr).await;
    let msgs = vec![
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Header(pb::SweepHeader {
                name: "foxes".into(),
                idempotency_key: "foxes-1".into(),
                ..Default::default()
            })),
        },
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Cells(pb::CellChunk {
                cells: (0..4).map(cell).collect(),
            })),
        },
    ];
    let id = sweeps
        .submit_sweep(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .sweep_id;
    let sid = id.to_string();

    let (ok, out, _) = kiln(&c.addr, &["sweeps"]);
    assert!(ok);
    assert!(out.contains("foxes") && out.contains("active"), "{out}");
    let (ok, out, _) = kiln(&c.addr, &["pause", &sid]);
    assert!(ok && out.contains("4 queued cells held"), "{out}");
    let (ok, out, _) = kiln(&c.addr, &["status", &sid]);
    assert!(
        ok && out.contains("paused") && out.contains("4 held"),
        "{out}"
    );
    let (ok, out, _) = kiln(&c.addr, &["resume", &sid]);
    assert!(ok && out.contains("4 cells released"), "{out}");

    let worker = workers
        .register(pb::RegisterRequest {
            info: Some(pb::WorkerInfo {
                name: "gaming-pc".into(),
                max_pixels: 1 << 20,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    creds.set_session(&worker.session).unwrap();
    let worker = worker.worker_id;
    let t = workers
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
        .remove(0);
    let a = pb::AttemptRef {
        cell_id: t.cell_id,
        attempt: t.attempt,
    };
    workers
        .fail(pb::FailRequest {
            worker_id: worker,
            attempt: Some(a),
            class: pb::FailureClass::BadInput as i32,
            message: "no such model".into(),
        })
        .await
        .unwrap();
    let (ok, out, _) = kiln(&c.addr, &["workers"]);
    assert!(
        ok && out.contains("gaming-pc") && out.contains("online") && out.contains("s ago"),
        "{out}"
    );
    let (ok, out, _) = kiln(&c.addr, &["retry", "--failed", &sid]);
    assert!(ok && out.contains("1 failed cells queued again"), "{out}");
    let (ok, out, _) = kiln(&c.addr, &["cancel", &sid]);
    assert!(ok && out.contains("4 queued cells cancelled"), "{out}");
    // The sweep is finished now: watch prints its end state and returns.
    let (ok, _, err) = kiln(&c.addr, &["watch", &sid]);
    assert!(ok, "{err}");

    // Errors are clear and exit non-zero.
    let (ok, _, err) = kiln(&c.addr, &["status", "999"]);
    assert!(!ok && err.contains("sweep 999 not found"), "{err}");
    let (ok, _, err) = kiln("127.0.0.1:1", &["sweeps"]);
    assert!(
        !ok && err.contains("connecting to the coordinator")
            && err.contains("start one with `kiln coordinator`"),
        "{err}"
    );
}

/// `kiln star` marks keepers that `kiln query 'starred'` (and `rating`, `--sort -rating`) then
/// finds, and the table shows; `--unstar` takes the star back; bad cells and ratings are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_then_query_starred() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let (mut sweeps, _, _) = clients(&c.addr).await;
    submit_cells(&mut sweeps, "foxes-1", (0..4).map(cell).collect()).await;
    let ids: Vec<String> = sweeps
        .query_results(pb::QueryResultsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cells
        .iter()
        .map(|r| r.cell_id.to_string())
        .collect();
    let query = |filter: &str, sort: &str| {
        let (ok, out, err) = kiln(
            &c.addr,
            &["query", filter, "--sort", sort, "--format", "json"],
        );
        assert!(ok, "{err}");
        json_rows(&out)
            .iter()
            .map(|r| {
                (
                    r["cell"].to_string(),
                    r["starred"].clone(),
                    r["rating"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(query("starred", "").is_empty());

    let (ok, out, err) = kiln(&c.addr, &["star", &ids[1], &ids[2]]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("cell {} (sweep 1 #1): ★", ids[1])),
        "{out}"
    );
    let (ok, out, err) = kiln(&c.addr, &["star", &ids[2], "--rating", "5"]);
    assert!(ok && out.contains("★ 5/5"), "{out}{err}");
    let t = serde_json::Value::Bool(true);
    let n = |v: u64| serde_json::Value::from(v);
    assert_eq!(
        query("starred", "-rating"),
        [
            (ids[2].clone(), t.clone(), n(5)),
            (ids[1].clone(), t.clone(), n(0))
        ]
    );
    assert_eq!(query("rating >= 4", "").len(), 1);
    assert_eq!(query("not starred", "").len(), 2);
    let (ok, table, _) = kiln(&c.addr, &["query", "starred"]);
    assert!(
        ok && table.lines().next().unwrap().contains(" KEEP "),
        "{table}"
    );
    assert!(table.contains("★ 5/5"), "{table}");

    // Unstarred, it keeps its rating and drops out of `starred`.
    let (ok, out, err) = kiln(&c.addr, &["star", "--unstar", &ids[2]]);
    assert!(
        ok && out.contains("5/5") && !out.contains('★'),
        "{out}{err}"
    );
    let f = serde_json::Value::Bool(false);
    assert_eq!(query("starred", ""), [(ids[1].clone(), t, n(0))]);
    assert_eq!(query("rating = 5", ""), [(ids[2].clone(), f, n(5))]);

    // Refused, with why: an unknown cell, a rating past 5.
    let (ok, _, err) = kiln(&c.addr, &["star", "99999"]);
    assert!(!ok && err.contains("cell 99999 not found"), "{err}");
    let (ok, _, err) = kiln(&c.addr, &["star", &ids[0], "--rating", "6"]);
    assert!(!ok && err.contains("6 is not in 0..=5"), "{err}");
    assert_eq!(query("not starred and rating = 0", "").len(), 2);
}
