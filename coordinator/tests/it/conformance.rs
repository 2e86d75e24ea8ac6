//! One behaviour suite, run against both backends (`sqlite::*` and `postgres::*`). Each test
//! gets a fresh database and a manual clock, so lease expiry and backoff are deterministic.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use kiln_coordinator::Error;
use kiln_coordinator::domain::failure::Decision;
use kiln_coordinator::domain::lease::{Fence, HeartbeatStatus, LeasedCell};
use kiln_coordinator::domain::state::{CellState, FailureClass, SweepState};
use kiln_coordinator::queue::QueueConfig;
use kiln_coordinator::store::{CellQuery, CellSort};
use kiln_proto::{SweepId, WorkerId};

use crate::harness::{Backend, Fixture, cell, submission};

conformance!(
    concurrent_leasers_never_share_a_cell,
    expired_lease_is_requeued_and_stale_writes_are_rejected,
    cancel_reaches_queued_and_running_cells,
    retry_backs_off_then_discards_with_history,
    bad_input_is_not_retried,
    poison_cell_stops_after_failing_on_several_workers,
    idempotent_submit,
    release_returns_attempt_uncounted,
    pause_holds_and_resume_releases,
    affinity_and_capabilities_shape_leases,
    affinity_never_starves_a_cold_head,
    queries_filter_sort_and_page,
    duplicate_cells_in_one_sweep_are_stored_once,
    reopen_keeps_everything,
    complete_and_lease_returns_the_next_cells,
    stale_complete_and_lease_is_rejected_and_leases_nothing,
    complete_and_lease_honours_capabilities_and_affinity,
    lease_sees_cells_queued_ahead_of_its_read_ahead,
    small_worker_is_served_past_a_read_ahead_of_big_cells,
    two_coordinators_on_one_database_never_share_a_cell,
    read_ahead_catches_up_with_changes_it_was_not_told_of,
    odd_text_and_out_of_range_numbers_are_invalid_on_both_backends,
);

fn fence(c: &LeasedCell, worker: WorkerId) -> Fence {
    Fence {
        cell: c.id,
        attempt: c.attempt,
        worker,
    }
}

async fn submit_n(fx: &Fixture, key: &str, n: u64) -> SweepId {
    fx.queue
        .submit(submission(key, (0..n).map(cell).collect()))
        .await
        .unwrap()
        .id
}

const RESULT: &str = r#"{"object_key":"k","sha256":"00"}"#;

