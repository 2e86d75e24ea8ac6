//! The intake of large submissions (`queue::intake`), on both backends: a submit stores its
//! first chunk of cells with the sweep and the rest as chunks, which are moved into the queue
//! later. Chunks here are a few cells, so small sweeps exercise it. Queues made with
//! `move_intake: false` never move chunks on their own, so a test decides when they move;
//! the assertions made while chunks may be moving hold whatever the timing.

use std::time::Duration;

use kiln_coordinator::clock::Millis;
use kiln_coordinator::domain::lease::Fence;
use kiln_coordinator::domain::rows::CellRow;
use kiln_coordinator::domain::state::CellState;
use kiln_coordinator::queue::QueueConfig;
use kiln_coordinator::store::CellQuery;
use kiln_coordinator::sweep::{CellSpec, NewCell};
use kiln_proto::SweepId;

use crate::harness::{Backend, Fixture, T0, cell, submission};

conformance!(
    a_large_submit_is_whole_at_once_and_its_cells_keep_number_and_age,
    pause_resume_and_cancel_reach_cells_still_in_the_intake,
    a_damaged_chunk_stays_put_and_the_rest_move,
    chunks_left_by_a_stopped_coordinator_are_moved_after_restart,
    the_background_mover_takes_in_while_workers_lease,
);

/// Chunks of 4 cells; the test moves them.
fn held_back() -> QueueConfig {
    QueueConfig {
        intake_chunk: 4,
        move_intake: false,
        ..QueueConfig::default()
    }
}

async fn cells_of(fx: &Fixture, sweep: SweepId) -> Vec<CellRow> {
    fx.queue
        .query(&CellQuery {
            sweep: Some(sweep),
            limit: 1_000,
            ..CellQuery::default()
        })
        .await
        .unwrap()
}

/// The cell a direct insert would have written for `spec` at `number`.
fn expected(number: u32, spec: CellSpec) -> NewCell {
    NewCell::new(number, spec).unwrap()
}

async fn a_large_submit_is_whole_at_once_and_its_cells_keep_number_and_age(b: Backend) {
    let fx = Fixture::with_config(b, held_back()).await;
    let store = fx.queue.store().clone();
    // Duplicates are dropped before the split: 10 distinct cells out of 12.
    let mut specs: Vec<CellSpec> = (0..10).map(cell).collect();
    specs.insert(3, cell(1));
    specs.push(cell(9));
    let out = fx.queue.submit(submission("big", specs)).await.unwrap();
    assert_eq!((out.cell_count, out.duplicate), (10, false));
    // The first chunk is in the queue, the rest waits; counts show all of it.
    assert_eq!(store.intake_pending().await.unwrap(), 6);
    assert_eq!(cells_of(&fx, out.id).await.len(), 4);
    let s = fx.queue.sweep(out.id).await.unwrap();
    assert_eq!((s.counts.available, s.counts.total()), (10, 10));
    assert!(!s.counts.finished());
    let again = fx
        .queue
        .submit(submission("big", (0..10).map(cell).collect()))
        .await
        .unwrap();
    assert_eq!(
        (again.id, again.cell_count, again.duplicate),
        (out.id, 10, true)
    );

    // A later sweep, then the move: the moved cells keep the submit's time, so they are
    // still ahead of the later sweep's cell in the queue.
    fx.clock.advance(5_000);
    let later = fx
        .queue
        .submit(submission("later", vec![cell(100)]))
        .await
        .unwrap();
    assert_eq!(fx.queue.take_in(None).await.unwrap(), 6);
    assert_eq!(store.intake_pending().await.unwrap(), 0);
    assert_eq!(fx.queue.take_in(None).await.unwrap(), 0);
    let rows = cells_of(&fx, out.id).await;
    assert_eq!(rows.len(), 10);
    for (i, r) in rows.iter().enumerate() {
        let want = expected(i as u32, cell(i as u64));
        assert_eq!(r.number, i as i64);
        assert_eq!(
            (&r.cell_key, &r.spec_json),
            (&want.cell_key, &want.spec_json)
        );
        assert_eq!(r.state, CellState::Available);
    }
    let w = fx.worker("w").await;
    let mut order = Vec::new();
    loop {
        let got = fx.queue.lease(w, 3, None).await.unwrap();
        if got.is_empty() {
            break;
        }
        for c in got {
            assert_eq!(c.lease_expires_at, Millis(T0 + 5_000 + 60_000));
            order.push((c.sweep_id, c.number));
            let f = Fence {
                cell: c.id,
                attempt: c.attempt,
                worker: w,
            };
            fx.queue.complete(f, "{}").await.unwrap();
        }
    }
    let want: Vec<_> = (0..10)
        .map(|n| (out.id, n))
        .chain([(later.id, 0)])
        .collect();
    assert_eq!(order, want);
    assert!(fx.queue.sweep(out.id).await.unwrap().counts.finished());
    fx.finish().await;
}

