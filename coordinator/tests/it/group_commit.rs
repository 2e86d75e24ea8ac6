//! The group commit of completes and leases (`queue::group`, `Store::cell_complete_many`,
//! `Store::cell_lease_many`), on both backends: writes in one batch each get their own
//! answer, and concurrent completes through the queue are each answered as if they had been
//! written alone.

use kiln_coordinator::Error;
use kiln_coordinator::clock::Millis;
use kiln_coordinator::domain::lease::{Completion, Fence, LeasePick, LeasedCell};
use kiln_coordinator::domain::state::CellState;
use kiln_proto::{Attempt, CellId, WorkerId};

use crate::harness::{Backend, Fixture, T0, cell, submission};

conformance!(
    one_batch_answers_each_lease_alone,
    one_batch_answers_each_complete_alone,
    concurrent_completes_are_each_answered,
    a_complete_the_database_refuses_fails_alone,
);

fn fence(c: &LeasedCell, worker: WorkerId) -> Fence {
    Fence {
        cell: c.id,
        attempt: c.attempt,
        worker,
    }
}

/// Submits `n` cells and has `n` workers lease one each.
async fn leased(fx: &Fixture, key: &str, n: u64) -> Vec<(WorkerId, LeasedCell)> {
    fx.queue
        .submit(submission(key, (0..n).map(cell).collect()))
        .await
        .unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let w = fx.worker(&format!("{key}-w{i}")).await;
        let mut l = fx.queue.lease(w, 1, None).await.unwrap();
        assert_eq!(l.len(), 1);
        out.push((w, l.pop().unwrap()));
    }
    out
}