async fn concurrent_leasers_never_share_a_cell(b: Backend) {
    let fx = Fixture::new(b).await;
    let sweep = submit_n(&fx, "race", 300).await;
    let held: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let ever: Arc<Mutex<Vec<i64>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let queue = fx.queue.clone();
        let worker = fx.worker(&format!("w{w}")).await;
        let held = held.clone();
        let ever = ever.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let leased = queue.lease(worker, 1 + (w % 3), None).await.unwrap();
                if leased.is_empty() {
                    break;
                }
                for c in &leased {
                    assert!(
                        held.lock().unwrap().insert(c.id.0),
                        "cell {} leased while held",
                        c.id
                    );
                    ever.lock().unwrap().push(c.id.0);
                }
                tokio::task::yield_now().await;
                for c in &leased {
                    held.lock().unwrap().remove(&c.id.0);
                    queue.complete(fence(c, worker), RESULT).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ever = ever.lock().unwrap().clone();
    let distinct: HashSet<i64> = ever.iter().copied().collect();
    assert_eq!(ever.len(), 300, "each cell leased exactly once");
    assert_eq!(distinct.len(), 300);
    let s = fx.queue.sweep(sweep).await.unwrap();
    assert_eq!(s.counts.completed, 300);
    assert!(s.counts.finished());
    fx.finish().await;
}

async fn expired_lease_is_requeued_and_stale_writes_are_rejected(b: Backend) {
    let fx = Fixture::new(b).await;
    submit_n(&fx, "expiry", 1).await;
    let w1 = fx.worker("w1").await;
    let w2 = fx.worker("w2").await;
    let first = fx.queue.lease(w1, 1, None).await.unwrap().remove(0);
    assert_eq!(first.attempt.0, 1);

    // A heartbeat inside the TTL extends the lease.
    fx.clock.advance(50_000);
    let (st, _) = fx
        .queue
        .heartbeat(w1, &[(first.id, first.attempt)], None)
        .await
        .unwrap();
    assert_eq!(st, vec![HeartbeatStatus::Extended]);
    fx.clock.advance(50_000);
    assert_eq!(
        fx.queue.maintain().await.unwrap().rescued,
        0,
        "extended lease kept"
    );

    // Silence past the TTL: rescued, retryable after a backoff, then available again.
    fx.clock.advance(11_000);
    assert_eq!(fx.queue.maintain().await.unwrap().rescued, 1);
    let c = fx.queue.cell(first.id).await.unwrap();
    assert_eq!(c.state, CellState::Retryable);
    assert!(c.errors_json.contains("lease_expired"), "{}", c.errors_json);
    assert!(
        fx.queue.lease(w2, 1, None).await.unwrap().is_empty(),
        "not before backoff"
    );
    fx.clock.advance(10_000);
    assert_eq!(fx.queue.maintain().await.unwrap().promoted, 1);
    let second = fx.queue.lease(w2, 1, None).await.unwrap().remove(0);
    assert_eq!((second.id, second.attempt.0), (first.id, 2));

    // The old attempt can neither heartbeat, progress, complete nor fail.
    let (st, _) = fx
        .queue
        .heartbeat(w1, &[(first.id, first.attempt)], None)
        .await
        .unwrap();
    assert_eq!(st, vec![HeartbeatStatus::Lost]);
    let stale = fence(&first, w1);
    assert!(matches!(
        fx.queue.complete(stale, RESULT).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        fx.queue.fail(stale, FailureClass::Transient, "late").await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        fx.queue.progress(stale, 1, 4).await,
        Err(Error::LeaseLost { .. })
    ));
    // Right attempt, wrong worker: also rejected.
    let wrong = Fence {
        worker: w1,
        ..fence(&second, w2)
    };
    assert!(matches!(
        fx.queue.complete(wrong, RESULT).await,
        Err(Error::LeaseLost { .. })
    ));

    fx.queue.complete(fence(&second, w2), RESULT).await.unwrap();
    let c = fx.queue.cell(first.id).await.unwrap();
    assert_eq!(c.state, CellState::Completed);
    assert_eq!(c.worker, Some(w2));
    // A completed cell rejects even its own winner's second write.
    assert!(matches!(
        fx.queue.complete(fence(&second, w2), RESULT).await,
        Err(Error::LeaseLost { .. })
    ));
    fx.finish().await;
}

async fn cancel_reaches_queued_and_running_cells(b: Backend) {
    let fx = Fixture::new(b).await;
    let sweep = submit_n(&fx, "cancel", 3).await;
    let w = fx.worker("w").await;
    let running = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    assert_eq!(fx.queue.cancel(sweep).await.unwrap(), (2, 1));
    let s = fx.queue.sweep(sweep).await.unwrap();
    assert_eq!(s.state, SweepState::Cancelled);
    assert_eq!((s.counts.cancelled, s.counts.running), (2, 1));
    assert!(fx.queue.lease(w, 4, None).await.unwrap().is_empty());

    // The worker learns on heartbeat and on progress, then reports the cancel.
    let (st, _) = fx
        .queue
        .heartbeat(w, &[(running.id, running.attempt)], None)
        .await
        .unwrap();
    assert_eq!(st, vec![HeartbeatStatus::CancelRequested]);
    assert!(fx.queue.progress(fence(&running, w), 2, 4).await.unwrap());
    let d = fx
        .queue
        .fail(fence(&running, w), FailureClass::Cancelled, "cancelled")
        .await
        .unwrap();
    assert_eq!(d, Decision::Cancel);
    let s = fx.queue.sweep(sweep).await.unwrap();
    assert_eq!(s.counts.cancelled, 3);
    assert!(s.counts.finished());

    // A running cell whose worker dies is finalised as cancelled by the rescuer, not retried.
    let sweep = submit_n(&fx, "cancel2", 1).await;
    let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    fx.queue.cancel(sweep).await.unwrap();
    fx.clock.advance(61_000);
    fx.queue.maintain().await.unwrap();
    assert_eq!(
        fx.queue.cell(c.id).await.unwrap().state,
        CellState::Cancelled
    );
    fx.finish().await;
}

async fn retry_backs_off_then_discards_with_history(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut sub = submission("retry", vec![cell(1)]);
    sub.max_attempts = Some(3);
    let sweep = fx.queue.submit(sub).await.unwrap().id;
    let w = fx.worker("w").await;
    let mut last_backoff = 0;
    for attempt in 1..=3 {
        let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
        assert_eq!(c.attempt.0, attempt);
        let now = fx.queue.now().0;
        let d = fx
            .queue
            .fail(fence(&c, w), FailureClass::Transient, "storage down")
            .await
            .unwrap();
        if attempt < 3 {
            let Decision::Retry { at } = d else {
                panic!("{d:?}")
            };
            let backoff = at.0 - now;
            let nominal = 2_000 << (attempt - 1);
            assert!(
                backoff >= nominal * 8 / 10 && backoff <= nominal * 12 / 10,
                "{backoff}"
            );
            assert!(backoff > last_backoff / 2, "grows");
            last_backoff = backoff;
            // Not leasable before its time, leasable after.
            fx.queue.maintain().await.unwrap();
            assert!(fx.queue.lease(w, 1, None).await.unwrap().is_empty());
            fx.clock.advance(backoff);
            assert_eq!(fx.queue.maintain().await.unwrap().promoted, 1);
        } else {
            assert!(matches!(d, Decision::Discard { .. }), "{d:?}");
        }
    }
    let cells = fx
        .queue
        .query(&CellQuery {
            sweep: Some(sweep),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(cells[0].state, CellState::Discarded);
    let errors: Vec<serde_json::Value> = serde_json::from_str(&cells[0].errors_json).unwrap();
    assert_eq!(errors.len(), 3, "history kept");
    assert_eq!(errors[2]["attempt"], 3);
    assert_eq!(errors[2]["class"], "transient");

    // Retry failed: a fresh set of attempts.
    assert_eq!(fx.queue.retry_failed(sweep).await.unwrap(), 1);
    let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    assert_eq!(c.attempt.0, 4);
    fx.queue.complete(fence(&c, w), RESULT).await.unwrap();
    fx.finish().await;
}

async fn bad_input_is_not_retried(b: Backend) {
    let fx = Fixture::new(b).await;
    submit_n(&fx, "bad", 1).await;
    let w = fx.worker("w").await;
    let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    let d = fx
        .queue
        .fail(fence(&c, w), FailureClass::BadInput, "model not found: x")
        .await
        .unwrap();
    assert!(matches!(d, Decision::Discard { .. }));
    assert_eq!(
        fx.queue.cell(c.id).await.unwrap().state,
        CellState::Discarded
    );
    fx.finish().await;
}

async fn poison_cell_stops_after_failing_on_several_workers(b: Backend) {
    let cfg = QueueConfig {
        default_max_attempts: 10,
        ..Default::default()
    };
    let fx = Fixture::with_config(b, cfg).await;
    submit_n(&fx, "poison", 1).await;
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let w = fx.worker(name).await;
        let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
        let d = fx
            .queue
            .fail(fence(&c, w), FailureClass::Resource, "CUDA out of memory")
            .await
            .unwrap();
        if i < 2 {
            assert!(matches!(d, Decision::Retry { .. }), "{d:?}");
            fx.clock.advance(60_000);
            fx.queue.maintain().await.unwrap();
        } else {
            assert!(
                matches!(d, Decision::Discard { ref reason } if reason.contains("poison")),
                "{d:?}"
            );
        }
    }
    fx.finish().await;
}

async fn idempotent_submit(b: Backend) {
    let fx = Fixture::new(b).await;
    let a = fx
        .queue
        .submit(submission("same-key", (0..5).map(cell).collect()))
        .await
        .unwrap();
    let again = fx
        .queue
        .submit(submission("same-key", (0..9).map(cell).collect()))
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(again.duplicate);
    assert_eq!(a.id, again.id);
    assert_eq!(again.cell_count, 5);
    assert_eq!(fx.queue.sweeps(100, None, None).await.unwrap().len(), 1);
    // Concurrent submits of one key still make one sweep.
    let mut joins = Vec::new();
    for _ in 0..8 {
        let q = fx.queue.clone();
        joins.push(tokio::spawn(async move {
            q.submit(submission("racing", (0..50).map(cell).collect()))
                .await
        }));
    }
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for j in joins {
        let r = j.await.unwrap().unwrap();
        ids.insert(r.id);
        fresh += usize::from(!r.duplicate);
    }
    assert_eq!((ids.len(), fresh), (1, 1));
    assert_eq!(fx.queue.sweeps(100, None, None).await.unwrap().len(), 2);
    // A unique name: the same key is still its sweep; another key under that name is refused,
    // naming the sweep; without the flag it makes a second sweep of that name.
    let named = |key: &str, unique: bool| {
        let mut s = submission(key, (0..3).map(cell).collect());
        s.name = "foxes".into();
        s.unique_name = unique;
        s
    };
    let first = fx.queue.submit(named("foxes-a", true)).await.unwrap();
    assert!(
        fx.queue
            .submit(named("foxes-a", true))
            .await
            .unwrap()
            .duplicate
    );
    match fx.queue.submit(named("foxes-b", true)).await {
        Err(kiln_coordinator::Error::NameTaken { name, id }) => {
            assert_eq!((name.as_str(), id), ("foxes", first.id));
        }
        other => panic!("expected NameTaken, got {other:?}"),
    }
    assert!(
        !fx.queue
            .submit(named("foxes-b", false))
            .await
            .unwrap()
            .duplicate
    );
    fx.finish().await;
}

async fn release_returns_attempt_uncounted(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut sub = submission("release", vec![cell(0), cell(1)]);
    sub.max_attempts = Some(2);
    fx.queue.submit(sub).await.unwrap();
    let w = fx.worker("w").await;
    let leased = fx.queue.lease(w, 2, None).await.unwrap();
    let refs: Vec<_> = leased.iter().map(|c| (c.id, c.attempt)).collect();
    assert_eq!(fx.queue.release(w, &refs, true).await.unwrap(), 2);
    let w2 = fx.worker("w2").await;
    let again = fx.queue.lease(w2, 2, None).await.unwrap();
    assert_eq!(again.len(), 2);
    // A new attempt number, so the released worker's late writes (and its attempt-scoped
    // object keys) can never be taken for the new attempt's...
    assert!(
        again.iter().all(|c| c.attempt.0 == 2),
        "a released cell is leased again under a new attempt"
    );
    // ...but the release used none of the cell's attempts: with 2 allowed, a failure of the
    // first attempt that ran is retried, not discarded.
    let d = fx
        .queue
        .fail(
            fence(&again[0], w2),
            FailureClass::Transient,
            "storage down",
        )
        .await
        .unwrap();
    assert!(matches!(d, Decision::Retry { .. }), "{d:?}");
    // The released attempt's worker can no longer write.
    assert!(
        fx.queue
            .fail(fence(&leased[1], w), FailureClass::Transient, "late")
            .await
            .is_err()
    );
    let workers = fx.queue.workers().await.unwrap();
    assert!(workers.iter().find(|x| x.id == w).unwrap().drained);
    fx.finish().await;
}

async fn pause_holds_and_resume_releases(b: Backend) {
    let fx = Fixture::new(b).await;
    let sweep = submit_n(&fx, "pause", 4).await;
    let w = fx.worker("w").await;
    let running = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    assert_eq!(fx.queue.pause(sweep).await.unwrap(), 3);
    assert!(fx.queue.lease(w, 4, None).await.unwrap().is_empty());
    // A running cell finishes normally while paused.
    fx.queue.complete(fence(&running, w), RESULT).await.unwrap();
    let s = fx.queue.sweep(sweep).await.unwrap();
    assert_eq!(
        (s.state, s.counts.held, s.counts.completed),
        (SweepState::Paused, 3, 1)
    );
    assert_eq!(fx.queue.resume(sweep).await.unwrap(), 3);
    assert_eq!(fx.queue.lease(w, 4, None).await.unwrap().len(), 3);
    // Cancelled sweeps cannot be resumed.
    fx.queue.cancel(sweep).await.unwrap();
    assert!(matches!(
        fx.queue.resume(sweep).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        fx.queue.pause(SweepId(999_999)).await,
        Err(Error::SweepNotFound(_))
    ));
    fx.finish().await;
}

async fn affinity_and_capabilities_shape_leases(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut cells = Vec::new();
    for i in 0..6 {
        let mut c = cell(i);
        c.model = if i % 2 == 0 { "a".into() } else { "b".into() };
        cells.push(c);
    }
    let mut big = cell(100);
    big.width = 1024;
    big.height = 1024;
    cells.push(big.clone());
    fx.queue
        .submit(submission("affinity", cells.clone()))
        .await
        .unwrap();
    let key_b = cells[1].affinity_key();

    let w = fx.worker("w").await;
    let got = fx
        .queue
        .lease(w, 3, Some(std::slice::from_ref(&key_b)))
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|c| c.affinity_key == key_b),
        "loaded pipeline first"
    );

    // A worker that cannot render 1024x1024 never gets the big cell.
    let mut small = crate::harness::registration("small");
    small.max_pixels = 512 * 512;
    let s = fx.queue.register(&small).await.unwrap().0;
    let got = fx.queue.lease(s, 10, None).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|c| c.affinity_key != big.affinity_key()));
    let w2 = fx.worker("w2").await;
    let got = fx.queue.lease(w2, 10, None).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].affinity_key, big.affinity_key());
    fx.finish().await;
}