async fn pause_resume_and_cancel_reach_cells_still_in_the_intake(b: Backend) {
    let fx = Fixture::with_config(b, held_back()).await;
    let store = fx.queue.store().clone();
    let a = fx
        .queue
        .submit(submission("a", (0..10).map(cell).collect()))
        .await
        .unwrap()
        .id;
    // Pause counts the 6 waiting cells as held, and they are moved in held.
    assert_eq!(fx.queue.pause(a).await.unwrap(), 10);
    assert_eq!(fx.queue.pause(a).await.unwrap(), 0);
    let s = fx.queue.sweep(a).await.unwrap();
    assert_eq!((s.counts.held, s.counts.available), (10, 0));
    assert_eq!(fx.queue.take_in(Some(a)).await.unwrap(), 6);
    let w = fx.worker("w").await;
    assert!(fx.queue.lease(w, 10, None).await.unwrap().is_empty());
    assert_eq!(fx.queue.resume(a).await.unwrap(), 10);
    assert_eq!(fx.queue.lease(w, 10, None).await.unwrap().len(), 10);

    // Paused with chunks waiting, resumed before they move: they enter available.
    let b_id = fx
        .queue
        .submit(submission("b", (20..30).map(cell).collect()))
        .await
        .unwrap()
        .id;
    assert_eq!(fx.queue.pause(b_id).await.unwrap(), 10);
    assert_eq!(fx.queue.resume(b_id).await.unwrap(), 10);
    assert_eq!(fx.queue.take_in(Some(b_id)).await.unwrap(), 6);
    assert_eq!(fx.queue.sweep(b_id).await.unwrap().counts.available, 10);

    // Cancel counts the waiting cells too; they enter cancelled, finished at the cancel's
    // move, and the sweep is finished before and after.
    let c = fx
        .queue
        .submit(submission("c", (40..50).map(cell).collect()))
        .await
        .unwrap()
        .id;
    assert_eq!(fx.queue.cancel(c).await.unwrap(), (10, 0));
    let s = fx.queue.sweep(c).await.unwrap();
    assert_eq!(s.counts.cancelled, 10);
    assert!(s.counts.finished());
    fx.clock.advance(1_000);
    assert_eq!(fx.queue.take_in(None).await.unwrap(), 6);
    assert_eq!(store.intake_pending().await.unwrap(), 0);
    let rows = cells_of(&fx, c).await;
    assert_eq!(rows.len(), 10);
    assert!(rows.iter().all(|r| r.state == CellState::Cancelled));
    assert!(rows[..4].iter().all(|r| r.finalized_at == Some(T0)));
    assert!(rows[4..].iter().all(|r| r.finalized_at == Some(T0 + 1_000)));
    assert!(fx.queue.sweep(c).await.unwrap().counts.finished());
    fx.finish().await;
}

/// Replaces the bytes of one stored chunk, as a damaged disk or a bug would.
async fn damage_chunk(fx: &Fixture, b: Backend, sweep: SweepId, first: i64) {
    let url = match &fx.db.url {
        kiln_coordinator::store::DatabaseUrl::Sqlite(u)
        | kiln_coordinator::store::DatabaseUrl::Postgres(u) => u.clone(),
    };
    let n = match b {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let n = sqlx::query(
                "UPDATE intake SET cells = x'0400000000' WHERE sweep_id = ? AND first_number = ?",
            )
            .bind(sweep.0)
            .bind(first)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
            pool.close().await;
            n
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let n = sqlx::query(
                "UPDATE intake SET cells = '\\x0400000000' WHERE sweep_id = $1 AND first_number = $2",
            )
            .bind(sweep.0)
            .bind(first)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
            pool.close().await;
            n
        }
    };
    assert_eq!(n, 1);
}