async fn one_batch_answers_each_complete_alone(b: Backend) {
    let fx = Fixture::new(b).await;
    let cells = leased(&fx, "batch", 4).await;
    let [(w0, c0), (w1, c1), (w2, c2), (w3, c3)] = cells.as_slice() else {
        unreachable!()
    };
    let at = Millis(T0 + 5);
    let stale = Fence {
        attempt: Attempt(c2.attempt.0 + 1),
        ..fence(c2, *w2)
    };
    let other_worker = fence(c3, *w0);
    let unknown = Fence {
        cell: CellId(c3.id.0 + 1_000_000),
        ..fence(c0, *w0)
    };
    let done = [
        (fence(c0, *w0), r#"{"object_key":"a"}"#),
        (stale, "{}"),
        (fence(c1, *w1), r#"{"object_key":"b"}"#),
        (other_worker, "{}"),
        (unknown, "{}"),
    ]
    .map(|(fence, result_json)| Completion {
        fence,
        result_json,
        at,
    });
    let out = fx.queue.store().cell_complete_many(&done).await.unwrap();
    assert_eq!(out.len(), 5);
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
    assert!(matches!(out[1], Err(Error::LeaseLost { .. })), "{out:?}");
    assert!(matches!(out[3], Err(Error::LeaseLost { .. })), "{out:?}");
    assert!(matches!(out[4], Err(Error::CellNotFound(_))), "{out:?}");
    for (c, key, worker) in [(c0, "a", w0), (c1, "b", w1)] {
        let row = fx.queue.cell(c.id).await.unwrap();
        assert_eq!(row.state, CellState::Completed);
        assert_eq!(row.finalized_at, Some(at.0));
        assert_eq!(row.worker, Some(*worker));
        assert_eq!(
            row.result_json.as_deref(),
            Some(format!(r#"{{"object_key":"{key}"}}"#).as_str())
        );
    }
    // The rejected ones changed nothing: still running, and their real owners can finish.
    for (w, c) in [(w2, c2), (w3, c3)] {
        assert_eq!(fx.queue.cell(c.id).await.unwrap().state, CellState::Running);
        fx.queue.complete(fence(c, *w), "{}").await.unwrap();
    }
    fx.finish().await;
}

async fn concurrent_completes_are_each_answered(b: Backend) {
    let fx = Fixture::new(b).await;
    let cells = leased(&fx, "many", 64).await;
    // Every cell is completed twice at once by its owner (a client retry): exactly one of the
    // two succeeds. A stale attempt sent beside them is rejected.
    let mut tasks = Vec::new();
    for (w, c) in &cells {
        for result in ["first", "second"] {
            let q = fx.queue.clone();
            let f = fence(c, *w);
            tasks.push(tokio::spawn(async move {
                (
                    f.cell,
                    q.complete(f, &format!(r#"{{"r":"{result}"}}"#)).await,
                )
            }));
        }
        let q = fx.queue.clone();
        let stale = Fence {
            attempt: Attempt(c.attempt.0 + 1),
            ..fence(c, *w)
        };
        tasks.push(tokio::spawn(async move {
            let out = q.complete(stale, "{}").await;
            assert!(matches!(out, Err(Error::LeaseLost { .. })), "{out:?}");
            (CellId(-1), Ok(()))
        }));
    }
    let mut ok = std::collections::HashMap::<CellId, u32>::new();
    for t in tasks {
        let (cell, out) = t.await.unwrap();
        if cell.0 < 0 {
            continue;
        }
        match out {
            Ok(()) => *ok.entry(cell).or_default() += 1,
            Err(Error::LeaseLost { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    for (_, c) in &cells {
        assert_eq!(
            ok.get(&c.id),
            Some(&1),
            "cell {} completed exactly once",
            c.id
        );
        assert_eq!(
            fx.queue.cell(c.id).await.unwrap().state,
            CellState::Completed
        );
    }
    fx.finish().await;
}

async fn a_complete_the_database_refuses_fails_alone(b: Backend) {
    let fx = Fixture::new(b).await;
    let cells = leased(&fx, "refused", 16).await;
    // Postgres refuses a NUL character in text; SQLite stores it. Whether or not the bad
    // complete lands in a batch with the others, only it may fail.
    let mut tasks = Vec::new();
    for (i, (w, c)) in cells.iter().enumerate() {
        let q = fx.queue.clone();
        let f = fence(c, *w);
        let result = if i == 7 { "{\"r\":\"a\0b\"}" } else { "{}" };
        tasks.push(tokio::spawn(async move { q.complete(f, result).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap();
        match (i, b) {
            (7, Backend::Postgres) => {
                assert!(matches!(out, Err(Error::Database(_))), "{out:?}")
            }
            _ => out.unwrap(),
        }
    }
    for (i, (_, c)) in cells.iter().enumerate() {
        let want = match (i, b) {
            (7, Backend::Postgres) => CellState::Running,
            _ => CellState::Completed,
        };
        assert_eq!(fx.queue.cell(c.id).await.unwrap().state, want);
    }
    fx.finish().await;
}

async fn one_batch_answers_each_lease_alone(b: Backend) {
    let fx = Fixture::new(b).await;
    let sweep = fx
        .queue
        .submit(submission("picks", (0..6).map(cell).collect()))
        .await
        .unwrap()
        .id;
    let ids: Vec<CellId> = fx
        .queue
        .store()
        .cell_query(&kiln_coordinator::store::CellQuery {
            sweep: Some(sweep),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    let (wa, wb, wc) = (
        fx.worker("a").await,
        fx.worker("b").await,
        fx.worker("c").await,
    );
    // Cell 0 is leased by another worker before the batch: pick `b` comes back without it.
    let taken = fx.queue.lease(wc, 1, None).await.unwrap();
    assert_eq!(taken[0].id, ids[0]);
    let pick = |worker, idx: &[usize], head: Option<usize>| LeasePick {
        worker,
        ids: idx.iter().map(|&i| ids[i].0).collect(),
        head: head.map(|i| ids[i].0),
        lease_ttl_ms: 1_000,
        render_level: 0,
    };
    let (at_a, at_b) = (Millis(T0 + 10), Millis(T0 + 20));
    let picks = [
        // Picked out of queue order: the answer keeps the pick's order.
        (pick(wa, &[3, 1], Some(1)), at_a),
        (pick(wb, &[0, 2, 4], Some(0)), at_b),
    ];
    let out = fx.queue.store().cell_lease_many(&picks).await.unwrap();
    let got = |i: usize| out[i].iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(got(0), vec![ids[3], ids[1]]);
    assert_eq!(got(1), vec![ids[2], ids[4]]);
    assert_eq!(
        out[0].iter().map(|c| c.was_head).collect::<Vec<_>>(),
        vec![false, true]
    );
    assert!(out[1].iter().all(|c| !c.was_head));
    assert!(
        out[0]
            .iter()
            .all(|c| c.lease_expires_at == Millis(at_a.0 + 1_000))
    );
    assert!(
        out[1]
            .iter()
            .all(|c| c.lease_expires_at == Millis(at_b.0 + 1_000))
    );
    // Each leased cell is held by its own pick's worker: its fence works, the other's does not.
    for (c, owner, other) in [(&out[0][0], wa, wb), (&out[1][1], wb, wa)] {
        assert_eq!(c.attempt, Attempt(1));
        let wrong = fx.queue.complete(fence(c, other), "{}").await;
        assert!(matches!(wrong, Err(Error::LeaseLost { .. })), "{wrong:?}");
        fx.queue.complete(fence(c, owner), "{}").await.unwrap();
    }
    // Cell 5 was in no pick and is still available.
    assert_eq!(
        fx.queue.cell(ids[5]).await.unwrap().state,
        CellState::Available
    );
    fx.finish().await;
}