async fn affinity_never_starves_a_cold_head(b: Backend) {
    let cfg = QueueConfig {
        max_affinity_skips: 2,
        ..Default::default()
    };
    let fx = Fixture::with_config(b, cfg).await;
    let mut cold = cell(0);
    cold.model = "cold".into();
    let mut cells = vec![cold.clone()];
    cells.extend((1..10).map(cell));
    fx.queue
        .submit(submission("starve", cells.clone()))
        .await
        .unwrap();
    let warm = vec![cells[1].affinity_key()];
    let w = fx.worker("w").await;
    let mut keys = Vec::new();
    for _ in 0..4 {
        let c = fx.queue.lease(w, 1, Some(&warm)).await.unwrap().remove(0);
        keys.push(c.affinity_key == cold.affinity_key());
    }
    assert_eq!(
        keys,
        vec![false, false, true, false],
        "head taken after 2 skips"
    );
    fx.finish().await;
}

async fn queries_filter_sort_and_page(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut cells = Vec::new();
    for i in 0..20u64 {
        let mut c = cell(1000 + i);
        c.cfg = if i % 2 == 0 { 1.0 } else { 1.5 };
        c.prompt = if i < 10 {
            format!("a fox {i}")
        } else {
            format!("a cat {i}")
        };
        c.bindings
            .insert("animal".into(), if i < 10 { "fox" } else { "cat" }.into());
        cells.push(c);
    }
    let mut evil = cell(5);
    evil.prompt = "it's a \"fox\"; DROP TABLE cells; -- 100% _fox_ ✨ 狐".into();
    evil.bindings
        .insert("we\"ird' key".into(), "va'l\"ue; --".into());
    cells.push(evil);
    let sweep = fx
        .queue
        .submit(submission("query", cells))
        .await
        .unwrap()
        .id;
    let q = |f: &dyn Fn(&mut CellQuery)| {
        let mut q = CellQuery {
            sweep: Some(sweep),
            limit: 100,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    let n = |rows: Vec<_>| -> usize { Vec::len(&rows) };
    let run = |q: CellQuery| {
        let queue = fx.queue.clone();
        async move { queue.query(&q).await.unwrap() }
    };
    assert_eq!(n(run(q(&|_| {})).await), 21);
    assert_eq!(
        n(run(q(&|q| q.prompt_contains = Some("fox".into()))).await),
        11
    );
    assert_eq!(
        n(run(q(&|q| {
            q.bindings = vec![("animal".into(), "fox".into())];
            q.cfg_min = Some(1.5);
            q.seed_min = Some(1000);
            q.seed_max = Some(1005);
        }))
        .await),
        3
    );
    // Injection attempts are plain literals.
    let hit = run(q(&|q| {
        q.prompt_contains = Some("; DROP TABLE cells; --".into())
    }))
    .await;
    assert_eq!(hit.len(), 1);
    assert_eq!(
        n(run(q(&|q| q.prompt_contains = Some("100% _".into()))).await),
        1
    );
    assert_eq!(
        n(run(q(&|q| q.prompt_contains = Some("%".into()))).await),
        1,
        "no LIKE wildcards"
    );
    assert_eq!(
        n(run(q(&|q| q.prompt_contains = Some("狐".into()))).await),
        1
    );
    let b = run(q(&|q| {
        q.bindings = vec![("we\"ird' key".into(), "va'l\"ue; --".into())]
    }))
    .await;
    assert_eq!(b.len(), 1);
    assert_eq!(
        n(run(q(&|q| q.model = Some("x' OR '1'='1".into()))).await),
        0
    );
    // Sort and page.
    let page1 = run(q(&|q| {
        q.sort = CellSort::Seed;
        q.descending = true;
        q.limit = 5;
    }))
    .await;
    let page2 = run(q(&|q| {
        q.sort = CellSort::Seed;
        q.descending = true;
        q.limit = 5;
        q.offset = 5;
    }))
    .await;
    let seeds = |rows: &[kiln_coordinator::domain::rows::CellRow]| -> Vec<u64> {
        rows.iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.spec_json).unwrap()["seed"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(seeds(&page1), vec![1019, 1018, 1017, 1016, 1015]);
    assert_eq!(seeds(&page2), vec![1014, 1013, 1012, 1011, 1010]);
    assert_eq!(
        n(run(q(&|q| q.states = vec![CellState::Completed])).await),
        0
    );
    fx.finish().await;
}

async fn duplicate_cells_in_one_sweep_are_stored_once(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut cells: Vec<_> = (0..4).map(cell).collect();
    let mut dup = cell(2);
    dup.bindings.insert("from".into(), "elsewhere".into());
    cells.push(dup);
    let out = fx.queue.submit(submission("dups", cells)).await.unwrap();
    assert_eq!(out.cell_count, 4);
    fx.finish().await;
}

async fn reopen_keeps_everything(b: Backend) {
    let fx = Fixture::new(b).await;
    let sweep = submit_n(&fx, "reopen", 3).await;
    let w = fx.worker("w").await;
    let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    fx.queue.complete(fence(&c, w), RESULT).await.unwrap();
    fx.queue.store().close().await;
    let store = fx.db.store().await;
    let s = store.sweep_get(sweep).await.unwrap();
    assert_eq!((s.counts.completed, s.counts.available), (1, 2));
    store.close().await;
    fx.db.cleanup().await;
}

async fn complete_and_lease_returns_the_next_cells(b: Backend) {
    let fx = Fixture::new(b).await;
    let sweep = submit_n(&fx, "combined", 4).await;
    let w = fx.worker("w").await;
    let first = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    assert_eq!(first.number, 0);

    // Complete #0 and lease the next one in the same call, in queue order.
    let next = fx
        .queue
        .complete_and_lease(fence(&first, w), RESULT, 1, None)
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].number, next[0].attempt.0), (1, 1));
    let done = fx.queue.cell(first.id).await.unwrap();
    assert_eq!(done.state, CellState::Completed);
    assert_eq!(done.worker, Some(w));
    assert_eq!(done.result_json.as_deref(), Some(RESULT));
    let running = fx.queue.running(Some(sweep), Some(w)).await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].cell, next[0].id);

    // Up to `next` cells; then, with the queue empty, it completes and leases nothing.
    let more = fx
        .queue
        .complete_and_lease(fence(&next[0], w), RESULT, 5, None)
        .await
        .unwrap();
    assert_eq!(
        more.iter().map(|c| c.number).collect::<Vec<_>>(),
        vec![2, 3]
    );
    fx.queue.complete(fence(&more[0], w), RESULT).await.unwrap();
    let last = fx
        .queue
        .complete_and_lease(fence(&more[1], w), RESULT, 1, None)
        .await
        .unwrap();
    assert!(last.is_empty());
    let s = fx.queue.sweep(sweep).await.unwrap();
    assert_eq!(s.counts.completed, 4);
    assert!(s.counts.finished());
    // Zero next cells is a plain complete; too many is invalid and completes nothing.
    let sweep2 = submit_n(&fx, "combined-2", 2).await;
    let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    assert!(matches!(
        fx.queue
            .complete_and_lease(fence(&c, w), RESULT, 65, None)
            .await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(fx.queue.cell(c.id).await.unwrap().state, CellState::Running);
    let none = fx
        .queue
        .complete_and_lease(fence(&c, w), RESULT, 0, None)
        .await
        .unwrap();
    assert!(none.is_empty());
    let s = fx.queue.sweep(sweep2).await.unwrap();
    assert_eq!((s.counts.completed, s.counts.available), (1, 1));
    fx.finish().await;
}

async fn stale_complete_and_lease_is_rejected_and_leases_nothing(b: Backend) {
    let fx = Fixture::new(b).await;
    submit_n(&fx, "combined-stale", 1).await;
    let w1 = fx.worker("w1").await;
    let w2 = fx.worker("w2").await;
    let first = fx.queue.lease(w1, 1, None).await.unwrap().remove(0);

    // w1 goes silent past its lease; the cell is rescued and leased again by w2.
    fx.clock.advance(fx.queue.config().lease_ttl_ms + 1);
    assert_eq!(fx.queue.maintain().await.unwrap().rescued, 1);
    fx.clock.advance(60 * 60 * 1000);
    assert_eq!(fx.queue.maintain().await.unwrap().promoted, 1);
    let second = fx.queue.lease(w2, 1, None).await.unwrap().remove(0);
    assert_eq!((second.id, second.attempt.0), (first.id, 2));
    // Cells a wrongly accepted call could lease.
    let sweep = submit_n(&fx, "combined-stale-more", 2).await;
    let before = fx.queue.sweep(sweep).await.unwrap().counts;
    assert_eq!(before.available, 2);

    // The stale attempt's combined call: the same LeaseLost as a plain complete, no lease.
    let stale = fence(&first, w1);
    assert!(matches!(
        fx.queue.complete_and_lease(stale, RESULT, 2, None).await,
        Err(Error::LeaseLost { .. })
    ));
    // Right attempt, wrong worker: rejected too.
    let wrong = Fence {
        worker: w1,
        ..fence(&second, w2)
    };
    assert!(matches!(
        fx.queue.complete_and_lease(wrong, RESULT, 2, None).await,
        Err(Error::LeaseLost { .. })
    ));
    let after = fx.queue.sweep(sweep).await.unwrap().counts;
    assert_eq!(after, before, "a rejected call changes nothing");
    assert!(
        fx.queue.running(None, Some(w1)).await.unwrap().is_empty(),
        "the stale worker leased nothing"
    );
    let c = fx.queue.cell(first.id).await.unwrap();
    assert_eq!(
        (c.state, c.attempt, c.worker),
        (CellState::Running, 2, Some(w2))
    );

    // The winner's call works, and its own second call is stale.
    let next = fx
        .queue
        .complete_and_lease(fence(&second, w2), RESULT, 1, None)
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert!(matches!(
        fx.queue
            .complete_and_lease(fence(&second, w2), RESULT, 1, None)
            .await,
        Err(Error::LeaseLost { .. })
    ));
    assert_eq!(fx.queue.running(None, Some(w2)).await.unwrap().len(), 1);
    fx.finish().await;
}

async fn complete_and_lease_honours_capabilities_and_affinity(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut cells = Vec::new();
    let mut big = cell(100);
    big.width = 1024;
    big.height = 1024;
    cells.push(big.clone());
    for i in 0..6 {
        let mut c = cell(i);
        c.model = if i % 2 == 0 { "a".into() } else { "b".into() };
        cells.push(c);
    }
    fx.queue
        .submit(submission("combined-caps", cells.clone()))
        .await
        .unwrap();
    let key_b = cells[2].affinity_key();

    // A worker that cannot render 1024x1024 never gets the big cell at the queue head.
    let mut small = crate::harness::registration("small");
    small.max_pixels = 512 * 512;
    let s = fx.queue.register(&small).await.unwrap().0;
    let first = fx.queue.lease(s, 1, None).await.unwrap().remove(0);
    assert_ne!(first.affinity_key, big.affinity_key());
    // With model "b" loaded, the combined lease prefers the "b" cells.
    let next = fx
        .queue
        .complete_and_lease(
            fence(&first, s),
            RESULT,
            2,
            Some(std::slice::from_ref(&key_b)),
        )
        .await
        .unwrap();
    assert_eq!(next.len(), 2);
    assert!(
        next.iter().all(|c| c.affinity_key == key_b),
        "loaded pipeline first"
    );
    let mut left = next;
    let mut taken = 3;
    while let Some(c) = left.pop() {
        let got = fx
            .queue
            .complete_and_lease(fence(&c, s), RESULT, 1, None)
            .await
            .unwrap();
        assert!(got.iter().all(|c| c.affinity_key != big.affinity_key()));
        taken += got.len();
        left.extend(got);
    }
    assert_eq!(taken, 6, "every small cell, never the big one");
    let w = fx.worker("w").await;
    let got = fx.queue.lease(w, 10, None).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].affinity_key, big.affinity_key());
    fx.finish().await;
}

