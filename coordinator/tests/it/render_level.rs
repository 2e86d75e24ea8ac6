//! Render levels on both backends: a worker is never leased a cell that needs features it
//! does not understand (k-diffusion samplers, variation seeds, NV noise), and such a cell waits
//! for a worker that does, untouched; samplers are stored and queried by their kiln names.

use kiln_coordinator::domain::lease::LeasePick;
use kiln_coordinator::domain::state::CellState;
use kiln_coordinator::query::Filter;
use kiln_coordinator::store::CellQuery;
use kiln_coordinator::sweep::CellSpec;
use kiln_proto::sampler::{RENDER_LEVEL, SamplerName};

use crate::harness::{Backend, Fixture, cell, registration, submission};

conformance!(
    an_older_worker_is_not_leased_a_newer_cell,
    samplers_are_stored_and_queried_by_kiln_name,
);

/// A cell only a level-1 worker renders.
fn level_one(seed: u64) -> CellSpec {
    let mut c = cell(seed);
    c.sampler = "DPM++ 2S a Karras".parse().unwrap();
    c.steps = 20;
    assert_eq!(c.render_level(), 1);
    c
}

async fn all_cells(fx: &Fixture) -> Vec<kiln_coordinator::domain::rows::CellRow> {
    fx.queue
        .query(&CellQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn an_older_worker_is_not_leased_a_newer_cell(backend: Backend) {
    let fx = Fixture::new(backend).await;
    // The level-1 cells come first in queue order: the old worker must look past them.
    let mut nv = cell(3);
    nv.rng = "nv".into();
    let mut varied = cell(4);
    (varied.subseed, varied.subseed_strength) = (9, 0.5);
    let cells = vec![level_one(1), nv, varied, cell(2)];
    fx.queue.submit(submission("levels", cells)).await.unwrap();
    let mut old_info = registration("old");
    old_info.render_level = 0;
    let old = fx.queue.register(&old_info).await.unwrap().0;
    let new = fx.worker("new").await;
    let levels: Vec<_> = fx
        .queue
        .workers()
        .await
        .unwrap()
        .iter()
        .map(|w| w.info.render_level)
        .collect();
    assert_eq!(levels, [0, RENDER_LEVEL]);

    let got = fx.queue.lease(old, 4, None).await.unwrap();
    let seeds: Vec<u64> = got
        .iter()
        .map(|c| serde_json::from_str::<CellSpec>(&c.spec_json).unwrap().seed)
        .collect();
    assert_eq!(seeds, [2], "the level-0 worker gets only the LCM cell");
    assert!(fx.queue.lease(old, 4, None).await.unwrap().is_empty());

    // The store is the arbiter too: a pick naming level-1 cells for a level-0 worker (a stale
    // read-ahead, another coordinator) leases none of them, alone or in a batch.
    let waiting: Vec<i64> = all_cells(&fx)
        .await
        .iter()
        .filter(|c| c.state == CellState::Available)
        .map(|c| c.id.0)
        .collect();
    assert_eq!(waiting.len(), 3);
    let pick = LeasePick {
        worker: old,
        ids: waiting.clone(),
        head: None,
        lease_ttl_ms: 60_000,
        render_level: 0,
    };
    let store = fx.queue.store();
    let now = fx.queue.now();
    assert!(store.cell_lease(&pick, now).await.unwrap().is_empty());
    let batch = store.cell_lease_many(&[(pick, now)]).await.unwrap();
    assert!(batch[0].is_empty());

    // Nothing was failed, retried or discarded: the cells wait, untouched, for the new worker.
    for c in all_cells(&fx)
        .await
        .iter()
        .filter(|c| waiting.contains(&c.id.0))
    {
        assert_eq!(c.state, CellState::Available, "cell {}", c.id.0);
        assert_eq!((c.attempt, c.errors_json.as_str()), (0, "[]"));
    }
    let got = fx.queue.lease(new, 4, None).await.unwrap();
    let mut ids: Vec<i64> = got.iter().map(|c| c.id.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, waiting, "the level-1 worker gets them all");
    fx.finish().await;
}

async fn samplers_are_stored_and_queried_by_kiln_name(backend: Backend) {
    let fx = Fixture::new(backend).await;
    let mut euler_a = cell(3);
    euler_a.sampler = "Euler a".parse().unwrap();
    let mut diffusers = cell(4);
    diffusers.sampler = SamplerName::EULER_A_DIFFUSERS;
    let cells = vec![cell(1), level_one(2), euler_a, diffusers, level_one(5)];
    fx.queue
        .submit(submission("samplers", cells))
        .await
        .unwrap();
    let run = |filter: &'static str| {
        let fx = &fx;
        async move {
            let mut seeds: Vec<u64> = fx
                .queue
                .query(&CellQuery {
                    filter: Some(Filter::parse(filter).unwrap()),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{filter}: {e}"))
                .iter()
                .map(|r| serde_json::from_str::<CellSpec>(&r.spec_json).unwrap().seed)
                .collect();
            seeds.sort_unstable();
            seeds
        }
    };
    assert_eq!(run(r#"sampler = "dpmpp_2s_a_karras""#).await, [2, 5]);
    assert_eq!(run(r#"sampler = "euler_a""#).await, [3]);
    assert_eq!(run(r#"sampler = "euler_a_diffusers""#).await, [4]);
    assert_eq!(run(r#"sampler = "lcm""#).await, [1]);
    let stored = all_cells(&fx).await;
    let spec = stored
        .iter()
        .find(|c| c.spec_json.contains("karras"))
        .unwrap();
    assert!(
        spec.spec_json.contains(r#""sampler":"dpmpp_2s_a_karras""#),
        "{}",
        spec.spec_json
    );
    fx.finish().await;
}
