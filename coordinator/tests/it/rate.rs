//! The rate `kiln watch` shows: cells finished per second over the last minute, or over the
//! sweep's life when it is younger (a sweep that ends in 3 s shows its real rate, not a
//! sixtieth of it).

use kiln_coordinator::domain::lease::Fence;

use crate::harness::{Backend, Fixture, cell, submission};

conformance!(a_young_sweep_rates_over_its_life);

async fn a_young_sweep_rates_over_its_life(b: Backend) {
    let fx = Fixture::new(b).await;
    let worker = fx.worker("w").await;
    let sweep = fx
        .queue
        .submit(submission("quick", (0..8).map(cell).collect()))
        .await
        .unwrap();
    let created = fx.queue.sweep(sweep.id).await.unwrap().created_at;
    fx.clock.advance(3_000);
    for c in fx.queue.lease(worker, 8, None).await.unwrap() {
        let fence = Fence {
            cell: c.id,
            attempt: c.attempt,
            worker,
        };
        fx.queue
            .complete(fence, r#"{"object_key":"k","sha256":"00"}"#)
            .await
            .unwrap();
    }
    let rate = |fx: &Fixture| {
        let queue = fx.queue.clone();
        async move {
            queue
                .sweep_rate(sweep.id, kiln_coordinator::clock::Millis(created))
                .await
                .unwrap()
        }
    };
    // 8 cells in the sweep's first 3 s.
    let young = rate(&fx).await;
    assert!((young - 8.0 / 3.0).abs() < 1e-9, "{young}");
    // Two minutes on, the window is the last minute, in which nothing finished.
    fx.clock.advance(120_000);
    assert_eq!(rate(&fx).await, 0.0);
    fx.finish().await;
}