/// The dispatcher reads the queue ahead (`queue::dispatch`); cells that become available ahead
/// of what it has read (a higher-priority sweep, a released cell) must still come first.
async fn lease_sees_cells_queued_ahead_of_its_read_ahead(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut mid = submission("mid", (0..20).map(cell).collect());
    mid.priority = 5;
    fx.queue.submit(mid).await.unwrap();
    let w = fx.worker("w").await;
    let first = fx.queue.lease(w, 1, None).await.unwrap();
    assert_eq!(first.len(), 1);

    let mut urgent = submission("urgent", vec![cell(1_000)]);
    urgent.priority = 0;
    let mut low = submission("low2", vec![cell(2_000)]);
    low.priority = 9;
    let low_id = fx.queue.submit(low).await.unwrap().id;
    let urgent_id = fx.queue.submit(urgent).await.unwrap().id;
    let next = fx.queue.lease(w, 1, None).await.unwrap();
    assert_eq!(
        next[0].sweep_id, urgent_id,
        "the priority-0 sweep goes first"
    );

    // A released cell is back at its old place: before the rest of its sweep.
    let n = fx
        .queue
        .release(w, &[(first[0].id, first[0].attempt)], false)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let again = fx.queue.lease(w, 1, None).await.unwrap();
    assert_eq!(
        again[0].id, first[0].id,
        "the released cell is leased again first"
    );
    assert_ne!(again[0].sweep_id, low_id);
    fx.finish().await;
}

