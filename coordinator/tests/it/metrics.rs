//! The coordinator's `/metrics` on both backends: counters move where events happen (leases,
//! completes, failures by class, expired leases), the gauges read from the store say what the
//! queue holds (cells per state of the newest sweeps only, of the caller's owner only; workers
//! online, offline and drained; the oldest available cell's age).

use kiln_coordinator::clock::Millis;
use kiln_coordinator::domain::auth::Principal;
use kiln_coordinator::domain::lease::Fence;
use kiln_coordinator::domain::state::{FailureClass, Scope};
use kiln_coordinator::metrics::scrape;
use kiln_coordinator::store::Store;

use crate::harness::{Backend, Fixture, cell, submission};

conformance!(
    counters_move_with_events_and_gauges_read_the_store,
    only_the_newest_sweeps_and_the_callers_own_are_shown,
);

const RESULT: &str = r#"{"object_key":"k","sha256":"00"}"#;

/// The value of the series `series` (name and labels exactly as exposed).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
        .parse()
        .unwrap()
}

fn cells(sweep: i64, name: &str, state: &str) -> String {
    format!("kiln_coordinator_sweep_cells{{sweep=\"{sweep}\",name=\"{name}\",state=\"{state}\"}}")
}

async fn counters_move_with_events_and_gauges_read_the_store(b: Backend) {
    let fx = Fixture::new(b).await;
    let sweep = fx
        .queue
        .submit(submission("m", (0..4).map(cell).collect()))
        .await
        .unwrap()
        .id;
    let name = fx.queue.sweep(sweep).await.unwrap().name;
    let (w1, w2, w3) = (
        fx.worker("w1").await,
        fx.worker("w2").await,
        fx.worker("w3").await,
    );
    fx.queue.release(w3, &[], true).await.unwrap();
    let open = Principal::open();
    let text = scrape(&fx.queue, &open).await.unwrap();
    assert_eq!(value(&text, "kiln_coordinator_leases_total"), 0.0);
    assert_eq!(value(&text, &cells(sweep.0, &name, "available")), 4.0);
    assert_eq!(
        value(&text, "kiln_coordinator_workers{state=\"online\"}"),
        2.0
    );
    assert_eq!(
        value(&text, "kiln_coordinator_workers{state=\"drained\"}"),
        1.0
    );

    fx.clock.advance(2_500);
    let text = scrape(&fx.queue, &open).await.unwrap();
    assert_eq!(
        value(&text, "kiln_coordinator_oldest_available_age_seconds"),
        2.5
    );

    let leased = fx.queue.lease(w1, 2, None).await.unwrap();
    let fence = |i: usize, worker| Fence {
        cell: leased[i].id,
        attempt: leased[i].attempt,
        worker,
    };
    fx.queue.complete(fence(0, w1), RESULT).await.unwrap();
    fx.queue
        .fail(fence(1, w1), FailureClass::BadInput, "no such model")
        .await
        .unwrap();
    let lost = fx.queue.lease(w2, 1, None).await.unwrap();
    assert_eq!(lost.len(), 1);
    // w2 goes silent past its lease: the maintenance pass rescues the cell.
    fx.clock.advance(61_000);
    fx.queue.heartbeat(w1, &[], None).await.unwrap();
    assert_eq!(fx.queue.maintain().await.unwrap().rescued, 1);

    let text = scrape(&fx.queue, &open).await.unwrap();
    assert_eq!(value(&text, "kiln_coordinator_leases_total"), 3.0);
    assert_eq!(value(&text, "kiln_coordinator_completes_total"), 1.0);
    for (class, n) in [
        ("bad_input", 1.0),
        ("lease_expired", 1.0),
        ("transient", 0.0),
    ] {
        let series = format!("kiln_coordinator_failures_total{{class=\"{class}\"}}");
        assert_eq!(value(&text, &series), n, "{class}");
    }
    for (state, n) in [
        ("completed", 1.0),
        ("discarded", 1.0),
        ("retryable", 1.0),
        ("available", 1.0),
        ("running", 0.0),
    ] {
        assert_eq!(value(&text, &cells(sweep.0, &name, state)), n, "{state}");
    }
    for (state, n) in [("online", 1.0), ("offline", 1.0), ("drained", 1.0)] {
        let series = format!("kiln_coordinator_workers{{state=\"{state}\"}}");
        assert_eq!(value(&text, &series), n, "{state}");
    }
    // The one available cell has waited since the submission.
    assert_eq!(
        value(&text, "kiln_coordinator_oldest_available_age_seconds"),
        63.5
    );
    fx.finish().await;
}

async fn only_the_newest_sweeps_and_the_callers_own_are_shown(b: Backend) {
    let fx = Fixture::new(b).await;
    let mut ids = Vec::new();
    for (key, owner) in [("a", None), ("b", Some("ann")), ("c", None)] {
        let mut s = submission(key, vec![cell(1), cell(2)]);
        s.owner = owner.map(str::to_owned);
        ids.push(fx.queue.submit(s).await.unwrap().id);
    }
    let store: &Store = fx.queue.store();
    let snap = store.farm_snapshot(2, None, Millis(0)).await.unwrap();
    let shown: Vec<_> = snap.sweeps.iter().map(|s| s.id).collect();
    assert_eq!(shown, ids[1..].to_vec(), "the newest two, oldest first");
    assert!(snap.sweeps.iter().all(|s| s.counts.available == 2));
    let snap = store
        .farm_snapshot(20, Some("ann"), Millis(0))
        .await
        .unwrap();
    let shown: Vec<_> = snap.sweeps.iter().map(|s| s.id).collect();
    assert_eq!(shown, vec![ids[1]]);

    // A read token's scrape shows its owner's sweeps only; a worker token may not scrape.
    let ann = Principal::token("ann".into(), Scope::Read);
    let text = scrape(&fx.queue, &ann).await.unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("kiln_coordinator_sweep_cells{"))
        .collect::<Vec<_>>();
    assert!(
        series
            .iter()
            .all(|l| l.contains(&format!("sweep=\"{}\"", ids[1].0))),
        "{text}"
    );
    assert!(!series.is_empty());
    let worker = Principal::token("farm".into(), Scope::Worker);
    assert!(scrape(&fx.queue, &worker).await.is_err());
    fx.finish().await;
}