async fn a_damaged_chunk_stays_put_and_the_rest_move(b: Backend) {
    let fx = Fixture::with_config(b, held_back()).await;
    let store = fx.queue.store().clone();
    let id = fx
        .queue
        .submit(submission("d", (0..14).map(cell).collect()))
        .await
        .unwrap()
        .id;
    damage_chunk(&fx, b, id, 8).await;
    // Chunks at 4 and 12 move; the one at 8 is logged and left, with nothing lost.
    assert_eq!(fx.queue.take_in(None).await.unwrap(), 4 + 2);
    assert_eq!(store.intake_pending().await.unwrap(), 4);
    let numbers: Vec<i64> = cells_of(&fx, id).await.iter().map(|r| r.number).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4, 5, 6, 7, 12, 13]);
    assert_eq!(fx.queue.sweep(id).await.unwrap().counts.total(), 14);
    // The queue goes on: the moved cells lease, and a later pass tries the chunk again.
    let w = fx.worker("w").await;
    assert_eq!(fx.queue.lease(w, 20, None).await.unwrap().len(), 10);
    assert_eq!(fx.queue.take_in(None).await.unwrap(), 0);
    assert_eq!(store.intake_pending().await.unwrap(), 4);
    // An extend needs every old cell in the queue, so it refuses, saying why.
    let e = fx
        .queue
        .extend(
            id,
            kiln_coordinator::sweep::SweepSource {
                path: "d.toml".into(),
                text: "model = \"m\"\nprompt = \"x\"\nsteps = 4\ncfg = 1.0\n\
                       seeds = { from = 1, count = 2 }\n"
                    .into(),
                files: Default::default(),
                images: Default::default(),
                models: Default::default(),
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("4 cells in its intake"), "{e}");
    fx.finish().await;
}

async fn chunks_left_by_a_stopped_coordinator_are_moved_after_restart(b: Backend) {
    let fx = Fixture::with_config(b, held_back()).await;
    let id = fx
        .queue
        .submit(submission("r", (0..10).map(cell).collect()))
        .await
        .unwrap()
        .id;
    fx.queue.store().close().await;

    // A new coordinator on the same database, moving in the background as the server does:
    // the maintenance loop wakes the mover on every tick, the first at start.
    let store = fx.db.store().await;
    let queue = kiln_coordinator::queue::Queue::new(
        store.clone(),
        std::sync::Arc::new(fx.clock.clone()),
        QueueConfig {
            intake_chunk: 4,
            ..QueueConfig::default()
        },
    );
    queue.wake_intake();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.intake_pending().await.unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "intake not moved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = queue.sweep(id).await.unwrap();
    assert_eq!((s.counts.available, s.counts.total()), (10, 10));
    let w = queue
        .register(&crate::harness::registration("w"))
        .await
        .unwrap()
        .0;
    assert_eq!(queue.lease(w, 20, None).await.unwrap().len(), 10);
    store.close().await;
    fx.db.cleanup().await;
}

async fn the_background_mover_takes_in_while_workers_lease(b: Backend) {
    let fx = Fixture::with_config(
        b,
        QueueConfig {
            intake_chunk: 7,
            ..QueueConfig::default()
        },
    )
    .await;
    let id = fx
        .queue
        .submit(submission("m", (0..300).map(cell).collect()))
        .await
        .unwrap()
        .id;
    // Workers lease and complete while the mover (woken by the submit) brings the rest in;
    // they stop when the sweep is finished, so every cell must have come through.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let q = fx.queue.clone();
        let w = fx.worker(&format!("w{i}")).await;
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !q.sweep(id).await.unwrap().counts.finished() {
                assert!(std::time::Instant::now() < deadline, "sweep not finished");
                let got = q.lease(w, 2, None).await.unwrap();
                if got.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                for c in got {
                    let f = Fence {
                        cell: c.id,
                        attempt: c.attempt,
                        worker: w,
                    };
                    q.complete(f, "{}").await.unwrap();
                    done.push(c.number);
                }
            }
            done
        }));
    }
    let mut numbers = Vec::new();
    for t in tasks {
        numbers.extend(t.await.unwrap());
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (0..300).collect::<Vec<i64>>());
    assert_eq!(fx.queue.store().intake_pending().await.unwrap(), 0);
    fx.finish().await;
}