/// More big cells than the dispatcher reads ahead, then small ones: a worker that can only
/// render the small ones still gets them, in queue order.
async fn small_worker_is_served_past_a_read_ahead_of_big_cells(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut cells: Vec<_> = (0..1_100)
        .map(|i| {
            let mut c = cell(i);
            c.width = 1024;
            c.height = 1024;
            c
        })
        .collect();
    cells.extend((5_000..5_003).map(cell));
    let sweep = fx
        .queue
        .submit(submission("big-first", cells))
        .await
        .unwrap()
        .id;
    // More cells than one intake chunk: have them all in the queue before leasing.
    fx.queue.take_in(None).await.unwrap();
    let big = fx.worker("big").await;
    let got = fx.queue.lease(big, 1, None).await.unwrap();
    assert_eq!(got[0].number, 0, "a big worker takes the head");

    let mut small = crate::harness::registration("small");
    small.max_pixels = 512 * 512;
    let s = fx.queue.register(&small).await.unwrap().0;
    let got = fx.queue.lease(s, 2, None).await.unwrap();
    let numbers: Vec<i64> = got.iter().map(|c| c.number).collect();
    assert_eq!(numbers, vec![1_100, 1_101]);
    let got = fx.queue.lease(s, 2, None).await.unwrap();
    let numbers: Vec<i64> = got.iter().map(|c| c.number).collect();
    assert_eq!(
        numbers,
        vec![1_102],
        "then the last small cell, and nothing big"
    );
    assert!(fx.queue.lease(s, 2, None).await.unwrap().is_empty());
    let s = fx.queue.sweep(sweep).await.unwrap();
    assert_eq!(s.counts.running, 4);
    fx.finish().await;
}

/// The store, not the dispatcher, decides: two coordinators (two queues with separate
/// read-aheads) leasing from one database at once still never hand out one cell twice.
async fn two_coordinators_on_one_database_never_share_a_cell(b: Backend) {
    let fx = Fixture::new(b).await;
    submit_n(&fx, "shared", 200).await;
    let other = kiln_coordinator::queue::Queue::new(
        fx.db.store().await,
        Arc::new(fx.clock.clone()),
        QueueConfig::default(),
    );
    let ever: Arc<Mutex<Vec<i64>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let queue = if w % 2 == 0 {
            fx.queue.clone()
        } else {
            other.clone()
        };
        let worker = fx.worker(&format!("w{w}")).await;
        let ever = ever.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let leased = queue.lease(worker, 1 + (w % 2), None).await.unwrap();
                if leased.is_empty() {
                    break;
                }
                for c in &leased {
                    ever.lock().unwrap().push(c.id.0);
                    queue.complete(fence(c, worker), RESULT).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ever = ever.lock().unwrap().clone();
    let distinct: HashSet<i64> = ever.iter().copied().collect();
    assert_eq!(
        (ever.len(), distinct.len()),
        (200, 200),
        "each cell leased once"
    );
    other.store().close().await;
    fx.finish().await;
}

/// A change the dispatcher was not told of (another coordinator's submit) is seen within
/// `dispatch::REFRESH_MS`, and a stale read-ahead never leases a cell that is no longer
/// available.
async fn read_ahead_catches_up_with_changes_it_was_not_told_of(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut low = submission("low", (0..5).map(cell).collect());
    low.priority = 5;
    fx.queue.submit(low).await.unwrap();
    let w = fx.worker("w").await;
    assert_eq!(fx.queue.lease(w, 1, None).await.unwrap().len(), 1);

    let other = kiln_coordinator::queue::Queue::new(
        fx.db.store().await,
        Arc::new(fx.clock.clone()),
        QueueConfig::default(),
    );
    // The other coordinator leases two of the cells this one has read ahead, then submits.
    let o = other
        .register(&crate::harness::registration("o"))
        .await
        .unwrap()
        .0;
    let taken: HashSet<i64> = other
        .lease(o, 2, None)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id.0)
        .collect();
    assert_eq!(taken.len(), 2);
    let urgent = other
        .submit(submission("urgent", vec![cell(99)]))
        .await
        .unwrap()
        .id;

    let next = fx.queue.lease(w, 1, None).await.unwrap();
    assert!(
        !taken.contains(&next[0].id.0),
        "never a cell another coordinator holds"
    );
    fx.clock
        .advance(kiln_coordinator::queue::dispatch::REFRESH_MS);
    let mut seen_urgent = false;
    for _ in 0..3 {
        for c in fx.queue.lease(w, 1, None).await.unwrap() {
            assert!(!taken.contains(&c.id.0));
            seen_urgent |= c.sweep_id == urgent;
        }
    }
    assert!(
        seen_urgent,
        "the other coordinator's sweep is seen after a refresh"
    );
    other.store().close().await;
    fx.finish().await;
}

async fn odd_text_and_out_of_range_numbers_are_invalid_on_both_backends(b: Backend) {
    let fx = Fixture::new(b).await;
    fn invalid<T: std::fmt::Debug>(r: Result<T, Error>, field: &str) {
        match r {
            Err(Error::Invalid(m)) => assert!(m.contains(&format!("{field}: ")), "{field}: {m}"),
            other => panic!("{field}: expected invalid, got {other:?}"),
        }
    }
    let mut nul_prompt = cell(1);
    nul_prompt.prompt = "a fox\0".into();
    invalid(
        fx.queue.submit(submission("nul", vec![nul_prompt])).await,
        "prompt",
    );
    let mut nul_binding = cell(1);
    nul_binding.bindings.insert("animal".into(), "fox\0".into());
    invalid(
        fx.queue.submit(submission("nulb", vec![nul_binding])).await,
        "bindings.animal",
    );
    let mut huge_memory = cell(1);
    huge_memory.min_memory_mib = u64::MAX;
    invalid(
        fx.queue.submit(submission("mem", vec![huge_memory])).await,
        "min_memory_mib",
    );
    let mut nul_name = submission("nuln", vec![cell(1)]);
    nul_name.name = "zoo\0".into();
    invalid(fx.queue.submit(nul_name).await, "name");
    invalid(fx.queue.submit(submission("empty", vec![])).await, "cells");
    let mut reg = crate::harness::registration("w");
    reg.name = "w\0".into();
    invalid(fx.queue.register(&reg).await, "info.name");
    // Nothing of the above was stored.
    assert!(fx.queue.sweeps(10, None, None).await.unwrap().is_empty());

    // A worker's failure text is kept, with NUL replaced, on both backends alike.
    submit_n(&fx, "ok", 1).await;
    let w = fx.worker("w").await;
    let c = fx.queue.lease(w, 1, None).await.unwrap().remove(0);
    fx.queue
        .fail(fence(&c, w), FailureClass::BadInput, "bad\0file")
        .await
        .unwrap();
    let errors: Vec<serde_json::Value> =
        serde_json::from_str(&fx.queue.cell(c.id).await.unwrap().errors_json).unwrap();
    assert_eq!(errors[0]["message"], "bad\u{FFFD}file");
    fx.finish().await;
}
